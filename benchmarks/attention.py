"""Dense SDPA (cuDNN, flash) vs FlexAttention dense vs FlexAttention block-sparse.

    python benchmarks/attention.py [--quick] [--heads 30] [--tokens 17776] [--dim 64]

CogVideoX-2b shapes by default (B=2, H=30, N=17,776, D=64, bf16). Sparse masks are bands
of tiles around the diagonal at 50 / 25 / 12.5 % of the tiles, and the radial mask when
available. Effective TFLOP/s count only the kept pairs: 4 * B * H * N^2 * D * density.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, os.path.dirname(__file__))
from common import cuda_ms, header, save, table  # noqa: E402

import flexsparse as fs  # noqa: E402
from flexsparse import masks  # noqa: E402


def banded_tiles(n: int, fraction: float, block: int = 128) -> torch.Tensor:
    """bool [Nb, Nb]: a band of tiles around the diagonal keeping ``fraction`` of them."""
    nb = -(-n // block)
    i = torch.arange(nb)
    dist = (i[:, None] - i[None, :]).abs()
    # the smallest half-width whose band keeps at least the wanted fraction of tiles
    for half in range(nb):
        kept = dist <= half
        if kept.float().mean() >= fraction:
            return kept
    return torch.ones(nb, nb, dtype=torch.bool)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--heads", type=int, default=30)
    ap.add_argument("--tokens", type=int, default=17776)
    ap.add_argument("--dim", type=int, default=64)
    args = ap.parse_args()
    dev, dt = torch.device("cuda"), torch.bfloat16
    b, h, n, d = args.batch, args.heads, args.tokens, args.dim
    q, k, v = (torch.randn(b, h, n, d, device=dev, dtype=dt) for _ in range(3))
    reps = 5 if args.quick else 20
    flops = 4 * b * h * n * n * d
    rows = []

    def add(name, fn, density=1.0):
        ms = cuda_ms(fn, reps=reps)
        rows.append(dict(kernel=name, density=density, ms=ms,
                         tflops=flops * density / ms / 1e9))
        print(rows[-1], flush=True)

    for name, backend in (("SDPA cuDNN", SDPBackend.CUDNN_ATTENTION),
                          ("SDPA flash", SDPBackend.FLASH_ATTENTION)):
        try:
            with sdpa_kernel([backend]):
                add(name, lambda: F.scaled_dot_product_attention(q, k, v))
        except RuntimeError as exc:
            print(f"{name} unavailable: {exc}")
    dense = masks.full()
    add("flex dense", lambda: fs.attention(q, k, v, dense, backend="flex"))
    ref = F.scaled_dot_product_attention(q, k, v)
    out = fs.attention(q, k, v, dense, backend="flex")
    print("flex dense vs SDPA max abs diff:", (out - ref).abs().max().item())
    sparse = {f"flex band {int(f * 1000) / 10}%": fs.Mask.from_tiles(banded_tiles(n, f), 128,
                                                                       length=n)
              for f in (0.5, 0.25, 0.125)}
    if n == 17776 and hasattr(masks, "radial"):
        sparse["flex radial"] = masks.radial(fs.VideoLayout.from_video(49, 480, 720))
    for name, mask in sparse.items():
        density = mask.density(n, n, device=dev)
        mask.block_mask(n, n, device=dev)
        add(name, lambda m=mask: fs.attention(q, k, v, m, backend="flex"), density)
    text = header(f"Attention B={b} H={h} N={n} D={d} bf16") + "\n" + table(
        rows, ["kernel", "density", "ms", "tflops"])
    print(text)
    save("attention", rows, text)


if __name__ == "__main__":
    main()
