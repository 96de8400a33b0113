"""Shared benchmark plumbing: one timer, one table writer, one band of tiles.

- ``time_ms(fn, warmup, reps, clock)``: the one timer. ``clock="events"`` (default on
  CUDA): median of CUDA-event times after warm-up; ``"wall"``: median host time with the
  GPU synchronised around each call (first calls, compile times, CPU runs).
  ``cuda_ms`` and ``wall_ms`` are the same timer with those clocks.
- ``write_table(path, rows, columns, title, notes)``: the one table writer: a markdown
  section (title, the command, device, torch, date, table, notes), printed, appended to
  ``path`` when given, and saved with the rows as JSON under ``$OUT`` when it is set.
  ``table`` formats the table alone; ``save`` writes JSON + markdown under ``$OUT``.
- ``banded_tiles(n, fraction, block)``: a band of tiles around the diagonal keeping at
  least ``fraction`` of the tiles.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import re
import statistics
import sys
import time
from collections.abc import Callable, Sequence

import torch


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return "cpu"


def header(title: str) -> str:
    return (
        f"### {title}\n\n`python {' '.join(sys.argv)}` on {device_name()}, torch "
        f"{torch.__version__}, {_dt.date.today().isoformat()}\n"
    )


# -- the timer ------------------------------------------------------------------------------


def time_ms(
    fn: Callable[[], object], warmup: int = 3, reps: int = 20, clock: str | None = None
) -> float:
    """Median milliseconds of ``reps`` calls of ``fn`` after ``warmup`` calls.

    ``clock``:
      - ``"events"``: CUDA events around each call, the GPU synchronised after each, so
        the host time before a call's first launch counts (a call on its own);
      - ``"queued"``: CUDA events around each call, no synchronisation between calls
        (``triton.testing.do_bench``'s method): a call's host time overlaps the GPU work
        queued before it, as in a model's forward pass, and counts only where the host
        falls behind the GPU;
      - ``"wall"``: host clock, the GPU synchronised before and after each call.
    None picks events on CUDA. ``events`` and ``queued`` need CUDA.
    """
    use_cuda = torch.cuda.is_available()
    clock = clock or ("events" if use_cuda else "wall")
    if clock not in ("events", "queued", "wall"):
        raise ValueError(f"clock must be 'events', 'queued' or 'wall', got {clock!r}")
    if clock != "wall" and not use_cuda:
        raise ValueError(f"clock={clock!r} needs CUDA; use clock='wall' on the CPU")
    for _ in range(warmup):
        fn()
    if clock == "queued":
        torch.cuda.synchronize()
        marks = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                 for _ in range(reps)]
        for start, end in marks:
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize()
        return statistics.median(start.elapsed_time(end) for start, end in marks)
    times = []
    for _ in range(reps):
        if clock == "events":
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            if use_cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn()
            if use_cuda:
                torch.cuda.synchronize()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def cuda_ms(fn: Callable[[], object], warmup: int = 3, reps: int = 20) -> float:
    """``time_ms`` with CUDA events."""
    return time_ms(fn, warmup, reps, clock="events")


def queued_ms(fn: Callable[[], object], warmup: int = 3, reps: int = 20) -> float:
    """``time_ms`` with CUDA events and no synchronisation between calls."""
    return time_ms(fn, warmup, reps, clock="queued")


def wall_ms(fn: Callable[[], object], reps: int = 1) -> float:
    """``time_ms`` on the host clock, no warm-up (first calls, compile times)."""
    return time_ms(fn, warmup=0, reps=reps, clock="wall")


# -- tables -----------------------------------------------------------------------------------


def _fmt(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        if v != v:
            return "n/a"
        if v != 0 and abs(v) < 1e-3:
            return f"{v:.1e}"
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
    return str(v)


def table(rows: Sequence[dict], columns: Sequence[str]) -> str:
    """A markdown table of ``rows`` (missing cells blank, floats to 3 significant digits)."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r.get(c, "")) for c in columns) + " |")
    return "\n".join(lines)


def write_table(
    path: str | os.PathLike | None,
    rows: Sequence[dict],
    columns: Sequence[str],
    title: str,
    notes: Sequence[str] = (),
) -> str:
    """Format, print and keep one result table; returns the markdown.

    The section is ``header(title)``, the table and ``notes`` as a bullet list. It is
    appended to ``path`` when given, and written with ``rows`` as JSON to
    ``$OUT/<slug of title>.{md,json}`` when ``OUT`` is set."""
    text = header(title) + "\n" + table(rows, columns) + "\n"
    if notes:
        text += "\n" + "\n".join(f"- {n}" for n in notes) + "\n"
    print(text, flush=True)
    if path is not None:
        with open(path, "a") as f:
            f.write(text + "\n")
    slug = re.sub(r"[^a-z0-9]+", "_", title.lower()).strip("_")[:60] or "table"
    save(slug, list(rows), text)
    return text


def save(name: str, rows: list[dict], text: str) -> None:
    """Write rows as JSON (and the markdown) under ``$OUT`` when it is set."""
    out = os.environ.get("OUT")
    if not out:
        return
    with open(os.path.join(out, f"{name}.json"), "w") as f:
        json.dump({"device": device_name(), "torch": torch.__version__, "rows": rows}, f,
                  indent=1, default=str)
    with open(os.path.join(out, f"{name}.md"), "w") as f:
        f.write(text + "\n")


# -- masks ------------------------------------------------------------------------------------


def cudnn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False):
    """The peer: cuDNN's SDPA, dense or causal (flash where cuDNN has no kernel for the
    shape or build)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    sdpa = torch.nn.functional.scaled_dot_product_attention
    try:
        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
            return sdpa(q, k, v, is_causal=causal)
    except RuntimeError:
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            return sdpa(q, k, v, is_causal=causal)


def banded_tiles(n: int, fraction: float, block: int = 128) -> torch.Tensor:
    """bool ``[Nb, Nb]``: the narrowest band of tiles around the diagonal that keeps at least
    ``fraction`` of the ``ceil(n / block)^2`` tiles."""
    nb = -(-n // block)
    i = torch.arange(nb)
    dist = (i[:, None] - i[None, :]).abs()
    for half in range(nb):
        kept = dist <= half
        if kept.float().mean() >= fraction:
            return kept
    return torch.ones(nb, nb, dtype=torch.bool)
