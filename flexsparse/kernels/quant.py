"""Quantized block-sparse attention: host side, support rules and the PyTorch reference.

The arithmetic (identical in the Triton kernel and in ``quant_reference``)
-------------------------------------------------------------------------
Inputs ``q [B, Hq, Nq, D]``, ``k, v [B, Hkv, Nk, D]``; query rows are the *last* ``Nq``
rows of the ``Nk x Nk`` attention (query row ``r`` sits at position ``r + Nk - Nq``).

1. **Q** is multiplied by ``scale * log2(e)`` (so scores come out in log2 units) and
   quantized to INT8 per block of ``BLOCK_M = 128`` rows of one (b, h):
   ``s_q = max|x| / 127``, ``q_i = round_half_away(x * (127 / max|x|))``.
2. **K** is smoothed, ``k - mean_tokens(k)`` per (b, kv head) (adds a per-row constant
   to every score, which softmax ignores), then quantized the same way per block of
   ``block_n`` (64 or 128) rows.
3. Scores of key block ``j``: ``t = float(q_i · k_iᵀ) * (s_q * s_k[j])`` in fp32 (the int32
   dot is exact; padded key columns get ``-inf``, the causal rule too).
4. Online softmax over the kept key blocks in ascending order:
   ``m_new = max(m, rowmax(t))``, ``alpha = 2^(m - m_new)``, ``p = 2^(t - m_new + c)``,
   ``l = l * alpha + rowsum(p)``, ``acc = acc * alpha + round(p) @ v_q``.
   ``pv_dtype="fp8"``: ``c = log2(448)`` (P scaled into the e4m3 range), ``p`` rounded to
   e4m3, ``v_q = e4m3(v / s_v)`` with the per-channel ``s_v = max_tokens|v| / 448``;
   ``pv_dtype="fp16"``: ``c = 0``, ``p`` and ``v`` (clamped to ±65504) rounded to fp16.
   Accumulation in fp32. Output ``acc / l`` (times ``s_v``), zeros where ``l == 0``.
5. **pvthreshd** (per query head, SpargeAttn-style): for query tile ``i`` and key block
   ``j``, the P·V product is skipped when ``max_r (rowmax(t)[r] - m_new[r]) < -pvthreshd``
   over the tile's valid rows, i.e. every probability of the block is below
   ``2^-pvthreshd`` of its row's running maximum. ``l`` still counts them.

Tile skipping: a mask is accepted when every ``128 x 128`` tile (``BLOCK_M x TILE_N``) is
empty or full for this call; its full tiles become the list the kernel walks (the
``full_kv_num_blocks / full_kv_indices`` of the BlockMask). Masks with partial tiles
are refused (``supports`` says why) and ``backend="auto"`` uses FlexAttention for them.
Plain causal masks need no list: the kernel applies the causal rule on the diagonal.
"""

from __future__ import annotations

import functools
import math
import weakref

import torch
from torch import Tensor

from .. import tiles as T
from .._checks import check_choice, check_int

LOG2E = 1.4426950408889634
LOG2_FP8_MAX = math.log2(448.0)
FP8_MAX = 448.0
AMAX_EPS = 1e-20
#: Query rows per program and per Q scale; key columns per mask tile.
BLOCK_M = 128
TILE_N = 128
HEAD_DIMS = (64, 128)
PV_DTYPES = ("auto", "fp8", "fp16")

# -- quantization helpers (PyTorch, any device) --------------------------------------------


def _round_half_away(x: Tensor) -> Tensor:
    return torch.trunc(x + torch.where(x >= 0, 0.5, -0.5))


