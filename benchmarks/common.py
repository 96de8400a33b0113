"""Shared benchmark plumbing: timing, device description, tables, JSON output."""

from __future__ import annotations

import datetime as _dt
import json
import os
import statistics
import sys
import time
from collections.abc import Callable

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


def cuda_ms(fn: Callable[[], object], warmup: int = 3, reps: int = 20) -> float:
    """Median milliseconds of ``fn`` on the GPU, timed with CUDA events after warm-up."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def wall_ms(fn: Callable[[], object], reps: int = 1) -> float:
    """Median wall-clock milliseconds of ``fn`` (synchronising the GPU around it)."""
    times = []
    for _ in range(reps):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def table(rows: list[dict], columns: list[str]) -> str:
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
        return str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        lines.append("| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |")
    return "\n".join(lines)


def save(name: str, rows: list[dict], text: str) -> None:
    """Write rows as JSON (and the markdown) under ``$OUT`` when it is set."""
    out = os.environ.get("OUT")
    if not out:
        return
    with open(os.path.join(out, f"{name}.json"), "w") as f:
        json.dump({"device": device_name(), "torch": torch.__version__, "rows": rows}, f,
                  indent=1)
    with open(os.path.join(out, f"{name}.md"), "w") as f:
        f.write(text + "\n")
