"""``flexsparse ensemble``: self-ensemble answers for a JSONL file of questions.

Input lines: ``{"id": ..., "paraphrases": [...], "answers": [...]?, "prefix": "..."?}``.
Output lines: ``{"id", "method", "prediction", "timing", "answers"?, "candidates"?}``,
appended (earlier records are never removed); a question already answered with the same
``--method`` is skipped, so an interrupted run resumes where it stopped and a run with
another method on the same file answers every question again. Each record is written as
one line at once: a failed write (disk full, file-size limit) leaves no half line. An
unreadable line in the output (cut by a crash) is named on stderr and its question
answered again. Bad input lines are reported with their line number and skipped. With
gold answers a summary gives exact match, token F1 and contains-answer over every
question answered with the method.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

from ..cli import UsageError
from . import _common as C

DTYPES = ("float32", "bfloat16", "float16")


def add_parser(subparsers) -> None:
    from ..ensemble import METHODS, POSITION_MODES

    p = subparsers.add_parser(
        "ensemble", help="self-ensemble generation over paraphrased questions (JSONL)",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", help="directory with a local transformers model + tokenizer")
    p.add_argument("--input", help="questions, JSONL")
    p.add_argument("--output", help="answers, JSONL (appended; resumable)")
    p.add_argument("--method", default="flex", choices=METHODS)
    p.add_argument("--paraphrases", type=int, default=None, metavar="K",
                   help="use the first K paraphrases of each question")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=1, help="questions decoded together")
    p.add_argument("--position-mode", default="aligned", choices=POSITION_MODES)
    p.add_argument("--separator", default="\n\n")
    p.add_argument("--suffix", default="", help="text after the paraphrases (e.g. 'Answer:')")
    p.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    p.add_argument("--stop-on-newline", action="store_true")
    p.add_argument("--backend", default="auto", choices=("auto", "flex", "sdpa", "quant"))
    p.add_argument("--dtype", default=None, choices=DTYPES,
                   help="default: bfloat16 on CUDA, float32 on the CPU")
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--demo", action="store_true",
                   help="tiny built-in random model and the questions shipped with flexsparse")
    p.set_defaults(func=run)


def run(args) -> int:
    import torch

    from ..ensemble import SelfEnsemble
    from ..models import tiny

    if args.demo:
        model_dir = Path(args.model) if args.model else tiny.tiny_model_dir()
        input_path = Path(args.input) if args.input else _shipped_questions()
        output = Path(args.output) if args.output else Path(tempfile.mkdtemp()) / "answers.jsonl"
    else:
        missing = [f"--{n}" for n in ("model", "input", "output") if not getattr(args, n)]
        if missing:
            raise UsageError(f"{', '.join(missing)} required (or --demo)")
        model_dir, input_path, output = Path(args.model), Path(args.input), Path(args.output)
    for name, value, low in (("--paraphrases", args.paraphrases, 1),
                             ("--max-new-tokens", args.max_new_tokens, 1),
                             ("--batch-size", args.batch_size, 1)):
        if value is not None and value < low:
            raise UsageError(f"{name} must be >= {low}, got {value}")
    for i, stop in enumerate(args.stop or []):
        if not stop:
            raise UsageError(f"--stop must be a non-empty string, got {stop!r} (--stop #{i + 1})")
    if not input_path.is_file():
        raise UsageError(f"--input {str(input_path)!r} is not a file")
    model_dir = C.local_dir("--model", model_dir, what="a local model directory")
    C.output_file("--output", output)
    device = C.parse_device("--device", args.device)

    questions, bad = read_questions(input_path, args.paraphrases)
    for line_no, why in bad:
        print(f"{input_path}:{line_no}: skipped: {why}", file=sys.stderr)
    done, unreadable = read_done(output)
    for line_no, why in unreadable:
        print(f"{output}:{line_no}: warning: {why}; ignored, its question is answered again",
              file=sys.stderr)
    todo = [q for q in questions if (q["id"], args.method) not in done]

    dtype_name = args.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    model, tokenizer = tiny.load(model_dir, dtype=getattr(torch, dtype_name), device=device)
    ens = SelfEnsemble(model, tokenizer, separator=args.separator,
                       position_mode=args.position_mode, backend=args.backend)
    print(f"{len(questions)} questions ({len(bad)} bad lines skipped), "
          f"{len(questions) - len(todo)} already answered with --method {args.method} in "
          f"{output}, {len(todo)} to do", file=sys.stderr)
    _answer(ens, todo, output, args)
    summary = summarize(output, {q["id"]: q for q in questions}, args.method)
    print(format_summary(summary, output))
    if args.demo:
        print("(demo: a tiny model with random weights; the scores only show the mechanics)")
    return 0


def _shipped_questions() -> Path:
    from importlib import resources

    return Path(str(resources.files("flexsparse").joinpath("data/questions.jsonl")))


def read_questions(path: Path, k: int | None) -> tuple[list[dict], list[tuple[int, str]]]:
    """Valid questions and ``(line number, reason)`` for every skipped line."""
    good, bad, seen = [], [], set()
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            q, why = parse_line(raw)
            if why is not None:
                bad.append((line_no, why))
                continue
            why = _invalid(q)
            if why is None and str(q["id"]) in seen:
                why = f"duplicate id {q['id']!r}"
            if why is not None:
                bad.append((line_no, why))
                continue
            q = dict(q, id=str(q["id"]))
            if k is not None:
                q["paraphrases"] = q["paraphrases"][:k]
            seen.add(q["id"])
            good.append(q)
    return good, bad


def _invalid(q) -> str | None:
    if not isinstance(q, dict):
        return f"expected a JSON object, got {type(q).__name__}"
    if "id" not in q or not isinstance(q["id"], (str, int)) or isinstance(q["id"], bool):
        return "missing or invalid 'id' (a string or an integer)"
    para = q.get("paraphrases")
    if (not isinstance(para, list) or not para
            or not all(isinstance(p, str) and p.strip() for p in para)):
        return "'paraphrases' must be a non-empty list of non-empty strings"
    answers = q.get("answers")
    if answers is not None and (
        not isinstance(answers, list) or not all(isinstance(a, str) for a in answers)
    ):
        return "'answers' must be a list of strings"
    if "prefix" in q and not isinstance(q["prefix"], str):
        return "'prefix' must be a string"
    return None


def parse_line(raw: bytes) -> tuple[object, str | None]:
    """``(value, None)`` for a line of JSON, ``(None, why)`` for one that is not: cut
    inside a UTF-8 character, not JSON, or nested too deeply to read."""
    try:
        return json.loads(raw.decode("utf-8")), None
    except UnicodeDecodeError as exc:
        return None, f"not UTF-8 text (cut inside a character at byte {exc.start}?)"
    except json.JSONDecodeError as exc:
        return None, f"not valid JSON ({exc.msg})"
    except RecursionError:
        return None, "JSON nested too deeply"


def read_done(output: Path) -> tuple[dict[tuple[str, str], dict], list[tuple[int, str]]]:
    """Records already in ``output`` by ``(id, method)``, and ``(line number, why)`` for
    every line that cannot be read (left in place, never removed)."""
    done, unreadable = {}, []
    if not output.exists():
        return done, unreadable
    with open(output, "rb") as f:
        for line_no, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            rec, why = parse_line(raw)
            if why is None and not (isinstance(rec, dict) and "id" in rec):
                why = "not an answer record (no 'id')"
            if why is not None:
                unreadable.append((line_no, why))
                continue
            done[(str(rec["id"]), str(rec.get("method")))] = rec
    return done, unreadable


def append_line(fd: int, text: str) -> None:
    """Append ``text`` (one JSONL line) to the file open at ``fd`` (``O_APPEND``) all at
    once: if the write fails part way (disk full, ``RLIMIT_FSIZE``) the file is cut back to
    where it was, so no half line is left, and the ``OSError`` is raised."""
    data = text.encode("utf-8")
    start = os.fstat(fd).st_size
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
    except OSError:
        os.ftruncate(fd, start)
        raise


def _answer(ens, todo: list[dict], output: Path, args) -> None:
    from tqdm import tqdm

    if not todo:
        return
    output.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(output, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        # A last line cut by a crash is closed first so that new records start on their
        # own lines (the cut line stays, reported as unreadable).
        if os.fstat(fd).st_size > 0 and not _ends_with_newline(output):
            append_line(fd, "\n")
        with tqdm(total=len(todo), desc=f"ensemble {args.method}", unit="q",
                  disable=args.no_progress, file=sys.stderr) as bar:
            for start in range(0, len(todo), args.batch_size):
                batch = todo[start:start + args.batch_size]
                results = ens.generate_batch(
                    [q["paraphrases"] for q in batch],
                    prefix=[q.get("prefix", "") for q in batch], suffix=args.suffix,
                    max_new_tokens=args.max_new_tokens, method=args.method, stop=args.stop,
                    stop_on_newline=args.stop_on_newline,
                )
                for q, r in zip(batch, results):
                    append_line(fd, json.dumps(_record(q, r, args.method),
                                               ensure_ascii=False) + "\n")
                bar.update(len(batch))
    except OSError as exc:
        exc.filename = exc.filename or str(output)
        raise
    finally:
        os.close(fd)


def _record(q: dict, r, method: str) -> dict:
    rec = {
        "id": q["id"], "method": method, "prediction": r.text,
        "timing": {
            "prefill_s": r.timing["prefill_s"], "decode_s": r.timing["decode_s"],
            "total_s": r.timing["total_s"], "batch_size": r.timing["batch_size"],
            "new_tokens": len(r.token_ids),
        },
        "paraphrases": len(q["paraphrases"]),
    }
    if r.candidates:
        rec["candidates"] = r.candidates
    if q.get("answers") is not None:
        rec["answers"] = q["answers"]
    return rec


def _ends_with_newline(path: Path) -> bool:
    with open(path, "rb") as f:
        f.seek(-1, 2)
        return f.read(1) == b"\n"


def summarize(output: Path, questions: dict[str, dict], method: str) -> dict:
    """Metrics over the records of ``method`` in ``output`` that have gold answers (from
    the input, else stored in the record)."""
    from ..ensemble import contains_answer, exact_match, token_f1

    recs = [r for (_, m), r in read_done(output)[0].items() if m == method]
    scored = []
    for r in recs:
        gold = (questions.get(str(r["id"])) or {}).get("answers") or r.get("answers")
        if gold:
            pred = str(r.get("prediction", ""))
            scored.append((exact_match(pred, gold), token_f1(pred, gold),
                           contains_answer(pred, gold)))
    times = [r["timing"]["total_s"] / max(r["timing"].get("batch_size", 1), 1)
             for r in recs if isinstance(r.get("timing"), dict) and "total_s" in r["timing"]]
    out = {"method": method, "answered": len(recs), "with_gold": len(scored)}
    if scored:
        for i, name in enumerate(("exact_match", "token_f1", "contains_answer")):
            out[name] = sum(s[i] for s in scored) / len(scored)
    if times:
        out["seconds_per_question"] = sum(times) / len(times)
    return out


def format_summary(summary: dict, output: Path) -> str:
    lines = [f"answers: {output}", "| metric | value |", "|---|---|"]
    for key, value in summary.items():
        lines.append(f"| {key} | {value:.4f} |" if isinstance(value, float)
                     else f"| {key} | {value} |")
    return "\n".join(lines)
