"""Which FlexAttention kernel options are fastest on this GPU (dense and 25 % band)?

    python benchmarks/flex_options.py

Times compiled flex_attention at CogVideoX-2b shapes with several ``kernel_options``
against cuDNN SDPA, to choose flexsparse's defaults.
"""

from __future__ import annotations

import os
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.flex_attention import flex_attention

sys.path.insert(0, os.path.dirname(__file__))
from common import banded_tiles, time_ms, write_table  # noqa: E402

import flexsparse as fs  # noqa: E402
from flexsparse import masks  # noqa: E402

OPTIONS = {
    "default": None,
    "tma": {"USE_TMA": True},
    "128x64 w4 s3": {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 4, "num_stages": 3},
    "128x128 w8 s2": {"BLOCK_M": 128, "BLOCK_N": 128, "num_warps": 8, "num_stages": 2},
    "128x64 w8 s3": {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8, "num_stages": 3},
}


def main() -> None:
    b, h, n, d = 2, 30, 17776, int(os.environ.get("DIM", 64))
    q, k, v = (torch.randn(b, h, n, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    flops = 4 * b * h * n * n * d
    compiled = torch.compile(flex_attention, dynamic=False)
    rows = []
    with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
        ms = time_ms(lambda: F.scaled_dot_product_attention(q, k, v))
    rows.append(dict(mask="dense", options="cuDNN SDPA", ms=ms, tflops=flops / ms / 1e9))
    ref = F.scaled_dot_product_attention(q, k, v)
    full = masks.full().block_mask(n, n, device="cuda")
    band = fs.Mask.from_tiles(banded_tiles(n, 0.25), 128, length=n)
    band_bm = band.block_mask(n, n, device="cuda")
    dens = band.density(n, n, device="cuda")
    for mask_name, bm, density in (("none", None, 1.0), ("full tiles", full, 1.0),
                                   ("band 25%", band_bm, dens)):
        for name, opts in OPTIONS.items():
            if bm is None and name != "default":
                continue
            kw = {} if opts is None else {"kernel_options": opts}
            try:
                out = compiled(q, k, v, block_mask=bm, **kw)
                if bm is not full and density == 1.0 or bm is full:
                    err = (out.float() - ref.float()).abs().max().item()
                else:
                    err = float("nan")
                ms = time_ms(lambda bm=bm, kw=kw: compiled(q, k, v, block_mask=bm, **kw))
            except Exception as exc:  # noqa: BLE001 - report and go on
                print(name, "failed:", type(exc).__name__, str(exc)[:200])
                continue
            rows.append(dict(mask=mask_name, options=name, ms=ms,
                             tflops=flops * density / ms / 1e9, max_err=err))
            print(rows[-1], flush=True)
    write_table(None, rows, ["mask", "options", "ms", "tflops", "max_err"],
                f"FlexAttention kernel options, B={b} H={h} N={n} D={d}",
                ["ms: median of 20 CUDA-event timings after 3 warm-up calls."])


if __name__ == "__main__":
    main()
