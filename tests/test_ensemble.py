"""Self-ensemble generation against slow references (tiny random model, BPE tokenizer
built with ``tokenizers``). Token ids are compared exactly; hidden states to 1e-5."""

from __future__ import annotations

import json

import pytest
import torch

from flexsparse import SegmentLayout
from flexsparse.cli import main as cli_main
from flexsparse.ensemble import (
    SelfEnsemble,
    contains_answer,
    exact_match,
    segments_batch_mask,
    token_f1,
)
from flexsparse.models import llama, tiny

pytest.importorskip("transformers")

QUESTIONS = [
    ["What is the capital of France?", "Which city is the capital of France?",
     "Name the French capital city."],
    ["How many legs does a spider have?", "A spider has how many legs?"],
]
PREFIX = "Answer the question in a few words."


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny.save_tiny(tmp_path_factory.mktemp("ens") / "chat", "llama", chat_template=True)


@pytest.fixture(scope="module")
def loaded(model_dir):
    return tiny.load(model_dir)


@pytest.fixture(scope="module")
def eager(model_dir):
    return tiny.load(model_dir, attn_implementation="eager")[0]


def seg_dense(layout: SegmentLayout, n: int) -> torch.Tensor:
    """Segment isolation by definition (independent of the library's mask code)."""
    ids = layout.segment_ids(n)
    q, kv = ids[:, None], ids[None, :]
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    return causal & ((kv == 0) | (q == kv) | (q == layout.suffix_id))


def slow_flex(model, prompt_ids, layout, mode, steps):
    """Recompute the whole sequence each step: unpatched eager model, explicit additive
    segment mask and the same position ids."""
    seq = list(prompt_ids)
    out = []
    with torch.no_grad():
        for _ in range(steps):
            n = len(seq)
            lowest = torch.finfo(torch.float32).min
            add = torch.zeros(n, n).masked_fill(~seg_dense(layout, n), lowest)[None, None]
            pos = layout.position_ids(mode, length=n)[None]
            logits = model(torch.tensor([seq]), attention_mask=add, position_ids=pos).logits
            tok = int(logits[0, -1].argmax())
            out.append(tok)
            seq.append(tok)
    return out


def plain_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0, -1]


def no_eos(ens):
    ens.eos_ids = set()  # random weights: compare full-length generations
    return ens


@pytest.mark.parametrize("mode", ["aligned", "continuous"])
def test_flex_equals_slow_reference(loaded, eager, mode):
    model, tok = loaded
    ens = no_eos(SelfEnsemble(model, tok, position_mode=mode))
    steps = 6
    results = ens.generate_batch(QUESTIONS, prefix=PREFIX, max_new_tokens=steps)
    single = ens.generate(QUESTIONS[0], prefix=PREFIX, max_new_tokens=steps)
    for q, res in zip(QUESTIONS, results):
        pk = ens.pack(q, PREFIX)
        assert res.layout == pk.layout and res.prompt_ids == pk.ids
        ref = slow_flex(eager, pk.ids, pk.layout, mode, steps)
        assert res.token_ids == ref
    assert single.token_ids == results[0].token_ids  # batch (left padded) == alone
    assert not llama.is_patched(model)  # restored after the call
    assert len(single.timing["step_s"]) == steps - 1 and single.timing["prefill_s"] > 0


def test_isolation_holds_and_answer_depends_on_every_segment(loaded):
    model, tok = loaded
    ens = SelfEnsemble(model, tok)
    pk = ens.pack(QUESTIONS[0], PREFIX)
    lay = pk.layout
    b = lay.bounds  # starts of prefix, seg1, seg2, seg3, suffix, end
    pos = lay.position_ids("aligned")[None]

    def run(ids):
        with torch.no_grad(), llama.masked(model, segments_batch_mask([lay])):
            out = model(torch.tensor([ids]), position_ids=pos, output_hidden_states=True)
        return out.hidden_states[-1][0], out.logits[0, -1]

    base_h, base_logits = run(pk.ids)
    for seg in (1, 2):  # alter segment 2, then segment 3 (same lengths)
        ids = list(pk.ids)
        for i in range(b[seg + 1], b[seg + 2]):
            ids[i] = (ids[i] + 7) % 390 + 4
        h, logits = run(ids)
        untouched = [i for i in range(b[-2]) if not b[seg + 1] <= i < b[seg + 2]]
        torch.testing.assert_close(h[untouched], base_h[untouched], atol=1e-5, rtol=0)
        assert (h[b[seg + 1]:b[seg + 2]] - base_h[b[seg + 1]:b[seg + 2]]).abs().max() > 1e-3
        assert (logits - base_logits).abs().max() > 1e-3  # the answer reads every segment


