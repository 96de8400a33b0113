"""Triton kernels of the meansim predictor (the arithmetic is ``flexsparse.masks.meansim``'s;
``meansim_fast.py`` launches them).

- ``_block_stats``: one pass over every block of ``x`` (the partial leading / trailing
  block included, zero-padded): pooled mean and the self-similarity
  ``|sum_i x_i / |x_i||^2 / n^2`` (fp32 accumulation, ``-inf`` for a partial block),
  optionally after subtracting a per-(b, h) mean (``smooth_k``).
- ``_sort_rows``: each query block's probabilities sorted in registers (bitonic, a
  power-of-two width padded with -1) instead of ``torch.sort``'s segmented sort.
- ``_select``: one query block's row of the tile map from the probabilities, the sorted row
  and its cumulative sum (``torch.cumsum``: its rounding decides which tiles sit at the
  ``cdfthreshd`` edge, so it is the PyTorch path's own): the count, the cut value, the
  stable-sort tie rule, then the always-kept tiles, the causal drop and the sink.

Only imported when a CUDA call needs it.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _block_stats(
    X, Mean, Pooled, Selfsim,
    sxb, sxh, sxn,
    H, N, NB, LEAD,
    HAS_MEAN: tl.constexpr, BLOCK: tl.constexpr, BLOCK_P: tl.constexpr, D: tl.constexpr,
    D_P: tl.constexpr, GROUP: tl.constexpr, STAGES: tl.constexpr,
):
    """Block ``blk`` of (b, h): tokens ``blk * BLOCK - LEAD ...`` of X [B, H, N, D] (those
    outside ``[0, N)`` are absent: the partial leading / trailing block), written to block
    ``blk`` of Pooled [B, H, NB, D] and Selfsim [B, H, NB] (``-inf`` for a partial block).
    BLOCK_P, D_P: powers of two >= BLOCK, D (masked lanes are zeros). A program does
    GROUP consecutive blocks, their loads software-pipelined STAGES deep."""
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    lane = tl.arange(0, BLOCK_P)
    cols = tl.arange(0, D_P)
    cmask = cols < D
    src = X + b.to(tl.int64) * sxb + h.to(tl.int64) * sxh
    for i in tl.range(0, GROUP, num_stages=STAGES):
        blk = tl.program_id(0) * GROUP + i
        _one_block(src, Mean, Pooled, Selfsim, sxn, N, NB, LEAD, blk, bh, lane, cols, cmask,
                   HAS_MEAN, BLOCK, D)


@triton.jit
def _one_block(src, Mean, Pooled, Selfsim, sxn, N, NB, LEAD, blk, bh, lane, cols, cmask,
               HAS_MEAN: tl.constexpr, BLOCK: tl.constexpr, D: tl.constexpr):
    rows = blk * BLOCK - LEAD + lane
    valid = (lane < BLOCK) & (rows >= 0) & (rows < N)
    keep = valid[:, None] & cmask[None, :]
    x = tl.load(src + rows[:, None].to(tl.int64) * sxn + cols[None, :], mask=keep, other=0.0)
    x = x.to(tl.float32)
    if HAS_MEAN:
        mu = tl.load(Mean + bh.to(tl.int64) * D + cols, mask=cmask, other=0.0)
        # absent tokens stay zeros after the shift (the reference pads after subtracting)
        x = tl.where(keep, x - mu[None, :], 0.0)
    count = tl.sum(valid.to(tl.int32), 0)
    total = tl.sum(x, 0)
    norm = tl.sqrt(tl.sum(x * x, 1))
    # A zero token stays a zero vector (the reference clamps the norm the same way).
    unit = tl.sum(x * (1.0 / tl.maximum(norm, 1e-12))[:, None], 0)
    out = bh.to(tl.int64) * NB + blk
    here = blk < NB  # the last program's group may run past the last block
    tl.store(Pooled + out * D + cols, total / tl.maximum(count, 1).to(tl.float32),
             mask=cmask & here)
    sim = tl.sum(unit * unit, 0) / (BLOCK * BLOCK)
    tl.store(Selfsim + out, tl.where(count == BLOCK, sim, float("-inf")), mask=here)


@triton.jit
def _sort_rows(Prob, Ordered, KB, WIDTH: tl.constexpr):
    """Row ``r`` of Prob [R, KB] (fp32, >= 0) sorted descending into Ordered [R, KB]."""
    r = tl.program_id(0)
    cols = tl.arange(0, WIDTH)
    valid = cols < KB
    row = r.to(tl.int64) * KB
    # -1 pads sort after every probability (all >= 0).
    p = tl.load(Prob + row + cols, mask=valid, other=-1.0)
    tl.store(Ordered + row + cols, tl.sort(p, 0, descending=True), mask=valid)


@triton.jit
def _select(
    Prob, Ordered, Cdf, SimQ, SimK, Thr, Out,
    H, QB, KB, Q_OFF, BQ, BKV,
    USE_CDF: tl.constexpr, CAUSAL: tl.constexpr, SINK: tl.constexpr, WIDTH: tl.constexpr,
):
    """Row ``r`` of Prob [B*H*QB, KB] (fp32, >= 0) -> Out uint8 [B*H*QB, KB].

    Ordered: the rows sorted descending; Cdf: their cumulative sums (USE_CDF; computed by
    ``torch.cumsum``, so that its rounding is the PyTorch path's). SimQ uint8 [B*H*QB],
    SimK uint8 [B*H, KB]: self-similar blocks. Thr: fp32 [H] ``cdfthreshd`` (USE_CDF) or
    int32 [H] ``topk`` counts."""
    r = tl.program_id(0)
    bh = r // QB
    qi = r % QB
    h = bh % H
    cols = tl.arange(0, WIDTH)
    valid = cols < KB
    row = r.to(tl.int64) * KB
    p = tl.load(Prob + row + cols, mask=valid, other=-1.0)
    if USE_CDF:
        cdf = tl.load(Cdf + row + cols, mask=valid, other=float("inf"))
        num = tl.sum((cdf <= tl.load(Thr + h)).to(tl.int32), 0)
    else:
        num = tl.load(Thr + h)
    num = tl.minimum(tl.maximum(num, 1), KB)
    cut = tl.load(Ordered + row + num - 1)  # the num-th largest value
    above = p > cut
    tie = (p == cut) & valid
    room = num - tl.sum(above.to(tl.int32), 0)
    # Of the ties, the lowest indices first (what a stable descending sort keeps).
    kept = above | (tie & (tl.cumsum(tie.to(tl.int32), 0) <= room))
    sim_k = tl.load(SimK + bh.to(tl.int64) * KB + cols, mask=valid, other=1)
    sim_q = tl.load(SimQ + r)
    kept = kept | (sim_k == 0) | (sim_q == 0)
    if CAUSAL:
        kept = kept & (cols * BKV < (qi + Q_OFF + 1) * BQ)
    if SINK:
        kept = kept | (cols == 0)
    tl.store(Out + row + cols, kept.to(tl.uint8), mask=valid)