def quantize_blocks(x: Tensor, block: int, mul: float = 1.0, mean: Tensor | None = None):
    """Per-block symmetric INT8 quantization along the token axis.

    Args:
        x: ``[B, H, N, D]``.
        block: rows per scale.
        mul: factor applied (in fp32) before quantizing (``scale * log2(e)`` for Q).
        mean: optional ``[B, H, D]`` fp32 subtracted after ``mul`` (K smoothing).

    Returns:
        ``(values, scales)``: ``values`` int8 ``[B, H, ceil(N / block) * block, D]`` (zeros
        past ``N``), ``scales`` fp32 ``[B, H, ceil(N / block)]`` with
        ``x ≈ values * scales`` block-wise.
    """
    b, h, n, d = x.shape
    nb = -(-n // block)
    xf = x.to(torch.float32) * mul
    if mean is not None:
        xf = xf - mean[:, :, None, :]
    xf = torch.nn.functional.pad(xf, (0, 0, 0, nb * block - n)).view(b, h, nb, block, d)
    amax = xf.abs().amax(dim=(-2, -1)).clamp_min(AMAX_EPS)
    y = _round_half_away(xf * (127.0 / amax)[..., None, None])
    return y.to(torch.int8).view(b, h, nb * block, d), amax / 127.0


def k_mean(k: Tensor) -> Tensor:
    """Per-(b, h) mean of K over tokens, fp32 ``[B, H, D]`` (the smoothing term)."""
    return torch.mean(k, dim=2, dtype=torch.float32)


def v_channel_scale(v: Tensor) -> Tensor:
    """Per-(b, h, channel) FP8 scale of V, fp32 ``[B, H, D]``: ``max_tokens |v| / 448``."""
    lo, hi = torch.aminmax(v, dim=2)
    amax = torch.maximum(hi.float(), -lo.float()).clamp_min(AMAX_EPS)
    return amax / FP8_MAX


def to_fp8(x: Tensor) -> Tensor:
    """Round fp32 values to e4m3 (saturating at ±448) and back to fp32."""
    return x.clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).to(torch.float32)


# -- tile lists ------------------------------------------------------------------------------

_TILE_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def mask_tiles(mask, q_len: int, kv_len: int, device) -> tuple[int, Tensor, Tensor, Tensor]:
    """``(n_partial, kept, num, idx)`` of ``mask`` at ``BLOCK_M x TILE_N`` for one call.

    ``kept`` is bool ``[Bm, Hm, Qb, KVb]`` (``Bm``/``Hm`` 1 when the mask broadcasts), ``num``
    int32 ``[Bm, Hm, Qb]`` and ``idx`` int32 ``[Bm, Hm, Qb, KVb]`` list the full tiles in
    ascending order (what ``BlockMask.full_kv_num_blocks / full_kv_indices`` hold). Cached
    per mask, lengths and device.
    """
    per_mask = _TILE_CACHE.setdefault(mask, {})
    key = (q_len, kv_len, str(torch.device(device)))
    hit = per_mask.get(key)
    if hit is None:
        states = mask.tile_states(q_len, kv_len, (BLOCK_M, TILE_N), device=device)
        while states.dim() < 4:
            states = states.unsqueeze(0)
        n_partial = int((states == T.PARTIAL).sum())
        kept = states == T.FULL
        num, idx = T._ordered(kept)
        hit = (n_partial, kept, num, idx)
        per_mask[key] = hit
    return hit


def _mode_of(mask) -> str:
    """``"dense" | "causal" | "tiles"`` for a flexsparse Mask (or None)."""
    if mask is None or mask.sdpa_hint == "full":
        return "dense"
    if mask.sdpa_hint == "causal":
        return "causal"
    return "tiles"


# -- support rules -------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _triton_error() -> str | None:
    try:
        import triton  # noqa: F401
    except ImportError as exc:  # pragma: no cover - depends on the install
        return f"triton is not importable ({exc})"
    return None


def supports(q: Tensor, k: Tensor, mask) -> str | None:
    """None when the quant kernel can run this call, else the reason it cannot."""
    if q.device.type != "cuda":
        return f"needs a CUDA device, got {q.device.type}"
    major, minor = torch.cuda.get_device_capability(q.device)
    if (major, minor) < (8, 0):
        return f"needs compute capability 8.0 or newer, got {major}.{minor}"
    if q.shape[-1] not in HEAD_DIMS:
        return f"head_dim must be one of {HEAD_DIMS}, got {q.shape[-1]}"
    if q.dtype not in (torch.float16, torch.bfloat16):
        return f"dtype must be float16 or bfloat16, got {q.dtype}"
    err = _triton_error()
    if err:
        return err
    if _mode_of(mask) == "tiles":
        n_partial = mask_tiles(mask, q.shape[2], k.shape[2], q.device)[0]
        if n_partial:
            return (
                f"mask {mask.name!r} has {n_partial} partial {BLOCK_M}x{TILE_N} tiles; the "
                "quant kernel takes block-granular masks (empty/full tiles) only"
            )
    return None


