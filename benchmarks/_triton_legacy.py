"""The quantized kernel as it was on 2026-11-24 (128x128 whole tiles, about 450 TOPS),
kept unchanged as the baseline ``benchmarks/quant.py`` compares the current kernel with.

Three launches per call:
  1. ``_quant_rows``: Q (times ``scale * log2(e)``) and smoothed K to INT8, one fp32
     scale per block of rows, padded rows written as zeros; one pass each.
  2. ``_quant_v``: V to FP8 e4m3 with a per-channel scale, stored transposed
     ``[B, H, D, N_pad]`` so that the P·V product reads it K-major (what fp8 MMA wants),
     or to FP16 ``[B, H, N_pad, D]`` (padded, clamped).
  3. ``_attn``: INT8 ``Q·Kᵀ`` -> int32, exact int->fp32 conversion by the magic-number
     trick (an integer add and an exact float subtract instead of a 16/clk I2F), online
     softmax in base 2, P·V in FP8 or FP16 with fp32 accumulation,
     tile skipping from a tile list, in-kernel causal rule, optional ``pvthreshd``.

Only imported when a CUDA call (or a test under ``TRITON_INTERPRET=1``) needs it.
"""

from __future__ import annotations

import triton
import triton.language as tl

#: log2(448): P is scaled by 448 (the e4m3 maximum) before its FP8 rounding.
LOG2_FP8_MAX = tl.constexpr(8.807354922057604)
#: 1.5 * 2**23: for |x| < 2**22, float_bits(x + MAGIC_INT) - MAGIC_FLOAT == float(x).
MAGIC_INT = tl.constexpr(0x4B400000)
MAGIC_FLOAT = tl.constexpr(12582912.0)
#: Floor of a block's absolute maximum, so that an all-zero block gets a finite scale.
AMAX_EPS = tl.constexpr(1e-20)


@triton.jit
def _quant_rows(
    X, Mean, Out, Scale,
    sxb, sxh, sxn,
    H, N, N_PAD, NB,
    mul,
    HAS_MEAN: tl.constexpr, BLOCK: tl.constexpr, D: tl.constexpr,
):
    """One block of ``BLOCK`` rows of one (b, h): ``x * mul - mean`` -> int8 + fp32 scale.

    X: [B, H, N, D] (last dim contiguous). Out: int8 [B, H, N_PAD, D]. Scale: [B, H, NB].
    """
    blk = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    rows = blk * BLOCK + tl.arange(0, BLOCK)
    cols = tl.arange(0, D)
    valid = rows < N
    src = X + b.to(tl.int64) * sxb + h.to(tl.int64) * sxh
    x = tl.load(src + rows[:, None] * sxn + cols[None, :], mask=valid[:, None], other=0.0)
    x = x.to(tl.float32) * mul
    if HAS_MEAN:
        mean = tl.load(Mean + bh.to(tl.int64) * D + cols)
        x = tl.where(valid[:, None], x - mean[None, :], 0.0)
    amax = tl.maximum(tl.max(tl.max(tl.abs(x), 1), 0), AMAX_EPS)
    y = x * (127.0 / amax)
    # Round half away from zero (the float->int conversion truncates).
    y = (y + tl.where(y >= 0, 0.5, -0.5)).to(tl.int8)
    dst = Out + bh.to(tl.int64) * N_PAD * D
    tl.store(dst + rows[:, None] * D + cols[None, :], y, mask=(rows < N_PAD)[:, None])
    tl.store(Scale + bh.to(tl.int64) * NB + blk, amax / 127.0)


@triton.jit
def _quant_v(
    V, Inv, Out,
    svb, svh, svn,
    H, N, N_PAD,
    OUT_FP8: tl.constexpr, BLOCK: tl.constexpr, D: tl.constexpr,
):
    """V [B, H, N, D] for the P·V product, zeros past N. OUT_FP8: times the per-channel
    ``Inv`` [B, H, D], e4m3, stored transposed into Out [B, H, D, N_PAD]; else fp16
    (clamped to its range) into Out [B, H, N_PAD, D]."""
    blk = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    rows = blk * BLOCK + tl.arange(0, BLOCK)
    cols = tl.arange(0, D)
    src = V + b.to(tl.int64) * svb + h.to(tl.int64) * svh
    x = tl.load(src + rows[:, None] * svn + cols[None, :], mask=(rows < N)[:, None], other=0.0)
    x = x.to(tl.float32)
    keep = (rows < N_PAD)[:, None]
    if OUT_FP8:
        inv = tl.load(Inv + bh.to(tl.int64) * D + cols)
        y = tl.clamp(x * inv[None, :], -448.0, 448.0).to(tl.float8e4nv)
        dst = Out + bh.to(tl.int64) * D * N_PAD
        tl.store(dst + cols[None, :] * N_PAD + rows[:, None], y, mask=keep)
    else:
        y = tl.clamp(x, -65504.0, 65504.0).to(tl.float16)
        dst = Out + bh.to(tl.int64) * N_PAD * D
        tl.store(dst + rows[:, None] * D + cols[None, :], y, mask=keep)


