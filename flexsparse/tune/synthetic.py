"""Synthetic attention inputs with known sparse structure, for calibration demos and tests."""

from __future__ import annotations

import torch
from torch import Tensor


def block_structured_qkv(
    seed: int,
    batch: int = 2,
    heads: int = 2,
    n: int = 256,
    *,
    block_q: int = 32,
    block_kv: int = 16,
    head_dim: int = 32,
    strong: float = 8.0,
    medium: float = 6.5,
    noise: float = 0.02,
) -> tuple[Tensor, Tensor, Tensor]:
    """q, k, v ``[batch, heads, n, head_dim]`` float32 where head 0 is block-sparse and
    head 1 is not.

    In head 0 query block ``i`` (``block_q`` tokens) scores ``strong`` against key block
    ``2i`` and ``medium`` against ``2i + 1`` (``block_kv`` tokens each), about 0 elsewhere:
    keeping the strong tiles only gives a relative L1 error of about 0.3, strong + medium
    about 0.004, so a correct tuner keeps 2 key blocks per query block. Head 1 gets random
    q/k: attention is spread out and no sparse setting meets a tight bound.
    ``n`` must be a multiple of ``block_q``, and ``n // block_q <= head_dim``.
    """
    g = torch.Generator().manual_seed(seed)
    d = head_dim
    basis = torch.linalg.qr(torch.randn(d, d, generator=torch.Generator().manual_seed(7)))[0].T
    nqb, nkb = n // block_q, n // block_kv
    root = d**0.25
    kdir = torch.zeros(nkb, d)
    kdir[0::2] = basis[:nqb] * strong * root
    kdir[1::2] = basis[:nqb] * medium * root
    q = (basis[:nqb] * root).repeat_interleave(block_q, 0).expand(batch, heads, n, d).clone()
    k = kdir.repeat_interleave(block_kv, 0).expand(batch, heads, n, d).clone()
    q += noise * torch.randn(q.shape, generator=g)
    k += noise * torch.randn(k.shape, generator=g)
    q[:, 1] = torch.randn(batch, n, d, generator=g)
    k[:, 1] = torch.randn(batch, n, d, generator=g)
    v = torch.randn(batch, heads, n, d, generator=g)
    return q, k, v
