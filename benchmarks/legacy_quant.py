"""Host side of the legacy kernel (``_triton_legacy``, the quant kernel as it was before
issue 14): the baseline that ``benchmarks/quant.py`` times in the same run.

Not part of the library. Tile lists are 128x128 full tiles only.
"""

from __future__ import annotations

import torch
from torch import Tensor

from flexsparse import tiles as T
from flexsparse.kernels.quant import (
    BLOCK_M,
    LOG2E,
    _check_inputs,
    default_pv_dtype,
    k_mean,
    v_channel_scale,
)

TILE_N = 128
CONFIGS: dict[tuple[int, str], tuple[int, int, int]] = {
    (64, "fp8"): (128, 4, 3),
    (128, "fp8"): (64, 8, 3),
    (64, "fp16"): (128, 4, 3),
    (128, "fp16"): (64, 8, 3),
}
PVT_BRANCH = False


def legacy_quant_attention(
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
    import _triton_legacy as K

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
