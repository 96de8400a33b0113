"""The quantized attention kernel in Gluon for Hopper (sm_90): INT8 ``Q·Kᵀ`` and 16-bit
``P·V`` with the softmax of key block ``j`` overlapping the tensor-core work of blocks
``j`` (``P·V`` of ``j - 1``) and the loads of later blocks.

Same arithmetic as ``_triton_quant._attn`` (``quant.py`` describes it; ``quant_reference``
mirrors it), for the calls whose tiles are all full: dense, or the full tiles of a tile
list. What Triton's ``tl.dot`` cannot express is the order of one iteration:

    issue S_j = Q K_jᵀ (async)         issue O += P_{j-1} V_{j-1} (async)
    wait for S_j only                  softmax of S_j -> P_j, while P·V runs
    wait for P·V                       rescale O, prefetch K and V blocks (TMA)

(FlashAttention-3's intra-warpgroup overlap). Triton waits for every ``tl.dot`` that is
not an accumulation right after issuing it, so the softmax and the MMAs of one warp never
overlap there (``docs/kernel_notes.md``).
"""

from __future__ import annotations

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_wait,
)

#: 1.5 * 2**23: for |x| < 2**22, float_bits(x + MAGIC_INT) - MAGIC_FLOAT == float(x).
MAGIC_INT = gl.constexpr(0x4B400000)
MAGIC_FLOAT = gl.constexpr(12582912.0)


