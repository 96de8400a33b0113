"""Why is block-sparse FlexAttention slower per tile than dense? Probe BlockMask variants.

    python benchmarks/flex_sparse_probe.py

Radial mask at CogVideoX-2b shapes (B=2, H=30, N=17,776, D=64, bf16): the fast BlockMask,
the one create_block_mask builds, and kernel-option variants, against cuDNN SDPA.
"""

from __future__ import annotations

import os
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

sys.path.insert(0, os.path.dirname(__file__))
from common import time_ms, write_table  # noqa: E402

import flexsparse as fs  # noqa: E402
from flexsparse import masks  # noqa: E402


def main() -> None:
    layout = fs.VideoLayout.from_video(49, 480, 720)
    n = layout.length
    b, h, d = 2, 30, 64
    q, k, v = (torch.randn(b, h, n, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    mask = masks.radial(layout)
    density = mask.density(n, n, device="cuda")
    flops = 4 * b * h * n * n * d * density
    compiled = torch.compile(flex_attention, dynamic=False)
    rows = []
    with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
        ms = time_ms(lambda: F.scaled_dot_product_attention(q, k, v))
    rows.append(dict(variant="cuDNN dense", ms=ms))
    fast = mask.block_mask(n, n, device="cuda")
    slow = create_block_mask(mask.mask_mod_for("cuda"), None, None, n, n, device="cuda",
                             _compile=True)
    n_pad = -(-n // 128) * 128
    qp, kp, vp = (torch.nn.functional.pad(t, (0, 0, 0, n_pad - n)) for t in (q, k, v))
    padded = masks.radial(layout)
    padded_bm = fs.Mask.from_tiles(padded.block_map(n, n, device="cuda"), 128).block_mask(
        n_pad, n_pad, device="cuda")
    variants = {
        "fast BlockMask": (fast, None, (q, k, v)),
        "fast + TMA": (fast, {"USE_TMA": True}, (q, k, v)),
        "create_block_mask": (slow, None, (q, k, v)),
        "create_block_mask + TMA": (slow, {"USE_TMA": True}, (q, k, v)),
        "fast 128x128 w8": (fast, {"BLOCK_M": 128, "BLOCK_N": 128, "num_warps": 8,
                                   "num_stages": 2}, (q, k, v)),
        "fast 128x64 w4 s3 TMA": (fast, {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 4,
                                         "num_stages": 3, "USE_TMA": True}, (q, k, v)),
        "padded to 128 + TMA": (padded_bm, {"USE_TMA": True}, (qp, kp, vp)),
    }
    for name, (bm, opts, (qq, kk, vv)) in variants.items():
        kw = {} if opts is None else {"kernel_options": opts}
        try:
            ms = time_ms(lambda bm=bm, kw=kw, t=(qq, kk, vv): compiled(*t, block_mask=bm, **kw))
        except Exception as exc:  # noqa: BLE001 - report and go on
            print(name, "failed:", type(exc).__name__, str(exc)[:300])
            continue
        rows.append(dict(variant=name, ms=ms, tflops=flops / ms / 1e9))
        print(rows[-1], flush=True)
    print("partial tiles fast/slow:", int(fast.kv_num_blocks.sum()), int(slow.kv_num_blocks.sum()),
          "full:", int(fast.full_kv_num_blocks.sum()), int(slow.full_kv_num_blocks.sum()))
    write_table(None, rows, ["variant", "ms", "tflops"],
                f"Radial FlexAttention variants, density {density:.3f}",
                ["ms: median of 20 CUDA-event timings after 3 warm-up calls."])


if __name__ == "__main__":
    main()
