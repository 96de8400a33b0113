"""Dense throughput of the quantized kernels against cuDNN, one run:

    python benchmarks/sm90_dense.py [--reps N] [--results PATH]

Shapes: CogVideoX-2b (B=2, H=30, 17,776 tokens, D=64) and the same length at D=128
(B=2, H=24). Rows: cuDNN bf16 SDPA (the peer), ``quant_attention(kernel="triton")``, and the
Hopper kernel (``kernel="sm90"``) in each layout: three consumer warpgroups (D=64 only), two
with and without their ping-pong (``sm90.CONSUMERS``, ``sm90.PINGPONG``). Effective TOPS
count ``4 * B * H * N^2 * D`` operations, the queued clock (calls back to back, as in a
model's forward pass). Needs an sm_90 GPU and nvcc.
"""

from __future__ import annotations

import argparse
import os
import sys
from unittest import mock

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(__file__))
from common import queued_ms, write_table  # noqa: E402

from flexsparse.kernels import quant_attention, sm90  # noqa: E402

SHAPES = ((2, 30, 17776, 64), (2, 24, 17776, 128))
#: layout name -> (consumer warpgroups, ping-pong)
LAYOUTS = {"sm90 3 WG": (3, False), "sm90 2 WG ping-pong": (2, True),
           "sm90 2 WG": (2, False)}


def time_shape(b: int, h: int, n: int, d: int, reps: int) -> dict:
    """ms and effective TOPS of every kernel at one shape."""
    q, k, v = (torch.randn(b, h, n, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    ops = 4 * b * h * n * n * d
    kernels = {
        "cuDNN": lambda: F.scaled_dot_product_attention(q, k, v),
        "Triton": lambda: quant_attention(q, k, v, kernel="triton"),
    }
    kernels.update({name: lambda: quant_attention(q, k, v, kernel="sm90") for name in LAYOUTS})
    row = {"shape": f"B={b} H={h} N={n} D={d}"}
    for name, fn in kernels.items():
        consumers, pingpong = LAYOUTS.get(name, (sm90.CONSUMERS[d], sm90.PINGPONG[d]))
        if consumers == 3 and d != 64:
            continue  # three consumer warpgroups exist at head_dim 64 only
        with mock.patch.dict(sm90.CONSUMERS, {d: consumers}), \
                mock.patch.dict(sm90.PINGPONG, {d: pingpong}):
            ms = queued_ms(fn, warmup=3, reps=reps)
        row[f"{name} ms"], row[f"{name} TOPS"] = ms, ops / ms / 1e9
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--results", default=None, help="append the markdown table here")
    args = ap.parse_args()
    probe = torch.empty(1, 1, 128, 64, device="cuda", dtype=torch.bfloat16)
    if sm90.device_reasons(probe, probe):
        raise SystemExit(f"needs an sm_90 GPU and nvcc: {sm90.device_reasons(probe, probe)}")
    rows = [time_shape(*shape, args.reps) for shape in SHAPES]
    names = ("cuDNN", "Triton", *LAYOUTS)
    columns = ["shape"] + [f"{k} {u}" for k in names for u in ("ms", "TOPS")]
    write_table(args.results, rows, columns, "Dense throughput: quantized kernels vs cuDNN",
                notes=["queued clock, median of --reps calls after 3 warm-up calls"])


if __name__ == "__main__":
    main()
