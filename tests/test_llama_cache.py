"""flexsparse.models.llama with the caches and paths users reach through ``generate()``:
static caches, left padding, ``torch.compile``, ``output_attentions``, copies of a patched
model, switching ``attn_implementation``, sliding-window configs.

Tiny random models (2 layers, hidden 64, 4 q / 2 kv heads) built from configs, saved with
``save_pretrained`` and loaded back. References: the unpatched model (causal masks), the
stock eager model given the mask as an additive 4-D mask, and a cache-free forward of the
whole sequence. Tolerance: fp32 logits 2e-5 absolute.
"""

from __future__ import annotations

import copy

import pytest
import torch

from flexsparse import masks
from flexsparse.ensemble import _cache_kwarg
from flexsparse.models import llama, tiny

transformers = pytest.importorskip("transformers")

ATOL = 2e-5
ARCHS = ("llama", "mistral", "qwen2", "qwen3")
PROMPTS = ["Paris is the capital of France and", "How many legs"]
NEW = 5
WINDOW = masks.causal() & masks.sliding_window(3)


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("cache")
    return {arch: tiny.save_tiny(root / arch, arch) for arch in ARCHS}


def generate(model, tok, cache: str, **kw):
    """Greedy generation of a left-padded batch; ``(sequences, scores [steps, B, V])``."""
    batch = tok(PROMPTS, return_tensors="pt", padding=True)
    assert (batch["attention_mask"][1] == 0).any()  # really left padded
    out = model.generate(**batch, max_new_tokens=NEW, do_sample=False, pad_token_id=0,
                         cache_implementation=cache, output_scores=True,
                         return_dict_in_generate=True, **kw)
    return out.sequences, torch.stack(out.scores)