def default_pv_dtype(device) -> str:
    """The P·V precision ``pv_dtype="auto"`` picks: ``"fp16"``.

    FP8 P carries 3 mantissa bits: on inputs with flat attention (random data) that alone
    is ~3.6 % relative L2 error, over the 3e-2 budget, so FP8 (sm_89+) is opt-in."""
    del device
    return "fp16"


def _check_inputs(q, k, v, pvthreshd, pv_dtype, block_n, kept):
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must be [B, H, N, D], got shape {tuple(t.shape)}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have one shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise ValueError(
            f"q {tuple(q.shape)} and k {tuple(k.shape)} must share batch and head_dim"
        )
    if q.shape[1] % k.shape[1]:
        raise ValueError(
            f"q heads ({q.shape[1]}) must be a multiple of k/v heads ({k.shape[1]}) (GQA)"
        )
    if q.shape[3] not in HEAD_DIMS:
        raise ValueError(f"head_dim must be one of {HEAD_DIMS}, got {q.shape[3]}")
    check_choice("pv_dtype", pv_dtype, PV_DTYPES)
    check_int("block_n", block_n, minimum=1)
    if block_n not in (64, 128):
        raise ValueError(f"block_n must be 64 or 128, got {block_n}")
    if kept is not None:
        if kept.dtype != torch.bool or kept.dim() != 4:
            raise TypeError(f"kept must be a 4-D bool tensor, got {kept.dtype} {tuple(kept.shape)}")
        qb, kb = -(-q.shape[2] // BLOCK_M), -(-k.shape[2] // TILE_N)
        if tuple(kept.shape[2:]) != (qb, kb) or kept.shape[0] not in (1, q.shape[0]) or (
            kept.shape[1] not in (1, q.shape[1])
        ):
            raise ValueError(
                f"kept must be [1 or B, 1 or Hq, {qb}, {kb}] (tiles of {BLOCK_M}x{TILE_N}), "
                f"got {tuple(kept.shape)}"
            )
    pvt = None
    if pvthreshd is not None:
        pvt = torch.as_tensor(pvthreshd, dtype=torch.float32).flatten()
        if pvt.numel() == 1:
            pvt = pvt.expand(q.shape[1])
        if pvt.numel() != q.shape[1]:
            raise ValueError(
                f"pvthreshd must be a number or one value per query head ({q.shape[1]}), "
                f"got {pvt.numel()} values"
            )
        if torch.isnan(pvt).any() or (pvt < 0).any():
            raise ValueError(f"pvthreshd must be >= 0 (log2 units), got {pvt.tolist()}")
        pvt = pvt.contiguous()
    return pvt


# -- the reference ---------------------------------------------------------------------------


def quant_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool = False,
    kept: Tensor | None = None,
    scale: float | None = None,
    pvthreshd: float | Tensor | None = None,
    pv_dtype: str = "auto",
    block_n: int | None = None,
) -> Tensor:
    """The quant kernel's arithmetic in PyTorch (any device; fp32 with exact integer dots).

    Args:
        q: ``[B, Hq, Nq, D]``; k, v: ``[B, Hkv, Nk, D]``; fp16/bf16/fp32.
        causal: key ``j`` visible to query row ``r`` iff ``j <= r + Nk - Nq``.
        kept: bool ``[1|B, 1|Hq, ceil(Nq/128), ceil(Nk/128)]``: the 128x128 tiles to compute
            (None: all).
        scale: softmax scale, default ``D ** -0.5``.
        pvthreshd: None (off), a number or ``[Hq]`` values in log2 units (module docstring).
        pv_dtype: ``"fp8"``, ``"fp16"`` or ``"auto"`` (``default_pv_dtype``).
        block_n: key rows per K scale and per online-softmax step (64 or 128; None: the
            kernel's default for this head_dim and pv_dtype, ``CONFIGS``).

    Returns:
        ``[B, Hq, Nq, D]`` in the dtype of ``q``.
    """
    check_choice("pv_dtype", pv_dtype, PV_DTYPES)
    if pv_dtype == "auto":
        pv_dtype = default_pv_dtype(q.device)
    if block_n is None:
        block_n = CONFIGS.get((q.shape[-1], pv_dtype), (64,))[0]
    pvt = _check_inputs(q, k, v, pvthreshd, pv_dtype, block_n, kept)
    fp8 = pv_dtype == "fp8"
    bsz, hq, nq, d = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    group = hq // hkv
    scale = d**-0.5 if scale is None else float(scale)
    dev = q.device

    qi, qs = quantize_blocks(q, BLOCK_M, scale * LOG2E)
    ki, ks = quantize_blocks(k, block_n, 1.0, k_mean(k))
    nqb, nkb = qs.shape[2], ks.shape[2]
    heads = torch.arange(hq, device=dev) // group
    # fp32 dots of int8 values are exact: every partial sum is an integer below 2**24.
    qf = qi.float().view(bsz, hq, nqb, BLOCK_M, d)
    kf = ki.float()[:, heads]  # [B, Hq, NKB * block_n, D]
    ks = ks[:, heads]
    if fp8:
        sv = v_channel_scale(v)
        vq = to_fp8(v.float() * (1.0 / sv)[:, :, None, :])[:, heads]
        c = LOG2_FP8_MAX
    else:
        vq = v.float().clamp(-65504, 65504).to(torch.float16).float()[:, heads]
        c = 0.0
    vq = torch.nn.functional.pad(vq, (0, 0, 0, nkb * block_n - nk))

    rows = torch.arange(nqb * BLOCK_M, device=dev).view(nqb, BLOCK_M)
    row_ok = rows < nq  # [NQB, BM]
    q_pos = (rows + nk - nq)[..., None]
    if kept is not None:
        # kept tiles of 128 keys -> per key block of block_n
        kept_blk = kept.repeat_interleave(TILE_N // block_n, dim=-1)[..., :nkb]
        kept_blk = kept_blk.expand(bsz, hq, nqb, nkb)
    thr = None if pvt is None else pvt.to(dev)[None, :, None]

    m = torch.full((bsz, hq, nqb, BLOCK_M), -math.inf, device=dev)
    l_sum = torch.zeros_like(m)
    acc = torch.zeros(bsz, hq, nqb, BLOCK_M, d, device=dev)
    for j in range(nkb):
        cols = torch.arange(j * block_n, (j + 1) * block_n, device=dev)
        s = torch.einsum("bhqmd,bhnd->bhqmn", qf, kf[:, :, j * block_n:(j + 1) * block_n])
        cscale = (qs * ks[:, :, j : j + 1])[..., None, None]  # fp32, as the kernel
        t = s.float() * cscale
        t = t.masked_fill((cols >= nk)[None, None, None, None, :], -math.inf)
        if causal:
            t = t.masked_fill((q_pos < cols)[None, None], -math.inf)
        m_blk = t.amax(-1)
        m_new = torch.maximum(m, m_blk)
        m_safe = torch.where(m_new == -math.inf, 0.0, m_new)
        alpha = torch.exp2(m - m_safe)
        p = torch.exp2(t - (m_safe - c)[..., None])
        l_new = l_sum * alpha + p.sum(-1)
        pq = to_fp8(p) if fp8 else p.to(torch.float16).float()
        pv = pq @ vq[:, :, None, j * block_n:(j + 1) * block_n]
        acc_new = acc * alpha[..., None]
        if thr is not None:
            gap = torch.where(row_ok, m_blk - m_safe, -math.inf).amax(-1)  # [B, Hq, NQB]
            do_pv = gap >= -thr
            pv = pv * do_pv[..., None, None]
        acc_new = acc_new + pv
        if kept is not None:
            take = kept_blk[..., j]
            m = torch.where(take[..., None], m_new, m)
            l_sum = torch.where(take[..., None], l_new, l_sum)
            acc = torch.where(take[..., None, None], acc_new, acc)
        else:
            m, l_sum, acc = m_new, l_new, acc_new
    out = acc * torch.where(l_sum > 0, 1.0 / l_sum, 0.0)[..., None]
    if fp8:
        out = out * sv[:, heads][:, :, None, None, :]
    return out.reshape(bsz, hq, nqb * BLOCK_M, d)[:, :, :nq].to(q.dtype)


# -- the kernel launcher ---------------------------------------------------------------------

#: Launch configuration per (head_dim, pv_dtype): block_n, num_warps, num_stages.
#: D=64 measured on an H100 (CogVideoX-2b dense, fold=True): bn128 w4 s3 9.76 ms (fp16),
#: 9.69 (fp8); bn64 w4 s3 10.4 / 10.2; bn128 w8 s3 13.2 / 11.7; cuDNN SDPA 11.4.
#: D=128: not timed yet (bn64 w8 keeps the fp32 tiles of 128 rows in registers).
CONFIGS: dict[tuple[int, str], tuple[int, int, int]] = {
    (64, "fp8"): (128, 4, 3),
    (128, "fp8"): (64, 8, 3),
    (64, "fp16"): (128, 4, 3),
    (128, "fp16"): (64, 8, 3),
}
#: pvthreshd skips the P·V MMA with a branch (True) or zeroes P (False, no time saved).
#: Measured (H100, Triton 3.6, 2b dense shape): the branch breaks the WGMMA pipelining,
#: 21.5 ms instead of 9.7 ms, so the branch-free form is the default.
PVT_BRANCH = False


def quant_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool = False,
    kept: Tensor | None = None,
    tile_list: tuple[Tensor, Tensor] | None = None,
    scale: float | None = None,
    pvthreshd: float | Tensor | None = None,
    pv_dtype: str = "auto",
    block_n: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    fold: bool = True,
    pvt_branch: bool | None = None,
) -> Tensor:
    """Quantized block-sparse attention (Triton; CUDA, or ``TRITON_INTERPRET=1``).

    Args:
        q: ``[B, Hq, Nq, D]``; k, v: ``[B, Hkv, Nk, D]``; fp16/bf16, D in {64, 128}.
        causal: in-kernel causal rule (query rows are the last ``Nq`` rows).
        kept: bool ``[1|B, 1|Hq, Qb, KVb]`` tiles of ``128 x 128`` to compute, or
        tile_list: ``(num [1|B, 1|Hq, Qb] int32, idx [.., Qb, KVb] int32)``: the full tiles
            per query tile, ascending (``BlockMask.full_kv_num_blocks / full_kv_indices`` of
            a 128x128 BlockMask without partial tiles). None of both: dense.
        scale: softmax scale (default ``D ** -0.5``).
        pvthreshd: None, a number or ``[Hq]`` values (log2 units; see module docstring).
        pv_dtype: ``"fp8"`` (sm_89+), ``"fp16"`` or ``"auto"`` (``default_pv_dtype``).
        block_n, num_warps, num_stages: launch overrides (benchmarks); defaults from
            ``CONFIGS``.
        fold: fold the int->float offset, scale and running max into one FMA per score
            (faster; equal to the reference up to fp32 rounding of a per-row constant).
        pvt_branch: skip the P·V MMA of a pvthreshd-dropped block with a branch (saves
            time) rather than zeroing its P (None: ``PVT_BRANCH``).

    Returns:
        ``[B, Hq, Nq, D]`` in the dtype of ``q``; rows with no kept key are zeros.
    """
    from . import _triton_quant as K

    if pv_dtype == "auto":
        pv_dtype = default_pv_dtype(q.device)
    cfg = CONFIGS[(q.shape[-1], pv_dtype)]
    block_n = cfg[0] if block_n is None else block_n
    num_warps = cfg[1] if num_warps is None else num_warps
    num_stages = cfg[2] if num_stages is None else num_stages
    pvt = _check_inputs(q, k, v, pvthreshd, pv_dtype, block_n, kept)
    if q.dtype not in (torch.float16, torch.bfloat16):
        raise TypeError(f"q, k, v must be float16 or bfloat16, got {q.dtype}")
    if kept is not None and tile_list is not None:
        raise ValueError("pass kept or tile_list, not both")
    if kept is not None:
        tile_list = T._ordered(kept)
    if causal and tile_list is not None:
        raise ValueError("causal=True takes no tile list (apply causality in the mask tiles)")
    fp8 = pv_dtype == "fp8"
    bsz, hq, nq, d = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    scale = d**-0.5 if scale is None else float(scale)
    dev = q.device
    nqb, nkt = -(-nq // BLOCK_M), -(-nk // TILE_N)
    nq_pad, nk_pad = nqb * BLOCK_M, nkt * TILE_N
    nkb = nk_pad // block_n

    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    qi = torch.empty(bsz, hq, nq_pad, d, dtype=torch.int8, device=dev)
    qs = torch.empty(bsz, hq, nqb, dtype=torch.float32, device=dev)
    ki = torch.empty(bsz, hkv, nk_pad, d, dtype=torch.int8, device=dev)
    ks = torch.empty(bsz, hkv, nkb, dtype=torch.float32, device=dev)
    mean = k_mean(k).contiguous()
    K._quant_rows[(nqb, bsz * hq)](
        q, q, qi, qs, q.stride(0), q.stride(1), q.stride(2), hq, nq, nq_pad, nqb,
        scale * LOG2E, HAS_MEAN=False, BLOCK=BLOCK_M, D=d, num_warps=4,
    )
    K._quant_rows[(nkb, bsz * hkv)](
        k, mean, ki, ks, k.stride(0), k.stride(1), k.stride(2), hkv, nk, nk_pad, nkb,
        1.0, HAS_MEAN=True, BLOCK=block_n, D=d, num_warps=4,
    )
    if fp8:
        sv = v_channel_scale(v).contiguous()
        inv = (1.0 / sv).contiguous()
        vq = torch.empty(bsz, hkv, d, nk_pad, dtype=torch.float8_e4m3fn, device=dev)
        v_row, v_col = 1, nk_pad
    else:
        sv = inv = qs  # unused
        vq = torch.empty(bsz, hkv, nk_pad, d, dtype=torch.float16, device=dev)
        v_row, v_col = d, 1
    K._quant_v[(nkt, bsz * hkv)](
        v, inv, vq, v.stride(0), v.stride(1), v.stride(2),
        hkv, nk, nk_pad, OUT_FP8=fp8, BLOCK=TILE_N, D=d, num_warps=4,
    )

    if tile_list is not None:
        num, idx = (t.to(device=dev, dtype=torch.int32).contiguous() for t in tile_list)
        if num.dim() != 3 or idx.dim() != 4:
            raise ValueError(
                f"tile_list must be (num [Bm, Hm, Qb], idx [Bm, Hm, Qb, KVb]), got "
                f"{tuple(num.shape)} and {tuple(idx.shape)}"
            )
        mode = 2
        snb = num.stride(0) if num.shape[0] > 1 else 0
        snh = num.stride(1) if num.shape[1] > 1 else 0
        sib = idx.stride(0) if idx.shape[0] > 1 else 0
        sih = idx.stride(1) if idx.shape[1] > 1 else 0
        siq = idx.stride(2)
    else:
        mode = 1 if causal else 0
        num = idx = qs  # unused
        snb = snh = sib = sih = siq = 0
    if pvt is None:
        pvt_dev = qs  # unused
    else:
        pvt_dev = pvt.to(dev)

    out = torch.empty(bsz, hq, nq, d, dtype=q.dtype, device=dev)
    K._attn[(nqb, bsz * hq)](
        qi, ki, vq, qs, ks, sv, out, num, idx, pvt_dev,
        out.stride(0), out.stride(1), out.stride(2), v_row, v_col,
        snb, snh, sib, sih, siq,
        hq, hq // hkv, nq, nk, nq_pad, nk_pad, nk - nq, nqb, nkb, nkt,
        MODE=mode, PV_FP8=fp8, USE_PVT=pvt is not None, FOLD=fold,
        PVT_BRANCH=PVT_BRANCH if pvt_branch is None else pvt_branch,
        BLOCK_M=BLOCK_M, BLOCK_N=block_n, TILE_N=TILE_N, D=d,
        num_warps=num_warps, num_stages=num_stages,
    )
    return out


# -- the backend protocol ----------------------------------------------------------------


def run(q: Tensor, k: Tensor, v: Tensor, mask, scale, enable_gqa) -> Tensor:
    """``flexsparse.attention`` backend entry (``supports`` said yes)."""
    mode = _mode_of(mask)
    if mode == "tiles":
        _, kept, num, idx = mask_tiles(mask, q.shape[2], k.shape[2], q.device)
        return quant_attention(q, k, v, tile_list=(num, idx), scale=scale)
    return quant_attention(q, k, v, causal=mode == "causal", scale=scale)