@pytest.mark.parametrize("method", ["avg", "max"])
def test_avg_max_equal_definition(loaded, method):
    model, tok = loaded
    ens = no_eos(SelfEnsemble(model, tok))
    steps = 4
    res = ens.generate_batch(QUESTIONS, prefix=PREFIX, max_new_tokens=steps, method=method)
    for q, r in zip(QUESTIONS, res):
        pk = ens.pack(q, PREFIX)
        prompts = [pk.single(i) for i in range(len(q))]
        ref = []
        for _ in range(steps):
            logits = torch.stack([plain_logits(model, p) for p in prompts])
            pooled = logits.mean(0) if method == "avg" else logits.max(0).values
            t = int(pooled.argmax())
            ref.append(t)
            prompts = [p + [t] for p in prompts]
        assert r.token_ids == ref


def test_per_prompt_and_origin(loaded):
    model, tok = loaded
    ens = no_eos(SelfEnsemble(model, tok))
    pp = ens.generate(QUESTIONS[0], prefix=PREFIX, max_new_tokens=4, method="per_prompt")
    origin = ens.generate(QUESTIONS[0], prefix=PREFIX, max_new_tokens=4, method="origin")
    pk = ens.pack(QUESTIONS[0], PREFIX)
    ref = list(pk.single(0))
    for _ in range(4):
        ref.append(int(plain_logits(model, ref).argmax()))
    assert origin.token_ids == ref[len(pk.single(0)):]
    assert len(pp.candidates) == 3 and pp.candidates[0] == origin.text
    assert pp.text in pp.candidates


def test_token_bookkeeping(loaded):
    model, tok = loaded
    ens = SelfEnsemble(model, tok, separator="\n\n")
    pk = ens.pack(["Who wrote it?", "Name the writer."], prefix="Be brief.", suffix="Answer:")
    enc = lambda s: tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    head = "<s><|user|>\n"
    tail = "\n<|assistant|>\n"
    expect_prefix = enc(head) + enc("Be brief.") + enc("\n\n")
    segs = [enc("Who wrote it?") + enc("\n\n"), enc("Name the writer.") + enc("\n\n")]
    expect_suffix = enc("Answer:") + enc(tail)
    assert pk.ids == expect_prefix + segs[0] + segs[1] + expect_suffix
    assert pk.layout == SegmentLayout(len(expect_prefix), [len(s) for s in segs],
                                      len(expect_suffix))
    # each segment decodes to its paraphrase plus the separator it ends with
    b = pk.layout.bounds
    assert tok.decode(pk.ids[b[1]:b[2]]) == "Who wrote it?\n\n"
    assert tok.decode(pk.ids) == head + "Be brief.\n\nWho wrote it?\n\nName the writer.\n\n" \
        "Answer:" + tail
    assert [p[0] for p in pk.pieces] == ["template", "prefix", "seg 1", "seg 2", "suffix",
                                         "template"]
    plain = SelfEnsemble(model, tiny.build_tokenizer(), chat_template=None)
    assert plain.pack(["Hi there"]).ids[0] == 1  # BOS without a template
    with pytest.raises(ValueError, match=r"paraphrases\[1\]"):
        ens.pack(["ok", "  "])
    with pytest.raises(ValueError, match="method must be one of"):
        ens.generate(["ok"], method="vote")


