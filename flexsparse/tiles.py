"""Tile classification: which (query block, key block) tiles are empty, partial or full.

A *tile state* tensor has dtype int8 and shape ``[..., Qb, KVb]``; values are
``EMPTY`` (0: no pair kept, the tile is skipped), ``PARTIAL`` (1: some pairs kept, the
kernel evaluates ``mask_mod`` inside) and ``FULL`` (2: every in-range pair kept, the
kernel skips ``mask_mod``). With that encoding composition is elementwise:
``a & b == min(a, b)``, ``a | b == max(a, b)``, ``~a == 2 - a``.
Lengths need not be multiples of the block size: a tile's state only speaks of the
positions inside the sequence.
"""

from __future__ import annotations

import functools
import weakref
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.nn.attention.flex_attention import BlockMask, noop_mask

EMPTY, PARTIAL, FULL = 0, 1, 2

#: Elements checked against the per-element (vmap) evaluation before a mask_mod's
#: broadcast result is trusted.
_PROBE_POINTS = 16
#: mask_mod -> whether its broadcast evaluation was found right (checked once per rule).
_BROADCASTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def partial_free(block_mask: BlockMask) -> bool:
    """True when ``block_mask`` is known to list no partial tile (built by
    ``to_block_mask`` from states without any); False means "not known". Kernels then
    skip looking for partial tiles."""
    # An attribute of the BlockMask, not a weak set: Dynamo reads it while tracing, and a
    # set the garbage collector shrinks meanwhile fails the compile.
    return getattr(block_mask, "_flexsparse_partial_free", False)


@dataclass(frozen=True)
class TileGrid:
    """The tiles of a ``q_len x kv_len`` attention, with absolute token positions.

    Query rows are the *last* ``q_len`` rows of a ``kv_len x kv_len`` mask when
    ``q_len < kv_len`` (a decode step), so ``q_offset = kv_len - q_len``.

    Attributes:
        q_lo, q_hi: ``[Qb]`` long, first / last (inclusive) query position of each row tile.
        kv_lo, kv_hi: ``[KVb]`` long, first / last key position of each column tile.
    """

    q_len: int
    kv_len: int
    block_q: int
    block_kv: int
    q_offset: int
    device: torch.device
    q_lo: Tensor
    q_hi: Tensor
    kv_lo: Tensor
    kv_hi: Tensor

    @classmethod
    def make(
        cls, q_len: int, kv_len: int, block_q: int, block_kv: int, device="cpu", q_offset=None
    ) -> TileGrid:
        device = torch.device(device)
        if q_offset is None:
            q_offset = max(kv_len - q_len, 0)
        q_lo = torch.arange(0, q_len, block_q, device=device)
        kv_lo = torch.arange(0, kv_len, block_kv, device=device)
        q_hi = torch.clamp(q_lo + block_q - 1, max=q_len - 1)
        kv_hi = torch.clamp(kv_lo + block_kv - 1, max=kv_len - 1)
        return cls(
            q_len, kv_len, block_q, block_kv, q_offset, device,
            q_lo + q_offset, q_hi + q_offset, kv_lo, kv_hi,
        )

    @property
    def shape(self) -> tuple[int, int]:
        return (self.q_lo.numel(), self.kv_lo.numel())

    def rows(self) -> tuple[Tensor, Tensor]:
        """``(q_lo, q_hi)`` shaped ``[Qb, 1]`` for broadcasting against columns."""
        return self.q_lo[:, None], self.q_hi[:, None]

    def cols(self) -> tuple[Tensor, Tensor]:
        """``(kv_lo, kv_hi)`` shaped ``[1, KVb]``."""
        return self.kv_lo[None, :], self.kv_hi[None, :]


def from_bounds(all_true: Tensor, any_true: Tensor) -> Tensor:
    """Tile states from two boolean facts per tile (``all_true`` implies ``any_true``)."""
    return any_true.to(torch.int8) + (all_true & any_true).to(torch.int8)


def full_states(grid: TileGrid) -> Tensor:
    return torch.full(grid.shape, FULL, dtype=torch.int8, device=grid.device)


