"""Quantized block-sparse attention: host side, the backend and the PyTorch reference.

The arithmetic (identical in the Triton kernel and in ``quant_reference``)
-------------------------------------------------------------------------
Inputs ``q [B, Hq, Nq, D]``, ``k, v [B, Hkv, Nk, D]``; query rows are the *last* ``Nq``
rows of the ``Nk x Nk`` attention (query row ``r`` sits at position ``r + Nk - Nq``).

1. **Q** is multiplied by ``scale * log2(e)`` (so scores come out in log2 units) and
   quantized to INT8 per block of ``BLOCK_M = 128`` rows of one (b, h):
   ``s_q = max|x| / 127``, ``q_i = round_half_away(x * (127 / max|x|))``.
2. **K** is smoothed, ``k - k_mean(k)`` per (b, kv head): minus the mean of a strided
   sample of 2,048+ keys (adds a per-row constant to every score, which softmax ignores),
   then quantized the same way per block of ``block_n`` (64 or 128) rows.
3. Scores of key block ``j``: ``t = float(q_i · k_iᵀ) * (s_q * s_k[j])`` in fp32 (the int32
   dot is exact); pairs the mask drops, padded key columns and the causal rule give
   ``-inf``.
4. Online softmax over the key blocks:
   ``m_new = max(m, rowmax(t))``, ``alpha = 2^(m - m_new)``, ``p = 2^(t - m_new + c)``,
   ``l = l * alpha + rowsum(p)``, ``acc = acc * alpha + round(p) @ v_q``.
   ``pv_dtype="fp8"``: ``c = log2(448)`` (P scaled into the e4m3 range), ``p`` rounded to
   e4m3, ``v_q = e4m3(v / s_v)`` with the per-channel ``s_v = max_tokens|v| / 448``;
   ``pv_dtype="fp16"`` / ``"bf16"``: ``c = 0``, ``p`` and ``v`` rounded to that 16-bit
   float (``v`` clamped to ±65504 for fp16). ``"auto"`` is the 16-bit dtype of the
   inputs, so V is read where it lies, with no copy.
   Accumulation in fp32. Output ``acc / l`` (times ``s_v``), zeros where ``l == 0``.
   A key block whose pairs are all dropped changes nothing (``alpha = 1``, ``p = 0``),
   which is why skipping empty tiles is exact. The Triton kernel walks a query tile's
   full tiles first, then its partial tiles; the Hopper kernel and the reference walk key
   blocks in ascending order: they agree up to the rounding of ``p`` against a different
   running max.
5. **pvthreshd** (per query head, SpargeAttn-style): for query tile ``i`` and key block
   ``j``, the P·V product is skipped when ``max_r (rowmax(t)[r] - m_new[r]) < -pvthreshd
   - 2^-10`` over the tile's valid rows, i.e. every probability of the block is below
   ``2^-pvthreshd`` of its row's running maximum. ``l`` still counts them. The ``2^-10``
   (``PVT_SLACK``) keeps a block that sets a row's new maximum (gap exactly 0) when
   rounding makes its gap -1 ulp.

Tiles: the kernel reads the call's ``BlockMask`` at ``128 x 128`` or ``128 x 64`` tiles
(``TILE_SIZES``): ``full_kv_num_blocks / full_kv_indices`` are computed without a rule,
``kv_num_blocks / kv_indices`` (partial tiles) with the token rule, from one bit per
pair packed per tile (``tile_lists``, cached with the BlockMask). Masks that are exactly
causal or full need no list: the Triton kernel applies the causal rule on the diagonal;
on the Hopper kernel the backend runs a causal mask through its BlockMask (its diagonal
tiles partial).
"""

from __future__ import annotations

import functools
import math
import weakref
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .. import tiles as T
from .._checks import check_choice, check_int
from .._devices import cuda_capability
from . import sm90

LOG2E = 1.4426950408889634
#: Slack of the pvthreshd test (log2 units; ``_triton_quant.PVT_SLACK``).
PVT_SLACK = 2.0**-10
#: Relative margin on a K block's largest row norm (``_quantize_qk``'s ``kn``), far above the
#: fp32 rounding of the norms and their product: the bound stays a bound.
NORM_MARGIN = 2.0**-10
LOG2_FP8_MAX = math.log2(448.0)
FP8_MAX = 448.0
AMAX_EPS = 1e-20
#: Query rows per program and per Q scale.
BLOCK_M = 128
#: Key columns per mask tile when none is asked for.
TILE_N = 128
#: The BlockMask tile sizes the kernel reads (SpargeAttn predicts 128 x 64).
TILE_SIZES = ((128, 128), (128, 64))
HEAD_DIMS = (64, 128)
PV_DTYPES = ("auto", "fp8", "fp16", "bf16")
#: ``quant_attention(kernel=)``: the Hopper CUDA kernel where it can run, or a fixed one.
KERNELS = ("auto", "triton", "sm90")
#: Tile widths ``kernel="auto"`` runs on the Hopper kernel. It runs 64-column tiles too, but
#: slower than Triton's kernel: H100, SpargeAttn's 128 x 64 maps at the CogVideoX-2b shape
#: (D=64, 0.35/0.98), 9.83 vs 8.27 ms (BENCHMARKS.md, 2026-11-25 late evening).
SM90_TILE_N = (128,)
#: The 16-bit P·V formats, by name.
PV_TORCH_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
#: Above this many bytes of packed partial-tile bits the backend declines the call.
MAX_BITS_BYTES = 512 << 20
#: Partial tiles: one word load per score element (True, the first version) or each
#: row's words once (False). Benchmarks flip it to compare the two in one run.
BITS_GATHER = False
#: Relative speed of the kernel on tile lists per (head_dim, tile_n) at its ``CONFIGS``,
#: and the cost of a partial tile relative to a full one: what ``_tile_size`` weighs tile
#: maps with. Measured on an H100, 2026-11-25 (``benchmarks/quant.py --part kernel``,
#: radial block maps, which keep the same tiles at both shapes; 128 x 128 / 128 x 64 ms:
#: D=64 CogVideoX-2b 6.30 / 6.55, D=128 Wan 69 f 13.2 / 13.6, HunyuanVideo 117 f
#: 25.7 / 28.1; partial tiles ~1.6x a full one, docs/kernel_notes.md).
#: At D=64 with the register cap (``CONFIGS``) the two shapes run alike: radial 2b 5.96 /
#: 6.01 ms, every tile kept 11.3 / 10.5 ms (H100, ``--part lists``).
TILE_SPEED = {(64, 128): 1.0, (64, 64): 1.0, (128, 128): 1.0, (128, 64): 0.94}
PARTIAL_COST = 1.6
#: Per head_dim: how much faster the Hopper kernel runs a 128-column map than the Triton
#: kernel, where it runs the call (``_tile_size`` weighs the 128-column shape with it).
#: H100, 2026-11-26, token-granular radial maps (half their tiles partial / a fifth),
#: ``benchmarks/quant.py --part hopper`` (queued): CogVideoX-2b 9.21 / 6.63 ms (D=64), Wan
#: 69 f 16.0 / 12.3 ms (D=128).
SM90_SPEEDUP = {64: 1.39, 128: 1.30}
#: Query tiles of a tile list in ``row_order`` (False: index order). Benchmarks flip it.
ROW_ORDER = True
#: Max over mean work per query tile above which ``row_order`` puts the longest first.
ROW_IMBALANCE = 2.5

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