@triton.jit
def _attn_block(
    acc, l_i, m_i, q, c_q, Kb, Vb, Ks, start_n, q_pos, row_ok, N_KV, V_ROW, V_COL, thr,
    MASK: tl.constexpr, PV_FP8: tl.constexpr, USE_PVT: tl.constexpr, FOLD: tl.constexpr,
    PVT_BRANCH: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr,
):
    """One (query tile, key block) step of the online softmax; scores in log2 units.

    MASK: 0 none, 1 key columns past N_KV, 2 causal (which also drops them for valid
    rows). FOLD: keep ``x = MAGIC + qk`` (exact) and fold the magic offset, the scale and
    the running max into one FMA per element, ``p = 2^(x*c - (MAGIC*c + m))``; else
    ``t = (x - MAGIC) * c`` first (two more ops per element, bit-equal to the reference).
    """
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D)
    k = tl.load(Kb + offs_d[:, None] + offs_n[None, :] * D)  # int8 [D, BLOCK_N]
    c = c_q * tl.load(Ks + start_n // BLOCK_N)
    qk = tl.dot(q, k)  # int32, |qk| <= 127 * 127 * D < 2**22
    x = (qk + MAGIC_INT).to(tl.float32, bitcast=True)  # == MAGIC_FLOAT + qk exactly
    if not FOLD:
        x = (x - MAGIC_FLOAT) * c
    if MASK == 1:
        x = tl.where((offs_n < N_KV)[None, :], x, float("-inf"))
    if MASK == 2:
        x = tl.where(q_pos[:, None] >= offs_n[None, :], x, float("-inf"))
    if FOLD:
        m_blk = (tl.max(x, 1) - MAGIC_FLOAT) * c
    else:
        m_blk = tl.max(x, 1)
    m_new = tl.maximum(m_i, m_blk)
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.math.exp2(m_i - m_safe)
    shift = m_safe
    if PV_FP8:
        shift = shift - LOG2_FP8_MAX
    if FOLD:
        p = tl.math.exp2(x * c - (shift + MAGIC_FLOAT * c)[:, None])
    else:
        p = tl.math.exp2(x - shift[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    v = tl.load(Vb + offs_n[:, None] * V_ROW + offs_d[None, :] * V_COL)  # [BLOCK_N, D]
    if USE_PVT:
        gap = tl.max(tl.where(row_ok, m_blk - m_safe, float("-inf")), 0)
        if PVT_BRANCH:
            # Skips the MMA. The product goes to a fresh accumulator: Triton's WGMMA
            # pipelining mishandles a loop-carried accumulator updated under an ``if``.
            if gap >= -thr:
                pv = tl.dot(p.to(v.dtype), v)
            else:
                pv = tl.zeros([BLOCK_M, D], tl.float32)
            acc += pv
        else:
            # Same result without a branch (no time saved): zero P of a skipped block.
            acc += tl.dot(tl.where(gap >= -thr, p, 0.0).to(v.dtype), v)
    else:
        acc += tl.dot(p.to(v.dtype), v)
    return acc, l_i, m_new


@triton.jit
def _attn(
    Q, K, V, Qs, Ks, Vs, Out, NumBlk, IdxBlk, Pvt,
    sob, soh, son, V_ROW, V_COL,
    snb, snh, sib, sih, siq,
    HQ, GROUP, N_Q, N_KV, NQ_PAD, NK_PAD, Q_OFF, NQB, NKB, NKT,
    MODE: tl.constexpr,  # 0 dense, 1 causal, 2 tile list
    PV_FP8: tl.constexpr, USE_PVT: tl.constexpr, FOLD: tl.constexpr, PVT_BRANCH: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, TILE_N: tl.constexpr, D: tl.constexpr,
):
    """One query tile of one (b, h). Q, K: int8 [B, H, N_PAD, D]; V: fp8 [B, Hkv, D, NK_PAD]
    (PV_FP8) or fp16 [B, Hkv, NK_PAD, D]; Qs [B, HQ, NQB], Ks [B, Hkv, NKB] fp32;
    Vs [B, Hkv, D] fp32; Out [B, HQ, N_Q, D]."""
    pid_m = tl.program_id(0)
    if MODE == 1:
        # Causal: the longest rows first, so the short ones fill the tail of the grid.
        pid_m = NQB - 1 - pid_m
    bh = tl.program_id(1)
    b = bh // HQ
    h = bh % HQ
    hk = h // GROUP
    bhk = (b * (HQ // GROUP) + hk).to(tl.int64)
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D)
    row_ok = offs_m < N_Q
    q_pos = offs_m + Q_OFF

    q = tl.load(Q + bh.to(tl.int64) * NQ_PAD * D + offs_m[:, None] * D + offs_d[None, :])
    c_q = tl.load(Qs + bh.to(tl.int64) * NQB + pid_m)
    Kb = K + bhk * NK_PAD * D
    Ks = Ks + bhk * NKB
    Vb = V + bhk * D * NK_PAD  # the same element count in both layouts
    thr = 0.0
    if USE_PVT:
        thr = tl.load(Pvt + h)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)

    if MODE == 0:
        n_full = (N_KV // BLOCK_N) * BLOCK_N
        for start_n in range(0, n_full, BLOCK_N):
            acc, l_i, m_i = _attn_block(
                acc, l_i, m_i, q, c_q, Kb, Vb, Ks, start_n, q_pos, row_ok, N_KV, V_ROW,
                V_COL, thr, 0, PV_FP8, USE_PVT, FOLD, PVT_BRANCH, BLOCK_M, BLOCK_N, D,
            )
        if n_full < N_KV:  # the ragged last block
            acc, l_i, m_i = _attn_block(
                acc, l_i, m_i, q, c_q, Kb, Vb, Ks, n_full, q_pos, row_ok, N_KV, V_ROW,
                V_COL, thr, 1, PV_FP8, USE_PVT, FOLD, PVT_BRANCH, BLOCK_M, BLOCK_N, D,
            )
    elif MODE == 1:
        # Blocks every row of the tile sees in full, then the diagonal band.
        lo_diag = ((start_m + Q_OFF + 1) // BLOCK_N) * BLOCK_N
        hi = tl.minimum(start_m + BLOCK_M + Q_OFF, N_KV)
        for start_n in range(0, lo_diag, BLOCK_N):
            acc, l_i, m_i = _attn_block(
                acc, l_i, m_i, q, c_q, Kb, Vb, Ks, start_n, q_pos, row_ok, N_KV, V_ROW,
                V_COL, thr, 0, PV_FP8, USE_PVT, FOLD, PVT_BRANCH, BLOCK_M, BLOCK_N, D,
            )
        for start_n in range(lo_diag, hi, BLOCK_N):
            acc, l_i, m_i = _attn_block(
                acc, l_i, m_i, q, c_q, Kb, Vb, Ks, start_n, q_pos, row_ok, N_KV, V_ROW,
                V_COL, thr, 2, PV_FP8, USE_PVT, FOLD, PVT_BRANCH, BLOCK_M, BLOCK_N, D,
            )
    else:
        n_ptr = NumBlk + b * snb + h * snh + pid_m
        i_ptr = IdxBlk + b.to(tl.int64) * sib + h.to(tl.int64) * sih + pid_m * siq
        n_tiles = tl.load(n_ptr)
        # Tiles come in ascending order: only a last tile past N_KV needs the column mask.
        last = tl.load(i_ptr + tl.maximum(n_tiles - 1, 0))
        ragged = (n_tiles > 0) & (last == NKT - 1) & (N_KV % TILE_N != 0)
        n_plain = n_tiles - ragged.to(tl.int32)
        for i in range(0, n_plain):
            tile = tl.load(i_ptr + i)
            for s in tl.static_range(TILE_N // BLOCK_N):
                acc, l_i, m_i = _attn_block(
                    acc, l_i, m_i, q, c_q, Kb, Vb, Ks, tile * TILE_N + s * BLOCK_N, q_pos,
                    row_ok, N_KV, V_ROW, V_COL, thr, 0, PV_FP8, USE_PVT, FOLD, PVT_BRANCH, BLOCK_M,
                    BLOCK_N, D,
                )
        if ragged:
            for s in tl.static_range(TILE_N // BLOCK_N):
                acc, l_i, m_i = _attn_block(
                    acc, l_i, m_i, q, c_q, Kb, Vb, Ks, last * TILE_N + s * BLOCK_N, q_pos,
                    row_ok, N_KV, V_ROW, V_COL, thr, 1, PV_FP8, USE_PVT, FOLD, PVT_BRANCH, BLOCK_M,
                    BLOCK_N, D,
                )

    inv_l = tl.where(l_i > 0, 1.0 / l_i, 0.0)
    out = acc * inv_l[:, None]
    if PV_FP8:
        out = out * tl.load(Vs + bhk * D + offs_d)[None, :]
    dst = Out + b.to(tl.int64) * sob + h.to(tl.int64) * soh
    tl.store(
        dst + offs_m[:, None] * son + offs_d[None, :], out.to(Out.dtype.element_ty),
        mask=row_ok[:, None],
    )