def states_from_dense(dense: Tensor, block_q: int, block_kv: int) -> Tensor:
    """Classify tiles of a materialised boolean mask ``[..., Q, KV]`` (padding ignored)."""
    q_len, kv_len = dense.shape[-2:]
    pad_q, pad_kv = -q_len % block_q, -kv_len % block_kv
    lead = dense.shape[:-2]
    valid = torch.ones(q_len, kv_len, dtype=torch.bool, device=dense.device)
    dense = torch.nn.functional.pad(dense, (0, pad_kv, 0, pad_q))
    valid = torch.nn.functional.pad(valid, (0, pad_kv, 0, pad_q))
    qb, kb = dense.shape[-2] // block_q, dense.shape[-1] // block_kv
    kept = dense.reshape(*lead, qb, block_q, kb, block_kv).sum((-3, -1))
    total = valid.reshape(qb, block_q, kb, block_kv).sum((-3, -1))
    return from_bounds(kept == total, kept > 0)


def evaluate_mask_mod(mask_mod, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
    """``mask_mod`` on broadcastable index tensors: bool of their broadcast shape.

    torch calls a ``mask_mod`` on scalars (``create_mask`` vmaps it over b, h, q, kv), so a
    valid ``mask_mod`` need not broadcast: one that indexes a lookup table by ``kv_idx``
    and then takes ``row[0]`` (attention-gym's vision cross-attention mask) gives a wrong
    shape or wrong values on index grids. The first time a rule is met, its broadcast
    result is checked (shape, and values against per-element evaluation on a sample of
    points); a rule that fails is evaluated element-wise with ``vmap`` over the flattened
    grid from then on. Rules marked with ``broadcasts`` (the library's) skip the check."""
    mask_mod = getattr(mask_mod, "_flexsparse_inner", mask_mod)  # evaluated here, once
    idx = [torch.as_tensor(x, device=q_idx.device) for x in (b, h, q_idx, kv_idx)]
    shape = torch.broadcast_shapes(*(x.shape for x in idx))
    verdict = _verdict(mask_mod)
    if verdict is not False:
        out = _broadcast_eval(mask_mod, idx, shape)
        if out is not None and (verdict or _agrees(mask_mod, idx, shape, out)):
            _remember_verdict(mask_mod, True)
            return out
        if getattr(mask_mod, "_flexsparse_broadcasts", False):
            mask_mod(*idx)  # a library rule failed: let it raise its own error
        _remember_verdict(mask_mod, False)
    flat = [x.expand(shape).reshape(-1) for x in idx]
    if flat[0].numel() == 0:
        return torch.zeros(shape, dtype=torch.bool, device=q_idx.device)
    return torch.vmap(mask_mod)(*flat).to(torch.bool).reshape(shape)


def broadcasts(mask_mod):
    """Mark ``mask_mod`` as written to broadcast over index grids (no check needed)."""
    mask_mod._flexsparse_broadcasts = True
    return mask_mod


def broadcast_safe(mask_mod):
    """``mask_mod`` made safe to call on index grids: on scalars (torch's vmap and
    compiled kernels) it is called as is, on grids through ``evaluate_mask_mod``. ``Mask``
    wraps the ``mask_mod`` a user passes, so every caller that evaluates it on a grid (the
    dense reference, row-wise SDPA, tile classification) gets torch's semantics."""
    if getattr(mask_mod, "_flexsparse_broadcasts", False) or hasattr(
        mask_mod, "_flexsparse_inner"
    ):
        return mask_mod

    @functools.wraps(mask_mod)
    def safe(b, h, q_idx, kv_idx):
        if all(getattr(x, "dim", _scalar)() == 0 for x in (b, h, q_idx, kv_idx)):
            return mask_mod(b, h, q_idx, kv_idx)
        return evaluate_mask_mod(mask_mod, b, h, q_idx, kv_idx)

    safe._flexsparse_inner = mask_mod
    return safe


def _scalar() -> int:
    return 0


def _verdict(mask_mod) -> bool | None:
    if getattr(mask_mod, "_flexsparse_broadcasts", False):
        return True
    try:
        return _BROADCASTS.get(mask_mod)
    except TypeError:  # not weak-referenceable: checked every time
        return None


def _remember_verdict(mask_mod, ok: bool) -> None:
    try:
        _BROADCASTS[mask_mod] = ok
    except TypeError:
        pass


def _broadcast_eval(mask_mod, idx: list[Tensor], shape: torch.Size) -> Tensor | None:
    try:
        out = torch.as_tensor(mask_mod(*idx))
        if torch.broadcast_shapes(out.shape, shape) != shape:
            return None
    except Exception:  # noqa: BLE001 - any failure means "evaluate per element"; a real
        return None    # bug in the mask_mod then surfaces from the vmap evaluation
    return out.to(torch.bool).expand(shape)


def _agrees(mask_mod, idx: list[Tensor], shape: torch.Size, out: Tensor) -> bool:
    """Does ``out`` match ``mask_mod`` evaluated point by point on a spread of elements?"""
    total = out.numel()
    if total == 0:
        return True
    pick = torch.unique(torch.linspace(0, total - 1, _PROBE_POINTS).long()).to(out.device)
    coords = torch.unravel_index(pick, shape) if len(shape) else ()
    points = [x.expand(shape)[coords] if len(shape) else x.reshape(1) for x in idx]
    try:
        want = torch.vmap(mask_mod)(*points).to(torch.bool)
    except Exception:  # noqa: BLE001 - not vmap-able: the broadcast result is all there is
        return True
    got = out[coords] if len(shape) else out.reshape(1)
    return bool(torch.equal(want.reshape(-1), got.reshape(-1)))


def evaluate_tiles(mask_mod, grid: TileGrid, tiles: Tensor, heads: int | None) -> Tensor:
    """Exact states of the listed tiles by evaluating ``mask_mod`` on their elements.

    Args:
        tiles: ``[T, 3]`` long (head, q tile, kv tile); head is ignored when ``heads`` is None.
    Returns:
        ``[T]`` int8 states.
    """
    bq, bk = grid.block_q, grid.block_kv
    dq = torch.arange(bq, device=grid.device)
    dk = torch.arange(bk, device=grid.device)
    q = grid.q_lo[tiles[:, 1]][:, None, None] + dq[None, :, None]
    kv = grid.kv_lo[tiles[:, 2]][:, None, None] + dk[None, None, :]
    in_range = (q <= grid.q_hi[tiles[:, 1]][:, None, None]) & (
        kv <= grid.kv_hi[tiles[:, 2]][:, None, None]
    )
    h = tiles[:, 0][:, None, None] if heads is not None else torch.zeros((), dtype=torch.long)
    b = torch.zeros((), dtype=torch.long, device=grid.device)
    # Clamp so that lookup tensors are never indexed past the sequence.
    qc = torch.minimum(q, grid.q_hi[tiles[:, 1]][:, None, None])
    kc = torch.minimum(kv, grid.kv_hi[tiles[:, 2]][:, None, None])
    kept = evaluate_mask_mod(mask_mod, b, h.to(grid.device), qc, kc).expand_as(in_range)
    kept = kept & in_range
    n_kept = kept.sum((-2, -1))
    return from_bounds(n_kept == in_range.sum((-2, -1)), n_kept > 0)


def to_block_mask(
    states: Tensor,
    mask_mod,
    q_len: int,
    kv_len: int,
    block_q: int,
    block_kv: int,
    noop: bool = True,
    has_partial: bool | None = None,
    backward: bool = True,
) -> BlockMask:
    """Build a ``BlockMask`` straight from tile states ``[Qb, KVb]``, ``[H, Qb, KVb]`` or
    ``[B, H, Qb, KVb]``: partial tiles go to ``kv_*`` (``mask_mod`` applied), full tiles
    to ``full_kv_*`` (``mask_mod`` skipped), empty tiles nowhere.

    With ``noop``, a map without partial tiles carries torch's ``noop_mask`` instead of
    ``mask_mod`` (compiled FlexAttention then has no per-element rule: 7.7 ms instead of
    11.6 ms on the CogVideoX radial map, issue 14). Eager FlexAttention ignores the tile
    lists and applies only ``mask_mod`` to every score, so a BlockMask meant for it needs
    ``noop=False``. The query-side (transposed) indices that backward needs are ordered
    from the states directly, which is what ``from_kv_blocks`` would compute through a
    dense round trip.

    ``has_partial``: whether any state is ``PARTIAL``, when the caller knows (a
    block-granular map at its own tile size has none): saves a host read. None: looked
    up.

    ``backward``: build the query-side lists too (``q_*``, ``full_q_*``), which only
    FlexAttention's backward reads. False leaves them None: a call that needs no gradient
    skips their transposed sort (a quarter of the build's GPU time on a meansim map)."""
    while states.dim() < 4:
        states = states.unsqueeze(0)
    full = states == FULL
    partial = states == PARTIAL
    if has_partial is None:
        has_partial = bool(partial.any())  # one host sync
    if not noop or has_partial:
        kv = _ordered(partial)
    else:
        mask_mod = noop_mask
        kv = None
    full_kv = _ordered(full)
    q = full_q = (None, None)
    if backward:  # the same lists of the transposed map
        full_q = _ordered(full.transpose(-2, -1))
        q = _ordered(partial.transpose(-2, -1)) if kv is not None else _none_listed(full_q)
    bm = _block_mask(
        (q_len, kv_len), kv or _none_listed(full_kv), full_kv, q, full_q,
        (block_q, block_kv), mask_mod, backward,
    )
    if not has_partial:
        bm._flexsparse_partial_free = True
    return bm


def with_rule(block_mask: BlockMask, mask_mod) -> BlockMask:
    """A partial-free ``block_mask`` that carries ``noop_mask`` (``to_block_mask(noop=True)``)
    with ``mask_mod`` instead: the same lists, so no tile work and no host read, which also
    holds inside a ``torch.compile`` trace. For eager FlexAttention, which applies only
    ``mask_mod``."""
    if block_mask.mask_mod is not noop_mask or not partial_free(block_mask):
        raise ValueError("with_rule takes a partial-free BlockMask that carries noop_mask")

    def unlisted(idx: Tensor | None) -> Tensor | None:
        # The empty partial lists of a noop map share the full lists' index tensor
        # (``_none_listed``); these get their own, as ``_ordered`` gives for no selected
        # tile (every column, ascending). torch 2.13's compiled FlexAttention on the CPU
        # fails to build on the aliased inputs once a rule is present (a C++ compile error).
        if idx is None:
            return None
        cols = torch.arange(idx.shape[-1], dtype=idx.dtype, device=idx.device)
        return cols.expand(idx.shape).contiguous()

    bm = _block_mask(
        tuple(block_mask.seq_lengths),
        (block_mask.kv_num_blocks, unlisted(block_mask.kv_indices)),
        (block_mask.full_kv_num_blocks, block_mask.full_kv_indices),
        (block_mask.q_num_blocks, unlisted(block_mask.q_indices)),
        (block_mask.full_q_num_blocks, block_mask.full_q_indices),
        tuple(block_mask.BLOCK_SIZE), mask_mod, block_mask.q_indices is not None,
    )
    bm._flexsparse_partial_free = True
    return bm


def _none_listed(like: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
    """Lists of no tile shaped as ``like``: zero counts (the index tensor is never read
    past the counts, so ``like``'s is reused)."""
    return torch.zeros_like(like[0]), like[1]


def _block_mask(seq_lengths, kv, full_kv, q, full_q, block, mask_mod, backward=True):
    try:
        return BlockMask(
            seq_lengths=seq_lengths, kv_num_blocks=kv[0], kv_indices=kv[1],
            full_kv_num_blocks=full_kv[0], full_kv_indices=full_kv[1],
            q_num_blocks=q[0], q_indices=q[1], full_q_num_blocks=full_q[0],
            full_q_indices=full_q[1], BLOCK_SIZE=block, mask_mod=mask_mod,
        )
    except TypeError:  # a torch whose constructor differs: let it transpose itself
        return BlockMask.from_kv_blocks(
            *kv, *full_kv, BLOCK_SIZE=block, mask_mod=mask_mod, seq_lengths=seq_lengths,
            **({} if backward else {"compute_q_blocks": False}),
        )


def _ordered(selected: Tensor) -> tuple[Tensor, Tensor]:
    """``(num_blocks [.., R], indices [.., R, C])`` int32, the selected columns first, each
    group in ascending order (what torch's stable descending argsort gives)."""
    num = selected.sum(-1, dtype=torch.int32)
    if selected.device.type != "cpu":
        # On a GPU one segmented sort is fewer launches than the scatter below.
        idx = torch.argsort(selected.to(torch.int8), dim=-1, descending=True, stable=True)
        # The kernels read the indices as contiguous: a transposed input must not leak
        # its strides (sort and the casts keep them).
        return num.contiguous(), idx.to(torch.int32, memory_format=torch.contiguous_format)
    # On the CPU a sort of every row is the slow part: place each column directly. The
    # j-th column goes to (selected before it) if selected, else num + (unselected before).
    width = selected.shape[-1]
    before = selected.to(torch.int32).cumsum(-1, dtype=torch.int32)
    cols = torch.arange(width, dtype=torch.int32, device=selected.device)
    pos = torch.where(selected, before - 1, num[..., None] + cols - before)
    idx = torch.empty(pos.shape, dtype=torch.int32, device=pos.device)
    idx.scatter_(-1, pos.long(), cols.expand_as(pos))
    return num.contiguous(), idx


def summary(states: Tensor) -> dict[str, int]:
    """Counts of empty / partial / full tiles."""
    return {
        "empty": int((states == EMPTY).sum()),
        "partial": int((states == PARTIAL).sum()),
        "full": int((states == FULL).sum()),
        "total": states.numel(),
    }