@gluon.jit
def _block_of(j, FullIdx, i_off, MODE: gl.constexpr, SUB: gl.constexpr):
    """Key block (of BLOCK_N rows) of iteration ``j``: ``j`` itself (dense) or the
    ``j % SUB``-th block of the ``j // SUB``-th tile of the list."""
    if MODE == 0:
        return j
    else:
        return gl.load(FullIdx + i_off + j // SUB) * SUB + j % SUB


@gluon.jit
def _issue_kv(k_desc, v_desc, k_bufs, v_bufs, k_bars, v_bars, slot, k_row, v_row, pred,
              LOAD_K: gl.constexpr, LOAD_V: gl.constexpr):
    if LOAD_K:
        mbarrier.expect(k_bars.index(slot), k_desc.block_type.nbytes, pred=pred)
        tma.async_copy_global_to_shared(k_desc, [k_row, 0], k_bars.index(slot),
                                        k_bufs.index(slot), pred=pred)
    if LOAD_V:
        mbarrier.expect(v_bars.index(slot), v_desc.block_type.nbytes, pred=pred)
        tma.async_copy_global_to_shared(v_desc, [v_row, 0], v_bars.index(slot),
                                        v_bufs.index(slot), pred=pred)


@gluon.jit
def _softmax_step(s, m_i, l_i, c, start_n, cols, N_KV, MASKED: gl.constexpr):
    """Online softmax of one block of int32 scores ``s`` (scale ``c``, log2 units):
    ``(m, l, p, alpha)``; with ``MASKED``, columns past ``N_KV`` are dropped."""
    x = (s + MAGIC_INT).to(gl.float32, bitcast=True)  # == MAGIC_FLOAT + s exactly
    if MASKED:
        x = gl.where(gl.expand_dims(start_n + cols < N_KV, 0), x, float("-inf"))
    m_blk = (gl.max(x, 1) - MAGIC_FLOAT) * c
    m_new = gl.maximum(m_i, m_blk)
    m_safe = gl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = gl.exp2(m_i - m_safe)
    p = gl.exp2(x * c - gl.expand_dims(m_safe + MAGIC_FLOAT * c, 1))
    return m_new, l_i * alpha + gl.sum(p, 1), p, alpha


@gluon.jit
def _overlapped_step(j, acc, m_i, l_i, p, q_smem, k_bufs, v_bufs, k_bars, v_bars, k_desc,
                     v_desc, zero_s, Ks, c_q, cols, FullIdx, i_off, k_row0, v_row0, ks_off,
                     n_blocks, N_KV, MODE: gl.constexpr, SUB: gl.constexpr,
                     BLOCK_N: gl.constexpr, STAGES: gl.constexpr, o_rows: gl.constexpr,
                     p_layout: gl.constexpr, MASKED: gl.constexpr):
    """Iteration ``j >= 1``: S_j = Q K_jᵀ and O += P_{j-1} V_{j-1} in flight together,
    the softmax of S_j while the second runs, then the freed K / V slots refilled."""
    slot = j % STAGES
    prev = (j - 1) % STAGES
    blk = _block_of(j, FullIdx, i_off, MODE, SUB)
    mbarrier.wait(k_bars.index(slot), (j // STAGES) & 1)
    s = warpgroup_mma(q_smem, k_bufs.index(slot).permute((1, 0)), zero_s, use_acc=False,
                      is_async=True)
    mbarrier.wait(v_bars.index(prev), ((j - 1) // STAGES) & 1)
    acc = warpgroup_mma(p, v_bufs.index(prev), acc, is_async=True)
    s = warpgroup_mma_wait(1, deps=(s,))  # S_j done; P_{j-1} V_{j-1} may still run
    nxt = j + STAGES  # K of block j is read: its slot takes block j + STAGES
    nblk = _block_of(nxt % n_blocks, FullIdx, i_off, MODE, SUB)
    _issue_kv(k_desc, v_desc, k_bufs, v_bufs, k_bars, v_bars, slot,
              k_row0 + nblk * BLOCK_N, 0, nxt < n_blocks, True, False)
    m_i, l_i, p_f, alpha = _softmax_step(s, m_i, l_i, c_q * gl.load(Ks + ks_off + blk),
                                         blk * BLOCK_N, cols, N_KV, MASKED)
    acc = warpgroup_mma_wait(0, deps=(acc,))
    vb = j - 1 + STAGES  # V of block j - 1 is read: its slot takes block j - 1 + STAGES
    vblk = _block_of(vb % n_blocks, FullIdx, i_off, MODE, SUB)
    _issue_kv(k_desc, v_desc, k_bufs, v_bufs, k_bars, v_bars, prev,
              0, v_row0 + vblk * BLOCK_N, vb < n_blocks, False, True)
    acc = acc * gl.expand_dims(gl.convert_layout(alpha, o_rows), 1)
    p = gl.convert_layout(p_f.to(p.dtype), p_layout)
    return acc, m_i, l_i, p


@gluon.jit
def _attn_overlap(
    q_desc, k_desc, v_desc, Qs, Ks, Out, FullNum, FullIdx, RowOrder,
    sob, soh, son, snb, snh, sib, sih, siq,
    HQ, GROUP, N_Q, N_KV, NQ_PAD, NK_PAD, NQB, NKB, V_ROWS,
    MODE: gl.constexpr,  # 0 dense, 2 the full tiles of a tile list
    BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, TILE_N: gl.constexpr, D: gl.constexpr,
    STAGES: gl.constexpr, num_warps: gl.constexpr,
):
    """One query tile of one (b, h). q_desc: int8 [B * HQ * NQ_PAD, D] in [BLOCK_M, D]
    blocks; k_desc: int8 [B * Hkv * NK_PAD, D] in [BLOCK_N, D] blocks; v_desc: 16-bit
    [B * Hkv * V_ROWS, D] in [BLOCK_N, D] blocks (key rows past N_KV get P = 0).
    Qs [B, HQ, NQB], Ks [B, Hkv, NKB] fp32 scales; Out [B, HQ, N_Q, D] strided.
    MODE 2: FullNum [Bm, Hm, Qb], FullIdx [Bm, Hm, Qb, KVb] (strides snb, snh / sib, sih,
    siq) of TILE_N-wide tiles, taken in RowOrder."""
    SUB: gl.constexpr = TILE_N // BLOCK_N
    pid_m = gl.program_id(0)
    if MODE == 2:
        pid_m = gl.load(RowOrder + pid_m)
    bh = gl.program_id(1)
    b = bh // HQ
    h = bh % HQ
    bhk = b * (HQ // GROUP) + h // GROUP

    s_layout: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[num_warps, 1], instr_shape=[16, BLOCK_N, 32])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[num_warps, 1], instr_shape=[16, D, 16])
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    s_rows: gl.constexpr = gl.SliceLayout(1, s_layout)
    s_cols: gl.constexpr = gl.SliceLayout(0, s_layout)
    o_rows: gl.constexpr = gl.SliceLayout(1, o_layout)
    o_cols: gl.constexpr = gl.SliceLayout(0, o_layout)

    q_smem = gl.allocate_shared_memory(q_desc.dtype, [BLOCK_M, D], q_desc.layout)
    k_bufs = gl.allocate_shared_memory(k_desc.dtype, [STAGES, BLOCK_N, D], k_desc.layout)
    v_bufs = gl.allocate_shared_memory(v_desc.dtype, [STAGES, BLOCK_N, D], v_desc.layout)
    q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    k_bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    mbarrier.init(q_bar, count=1)
    for i in gl.static_range(STAGES):
        mbarrier.init(k_bars.index(i), count=1)
        mbarrier.init(v_bars.index(i), count=1)

    if MODE == 0:
        n_blocks = gl.cdiv(N_KV, BLOCK_N)
        n_plain = N_KV // BLOCK_N
        i_off = 0
    else:
        lst = b.to(gl.int64) * snb + h.to(gl.int64) * snh + pid_m
        i_off = b.to(gl.int64) * sib + h.to(gl.int64) * sih + pid_m * siq
        n_tiles = gl.load(FullNum + lst)
        n_blocks = n_tiles * SUB
        # Tiles ascend: only the last column tile may reach past N_KV.
        last_tile = gl.load(FullIdx + i_off + gl.maximum(n_tiles - 1, 0))
        ragged = (n_tiles > 0) & ((last_tile + 1) * TILE_N > N_KV)
        n_plain = n_blocks - ragged.to(gl.int32) * SUB
    k_row0 = bhk * NK_PAD
    v_row0 = bhk * V_ROWS

    mbarrier.expect(q_bar, q_desc.block_type.nbytes)
    tma.async_copy_global_to_shared(q_desc, [bh * NQ_PAD + pid_m * BLOCK_M, 0], q_bar, q_smem)
    for i in gl.static_range(STAGES):
        blk = _block_of(i % gl.maximum(n_blocks, 1), FullIdx, i_off, MODE, SUB)
        _issue_kv(k_desc, v_desc, k_bufs, v_bufs, k_bars, v_bars, i,
                  k_row0 + blk * BLOCK_N, v_row0 + blk * BLOCK_N, i < n_blocks, True, True)

    c_q = gl.load(Qs + bh * NQB + pid_m)
    cols = gl.arange(0, BLOCK_N, layout=s_cols)
    m_i = gl.full([BLOCK_M], float("-inf"), gl.float32, layout=s_rows)
    l_i = gl.full([BLOCK_M], 0.0, gl.float32, layout=s_rows)
    acc = gl.zeros([BLOCK_M, D], gl.float32, layout=o_layout)
    zero_s = gl.zeros([BLOCK_M, BLOCK_N], gl.int32, layout=s_layout)
    p = gl.zeros([BLOCK_M, BLOCK_N], v_desc.dtype, layout=p_layout)
    mbarrier.wait(q_bar, 0)

    if n_blocks > 0:  # block 0: nothing to multiply by V yet
        blk = _block_of(0, FullIdx, i_off, MODE, SUB)
        mbarrier.wait(k_bars.index(0), 0)
        s = warpgroup_mma(q_smem, k_bufs.index(0).permute((1, 0)), zero_s, use_acc=False,
                          is_async=True)
        s = warpgroup_mma_wait(0, deps=(s,))
        nblk = _block_of(STAGES % n_blocks, FullIdx, i_off, MODE, SUB)
        _issue_kv(k_desc, v_desc, k_bufs, v_bufs, k_bars, v_bars, 0,
                  k_row0 + nblk * BLOCK_N, 0, STAGES < n_blocks, True, False)
        m_i, l_i, p_f, alpha = _softmax_step(s, m_i, l_i, c_q * gl.load(Ks + bhk * NKB + blk),
                                             blk * BLOCK_N, cols, N_KV, True)
        p = gl.convert_layout(p_f.to(v_desc.dtype), p_layout)

    # Blocks whose columns all lie before N_KV, then the last ones (column mask): two
    # loops, since a branch inside the loop makes ptxas wait for every MMA in flight.
    for j in range(1, n_plain):
        acc, m_i, l_i, p = _overlapped_step(
            j, acc, m_i, l_i, p, q_smem, k_bufs, v_bufs, k_bars, v_bars, k_desc, v_desc,
            zero_s, Ks, c_q, cols, FullIdx, i_off, k_row0, v_row0, bhk * NKB, n_blocks, N_KV,
            MODE, SUB, BLOCK_N, STAGES, o_rows, p_layout, False)
    for j in range(gl.maximum(n_plain, 1), n_blocks):
        acc, m_i, l_i, p = _overlapped_step(
            j, acc, m_i, l_i, p, q_smem, k_bufs, v_bufs, k_bars, v_bars, k_desc, v_desc,
            zero_s, Ks, c_q, cols, FullIdx, i_off, k_row0, v_row0, bhk * NKB, n_blocks, N_KV,
            MODE, SUB, BLOCK_N, STAGES, o_rows, p_layout, True)

    if n_blocks > 0:
        last = (n_blocks - 1) % STAGES
        mbarrier.wait(v_bars.index(last), ((n_blocks - 1) // STAGES) & 1)
        acc = warpgroup_mma(p, v_bufs.index(last), acc, is_async=True)
        acc = warpgroup_mma_wait(0, deps=(acc,))

    mbarrier.invalidate(q_bar)
    for i in gl.static_range(STAGES):
        mbarrier.invalidate(k_bars.index(i))
        mbarrier.invalidate(v_bars.index(i))

    l_o = gl.convert_layout(l_i, o_rows)
    out = acc * gl.expand_dims(gl.where(l_o > 0, 1.0 / l_o, 0.0), 1)
    rows = pid_m * BLOCK_M + gl.arange(0, BLOCK_M, layout=o_rows)
    dcols = gl.arange(0, D, layout=o_cols)
    dst = Out + b.to(gl.int64) * sob + h.to(gl.int64) * soh
    ptrs = dst + gl.expand_dims(rows, 1) * son + gl.expand_dims(dcols, 0)
    gl.store(ptrs, out.to(Out.dtype.element_ty), mask=gl.expand_dims(rows < N_Q, 1))