#: K is centred on the mean of a strided sample of at least this many keys (all keys when
#: fewer than twice as many).
K_MEAN_SAMPLES = 2048


def k_mean(k: Tensor) -> Tensor:
    """The smoothing term, fp32 ``[B, H, D]``: per (b, h), the mean of every ``s``-th key,
    ``s = max(1, Nk // K_MEAN_SAMPLES)``.

    Any per-(b, h) vector subtracted from K adds one constant to each query row's scores,
    which softmax ignores: the term only centres K for its INT8 range, which a sample of
    2,048+ keys does as well as all of them, at a third of the time (2 x 30 x 17,776 keys,
    D=64: 18.6 against 58.3 us; H200, 2026-11-25, BENCHMARKS.md)."""
    step = max(1, k.shape[2] // K_MEAN_SAMPLES)
    return torch.mean(k[:, :, ::step], dim=2, dtype=torch.float32)


def v_channel_scale(v: Tensor) -> Tensor:
    """Per-(b, h, channel) FP8 scale of V, fp32 ``[B, H, D]``: ``max_tokens |v| / 448``."""
    lo, hi = torch.aminmax(v, dim=2)
    amax = torch.maximum(hi.float(), -lo.float()).clamp_min(AMAX_EPS)
    return amax / FP8_MAX


def to_fp8(x: Tensor) -> Tensor:
    """Round fp32 values to e4m3 (saturating at ±448) and back to fp32."""
    return x.clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).to(torch.float32)


# -- tile lists from the BlockMask ----------------------------------------------------------


@dataclass(frozen=True)
class TileLists:
    """What the kernel reads of a ``BlockMask`` (tensors on the BlockMask's device).

    Attributes:
        tile: ``(128, tile_n)``.
        full_num, part_num: int32 ``[Bm, Hm, Qb]``; full_idx, part_idx: int32
            ``[Bm, Hm, Qb, KVb]`` (the BlockMask's ``full_kv_*`` and ``kv_*``).
        part_off: int64 ``[Bm, Hm, Qb]``, the first entry of each partial list in ``bits``.
        bits: int32 ``[P, 128, tile_n // 32]``: bit ``c`` of word ``w`` of row ``r`` says
            whether pair (row ``r``, column ``32 w + c``) of the tile is kept (0 past the
            sequence); ``P`` = partial tiles in all lists.
        row_order: int32 ``[Qb]``: the query tiles by decreasing work (``row_order``), the
            order the kernel's programs take them in.
        derived: views of the lists a kernel computes once and keeps here (the Hopper
            kernel's ``sm90.walk_lists`` and ``sm90.thread_bits``).
    """

    tile: tuple[int, int]
    full_num: Tensor
    full_idx: Tensor
    part_num: Tensor
    part_idx: Tensor
    part_off: Tensor
    bits: Tensor
    row_order: Tensor
    derived: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def n_partial(self) -> int:
        return self.bits.shape[0]


_LISTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _as_lists(num: Tensor | None, idx: Tensor | None, like: Tensor) -> tuple[Tensor, Tensor]:
    if num is None:  # a BlockMask without full tiles listed
        return torch.zeros_like(like, dtype=torch.int32), torch.zeros(
            *like.shape, 1, dtype=torch.int32, device=like.device
        )
    return num.to(torch.int32).contiguous(), idx.to(torch.int32).contiguous()