def test_stopping_rules(loaded):
    model, tok = loaded
    ens = no_eos(SelfEnsemble(model, tok))
    free = ens.generate(QUESTIONS[1], max_new_tokens=6)
    first = free.token_ids[0]
    ens.eos_ids = {free.token_ids[2]}
    stopped = ens.generate(QUESTIONS[1], max_new_tokens=6)
    assert stopped.token_ids == free.token_ids[:2]
    text = tok.decode(free.token_ids[:3], skip_special_tokens=True)
    ens.eos_ids = set()
    if text.strip():
        by_string = ens.generate(QUESTIONS[1], max_new_tokens=6, stop=[text.strip()[-1]])
        assert len(by_string.token_ids) <= 3 and text.strip()[-1] not in by_string.text
    from flexsparse.ensemble import _Stopper

    s = _Stopper(tok, {2}, ["END"], True)
    ids = []
    for t in tok("yes it is\nmore", add_special_tokens=False)["input_ids"]:
        if s.push(ids, t):
            break
    assert s.text(ids) == "yes it is"
    assert s.push([], 2) is True and first >= 0


def test_batch_mask_matches_definition():
    lays = [SegmentLayout(2, [3, 2], 1), SegmentLayout(1, [2, 2, 2], 2)]
    m = segments_batch_mask(lays, heads=2)
    n = 14  # past both layouts: generated tokens belong to the suffix
    dense = m.to_dense(n, n)
    for b, lay in enumerate(lays):
        assert torch.equal(dense[b, 0], seg_dense(lay, n)) and torch.equal(dense[b, 1], dense[b, 0])
    try:
        from flexsparse.masks import segments
    except ImportError:
        return
    one = segments(lays[0])
    if one.length is None:
        assert torch.equal(one.to_dense(n, n), seg_dense(lays[0], n))
    else:
        assert torch.equal(one.to_dense(), seg_dense(lays[0], lays[0].length))


def test_metrics():
    assert exact_match("The Paris.", ["paris"]) == 1.0
    assert exact_match("Paris, France", ["Paris"]) == 0.0
    assert token_f1("Paris France", ["Paris"]) == pytest.approx(2 / 3)
    assert contains_answer("it is Paris, France", ["paris"]) == 1.0
    assert contains_answer("Parisian", ["paris"]) == 0.0


def _write(path, lines):
    path.write_text("".join(line + "\n" for line in lines))


def test_cli_resume_bad_lines_and_output_kept(model_dir, tmp_path, capsys):
    inp, out = tmp_path / "q.jsonl", tmp_path / "a.jsonl"
    good = [json.dumps({"id": f"q{i}", "paraphrases": p, "answers": ["Paris"]})
            for i, p in enumerate(QUESTIONS)]
    _write(inp, [good[0], "{not json", json.dumps({"id": "x", "paraphrases": []}), good[1],
                 json.dumps({"id": "q0", "paraphrases": ["dup"]})])
    # an earlier run answered q0 and crashed mid-line: both must survive
    previous = json.dumps({"id": "q0", "method": "flex", "prediction": "Paris",
                           "timing": {"total_s": 1.0, "batch_size": 1}})
    out.write_text(previous + "\n" + '{"id": "cut')
    argv = ["ensemble", "--model", str(model_dir), "--input", str(inp), "--output", str(out),
            "--method", "flex", "--max-new-tokens", "3", "--no-progress", "--paraphrases", "2"]
    assert cli_main(argv) == 0
    err = capsys.readouterr()
    assert f"{inp}:2: skipped: not valid JSON" in err.err
    assert f"{inp}:3: skipped: 'paraphrases'" in err.err
    assert f"{inp}:5: skipped: duplicate id 'q0'" in err.err
    lines = out.read_text().splitlines()
    assert lines[0] == previous and lines[1] == '{"id": "cut'  # nothing lost
    new = [json.loads(line) for line in lines[2:]]
    assert [r["id"] for r in new] == ["q1"]  # q0 resumed, not redone
    assert new[0]["method"] == "flex" and new[0]["paraphrases"] == 2
    assert "| exact_match | 0.5000 |" in err.out  # q0 "Paris" counts, q1 (random) does not
    assert cli_main(argv) == 0  # nothing left to do: file unchanged
    assert out.read_text().splitlines() == lines
    assert cli_main(["ensemble", "--input", str(inp)]) == 2


