"""Host side of the meansim predictor's Triton kernels (``_triton_meansim.py``).

- ``block_stats_into``: the block statistics of q or k in one launch (one pass over the
  tensor; sums in another order than PyTorch's, so a statistic can differ in its last bit).
  The default CUDA predictor (``flexsparse.masks.meansim``) uses it, then replays steps 2-4,
  PyTorch's own ops, from a CUDA graph (``capture``).
- ``select``: the opt-in Triton selection (``FLEXSPARSE_MEANSIM_TRITON=1``): rows sorted in
  registers, ``torch.cumsum`` kept so the threshold count rounds as in the PyTorch path,
  then one kernel for count, cut, tie rule and the always-kept tiles.

Nothing here synchronises except ``capture`` (once per shape).
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
    with ``FLEXSPARSE_MEANSIM_TRITON=1``, not inside ``torch.compile``. Opt-in, eager: 1.31 ms
    on the 2b shape against 0.61 ms for the default CUDA-graph predictor (H100, 2026-11-25)."""
    return (
        x.is_cuda
        and os.environ.get("FLEXSPARSE_MEANSIM_TRITON", "") == "1"
        and not torch.compiler.is_compiling()
        and _have_triton()
    )


#: Sort the rows with ``_sort_rows`` (True) or ``torch.sort`` (False); both give the same
#: values. Benchmarks flip it to compare.
SORT_IN_TRITON = True


def stats_ready(x: Tensor) -> bool:
    """Whether ``block_stats_into`` runs on ``x``: CUDA, Triton importable, not inside
    ``torch.compile``."""
    return x.is_cuda and not torch.compiler.is_compiling() and _have_triton()


def block_stats_into(
    x: Tensor, block: int, lead: int, pooled: Tensor, selfsim: Tensor,
    mean: Tensor | None = None,
) -> None:
    """Fill ``pooled`` ([B, H, NB, D] fp32) and ``selfsim`` ([B, H, NB] fp32) with the
    statistics of every block of ``x`` [B, H, N, D] (any strides but a unit last one), one
    launch: block ``j`` holds tokens ``j * block - lead ...``; a partial block is pooled over
    its tokens and has self-similarity ``-inf``. ``mean`` [B, H, D] fp32 (contiguous) is
    subtracted first (``smooth_k``)."""
    from . import _triton_meansim as K

    b, h, n, d = x.shape
    nb = pooled.shape[2]
    if nb == 0 or b * h == 0:
        return
    if x.stride(-1) != 1:
        x = x.contiguous()
    bp, dp = max(16, triton_next_pow2(block)), max(16, triton_next_pow2(d))
    group = max(1, STATS_ROWS // bp)
    K._block_stats[(-(-nb // group), b * h)](
        x, pooled if mean is None else mean, pooled, selfsim,
        x.stride(0), x.stride(1), x.stride(2), h, n, nb, lead,
        HAS_MEAN=mean is not None, BLOCK=block, BLOCK_P=bp, D=d, D_P=dp, GROUP=group,
        STAGES=STATS_STAGES, num_warps=4 if bp * dp <= 8192 else 8,
    )


#: Tokens per program of the statistics kernel (consecutive blocks, at least one) and the
#: depth of its software pipeline over them. One block per program measured fastest (H100,
#: q+k of the CogVideoX-2b shape: 194 us; 256 tokens 201 us, 256 / 2 stages 234 us,
#: 512 / 3 stages 231 us; ``benchmarks/meansim.py --auto``).
STATS_ROWS = 0
STATS_STAGES = 1


def capture(fn, inputs: dict, device: torch.device):
    """``fn(**inputs)`` captured in a CUDA graph (after two warm-up runs on a side stream,
    so that lazy initialisation stays out of the graph): ``(graph, out)``; ``replay()``
    recomputes ``out`` in place from the current contents of ``inputs``. Each graph has its
    own memory pool: a pool shared with graphs freed since (a dropped shape) trips the
    caching allocator's assertion (torch 2.11). Synchronises: call it once per shape."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(2):
            fn(**inputs)
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, capture_error_mode="thread_local"):
        out = fn(**inputs)
    return graph, out


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
    """The smallest power of two >= n (Triton's block shapes)."""
    return 1 << max(0, n - 1).bit_length()