def _pack_bits(kept: Tensor) -> Tensor:
    """bool ``[P, R, C]`` (C a multiple of 32) -> int32 ``[P, R, C // 32]``, bit c of word
    w = column 32 w + c."""
    p, r, c = kept.shape
    weights = torch.bitwise_left_shift(
        torch.ones(32, dtype=torch.int64, device=kept.device),
        torch.arange(32, device=kept.device),
    )
    words = (kept.view(p, r, c // 32, 32).to(torch.int64) * weights).sum(-1)
    # Two's complement: words >= 2**31 are the negative int32 with the same bits.
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def partial_bits(block_mask, num: Tensor, idx: Tensor, chunk: int = 4096) -> Tensor:
    """Packed token rule of the partial tiles ``num / idx`` of ``block_mask`` (see
    ``TileLists.bits``), evaluating ``block_mask.mask_mod`` on those tiles only."""
    bq, bk = block_mask.BLOCK_SIZE
    q_len, kv_len = block_mask.seq_lengths
    dev = num.device
    entries = torch.arange(idx.shape[-1], device=dev) < num[..., None].long()
    where = entries.nonzero()  # [P, 4]: b, h, q tile, list position (flattened order)
    if where.shape[0] == 0:
        return torch.zeros(0, bq, bk // 32, dtype=torch.int32, device=dev)
    cols = idx[entries].long()
    dq = torch.arange(bq, device=dev)[None, :, None]
    dk = torch.arange(bk, device=dev)[None, None, :]
    out = []
    for s in range(0, where.shape[0], chunk):
        w, c = where[s:s + chunk], cols[s:s + chunk]
        q = w[:, 2, None, None] * bq + dq
        kv = c[:, None, None] * bk + dk
        ok = (q < q_len) & (kv < kv_len)
        # Clamped so that a rule's lookup tensors are never indexed past the sequence.
        kept = block_mask.mask_mod(
            w[:, 0, None, None], w[:, 1, None, None], q.clamp(max=q_len - 1),
            kv.clamp(max=kv_len - 1),
        )
        out.append(_pack_bits(kept.expand_as(ok) & ok))
    return torch.cat(out)


def tile_lists(block_mask) -> TileLists:
    """The kernel's view of ``block_mask`` (a ``BlockMask`` at a size of ``TILE_SIZES``),
    computed once per BlockMask object (its partial-tile bits included)."""
    hit = _LISTS.get(block_mask)
    if hit is not None:
        return hit
    tile = tuple(block_mask.BLOCK_SIZE)
    if tile not in TILE_SIZES:
        raise ValueError(f"block_mask tiles must be one of {TILE_SIZES}, got {tile}")
    part_num, part_idx = block_mask.kv_num_blocks, block_mask.kv_indices
    full_num, full_idx = _as_lists(
        block_mask.full_kv_num_blocks, block_mask.full_kv_indices, part_num
    )
    part_num, part_idx = _as_lists(part_num, part_idx, part_num)
    if full_idx.shape != part_idx.shape:  # one set of strides in the kernel
        width = max(full_idx.shape[-1], part_idx.shape[-1])
        full_idx = torch.nn.functional.pad(full_idx, (0, width - full_idx.shape[-1]))
        part_idx = torch.nn.functional.pad(part_idx, (0, width - part_idx.shape[-1]))
    if full_num.shape != part_num.shape:
        shape = torch.broadcast_shapes(full_num.shape, part_num.shape)
        full_num, part_num = (t.expand(shape).contiguous() for t in (full_num, part_num))
        full_idx, part_idx = (
            t.expand(*shape, t.shape[-1]).contiguous() for t in (full_idx, part_idx)
        )
    flat = part_num.flatten().long()
    part_off = (torch.cumsum(flat, 0) - flat).view(part_num.shape).contiguous()
    if T.partial_free(block_mask):  # no partial tile: no search (a host read) for them
        bits = torch.zeros(0, tile[0], tile[1] // 32, dtype=torch.int32, device=part_num.device)
    else:
        bits = partial_bits(block_mask, part_num, part_idx)
    hit = TileLists(tile, full_num, full_idx, part_num, part_idx, part_off, bits,
                    row_order(full_num, part_num))
    _LISTS[block_mask] = hit
    return hit


def row_order(full_num: Tensor, part_num: Tensor) -> Tensor:
    """int32 ``[Qb]``: the order the kernel's programs take the query tiles in.

    Programs start in grid order, so when a few rows carry far more kept tiles than the
    mean (``ROW_IMBALANCE`` times or more; tiles summed over batch and heads, partial ones
    weighted by ``PARTIAL_COST``) the longest go first and short ones fill the tail:
    HunyuanVideo's 256 text rows see all 115k keys, 3.6x the mean row, and come last in
    index order. Other maps keep index order, whose neighbouring rows share key tiles.
    Measured across runs, not yet on one machine (``benchmarks/quant.py --part order``
    compares on one): HunyuanVideo radial 117 f 26.2 ms in index order, 24.4-24.5 ms
    reordered (H100, H200); for the CogVideoX-2b radial (1.9x) and meansim maps (1.6-1.9x)
    reordering gave the same time on an H200 and 5-12 % more on another H100, so those
    stay in index order until a same-machine comparison says otherwise."""
    work = (full_num.float() + PARTIAL_COST * part_num.float()).sum(dim=(0, 1))
    lpt = torch.sort(-work, stable=True).indices
    index = torch.arange(work.numel(), device=work.device)
    # where, not an if: no host read of the map
    skewed = work.max() >= ROW_IMBALANCE * work.mean()
    return torch.where(skewed, lpt, index).to(torch.int32).contiguous()


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


def device_reasons(q: Tensor) -> list[str]:
    """Why the kernel cannot run on ``q``'s device, dtype and head_dim (empty: it can)."""
    if q.device.type != "cuda":
        return [f"needs a CUDA device, got {q.device.type}"]
    out = []
    major, minor = cuda_capability(q.device)
    if (major, minor) < (8, 0):
        out.append(f"needs compute capability 8.0 or newer, got {major}.{minor}")
    if q.shape[-1] not in HEAD_DIMS:
        out.append(f"head_dim must be one of {HEAD_DIMS}, got {q.shape[-1]}")
    if q.dtype not in (torch.float16, torch.bfloat16):
        out.append(f"dtype must be float16 or bfloat16, got {q.dtype}")
    err = _triton_error()
    if err:
        out.append(err)
    return out


def default_pv_dtype(dtype: torch.dtype) -> str:
    """The P·V precision ``pv_dtype="auto"`` picks for inputs of ``dtype``: their own
    16-bit float (``"bf16"`` for bfloat16, else ``"fp16"``), so V needs no copy.

    FP8 P carries 3 mantissa bits: on inputs with flat attention (random data) P and V
    rounding give ~3.6 % relative L2 error, over the 3e-2 budget, so FP8 is opt-in
    (e4m3 rounding of P alone is 2.6 %, of V alone 2.7 %; docs/kernel_notes.md)."""
    return "bf16" if dtype == torch.bfloat16 else "fp16"


def _check_inputs(q, k, v, pvthreshd, pv_dtype, block_n, kept, tile_n=TILE_N):
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
    check_int("tile_n", tile_n, minimum=1)
    if tile_n not in (64, 128):
        raise ValueError(f"tile_n must be 64 or 128, got {tile_n}")
    check_int("block_n", block_n, minimum=1)
    if block_n not in (64, 128) or block_n > tile_n:
        raise ValueError(f"block_n must be 64 or 128 and <= tile_n ({tile_n}), got {block_n}")
    if kept is not None:
        if not isinstance(kept, Tensor) or kept.dtype != torch.bool or kept.dim() != 4:
            raise TypeError(
                f"kept must be a 4-D bool tensor, got {getattr(kept, 'dtype', type(kept))} "
                f"{tuple(getattr(kept, 'shape', ()))}"
            )
        qb, kb = -(-q.shape[2] // BLOCK_M), -(-k.shape[2] // tile_n)
        if tuple(kept.shape[2:]) != (qb, kb) or kept.shape[0] not in (1, q.shape[0]) or (
            kept.shape[1] not in (1, q.shape[1])
        ):
            raise ValueError(
                f"kept must be [1 or B, 1 or Hq, {qb}, {kb}] (tiles of {BLOCK_M}x{tile_n}), "
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


def _element_mask(mask, kept, tile_n, nq, nk, dev) -> Tensor | None:
    """bool ``[1|B, 1|Hq, Nq, Nk]`` from an element mask and / or a tile map, or None."""
    out = None
    if kept is not None:
        out = kept.to(dev).repeat_interleave(BLOCK_M, -2).repeat_interleave(tile_n, -1)
        out = out[..., :nq, :nk]
    if mask is not None:
        if not isinstance(mask, Tensor) or mask.dtype != torch.bool or not (
            2 <= mask.dim() <= 4
        ) or tuple(mask.shape[-2:]) != (nq, nk):
            raise ValueError(
                f"mask must be a bool [.., {nq}, {nk}] tensor (query rows x keys), got "
                f"{getattr(mask, 'dtype', type(mask))} {tuple(getattr(mask, 'shape', ()))}"
            )
        while mask.dim() < 4:
            mask = mask.unsqueeze(0)
        out = mask.to(dev) if out is None else out & mask.to(dev)
    return out


def quant_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool = False,
    mask: Tensor | None = None,
    kept: Tensor | None = None,
    tile_n: int = TILE_N,
    scale: float | None = None,
    pvthreshd: float | Tensor | None = None,
    pv_dtype: str = "auto",
    block_n: int | None = None,
) -> Tensor:
    """The quant kernel's arithmetic in PyTorch (any device; fp32 with exact integer dots).

    Args:
        q: ``[B, Hq, Nq, D]``; k, v: ``[B, Hkv, Nk, D]``; fp16/bf16/fp32.
        causal: key ``j`` visible to query row ``r`` iff ``j <= r + Nk - Nq``.
        mask: bool ``[Nq, Nk]``, ``[1|Hq, Nq, Nk]`` or ``[1|B, 1|Hq, Nq, Nk]``: the pairs
            kept (e.g. ``Mask.to_dense(Nq, Nk)``); None: all.
        kept: bool ``[1|B, 1|Hq, ceil(Nq/128), ceil(Nk/tile_n)]``: the tiles to compute
            (None: all); combined with ``mask`` by ``&``.
        tile_n: key columns per tile of ``kept`` (64 or 128).
        scale: softmax scale, default ``D ** -0.5``.
        pvthreshd: None (off), a number or ``[Hq]`` values in log2 units (module docstring).
        pv_dtype: ``"fp8"``, ``"fp16"`` or ``"auto"`` (``default_pv_dtype``).
        block_n: key rows per K scale and per online-softmax step (64 or 128, at most
            ``tile_n``; None: the kernel's default, ``CONFIGS``).

    Returns:
        ``[B, Hq, Nq, D]`` in the dtype of ``q``; rows with no kept key are zeros.
    """
    check_choice("pv_dtype", pv_dtype, PV_DTYPES)
    if pv_dtype == "auto":
        pv_dtype = default_pv_dtype(q.dtype)
    if block_n is None:
        block_n = config(q.shape[-1], pv_dtype, tile_n)[0]
    pvt = _check_inputs(q, k, v, pvthreshd, pv_dtype, block_n, kept, tile_n)
    fp8 = pv_dtype == "fp8"
    bsz, hq, nq, d = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    group = hq // hkv
    scale = d**-0.5 if scale is None else float(scale)
    dev = q.device
    allowed = _element_mask(mask, kept, tile_n, nq, nk, dev)

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
        p16 = PV_TORCH_DTYPES[pv_dtype]
        vf = v.float().clamp(-65504, 65504) if p16 == torch.float16 else v.float()
        vq = vf.to(p16).float()[:, heads]
        c = 0.0
    vq = torch.nn.functional.pad(vq, (0, 0, 0, nkb * block_n - nk))
    if allowed is not None:
        allowed = torch.nn.functional.pad(
            allowed, (0, nkb * block_n - nk, 0, nqb * BLOCK_M - nq)
        ).view(*allowed.shape[:2], nqb, BLOCK_M, nkb * block_n)

    rows = torch.arange(nqb * BLOCK_M, device=dev).view(nqb, BLOCK_M)
    row_ok = rows < nq  # [NQB, BM]
    q_pos = (rows + nk - nq)[..., None]
    thr = None if pvt is None else pvt.to(dev)[None, :, None]

    m = torch.full((bsz, hq, nqb, BLOCK_M), -math.inf, device=dev)
    l_sum = torch.zeros_like(m)
    acc = torch.zeros(bsz, hq, nqb, BLOCK_M, d, device=dev)
    for j in range(nkb):
        lo, hi = j * block_n, (j + 1) * block_n
        cols = torch.arange(lo, hi, device=dev)
        s = torch.einsum("bhqmd,bhnd->bhqmn", qf, kf[:, :, lo:hi])
        cscale = (qs * ks[:, :, j : j + 1])[..., None, None]  # fp32, as the kernel
        t = s.float() * cscale
        t = t.masked_fill((cols >= nk)[None, None, None, None, :], -math.inf)
        if causal:
            t = t.masked_fill((q_pos < cols)[None, None], -math.inf)
        if allowed is not None:
            t = t.masked_fill(~allowed[..., lo:hi], -math.inf)
        m_blk = t.amax(-1)
        m_new = torch.maximum(m, m_blk)
        m_safe = torch.where(m_new == -math.inf, 0.0, m_new)
        alpha = torch.exp2(m - m_safe)
        p = torch.exp2(t - (m_safe - c)[..., None])
        l_sum = l_sum * alpha + p.sum(-1)
        pq = to_fp8(p) if fp8 else p.to(p16).float()
        pv = pq @ vq[:, :, None, lo:hi]
        if thr is not None:
            gap = torch.where(row_ok, m_blk - m_safe, -math.inf).amax(-1)  # [B, Hq, NQB]
            pv = pv * (gap >= -thr - PVT_SLACK)[..., None, None]
        acc = acc * alpha[..., None] + pv
        m = m_new
    out = acc * torch.where(l_sum > 0, 1.0 / l_sum, 0.0)[..., None]
    if fp8:
        out = out * sv[:, heads][:, :, None, None, :]
    return out.reshape(bsz, hq, nqb * BLOCK_M, d)[:, :, :nq].to(q.dtype)


# -- the kernel launcher ---------------------------------------------------------------------

#: Launch configuration per (head_dim, pv_dtype, tile_n): block_n, num_warps, num_stages,
#: maxnreg (a register cap; None: none). Measured on an H100 (2026-11-25, dense
#: 2x30x17776 D=64 / 2x24x17776 D=128, effective TOPS; docs/kernel_notes.md): D=64 fp16
#: bn128 w4 s3 491, fp8 bn128 w4 s2 466; D=128 fp16 bn64 w4 s3 637 (w8: 573), fp8 bn128
#: w8 s3 623, fp8 bn64 w8 s3 546. At D=64 a cap of 168 registers fits 3 programs per SM
#: instead of 2 (bn64 needs ~180 uncapped, bn128 spills at 255): dense 9.83 vs 10.5 ms
#: (bn128), 128 x 64 lists keeping every tile 10.5 vs 12.6 ms, meansim 0.35/0.98 6.86 vs
#: 7.82 ms, radial 2b 5.96 vs 6.41 ms (H100, ``benchmarks/quant.py --part lists``,
#: BENCHMARKS.md). At D=128 the same cap spills (2.2x slower).
CONFIGS: dict[tuple[int, str, int], tuple[int, int, int, int | None]] = {
    (64, "fp16", 128): (64, 4, 3, 168),
    (64, "fp8", 128): (128, 4, 2, None),
    (128, "fp16", 128): (64, 4, 3, None),
    (128, "fp8", 128): (128, 8, 3, None),
    (64, "fp16", 64): (64, 4, 3, 168),
    (64, "fp8", 64): (64, 4, 3, None),
    (128, "fp16", 64): (64, 4, 3, None),
    (128, "fp8", 64): (64, 8, 3, None),
}


def config(head_dim: int, pv_dtype: str, tile_n: int) -> tuple[int, int, int, int | None]:
    """``(block_n, num_warps, num_stages, maxnreg)`` for a call (``CONFIGS``; bf16 as
    fp16)."""
    key = "fp16" if pv_dtype == "bf16" else pv_dtype
    return CONFIGS.get((head_dim, key, tile_n), (64, 4, 3, None))


def _list_strides(t: Tensor, dims: int) -> list[int]:
    """Strides of the leading ``[Bm, Hm]`` dims, 0 where the lists broadcast."""
    return [t.stride(i) if t.shape[i] > 1 else 0 for i in range(dims)]


#: Keys of ``k_mean``'s sample per program that sums them (``_quant_q_sum_k``).
K_SUM_CHUNK = 256


def _quantize_qk(q: Tensor, k: Tensor, q_mul: float, nq_pad: int, nk_pad: int,
                 block_n: int, norms: bool = False) -> tuple[Tensor, ...]:
    """Steps 1 and 2 of the arithmetic in two launches: Q with the sums of ``k_mean``'s
    sample (in parts), then K. Two launches and no PyTorch reduction, the long Q pass
    first: the GPU works on it while the host prepares the next launch, so little of the
    host time shows in a synchronised call.

    Args:
        q ``[B, Hq, Nq, D]``, k ``[B, Hkv, Nk, D]`` with unit last stride; q_mul: Q's
        factor; nq_pad, nk_pad: padded lengths (multiples of ``BLOCK_M`` and ``block_n``);
        block_n: K rows per scale; norms: whether to return the norms below too.

    Returns:
        ``qi`` int8 ``[B, Hq, nq_pad, D]``, ``qs`` fp32 ``[B, Hq, nq_pad / BLOCK_M]``,
        ``ki`` int8 ``[B, Hkv, nk_pad, D]``, ``ks`` fp32 ``[B, Hkv, nk_pad / block_n]``;
        with ``norms``, then ``qn`` fp32 ``[B, Hq, nq_pad]`` (each quantized row's norm,
        in the units of ``qi * qs``) and ``kn`` fp32 ``[B, Hkv, nk_pad / block_n]`` (each
        K block's largest, times ``1 + NORM_MARGIN``): ``qn[i] * kn[j]`` bounds every
        dequantized score of row i against block j (Cauchy-Schwarz), which lets the sm90
        kernel skip a block's row maxima when they cannot move the running ones.
    """
    from . import _triton_quant as K
    from .meansim_fast import triton_next_pow2

    bsz, hq, nq, d = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    nqb, nkb = nq_pad // BLOCK_M, nk_pad // block_n
    dev = q.device
    step = max(1, nk // K_MEAN_SAMPLES)  # k_mean's sample: keys 0, step, 2 step, ...
    n_samples = -(-nk // step)
    parts = -(-n_samples // K_SUM_CHUNK)
    qi = torch.empty(bsz, hq, nq_pad, d, dtype=torch.int8, device=dev)
    qs = torch.empty(bsz, hq, nqb, dtype=torch.float32, device=dev)
    part_sums = torch.empty(bsz * hkv, parts, d, dtype=torch.float32, device=dev)
    qn = torch.empty(bsz, hq, nq_pad, dtype=torch.float32, device=dev) if norms else qs
    q_progs = nqb * bsz * hq
    K._quant_q_sum_k[(q_progs + parts * bsz * hkv,)](
        q, k, qi, qs, qn, part_sums,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        hq, hkv, nq, nq_pad, nqb, nk, q_progs, step, parts, q_mul,
        NORMS=norms, BLOCK_Q=BLOCK_M, CHUNK=K_SUM_CHUNK, D=d, num_warps=4,
    )
    ki = torch.empty(bsz, hkv, nk_pad, d, dtype=torch.int8, device=dev)
    ks = torch.empty(bsz, hkv, nkb, dtype=torch.float32, device=dev)
    kn = torch.empty(bsz, hkv, nkb, dtype=torch.float32, device=dev) if norms else ks
    K._quant_k[(nkb, bsz * hkv)](
        k, part_sums, ki, ks, kn, k.stride(0), k.stride(1), k.stride(2), hkv, nk, nk_pad, nkb,
        parts, float(n_samples), NORMS=norms, BLOCK_K=block_n, D=d,
        PARTS_P2=triton_next_pow2(parts), num_warps=4,
    )
    return (qi, qs, ki, ks, qn, kn) if norms else (qi, qs, ki, ks)


def quant_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool = False,
    block_mask=None,
    kept: Tensor | None = None,
    tile_n: int | None = None,
    scale: float | None = None,
    pvthreshd: float | Tensor | None = None,
    pv_dtype: str = "auto",
    block_n: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    maxnreg: int | None = None,
    kernel: str = "auto",
) -> Tensor:
    """Quantized block-sparse attention (CUDA, or Triton's ``TRITON_INTERPRET=1``).

    Args:
        q: ``[B, Hq, Nq, D]``; k, v: ``[B, Hkv, Nk, D]``; fp16/bf16, D in {64, 128}.
        causal: in-kernel causal rule (query rows are the last ``Nq`` rows).
        block_mask: a ``BlockMask`` for ``Nq x Nk`` at ``128 x 128`` or ``128 x 64`` tiles:
            full tiles computed without a rule, partial ones with its ``mask_mod``
            (``tile_lists``), or
        kept: bool ``[1|B, 1|Hq, Qb, KVb]`` whole tiles of ``128 x tile_n`` to compute.
            None of both: dense.
        tile_n: columns per tile of ``kept`` (64 or 128; default 128).
        scale: softmax scale (default ``D ** -0.5``).
        pvthreshd: None, a number or ``[Hq]`` values (log2 units; see module docstring).
        pv_dtype: ``"fp8"`` (sm_89+), ``"fp16"``, ``"bf16"`` or ``"auto"`` (the inputs'
            16-bit dtype, ``default_pv_dtype``: V is then read in place).
        block_n, num_warps, num_stages, maxnreg: launch overrides of the Triton kernel
            (benchmarks); defaults from ``CONFIGS`` (its register cap applies when
            block_n and num_warps are the configuration's; ``maxnreg=0``: no cap).
        kernel: ``"auto"`` (the Hopper kernel, ``sm90``, where it runs the call, else
            Triton), ``"triton"`` or ``"sm90"`` (a ``ValueError`` with its reasons
            where it cannot run the call).

    Returns:
        ``[B, Hq, Nq, D]`` in the dtype of ``q``; rows with no kept key are zeros.
    """
    check_choice("pv_dtype", pv_dtype, PV_DTYPES)
    check_choice("kernel", kernel, KERNELS)
    if pv_dtype == "auto":
        pv_dtype = default_pv_dtype(q.dtype)
    if block_mask is not None and kept is not None:
        raise ValueError("pass block_mask or kept, not both")
    lists = None
    if block_mask is not None:
        lists = tile_lists(block_mask)
        if tile_n is not None and tile_n != lists.tile[1]:
            raise ValueError(f"tile_n={tile_n} but block_mask has tiles {lists.tile}")
        tile_n = lists.tile[1]
        if tuple(block_mask.seq_lengths) != (q.shape[2], k.shape[2]):
            raise ValueError(
                f"block_mask is for lengths {tuple(block_mask.seq_lengths)}, the call has "
                f"({q.shape[2]}, {k.shape[2]})"
            )
    tile_n = TILE_N if tile_n is None else tile_n
    cfg = config(q.shape[-1], pv_dtype, tile_n if tile_n in (64, 128) else TILE_N)
    overrides = (block_n, num_warps, num_stages, maxnreg)
    block_n = min(cfg[0], tile_n) if block_n is None else block_n
    pvt = _check_inputs(q, k, v, pvthreshd, pv_dtype, block_n, kept, tile_n)
    if q.dtype not in (torch.float16, torch.bfloat16):
        raise TypeError(f"q, k, v must be float16 or bfloat16, got {q.dtype}")
    if causal and (kept is not None or lists is not None):
        raise ValueError("causal=True takes no tiles (apply causality in the mask)")
    hopper = False
    if kernel != "triton":
        reasons = sm90_reasons(q, v, causal=causal, pvthreshd=pvthreshd, pv_dtype=pv_dtype,
                               overrides=overrides, tile_n=tile_n if kernel == "auto" else None)
        if kernel == "sm90" and reasons:
            raise ValueError(f"kernel='sm90' cannot run this call: {'; '.join(reasons)}")
        hopper = not reasons
    from . import _triton_quant as K  # V's conversion and the Triton kernel, below

    if hopper:
        block_n = tile_n  # one K scale and one softmax step per tile
    num_warps = cfg[1] if num_warps is None else num_warps
    num_stages = cfg[2] if num_stages is None else num_stages
    if maxnreg is None and block_n == cfg[0] and num_warps == cfg[1] and pvt is None:
        # The cap belongs to its configuration; not with the PV skip, whose kernel gave
        # 7 % off the reference under it (H100, test_pvthreshd_matches_reference).
        maxnreg = cfg[3]
    dev = q.device
    if kept is not None:
        full_num, full_idx = T._ordered(kept.to(dev))
        part_num = torch.zeros_like(full_num)
        lists = TileLists(
            (BLOCK_M, tile_n), full_num, full_idx, part_num, torch.zeros_like(full_idx),
            torch.zeros_like(full_num, dtype=torch.int64),
            torch.zeros(0, BLOCK_M, tile_n // 32, dtype=torch.int32, device=dev),
            row_order(full_num, part_num),
        )
    fp8 = pv_dtype == "fp8"
    bsz, hq, nq, d = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    scale = d**-0.5 if scale is None else float(scale)
    nqb, nkt = -(-nq // BLOCK_M), -(-nk // tile_n)
    nq_pad, nk_pad = nqb * BLOCK_M, nkt * tile_n
    nkb = nk_pad // block_n

    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    # the norms bound a block's scores for the Hopper kernel (sm90.attention's ``norms``)
    with_norms = hopper and sm90.uses_bound(d, v.dtype)
    qi, qs, ki, ks, *norms = _quantize_qk(q, k, scale * LOG2E, nq_pad, nk_pad, block_n,
                                          with_norms)
    sv = ks  # read only with fp8 P·V
    if fp8:
        sv = v_channel_scale(v).contiguous()
        inv = (1.0 / sv).contiguous()
        vq = torch.empty(bsz, hkv, d, nk_pad, dtype=torch.float8_e4m3fn, device=dev)
        v_strides = (vq.stride(0), vq.stride(1), 1, nk_pad)
    elif v.dtype == PV_TORCH_DTYPES[pv_dtype]:
        vq, inv = v, ks  # read in place
        v_strides = (v.stride(0), v.stride(1), v.stride(2), 1)
    else:
        vq = torch.empty(bsz, hkv, nk_pad, d, dtype=PV_TORCH_DTYPES[pv_dtype], device=dev)
        inv = ks  # unused
        v_strides = (vq.stride(0), vq.stride(1), d, 1)
    if vq is not v:
        K._quant_v[(nk_pad // 64, bsz * hkv)](
            v, inv, vq, v.stride(0), v.stride(1), v.stride(2),
            hkv, nk, nk_pad, OUT_FP8=fp8, BLOCK=64, D=d, num_warps=4,
        )

    if lists is not None:
        for name, t in (("full", lists.full_num), ("partial", lists.part_num)):
            if t.dim() != 3 or t.shape[2] != nqb or t.shape[0] not in (1, bsz) or (
                t.shape[1] not in (1, hq)
            ):
                raise ValueError(
                    f"the {name} tile lists must be [1 or B, 1 or Hq, {nqb}], got "
                    f"{tuple(t.shape)}"
                )
    out = torch.empty(bsz, hq, nq, d, dtype=q.dtype, device=dev)
    if hopper:
        return sm90.attention(
            qi, qs, ki, ks, vq, out, block_n=block_n, lists=lists, order=ROW_ORDER, norms=norms,
        )

    if lists is not None:
        mode = 2
        snb, snh = _list_strides(lists.full_num, 2)
        sib, sih = _list_strides(lists.full_idx, 2)
        siq = lists.full_idx.stride(2)
        tl_args = (lists.full_num, lists.full_idx, lists.part_num, lists.part_idx,
                   lists.part_off, lists.bits if lists.n_partial else lists.full_num,
                   lists.row_order if ROW_ORDER else torch.arange(
                       nqb, dtype=torch.int32, device=dev))
    else:
        mode = 1 if causal else 0
        snb = snh = sib = sih = siq = 0
        unused = torch.zeros(1, dtype=torch.int32, device=dev)
        tl_args = (ks,) * 5 + (unused, unused)
    pvt_dev = ks if pvt is None else pvt.to(dev)
    K._attn[(nqb, bsz * hq)](
        qi, ki, vq, qs, ks, sv, out, *tl_args, pvt_dev,
        v_strides[0], v_strides[1],
        out.stride(0), out.stride(1), out.stride(2), v_strides[2], v_strides[3],
        snb, snh, sib, sih, siq,
        hq, hq // hkv, nq, nk, nq_pad, nk_pad, nk - nq, nqb, nkb, nkt,
        MODE=mode, PV_FP8=fp8, USE_PVT=pvt is not None,
        HAS_PARTIAL=lists is not None and lists.n_partial > 0,
        BLOCK_M=BLOCK_M, BLOCK_N=block_n, TILE_N=tile_n, D=d, BITS_GATHER=BITS_GATHER,
        num_warps=num_warps, num_stages=num_stages,
        **({"maxnreg": maxnreg} if maxnreg else {}),
    )
    return out


# -- the backend ---------------------------------------------------------------------------


def sm90_reasons(
    q: Tensor,
    v: Tensor,
    *,
    causal: bool = False,
    pvthreshd=None,
    pv_dtype: str = "auto",
    overrides: tuple = (),
    tile_n: int | None = None,
) -> list[str]:
    """Why the Hopper kernel (``sm90``) does not run a ``quant_attention`` call (empty: it
    does); the Triton kernel runs it then. ``tile_n``: the map's tile width, for
    ``kernel="auto"``, which leaves widths outside ``SM90_TILE_N`` to Triton (None: what
    ``kernel="sm90"`` can run at all)."""
    out = sm90.device_reasons(q, v)
    if pv_dtype == "auto":
        pv_dtype = default_pv_dtype(q.dtype)
    if causal:
        out.append("the in-kernel causal rule runs on the Triton kernel (a causal BlockMask "
                   "runs here)")
    if pvthreshd is not None:
        out.append("pvthreshd runs on the Triton kernel")
    if PV_TORCH_DTYPES.get(pv_dtype) != v.dtype:
        out.append(f"P·V in {pv_dtype} for v in {v.dtype} runs on the Triton kernel")
    if v.dtype != q.dtype:  # the kernel writes the output in V's type
        out.append(f"q in {q.dtype} and v in {v.dtype} run on the Triton kernel")
    if any(x is not None for x in overrides):
        out.append("Triton launch overrides (block_n, num_warps, num_stages, maxnreg) given")
    if tile_n is not None and tile_n not in SM90_TILE_N and not out:
        out.append(f"{tile_n}-column tiles run faster on the Triton kernel")
    return out


def _tile_size(call) -> tuple[int, int]:
    """The BlockMask tiles for ``call``: asked for, else the mask's own (meansim predicts
    at 128 x 64), else the tile shape with the least estimated kernel time: kept tiles
    (partial ones weighted by ``PARTIAL_COST``) times their width over ``TILE_SPEED``
    (times ``SM90_SPEEDUP`` for the shapes the Hopper kernel would run). The 128-column
    lists run faster at both head dims, so 64-column tiles must skip enough more of the
    map to win (fine bands, token-granular maps). One tile census per shape and tile size
    (cached with the BlockMask)."""
    if call.block_size is not None:
        return tuple(call.block_size)
    native = getattr(call.mask, "native_block_size", None)
    if native is not None and tuple(native) in TILE_SIZES:
        return tuple(native)
    if _mode_of(call.mask) != "tiles" or call.head_dim not in HEAD_DIMS:
        return (BLOCK_M, TILE_N)
    # Remembered per mask and shape: the choice is asked for twice a call (reasons, run).
    seen = _TILE_CHOICE.setdefault(call.mask, {})
    # What decides whether the Hopper kernel runs it (sm90_reasons), cheaply: asked for
    # only on a miss, not on every call.
    v = call.v
    key = (call.q_len, call.kv_len, call.head_dim, str(call.device), call.q.dtype, v.dtype,
           v.stride(), v.data_ptr() % 16, sm90.MODE)
    if key not in seen:
        hopper = tuple(w for _, w in TILE_SIZES if not sm90_reasons(call.q, v, tile_n=w))

        def cost(tile):
            counts = call.tile_counts(tile)
            kept = counts.full + PARTIAL_COST * counts.partial
            speed = TILE_SPEED[(call.head_dim, tile[1])]
            if tile[1] in hopper:
                speed *= SM90_SPEEDUP[call.head_dim]
            return kept * tile[1] / speed

        seen[key] = min(TILE_SIZES, key=cost)
    return seen[key]


_TILE_CHOICE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _call_mode(call) -> str:
    """``_mode_of`` the call's mask, except for a causal mask where the Hopper kernel runs
    the call, which has no in-kernel causal rule:

    - one query row (a decode step) sees every key: ``"dense"``;
    - ``BLOCK_M`` rows or more (a prefill) run as a tile map, the mask's BlockMask with its
      diagonal tiles partial, faster than the Triton kernel runs the rule (H100,
      2026-11-26, ``benchmarks/quant.py --part hopper``, queued: 2 x 32 x 8,192, D=128,
      1.70 against 1.87 ms; 2 x 30 x 17,776, D=64, 4.73 against 5.37 ms). The BlockMask
      is built once per pair of lengths (a few ms);
    - fewer rows (speculative decoding, short chunks) keep the Triton kernel's rule: no
      build per step while the cache grows."""
    mode = _mode_of(call.mask)
    if mode == "causal" and not sm90_reasons(call.q, call.v):
        if call.q_len == 1:
            return "dense"
        if call.q_len >= BLOCK_M:
            return "tiles"
    return mode


class QuantBackend:
    """``backend="quant"`` of ``flexsparse.attention`` (the ``Backend`` protocol of
    ``flexsparse.call``): the quantized kernel on the call's BlockMask."""

    name = "quant"

    def not_supported_reasons(self, call) -> list[str]:
        """Why the kernel cannot run ``call`` (empty when it can)."""
        reasons = device_reasons(call.q)
        if reasons:
            return reasons
        tile = _tile_size(call)
        if tile not in TILE_SIZES:
            reasons.append(f"block_size must be one of {TILE_SIZES}, got {tile}")
        if reasons or _mode_of(call.mask) != "tiles":
            return reasons
        n_partial = call.tile_counts(tile).partial  # one host sync per BlockMask, cached
        need = n_partial * BLOCK_M * tile[1] // 8
        if need > MAX_BITS_BYTES:
            reasons.append(
                f"mask {call.mask.name!r} has {n_partial} partial {tile[0]}x{tile[1]} tiles: "
                f"{need >> 20} MiB of packed bits, over the {MAX_BITS_BYTES >> 20} MiB limit"
            )
        return reasons

    def describe(self, call) -> str:
        """Which of the two kernels runs ``call`` (what ``fs.explain`` prints)."""
        mode = _call_mode(call)
        tile = _tile_size(call) if mode == "tiles" else (BLOCK_M, TILE_N)
        why = sm90_reasons(call.q, call.v, causal=mode == "causal", tile_n=tile[1])
        if not why:
            return "quantized block-sparse kernel, the Hopper CUDA C++ one"
        return f"quantized block-sparse kernel, the Triton one ({'; '.join(why)})"

    def run(self, call) -> Tensor:
        """``[B, Hq, Q, D]`` in ``q``'s dtype (``not_supported_reasons`` was empty)."""
        mode = _call_mode(call)
        if mode == "tiles":
            bm = call.block_mask(_tile_size(call))
            return quant_attention(call.q, call.k, call.v, block_mask=bm, scale=call.scale)
        return quant_attention(
            call.q, call.k, call.v, causal=mode == "causal", scale=call.scale
        )
