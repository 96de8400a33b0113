"""Triton kernels of the quantized block-sparse attention (see ``quant.py`` for the
arithmetic, which ``quant_reference`` mirrors in PyTorch).

Launches per call:
  1. ``_quant_q_sum_k`` (Q to INT8, and the sums of ``quant.k_mean``'s sample of K, in
     parts), then ``_quant_k`` (smoothed K to INT8): one fp32 scale per block of rows,
     padded rows written as zeros. (Quantizing Q inside ``_attn`` instead, in registers,
     measured 10-25 % slower dense; docs/kernel_notes.md.)
  2. ``_quant_v``, only when V must change format: to FP8 e4m3 with a per-channel scale,
     stored transposed ``[B, H, D, N_pad]`` so that the P·V product reads it K-major
     (what fp8 MMA wants), or to the other 16-bit float ``[B, H, N_pad, D]``. When the
     P·V precision is V's own dtype (the default), ``_attn`` reads V where it lies.
  3. ``_attn``: INT8 ``Q·Kᵀ`` -> int32, exact
     int->fp32 conversion by the magic-number trick (an integer add and an exact float
     subtract instead of a 16/clk I2F), online softmax in base 2, P·V in FP8, FP16 or
     BF16 with fp32 accumulation, tile skipping from a tile list, in-kernel causal rule,
     optional ``pvthreshd``.

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
#: Slack (log2 units) of the pvthreshd test: the row that sets a new maximum has a gap of
#: exactly 0, which the compiler's FMA contraction can turn into -1 ulp; without slack
#: pvthreshd=0 then skipped such blocks (14.5 % off the reference at block_n=64, H100).
PVT_SLACK = tl.constexpr(2.0**-10)
#: Relative margin on a K block's largest row norm (``quant.NORM_MARGIN``).
NORM_MARGIN = tl.constexpr(2.0**-10)


@triton.jit
def _quant_block(
    X, Mean, Out, Scale, Norm, sxb, sxh, sxn, blk, bh, H, N, N_PAD, NB, mul,
    HAS_MEAN: tl.constexpr, NORM: tl.constexpr, BLOCK: tl.constexpr, D: tl.constexpr,
):
    """Block ``blk`` of ``BLOCK`` rows of (b, h) = divmod(bh, H): ``x * mul - mean`` ->
    int8 + fp32 scale. X: [B, H, N, D] (last dim contiguous). Mean: a [D] fp32 block
    (read only with HAS_MEAN).
    Out: int8 [B, H, N_PAD, D], padded rows written as zeros. Scale: [B, H, NB].
    Norm, by NORM: 0 nothing, 1 each row's Euclidean norm of the quantized values times the
    scale ([B, H, N_PAD]), 2 the block's largest ([B, H, NB], times ``1 + NORM_MARGIN`` so
    that a product of two norms bounds the dequantized dot)."""
    b = bh // H
    h = bh % H
    rows = blk * BLOCK + tl.arange(0, BLOCK)
    cols = tl.arange(0, D)
    valid = rows < N
    src = X + b.to(tl.int64) * sxb + h.to(tl.int64) * sxh
    x = tl.load(src + rows[:, None] * sxn + cols[None, :], mask=valid[:, None], other=0.0)
    x = x.to(tl.float32) * mul
    if HAS_MEAN:
        x = tl.where(valid[:, None], x - Mean[None, :], 0.0)
    amax = tl.maximum(tl.max(tl.max(tl.abs(x), 1), 0), AMAX_EPS)
    y = x * (127.0 / amax)
    # Round half away from zero (the float->int conversion truncates).
    y = (y + tl.where(y >= 0, 0.5, -0.5)).to(tl.int8)
    dst = Out + bh.to(tl.int64) * N_PAD * D
    tl.store(dst + rows[:, None] * D + cols[None, :], y, mask=(rows < N_PAD)[:, None])
    tl.store(Scale + bh.to(tl.int64) * NB + blk, amax / 127.0)
    if NORM != 0:
        yf = y.to(tl.float32)
        norm = tl.sqrt(tl.sum(yf * yf, 1)) * (amax / 127.0)
        if NORM == 1:
            tl.store(Norm + bh.to(tl.int64) * N_PAD + rows, norm, mask=rows < N_PAD)
        else:
            tl.store(Norm + bh.to(tl.int64) * NB + blk, tl.max(norm, 0) * (1.0 + NORM_MARGIN))


@triton.jit
def _quant_q_sum_k(
    Q, K, QOut, QScale, QNorm, Part,
    sqb, sqh, sqn, skb, skh, skn,
    HQ, HKV, NQ, NQ_PAD, NQB, NK, Q_PROGS, STEP, PARTS, q_mul,
    NORMS: tl.constexpr, BLOCK_Q: tl.constexpr, CHUNK: tl.constexpr, D: tl.constexpr,
):
    """Q to INT8, and the sums of ``quant.k_mean``'s sample of K, in one grid.

    Programs ``[0, Q_PROGS = NQB * B * HQ)`` quantize a ``BLOCK_Q``-row block of Q (times
    ``q_mul``) into QOut / QScale. Program ``Q_PROGS + bh * PARTS + part`` adds up keys
    ``STEP * i`` of (b, h) = divmod(bh, HKV), i in ``[part * CHUNK, part * CHUNK + CHUNK)``
    (those below NK), into Part [B * HKV, PARTS, D] (fp32). NORMS: Q's row norms into
    QNorm [B, HQ, NQ_PAD] too."""
    pid = tl.program_id(0)
    if pid < Q_PROGS:
        _quant_block(Q, Q, QOut, QScale, QNorm, sqb, sqh, sqn, pid % NQB, pid // NQB, HQ, NQ,
                     NQ_PAD, NQB, q_mul, HAS_MEAN=False, NORM=1 if NORMS else 0,
                     BLOCK=BLOCK_Q, D=D)
    else:
        pid -= Q_PROGS
        part = pid % PARTS
        bh = pid // PARTS
        b = bh // HKV
        h = bh % HKV
        rows = (part * CHUNK + tl.arange(0, CHUNK)) * STEP
        cols = tl.arange(0, D)
        src = K + b.to(tl.int64) * skb + h.to(tl.int64) * skh
        x = tl.load(src + rows[:, None].to(tl.int64) * skn + cols[None, :],
                    mask=(rows < NK)[:, None], other=0.0)
        tl.store(Part + (bh.to(tl.int64) * PARTS + part) * D + cols,
                 tl.sum(x.to(tl.float32), 0))


@triton.jit
def _quant_k(
    K, Part, KOut, KScale, KNorm, skb, skh, skn, HKV, NK, NK_PAD, NKB, PARTS, n_samples,
    NORMS: tl.constexpr, BLOCK_K: tl.constexpr, D: tl.constexpr, PARTS_P2: tl.constexpr,
):
    """Block ``program_id(0)`` of ``BLOCK_K`` rows of K (b, h) = divmod(program_id(1),
    HKV), minus the sample mean (``Part`` [B * HKV, PARTS, D] summed, over
    ``n_samples``), to INT8. NORMS: the block's largest row norm into KNorm [B, HKV, NKB]."""
    blk = tl.program_id(0)
    bh = tl.program_id(1)
    parts = tl.arange(0, PARTS_P2)
    cols = tl.arange(0, D)
    sums = tl.load(Part + (bh.to(tl.int64) * PARTS + parts[:, None]) * D + cols[None, :],
                   mask=(parts < PARTS)[:, None], other=0.0)
    mean = tl.sum(sums, 0) / n_samples
    _quant_block(K, mean, KOut, KScale, KNorm, skb, skh, skn, blk, bh, HKV, NK, NK_PAD, NKB,
                 1.0, HAS_MEAN=True, NORM=2 if NORMS else 0, BLOCK=BLOCK_K, D=D)


