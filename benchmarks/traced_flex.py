"""``fs.attention(..., backend="flex")`` traced into a caller's ``torch.compile`` against the
same call untraced, and cuDNN dense, on the CogVideoX-2b radial map (whole tiles).

    python benchmarks/traced_flex.py [--rounds 3] [--results FILE]

Untraced, our compiled FlexAttention runs the map with ``noop_mask`` and tuned kernel
options. Traced (``torch.compile(fullgraph=True)``, inductor, after one eager call warms the
mask cache), the map carries the pattern's rule (an outer eager backend would need it) and
the same options. Queued clock of ``common.time_ms``; each round times the three in turn.
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import cudnn, queued_ms, write_table  # noqa: E402

import flexsparse as fs  # noqa: E402
from flexsparse import masks  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--results", default=None, help="append the table to this file")
    args = ap.parse_args()
    layout = fs.VideoLayout.from_video(49, 480, 720, model="cogvideox")
    mask = masks.radial(layout, decay_factor=1.0, model="cogvideox")
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(2, 30, layout.length, 64, device="cuda", dtype=torch.bfloat16,
                           generator=g) for _ in range(3))

    def untraced():
        return fs.attention(q, k, v, mask, backend="flex")

    eager = untraced()  # also warms the mask cache, which a fullgraph trace needs
    traced_fn = torch.compile(lambda q, k, v: fs.attention(q, k, v, mask, backend="flex"),
                              fullgraph=True)
    diff = (traced_fn(q, k, v).float() - eager.float()).abs().max().item()
    calls = {"cuDNN dense": functools.partial(cudnn, q, k, v), "flex, untraced": untraced,
             "flex, traced (inductor, fullgraph)": lambda: traced_fn(q, k, v)}
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(args.rounds):
        for name, fn in calls.items():
            times[name].append(queued_ms(fn, 3, 20))
    base = statistics.median(times["cuDNN dense"])
    rows = [{"call": name, "ms queued": statistics.median(t), "x cuDNN": base /
             statistics.median(t), "rounds (ms)": " / ".join(f"{x:.2f}" for x in t)}
            for name, t in times.items()]
    write_table(args.results, rows, ["call", "ms queued", "x cuDNN", "rounds (ms)"],
                "Flex backend traced by a caller's torch.compile, CogVideoX-2b radial map",
                notes=[f"B=2 H=30 N={layout.length} D=64 bf16, {args.rounds} rounds, median",
                       f"max |traced - untraced| = {diff:.2e}"])


if __name__ == "__main__":
    main()
