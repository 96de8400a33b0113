# ruff: noqa
"""Prototype: warp-specialised quant attention (Triton 3.6 Hopper AutoWS, TMA K/V)."""
import triton
import triton.language as tl

MAGIC_INT = tl.constexpr(0x4B400000)
MAGIC_FLOAT = tl.constexpr(12582912.0)
NEG_INF_BITS = tl.constexpr(-8388608)  # 0xFF800000


@triton.jit
def _half(acc, l_i, m_i, q, c_q, k, v, ks, offs_n, N_KV, MASK: tl.constexpr):
    c = c_q * ks
    qk = tl.dot(q, k)
    # Padded key rows are zeros, so qk == 0 there: adding the bits of -inf gives -inf.
    bias = tl.where(offs_n < N_KV, MAGIC_INT, NEG_INF_BITS)
    x = (qk + bias[None, :]).to(tl.float32, bitcast=True)
    m_blk = (tl.max(x, 1) - MAGIC_FLOAT) * c
    m_new = tl.maximum(m_i, m_blk)
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.math.exp2(m_i - m_safe)
    p = tl.math.exp2(x * c - (m_safe + MAGIC_FLOAT * c)[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    acc = tl.dot(p.to(v.dtype), v, acc)
    return acc, l_i, m_new


@triton.jit
def _attn_ws(
    Q, K, V, Qs, Ks, Out, FullNum, FullIdx, RowOrder,
    svb, svh, svn, sob, soh, son,
    HQ, GROUP, N_Q, N_KV, NQ_PAD, NK_PAD, NQB, NKB, HKV, B,
    MODE: tl.constexpr, TWO_TILES: tl.constexpr, WS: tl.constexpr,
    BLOCK_N: tl.constexpr, TILE_N: tl.constexpr, D: tl.constexpr,
):
    """MODE 0 dense, 2 full-tile lists. TWO_TILES: a program is two 128-row query tiles
    (one per consumer warpgroup), else one tile split into two 64-row halves."""
    HALF: tl.constexpr = 128 if TWO_TILES else 64
    pid = tl.program_id(0)
    if MODE == 2:
        pid = tl.load(RowOrder + pid)
    bh = tl.program_id(1)
    b = bh // HQ
    h = bh % HQ
    hk = h // GROUP
    bhk = b * HKV + hk
    start_m = pid * (2 * HALF)
    offs_d = tl.arange(0, D)
    r0 = start_m + tl.arange(0, HALF)
    r1 = r0 + HALF
    qb = Q + bh.to(tl.int64) * NQ_PAD * D
    dq = tl.make_tensor_descriptor(Q, [B * HQ * NQ_PAD, D], [D, 1], [HALF, D])
    q0 = dq.load([bh * NQ_PAD + start_m, 0])
    q1 = dq.load([bh * NQ_PAD + start_m + HALF, 0])
    if TWO_TILES:
        c0 = tl.load(Qs + bh * NQB + 2 * pid)
        c1 = tl.load(Qs + bh * NQB + tl.minimum(2 * pid + 1, NQB - 1))
    else:
        c0 = tl.load(Qs + bh * NQB + pid)
        c1 = c0
    dk = tl.make_tensor_descriptor(K, [B * HKV * NK_PAD, D], [D, 1], [BLOCK_N, D])
    dv = tl.make_tensor_descriptor(V, [B, HKV, N_KV, D], [svb, svh, svn, 1], [1, 1, BLOCK_N, D])
    kbase = bhk * NK_PAD
    NKB4 = (NKB + 3) // 4 * 4
    dks = tl.make_tensor_descriptor(Ks, [B * HKV, NKB4], [NKB4, 1], [1, 4])
    four = tl.arange(0, 4)

    m0 = tl.full([HALF], float("-inf"), tl.float32)
    l0 = tl.zeros([HALF], tl.float32)
    a0 = tl.zeros([HALF, D], tl.float32)
    m1 = tl.full([HALF], float("-inf"), tl.float32)
    l1 = tl.zeros([HALF], tl.float32)
    a1 = tl.zeros([HALF, D], tl.float32)
    offs_nb = tl.arange(0, BLOCK_N)
    if MODE == 0:
        n_full = tl.cdiv(N_KV, BLOCK_N) * BLOCK_N
        for start_n in tl.range(0, n_full, BLOCK_N, warp_specialize=WS, disallow_acc_multi_buffer=True):
            k = dk.load([kbase + start_n, 0]).T
            v = dv.load([b, hk, start_n, 0]).reshape(BLOCK_N, D)
            ks = tl.sum(tl.where(four == 0, dks.load([bhk, start_n // BLOCK_N]).reshape(4), 0.0))
            a0, l0, m0 = _half(a0, l0, m0, q0, c0, k, v, ks, start_n + offs_nb, N_KV, False)
            a1, l1, m1 = _half(a1, l1, m1, q1, c1, k, v, ks, start_n + offs_nb, N_KV, False)
    else:
        SUB: tl.constexpr = TILE_N // BLOCK_N
        lst = bh * NQB + pid
        n_tiles = tl.load(FullNum + lst)
        NKT4 = (NK_PAD // TILE_N + 3) // 4 * 4
        di = tl.make_tensor_descriptor(FullIdx, [B * HQ * NQB, NKT4], [NKT4, 1], [1, 4])
        for j in tl.range(0, n_tiles * SUB, warp_specialize=WS, disallow_acc_multi_buffer=True):
            tile = tl.sum(tl.where(four == 0, di.load([lst, j // SUB]).reshape(4), 0))
            start_n = tile * TILE_N + (j % SUB) * BLOCK_N
            k = dk.load([kbase + start_n, 0]).T
            v = dv.load([b, hk, start_n, 0]).reshape(BLOCK_N, D)
            ks = tl.sum(tl.where(four == 0, dks.load([bhk, start_n // BLOCK_N]).reshape(4), 0.0))
            a0, l0, m0 = _half(a0, l0, m0, q0, c0, k, v, ks, start_n + offs_nb, N_KV, True)
            a1, l1, m1 = _half(a1, l1, m1, q1, c1, k, v, ks, start_n + offs_nb, N_KV, True)

    ob = Out + b.to(tl.int64) * sob + h.to(tl.int64) * soh
    o0 = a0 * tl.where(l0 > 0, 1.0 / l0, 0.0)[:, None]
    o1 = a1 * tl.where(l1 > 0, 1.0 / l1, 0.0)[:, None]
    tl.store(ob + r0[:, None] * son + offs_d[None, :], o0.to(Out.dtype.element_ty), mask=(r0 < N_Q)[:, None])
    tl.store(ob + r1[:, None] * son + offs_d[None, :], o1.to(Out.dtype.element_ty), mask=(r1 < N_Q)[:, None])


def ws_attention(q, k, v, block_mask=None, kept=None, tile_n=128, two_tiles=True,
                 block_n=64, num_stages=3, num_warps=4):
    import torch
    from flexsparse import tiles as T
    from flexsparse.kernels import _triton_quant as KQ
    from flexsparse.kernels.quant import LOG2E, k_mean, tile_lists

    triton.set_allocator(lambda size, align, stream: torch.empty(size, dtype=torch.int8, device="cuda"))
    bsz, hq, nq, d = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    dev = q.device
    scale = d**-0.5
    mode = 0
    if block_mask is not None:
        lists = tile_lists(block_mask)
        assert lists.n_partial == 0
        tile_n = lists.tile[1]
        full_num, full_idx, order = lists.full_num, lists.full_idx, lists.row_order
        mode = 2
    elif kept is not None:
        full_num, full_idx = T._ordered(kept.to(dev))
        order = torch.arange(full_num.shape[-1], dtype=torch.int32, device=dev)
        mode = 2
    nqb, nkt = -(-nq // 128), -(-nk // tile_n)
    nq_pad, nk_pad = nqb * 128, nkt * tile_n
    nkb = nk_pad // block_n
    nkb4 = (nkb + 3) // 4 * 4
    qi = torch.empty(bsz, hq, nq_pad, d, dtype=torch.int8, device=dev)
    qs = torch.empty(bsz, hq, nqb, dtype=torch.float32, device=dev)
    KQ._quant_rows[(nqb, bsz * hq)](
        q, q, qi, qs, q.stride(0), q.stride(1), q.stride(2), hq, nq, nq_pad, nqb,
        scale * LOG2E, HAS_MEAN=False, BLOCK=128, D=d, num_warps=4)
    ki = torch.empty(bsz, hkv, nk_pad, d, dtype=torch.int8, device=dev)
    ks = torch.zeros(bsz, hkv, nkb4, dtype=torch.float32, device=dev)
    mean = k_mean(k).contiguous()
    KQ._quant_rows[(nkb, bsz * hkv)](
        k, mean, ki, ks, k.stride(0), k.stride(1), k.stride(2), hkv, nk, nk_pad, nkb4,
        1.0, HAS_MEAN=True, BLOCK=block_n, D=d, num_warps=4)
    if mode == 2:
        nkt4 = (nkt + 3) // 4 * 4
        idx = torch.zeros(bsz, hq, nqb, nkt4, dtype=torch.int32, device=dev)
        idx[..., :nkt] = full_idx.expand(bsz, hq, nqb, nkt)
        num = full_num.expand(bsz, hq, nqb).contiguous()
        grid0 = nqb
        two_tiles = False
    else:
        idx = num = order = qs
        grid0 = -(-nqb // 2) if two_tiles else nqb
    out = torch.empty(bsz, hq, nq, d, dtype=q.dtype, device=dev)
    _attn_ws[(grid0, bsz * hq)](
        qi, ki, v, qs, ks, out, num, idx, order,
        v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
        hq, hq // hkv, nq, nk, nq_pad, nk_pad, nqb, nkb, hkv, bsz,
        MODE=mode, TWO_TILES=two_tiles, WS=True, BLOCK_N=block_n, TILE_N=tile_n, D=d,
        num_warps=num_warps, num_stages=num_stages)
    return out
