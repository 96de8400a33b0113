"""Host side of the meansim predictor's Triton kernels (``_triton_meansim.py``).

Kernels replace the parts of ``flexsparse.masks.meansim`` that dominated its CUDA time:
block statistics (one pass over q and k; sums in another order than PyTorch's, so a
statistic can differ in its last bit) and the per-row selection (rows sorted in registers,
``torch.cumsum`` kept so the threshold count rounds as in the PyTorch path, then one kernel
for count, cut, tie rule and the always-kept tiles). Nothing here synchronises.
"""

from __future__ import annotations

import functools
import os

import torch
from torch import Tensor


@functools.lru_cache(maxsize=1)
def _have_triton() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def available(x: Tensor) -> bool:
    """Whether the Triton path runs on ``x``'s device: CUDA, Triton importable, asked for
    with ``FLEXSPARSE_MEANSIM_TRITON=1``, not inside ``torch.compile``. Opt-in: measured at
    1.46 ms on the 2b shape against 1.02 ms for the compiled PyTorch path (H100)."""
    return (
        x.is_cuda
        and os.environ.get("FLEXSPARSE_MEANSIM_TRITON", "") == "1"
        and not torch.compiler.is_compiling()
        and _have_triton()
    )


#: Sort the rows with ``_sort_rows`` (True) or ``torch.sort`` (False); both give the same
#: values. Benchmarks flip it to compare.
SORT_IN_TRITON = True


def _pow2(n: int) -> bool:
    return n >= 16 and n & (n - 1) == 0


def stats_supported(x: Tensor, block: int) -> bool:
    """Shapes ``full_block_stats`` takes: power-of-two block (>= 16) and head_dim."""
    return available(x) and _pow2(block) and _pow2(x.shape[-1]) and x.stride(-1) == 1


def full_block_stats(
    x: Tensor, block: int, start: int, count: int, pooled: Tensor, selfsim: Tensor,
    first: int, mean: Tensor | None = None,
) -> None:
    """Fill ``pooled[:, :, first:first+count]`` ([B, H, NB, D] fp32) and ``selfsim`` ([B, H,
    NB] fp32) with the statistics of the ``count`` complete blocks of ``x`` [B, H, N, D]
    that start at token ``start``; ``mean`` [B, H, D] fp32 is subtracted first."""
    from . import _triton_meansim as K

    b, h, _, d = x.shape
    if count == 0:
        return
    K._block_stats[(count, b * h)](
        x, pooled if mean is None else mean, pooled, selfsim,
        x.stride(0), x.stride(1), x.stride(2), h, pooled.shape[2], first, start,
        HAS_MEAN=mean is not None, BLOCK=block, D=d, num_warps=4 if block * d <= 8192 else 8,
    )


def select(
    prob: Tensor, sim_q: Tensor, sim_k: Tensor, cdfthreshd: Tensor | None,
    topk: Tensor | None, *, block_q: int, block_kv: int, causal: bool, attention_sink: bool,
    q_block_offset: int,
) -> Tensor:
    """Steps 3-4 of the predictor on the probabilities.

    Args:
        prob: fp32 ``[B, H, Qb, KVb]`` (softmax over key blocks, NaN replaced by 0).
        sim_q: bool ``[B, H, Qb]``; sim_k: bool ``[B, H, KVb]``.
        cdfthreshd / topk: fp32 ``[H]`` (exactly one).

    Returns:
        bool ``[B, H, Qb, KVb]``.
    """
    from . import _triton_meansim as K

    b, h, qb, kb = prob.shape
    prob = prob.contiguous()
    if cdfthreshd is not None:
        thr = cdfthreshd.to(torch.float32).contiguous()
    else:
        # The count as the PyTorch path computes it: fp32 product truncated.
        thr = (topk * kb).to(torch.int64).clamp(max=kb).to(torch.int32).contiguous()
    width = max(16, triton_next_pow2(kb))
    warps = 4 if width <= 1024 else 8
    if SORT_IN_TRITON:
        ordered = torch.empty_like(prob)
        K._sort_rows[(b * h * qb,)](prob, ordered, kb, WIDTH=width, num_warps=warps)
    else:
        ordered = torch.sort(prob, dim=-1, descending=True).values
    # torch.cumsum, as the PyTorch path: its rounding decides the tiles at the threshold.
    cdf = ordered.cumsum(-1) if cdfthreshd is not None else ordered
    out = torch.empty(b, h, qb, kb, dtype=torch.uint8, device=prob.device)
    K._select[(b * h * qb,)](
        prob, ordered, cdf, sim_q.contiguous().view(torch.uint8),
        sim_k.contiguous().view(torch.uint8), thr, out, h, qb, kb, q_block_offset, block_q,
        block_kv, USE_CDF=cdfthreshd is not None, CAUSAL=causal, SINK=attention_sink,
        WIDTH=width, num_warps=warps,
    )
    return out.view(torch.bool)


def triton_next_pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()