def _cli_argv(model_dir, inp, out, method):
    return ["ensemble", "--model", str(model_dir), "--input", str(inp), "--output", str(out),
            "--method", method, "--max-new-tokens", "2", "--no-progress", "--paraphrases", "2"]


def _records(out):
    return [json.loads(line) for line in out.read_bytes().decode("utf-8").splitlines()]


def test_cli_resume_is_per_method_and_survives_a_cut_utf8_line(model_dir, tmp_path, capsys):
    inp, out = tmp_path / "q.jsonl", tmp_path / "a.jsonl"
    _write(inp, [json.dumps({"id": f"q{i}", "paraphrases": p}) for i, p in enumerate(QUESTIONS)])
    assert cli_main(_cli_argv(model_dir, inp, out, "flex")) == 0
    # another method on the same output answers every question again
    assert cli_main(_cli_argv(model_dir, inp, out, "avg")) == 0
    recs = _records(out)
    assert sorted((r["id"], r["method"]) for r in recs) == [
        ("q0", "avg"), ("q0", "flex"), ("q1", "avg"), ("q1", "flex")]
    assert "| answered | 2 |" in capsys.readouterr().out  # the avg summary counts avg only
    # a crash cut the last record inside a two-byte character: its question is redone
    last = json.dumps({"id": "q1", "method": "flex", "prediction": "café"},
                      ensure_ascii=False).encode("utf-8")
    kept = [line for line in out.read_bytes().splitlines()
            if not (b'"q1"' in line and b'"flex"' in line)]
    out.write_bytes(b"\n".join(kept) + b"\n" + last[: last.index("é".encode()) + 1])
    assert cli_main(_cli_argv(model_dir, inp, out, "flex")) == 0
    err = capsys.readouterr().err
    assert f"{out}:4: warning: not UTF-8 text" in err and "answered again" in err
    lines = out.read_bytes().splitlines()
    assert lines[3] == last[: last.index("é".encode()) + 1]  # left in place, never removed
    redone = [json.loads(line) for line in lines[4:]]
    assert [(r["id"], r["method"]) for r in redone] == [("q1", "flex")]


def test_cli_file_size_limit_leaves_whole_lines_and_resumes(model_dir, tmp_path):
    """RLIMIT_FSIZE hit mid-run (a subprocess: the limit must not touch pytest's own
    files): one line on stderr, exit 1, no half record; a second run completes the file."""
    import os
    import resource
    import subprocess
    import sys

    inp, out = tmp_path / "q.jsonl", tmp_path / "a.jsonl"
    many = [json.dumps({"id": f"q{i}", "paraphrases": QUESTIONS[i % 2]}) for i in range(6)]
    _write(inp, many)
    argv = [sys.executable, "-m", "flexsparse", *_cli_argv(model_dir, inp, out, "origin"),
            "--batch-size", "1"]
    limit = 700  # a record is about 250 bytes: room for two, the third is cut

    def small_files():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    env = dict(os.environ, PYTHONWARNINGS="ignore", HF_HUB_OFFLINE="1")
    res = subprocess.run(argv, capture_output=True, text=True, timeout=240, env=env,
                         preexec_fn=small_files)
    assert res.returncode == 1, res.stderr[-2000:]
    assert "Traceback" not in res.stderr
    error = [line for line in res.stderr.splitlines() if "error" in line]
    assert error == [f"flexsparse ensemble: error: File too large: {str(out)!r}"]
    data = out.read_bytes()
    assert 0 < len(data) <= limit and data.endswith(b"\n")
    first = [json.loads(line) for line in data.splitlines()]
    assert 1 <= len(first) < 6
    # resumed in-process (a second interpreter start costs ~15 s on 2 cores)
    assert cli_main([*_cli_argv(model_dir, inp, out, "origin"), "--batch-size", "1"]) == 0
    recs = _records(out)
    assert recs[: len(first)] == first
    assert sorted(r["id"] for r in recs) == [f"q{i}" for i in range(6)]