def recompute(model, tok, sequences) -> torch.Tensor:
    """Scores of the generated tokens from one cache-free forward over the whole sequence
    (``[steps, B, V]``), with the prompt's padding and transformers' position ids."""
    prompt = tok(PROMPTS, return_tensors="pt", padding=True)["attention_mask"]
    am = torch.cat([prompt, torch.ones(len(PROMPTS), NEW - 1, dtype=prompt.dtype)], 1)
    pos = (am.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        logits = model(sequences[:, :-1], attention_mask=am, position_ids=pos).logits
    start = prompt.shape[1] - 1
    return logits[:, start:].transpose(0, 1)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_causal_generate_equals_unpatched(model_dirs, arch, cache):
    """The issue's case: a causal patch generated other tokens with a static cache."""
    model, tok = tiny.load(model_dirs[arch])
    ref_seq, ref_scores = generate(model, tok, cache)
    for backend in ("auto", "flex", "sdpa"):
        llama.patch(model, masks.causal(), backend=backend)
        seq, scores = generate(model, tok, cache)
        llama.unpatch(model)
        assert torch.equal(seq, ref_seq), (backend, seq, ref_seq)
        torch.testing.assert_close(scores, ref_scores, atol=ATOL, rtol=0)


@pytest.mark.parametrize("arch", ARCHS)
def test_sparse_mask_static_equals_dynamic_and_recompute(model_dirs, arch):
    """A mask that is not the model's own: the static cache's empty slots and the rows'
    left padding must not reach it (decode rows and flex prefill)."""
    model, tok = tiny.load(model_dirs[arch])
    results = {}
    for backend, decode_backend in (("auto", "auto"), ("flex", "flex")):
        llama.patch(model, WINDOW, backend=backend, decode_backend=decode_backend)
        for cache in ("dynamic", "static"):
            results[backend, cache] = generate(model, tok, cache)
    seq, scores = results["auto", "dynamic"]
    for key, (s, sc) in results.items():
        assert torch.equal(s, seq), key
        torch.testing.assert_close(sc, scores, atol=ATOL, rtol=0, msg=str(key))
    torch.testing.assert_close(recompute(model, tok, seq), scores, atol=ATOL, rtol=0)
    llama.unpatch(model)
    stock_seq, _ = generate(model, tok, "dynamic")
    assert not torch.equal(stock_seq, seq)  # the window really changes the answer


def test_static_cache_longer_than_needed_and_continued(model_dirs):
    """A user-made StaticCache far longer than the sequence, and generation continued from a
    returned cache (transformers' ``test_generate_continue_from_past_key_values``)."""
    model, tok = tiny.load(model_dirs["llama"])
    llama.patch(model, WINDOW)
    seq, scores = generate(model, tok, "dynamic")
    batch = tok(PROMPTS, return_tensors="pt", padding=True)
    cache = transformers.StaticCache(config=model.config, max_cache_len=64)
    kw = dict(do_sample=False, pad_token_id=0, return_dict_in_generate=True)
    name = _cache_kwarg(model)
    first = model.generate(**batch, max_new_tokens=2, **{name: cache}, **kw)
    am = torch.cat([batch["attention_mask"], torch.ones(2, 2, dtype=torch.long)], 1)
    returned = getattr(first, "cache", None) or first.past_key_values
    assert returned is cache
    rest = model.generate(first.sequences, attention_mask=am, max_new_tokens=NEW - 2,
                          **{name: returned}, **kw)
    assert torch.equal(rest.sequences, seq)


def test_eager_loaded_equals_sdpa_loaded_static(model_dirs):
    """transformers' eager/SDPA equivalence, through the patch and a static cache."""
    out = []
    for impl in ("sdpa", "eager"):
        model, tok = tiny.load(model_dirs["llama"], attn_implementation=impl)
        llama.patch(model, WINDOW)
        assert model.config._attn_implementation == llama._IMPL_NAMES[impl]
        out.append(generate(model, tok, "static"))
    assert torch.equal(out[0][0], out[1][0])
    torch.testing.assert_close(out[0][1], out[1][1], atol=ATOL, rtol=0)


def additive(dense: torch.Tensor) -> torch.Tensor:
    """4-D additive mask for the stock eager model (0 kept, finfo.min dropped)."""
    out = torch.zeros(dense.shape).masked_fill(~dense, torch.finfo(torch.float32).min)
    return out[None, None]


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_output_attentions_equal_stock_eager(model_dirs, impl):
    """``output_attentions=True`` returned an empty tuple on a patched model."""
    n = 11
    x = torch.randint(4, 400, (1, n), generator=torch.Generator().manual_seed(3))
    stock, _ = tiny.load(model_dirs["llama"], attn_implementation="eager")
    with torch.no_grad():
        ref = stock(x, attention_mask=additive(WINDOW.to_dense(n, n)), output_attentions=True)
        ref_causal = stock(x, output_attentions=True)
        model, _ = tiny.load(model_dirs["llama"], attn_implementation=impl)
        llama.patch(model, WINDOW)
        out = model(x, output_attentions=True)
        llama.patch(model, WINDOW, layers=[1])
        part = model(x, output_attentions=True)
    assert len(out.attentions) == len(ref.attentions) == 2
    for got, want in zip(out.attentions, ref.attentions):
        assert got.shape == (1, 4, n, n)
        torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    torch.testing.assert_close(out.logits, ref.logits, atol=ATOL, rtol=0)
    # layer 0 unpatched: the model's own causal weights; layer 1 still the window's
    assert len(part.attentions) == 2
    torch.testing.assert_close(part.attentions[0], ref_causal.attentions[0], atol=1e-6, rtol=0)
    assert (part.attentions[1][..., :-3].tril(-3) == 0).all()  # nothing past the window


def test_deepcopy_is_independent(model_dirs):
    model, _ = tiny.load(model_dirs["llama"])
    x = torch.randint(4, 400, (1, 12), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ref = model(x).logits
        llama.patch(model, WINDOW)
        sparse = model(x).logits
        twin = copy.deepcopy(model)
        assert twin._flexsparse_patch is not model._flexsparse_patch
        llama.unpatch(twin)
        assert llama.is_patched(model) and model.config._attn_implementation == "flexsparse"
        assert not llama.is_patched(twin) and twin.config._attn_implementation == "sdpa"
        torch.testing.assert_close(model(x).logits, sparse, atol=0, rtol=0)
        torch.testing.assert_close(twin(x).logits, ref, atol=0, rtol=0)
        twin2 = copy.deepcopy(model)
        with llama.masked(twin2, masks.causal()):
            torch.testing.assert_close(model(x).logits, sparse, atol=0, rtol=0)
    assert (sparse - ref).abs().max() > 1e-3


def test_switching_attn_implementation_keeps_the_patch(model_dirs):
    model, _ = tiny.load(model_dirs["llama"])
    x = torch.randint(4, 400, (1, 12), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        llama.patch(model, WINDOW)
        sparse = model(x).logits
        model.config._attn_implementation = "eager"  # what set_attn_implementation does
        torch.testing.assert_close(model(x).logits, sparse, atol=ATOL, rtol=0)
        assert model.config._attn_implementation == "flexsparse_eager"
        llama.unpatch(model)
        assert model.config._attn_implementation == "eager"
        llama.patch(model, WINDOW)
        model.config._attn_implementation = "flash_attention_2"
        with pytest.raises(ValueError, match="switched to 'flash_attention_2'.*unpatch"):
            model(x)


def test_explicit_position_ids_and_padding(model_dirs):
    """Explicit position ids (shifted, as a continuation would give) with a padded batch:
    a causal patch equals the unpatched model, padded rows included."""
    model, tok = tiny.load(model_dirs["llama"])
    batch = tok(PROMPTS, return_tensors="pt", padding=True)
    pos = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0) + 7
    with torch.no_grad():
        ref = model(**batch, position_ids=pos).logits
        llama.patch(model, masks.causal(), backend="flex")
        out = model(**batch, position_ids=pos).logits
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(out[real], ref[real], atol=ATOL, rtol=0)


def test_left_padding_compatibility(model_dirs):
    """transformers' ``test_left_padding_compatibility`` with a sparse mask: the logits of a
    row are the same padded in a batch as alone."""
    model, tok = tiny.load(model_dirs["qwen2"])
    llama.patch(model, WINDOW)
    batch = tok(PROMPTS, return_tensors="pt", padding=True)
    pad = int((batch["attention_mask"][1] == 0).sum())
    alone = tok(PROMPTS[1:], return_tensors="pt")
    with torch.no_grad():
        padded = model(**batch).logits[1, pad:]
        single = model(**alone).logits[0]
    torch.testing.assert_close(padded, single, atol=ATOL, rtol=0)


def test_sliding_window_config(tmp_path):
    """A Mistral layer with a sliding window: equal to stock inside the window, a
    ValueError once the sequence (prompt and generated tokens) passes it."""
    path = tiny.save_tiny(tmp_path / "mistral-w", "mistral", sliding_window=8)
    model, _ = tiny.load(path)
    x = torch.randint(4, 400, (1, 5), generator=torch.Generator().manual_seed(6))
    kw = dict(do_sample=False, pad_token_id=0)
    ref = model.generate(x, max_new_tokens=3, **kw)
    llama.patch(model, masks.causal())
    assert torch.equal(model.generate(x, max_new_tokens=3, **kw), ref)
    for cache in ("dynamic", "static"):
        with pytest.raises(ValueError, match="sliding window of 8 tokens.*has 9"):
            model.generate(x, max_new_tokens=6, cache_implementation=cache, **kw)


def test_compiled_static_cache_decode(model_dirs):
    """``torch.compile(model, fullgraph=True)`` over prefill and decode steps with a static
    cache and a padded batch: no graph break, the same logits as the uncompiled patched model
    with a dynamic cache. (``aot_eager`` traces what inductor would compile, at a fraction of
    the CPU cost; tests/gpu compiles with inductor.)"""
    model, tok = tiny.load(model_dirs["llama"])
    llama.patch(model, WINDOW)
    batch = tok(PROMPTS, return_tensors="pt", padding=True)
    steps, n = 3, batch["input_ids"].shape[1]
    # the 2-D mask at the cache's full length keeps one shape for every decode step
    am = torch.cat([batch["attention_mask"], torch.ones(2, steps, dtype=torch.long)], 1)
    name = _cache_kwarg(model)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)

    def run(fwd, cache):
        out, logits = fwd(input_ids=batch["input_ids"], attention_mask=am[:, :n],
                          use_cache=True, **{name: cache}), []
        for i in range(steps):
            logits.append(out.logits[:, -1])
            nxt = out.logits[:, -1:].argmax(-1)
            mask = am if isinstance(cache, transformers.StaticCache) else am[:, : n + i + 1]
            out = fwd(input_ids=nxt, attention_mask=mask, use_cache=True, **{name: cache})
        return torch.stack(logits)

    with torch.no_grad():
        want = run(model, transformers.DynamicCache())
        got = run(compiled, transformers.StaticCache(config=model.config, max_cache_len=n + steps))
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


def test_static_cache_prompt_longer_than_decode_rows(model_dirs):
    """A prompt longer than ``DECODE_ROWS`` into an empty static cache: transformers (5.2x)
    passes no 4-D mask there (SDPA's top-left ``is_causal``), so the rows are the first
    slots, not the last. The causal patch gives the stock logits; a window mask the same
    scores as with a dynamic cache and as a cache-free forward."""
    from flexsparse.attention import DECODE_ROWS

    model, _ = tiny.load(model_dirs["llama"])
    x = torch.randint(4, 400, (1, DECODE_ROWS + 20), generator=torch.Generator().manual_seed(0))
    kw = dict(max_new_tokens=3, min_new_tokens=3, do_sample=False, pad_token_id=0,
              output_logits=True, return_dict_in_generate=True, disable_compile=True)

    def run(cache):
        out = model.generate(x, cache_implementation=cache, **kw)
        return out.sequences, torch.stack(out.logits)  # raw logits: the scores have -inf

    with torch.no_grad():
        ref_seq, ref_scores = run("static")
        llama.patch(model, masks.causal())
        seq, scores = run("static")
        assert torch.equal(seq, ref_seq)
        torch.testing.assert_close(scores, ref_scores, atol=ATOL, rtol=0)
        llama.patch(model, WINDOW)
        want_seq, want_scores = run("dynamic")
        seq, scores = run("static")
        full = model(want_seq[:, :-1]).logits[:, x.shape[1] - 1:].transpose(0, 1)
    assert torch.equal(seq, want_seq)
    torch.testing.assert_close(scores, want_scores, atol=ATOL, rtol=0)
    torch.testing.assert_close(full, want_scores, atol=ATOL, rtol=0)


def _decode_step_profile(model, mask, name):
    """Host syncs and the key length of one decode step with a static cache (after a
    padded prefill), and how often the mask rows were built: ``(syncs, kv_lens, builds)``."""
    from torch.profiler import ProfilerActivity, profile

    if llama.is_patched(model):
        llama.unpatch(model)
    if mask is not None:
        llama.patch(model, mask)
    x = torch.randint(4, 400, (2, 10), generator=torch.Generator().manual_seed(1))
    am = torch.ones(2, 12, dtype=torch.long)
    am[1, :3] = 0
    cache = transformers.StaticCache(config=model.config, max_cache_len=16)
    kv_lens, builds = [], []
    rows_keep = llama._rows_keep

    def counting(*args):
        builds.append(1)
        return rows_keep(*args)

    with torch.no_grad():
        model(input_ids=x, attention_mask=am[:, :10], use_cache=True, **{name: cache})
        model(input_ids=x[:, :1], attention_mask=am[:, :11], use_cache=True, **{name: cache})
        with llama.masked(model, mask) if mask is not None else _nothing(), \
                profile(activities=[ProfilerActivity.CPU]) as prof:
            observe = llama.get_handle(model) if mask is not None else None
            if observe is not None:
                observe.observers.append(lambda i, q, k, v: kv_lens.append(k.shape[2]))
            llama._rows_keep = counting
            try:
                model(input_ids=x[:, :1], attention_mask=am, use_cache=True, **{name: cache})
            finally:
                llama._rows_keep = rows_keep
    syncs = sum(e.count for e in prof.key_averages() if e.key == "aten::_local_scalar_dense")
    return syncs, kv_lens, len(builds)


class _nothing:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def test_decode_step_adds_no_host_sync_nor_new_shapes(model_dirs):
    """Issue 15's decode speed: a decode step of a patched model syncs the host no more
    often than the stock step (a sync per forward stalled CUDA decoding), keeps the static
    cache's full key length (a key length growing every step gives SDPA a new shape per
    step) and builds the mask rows once per forward, not once per layer."""
    model, _ = tiny.load(model_dirs["llama"])
    name = _cache_kwarg(model)
    stock, _, _ = _decode_step_profile(model, None, name)
    for mask, rows_built in ((masks.causal(), 0), (WINDOW, 1)):
        syncs, kv_lens, builds = _decode_step_profile(model, mask, name)
        assert syncs <= stock, (mask.name, syncs, stock)
        assert kv_lens == [16] * model.config.num_hidden_layers, (mask.name, kv_lens)
        assert builds == rows_built, (mask.name, builds)