@triton.jit
def _quant_v(
    V, Inv, Out,
    svb, svh, svn,
    H, N, N_PAD,
    OUT_FP8: tl.constexpr, BLOCK: tl.constexpr, D: tl.constexpr,
):
    """V [B, H, N, D] for the P·V product, zeros past N. OUT_FP8: times the per-channel
    ``Inv`` [B, H, D], e4m3, stored transposed into Out [B, H, D, N_PAD]; else Out's
    16-bit float (fp16: clamped to its range) into Out [B, H, N_PAD, D]."""
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
        if Out.dtype.element_ty == tl.float16:
            x = tl.clamp(x, -65504.0, 65504.0)
        y = x.to(Out.dtype.element_ty)
        dst = Out + bh.to(tl.int64) * N_PAD * D
        tl.store(dst + rows[:, None] * D + cols[None, :], y, mask=keep)


@triton.jit
def _attn_block(
    acc, l_i, m_i, q, c_q, Kb, Vb, Ks, start_n, q_pos, row_ok, N_KV, V_ROW, V_COL, thr,
    Wb, word0,
    MASK: tl.constexpr, PV_FP8: tl.constexpr, USE_PVT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr, WORDS: tl.constexpr,
    BITS_GATHER: tl.constexpr = False,
):
    """One (query tile, key block) step of the online softmax; scores in log2 units.

    MASK: 0 none (full tiles: no ``tl.where`` on the hot path), 1 key columns past N_KV,
    2 causal (which also drops them for valid rows), 3 the packed bits of a partial tile
    (``Wb``: int32 ``[BLOCK_M, WORDS]`` of the tile, ``word0``: first word of this block).
    ``x = MAGIC + qk`` is exact; the magic offset, the scale and the running max fold
    into one FMA per element, ``p = 2^(x*c - (MAGIC*c + m))``. V is read with the column
    rule on every masked block (it may be the caller's unpadded tensor).
    """
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D)
    k = tl.load(Kb + offs_d[:, None] + offs_n[None, :] * D)  # int8 [D, BLOCK_N]
    c = c_q * tl.load(Ks + start_n // BLOCK_N)
    qk = tl.dot(q, k)  # int32, |qk| <= 127 * 127 * D < 2**22
    x = (qk + MAGIC_INT).to(tl.float32, bitcast=True)  # == MAGIC_FLOAT + qk exactly
    if MASK == 1:
        x = tl.where((offs_n < N_KV)[None, :], x, float("-inf"))
    if MASK == 2:
        x = tl.where(q_pos[:, None] >= offs_n[None, :], x, float("-inf"))
    if MASK == 3:
        cols = tl.arange(0, BLOCK_N)
        rows = tl.arange(0, BLOCK_M)
        if BITS_GATHER:
            # One 4-byte load per score element (the first version; kept for comparison).
            w = tl.load(Wb + rows[:, None] * WORDS + (word0 + cols[None, :] // 32))
        else:
            # Each row's BLOCK_N / 32 words loaded once as [BLOCK_M] vectors (a few loads
            # per thread instead of one per element), spread over the columns by selects.
            w = tl.broadcast_to(tl.load(Wb + rows * WORDS + word0)[:, None], [BLOCK_M, BLOCK_N])
            for j in tl.static_range(1, BLOCK_N // 32):
                wj = tl.load(Wb + rows * WORDS + (word0 + j))
                w = tl.where((cols // 32 == j)[None, :], wj[:, None], w)
        x = tl.where(((w >> (cols[None, :] % 32)) & 1) != 0, x, float("-inf"))
    m_blk = (tl.max(x, 1) - MAGIC_FLOAT) * c
    m_new = tl.maximum(m_i, m_blk)
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.math.exp2(m_i - m_safe)
    shift = m_safe
    if PV_FP8:
        shift = shift - LOG2_FP8_MAX
    p = tl.math.exp2(x * c - (shift + MAGIC_FLOAT * c)[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    v_ptr = Vb + offs_n[:, None] * V_ROW + offs_d[None, :] * V_COL  # [BLOCK_N, D]
    if MASK == 0:
        v = tl.load(v_ptr)
    else:
        v = tl.load(v_ptr, mask=(offs_n < N_KV)[:, None], other=0.0)
    if USE_PVT:
        # SpargeAttn's PV skip as a zeroed P: a branch around the MMA breaks Triton's
        # WGMMA pipelining (measured 21.5 ms instead of 9.7 ms on the 2b dense shape).
        gap = tl.max(tl.where(row_ok, m_blk - m_safe, float("-inf")), 0)
        acc += tl.dot(tl.where(gap >= -thr - PVT_SLACK, p, 0.0).to(v.dtype), v)
    else:
        acc += tl.dot(p.to(v.dtype), v)
    return acc, l_i, m_new


@triton.jit
def _attn(
    Q, K, V, Qs, Ks, Vs, Out, FullNum, FullIdx, PartNum, PartIdx, PartOff, Bits, RowOrder,
    Pvt,
    svb, svh, sob, soh, son, V_ROW, V_COL,
    snb, snh, sib, sih, siq,
    HQ, GROUP, N_Q, N_KV, NQ_PAD, NK_PAD, Q_OFF, NQB, NKB, NKT,
    MODE: tl.constexpr,  # 0 dense, 1 causal, 2 tile lists (full, then partial with bits)
    PV_FP8: tl.constexpr, USE_PVT: tl.constexpr, HAS_PARTIAL: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, TILE_N: tl.constexpr, D: tl.constexpr,
    BITS_GATHER: tl.constexpr = False,
):
    """One query tile of one (b, h). Q, K: int8 [B, H, N_PAD, D]; V: fp8
    [B, Hkv, D, NK_PAD] (PV_FP8) or 16-bit [B, Hkv, >=N_KV, D], strides (svb, svh, V_ROW,
    V_COL); Qs [B, HQ, NQB], Ks [B, Hkv, NKB] fp32; Vs [B, Hkv, D] fp32; Out [B, HQ, N_Q, D].

    MODE 2: FullNum/PartNum [Bm, Hm, Qb] and FullIdx/PartIdx [Bm, Hm, Qb, KVb] are the
    BlockMask's ``full_kv_*`` / ``kv_*`` lists (one set of strides: both come from one
    BlockMask); PartOff [Bm, Hm, Qb] int64 the first partial entry of each list in Bits,
    int32 [P, BLOCK_M, TILE_N // 32] (bit c of word w: column 32 w + c of the tile);
    RowOrder [NQB] int32 the query tiles by decreasing work, taken in that order.
    """
    pid_m = tl.program_id(0)
    # The longest rows first, so the short ones fill the tail of the grid.
    if MODE == 1:
        pid_m = NQB - 1 - pid_m
    if MODE == 2:
        pid_m = tl.load(RowOrder + pid_m)
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
    WORDS: tl.constexpr = TILE_N // 32
    SUB: tl.constexpr = TILE_N // BLOCK_N  # key blocks per tile

    q = tl.load(Q + bh.to(tl.int64) * NQ_PAD * D + offs_m[:, None] * D + offs_d[None, :])
    c_q = tl.load(Qs + bh.to(tl.int64) * NQB + pid_m)
    Kb = K + bhk * NK_PAD * D
    Ks = Ks + bhk * NKB
    Vb = V + b.to(tl.int64) * svb + hk.to(tl.int64) * svh
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
                V_COL, thr, Bits, 0, 0, PV_FP8, USE_PVT, BLOCK_M, BLOCK_N, D, WORDS,
            )
        if n_full < N_KV:  # the ragged last block
            acc, l_i, m_i = _attn_block(
                acc, l_i, m_i, q, c_q, Kb, Vb, Ks, n_full, q_pos, row_ok, N_KV, V_ROW,
                V_COL, thr, Bits, 0, 1, PV_FP8, USE_PVT, BLOCK_M, BLOCK_N, D, WORDS,
            )
    elif MODE == 1:
        # Blocks every row of the tile sees in full, then the diagonal band.
        lo_diag = ((start_m + Q_OFF + 1) // BLOCK_N) * BLOCK_N
        hi = tl.minimum(start_m + BLOCK_M + Q_OFF, N_KV)
        for start_n in range(0, lo_diag, BLOCK_N):
            acc, l_i, m_i = _attn_block(
                acc, l_i, m_i, q, c_q, Kb, Vb, Ks, start_n, q_pos, row_ok, N_KV, V_ROW,
                V_COL, thr, Bits, 0, 0, PV_FP8, USE_PVT, BLOCK_M, BLOCK_N, D, WORDS,
            )
        for start_n in range(lo_diag, hi, BLOCK_N):
            acc, l_i, m_i = _attn_block(
                acc, l_i, m_i, q, c_q, Kb, Vb, Ks, start_n, q_pos, row_ok, N_KV, V_ROW,
                V_COL, thr, Bits, 0, 2, PV_FP8, USE_PVT, BLOCK_M, BLOCK_N, D, WORDS,
            )
    else:
        lst = b.to(tl.int64) * snb + h.to(tl.int64) * snh + pid_m
        i_off = b.to(tl.int64) * sib + h.to(tl.int64) * sih + pid_m * siq
        # Full tiles: ascending, so only a last tile past N_KV needs the column mask.
        n_tiles = tl.load(FullNum + lst)
        last = tl.load(FullIdx + i_off + tl.maximum(n_tiles - 1, 0))
        ragged = (n_tiles > 0) & (last == NKT - 1) & (N_KV % TILE_N != 0)
        n_plain = n_tiles - ragged.to(tl.int32)
        # One key block per iteration, also for tiles of several blocks: Triton pipelines a
        # loop body of one block best (H100, radial Wan 69 f at 128 x 128 tiles, D=128:
        # 15.5 ms with two unrolled blocks per tile, 13.2 ms this way).
        for j in range(0, n_plain * SUB):
            tile = tl.load(FullIdx + i_off + j // SUB)
            acc, l_i, m_i = _attn_block(
                acc, l_i, m_i, q, c_q, Kb, Vb, Ks, tile * TILE_N + (j % SUB) * BLOCK_N,
                q_pos, row_ok, N_KV, V_ROW, V_COL, thr, Bits, 0, 0, PV_FP8, USE_PVT, BLOCK_M,
                BLOCK_N, D, WORDS,
            )
        if ragged:
            for s in tl.static_range(TILE_N // BLOCK_N):
                acc, l_i, m_i = _attn_block(
                    acc, l_i, m_i, q, c_q, Kb, Vb, Ks, last * TILE_N + s * BLOCK_N, q_pos,
                    row_ok, N_KV, V_ROW, V_COL, thr, Bits, 0, 1, PV_FP8, USE_PVT, BLOCK_M,
                    BLOCK_N, D, WORDS,
                )
        if HAS_PARTIAL:
            # Partial tiles: the token rule from the packed bits (0 past N_KV and N_Q).
            n_part = tl.load(PartNum + lst)
            first = tl.load(PartOff + lst)
            for j in range(0, n_part * SUB):
                i = j // SUB
                tile = tl.load(PartIdx + i_off + i)
                Wb = Bits + (first + i) * (BLOCK_M * WORDS)
                acc, l_i, m_i = _attn_block(
                    acc, l_i, m_i, q, c_q, Kb, Vb, Ks, tile * TILE_N + (j % SUB) * BLOCK_N,
                    q_pos, row_ok, N_KV, V_ROW, V_COL, thr, Wb, (j % SUB) * (BLOCK_N // 32),
                    3, PV_FP8, USE_PVT, BLOCK_M, BLOCK_N, D, WORDS, BITS_GATHER,
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
