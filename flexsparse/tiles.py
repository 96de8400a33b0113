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

from dataclasses import dataclass

import torch
from torch import Tensor
from torch.nn.attention.flex_attention import BlockMask

EMPTY, PARTIAL, FULL = 0, 1, 2


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
    kept = mask_mod(b, h.to(grid.device), qc, kc).expand_as(in_range) & in_range
    n_kept = kept.sum((-2, -1))
    return from_bounds(n_kept == in_range.sum((-2, -1)), n_kept > 0)


def to_block_mask(
    states: Tensor,
    mask_mod,
    q_len: int,
    kv_len: int,
    block_q: int,
    block_kv: int,
) -> BlockMask:
    """Build a ``BlockMask`` straight from tile states ``[Qb, KVb]``, ``[H, Qb, KVb]`` or
    ``[B, H, Qb, KVb]``: partial tiles go to ``kv_*`` (``mask_mod`` applied), full tiles
    to ``full_kv_*`` (``mask_mod`` skipped), empty tiles nowhere."""
    while states.dim() < 4:
        states = states.unsqueeze(0)
    partial = states == PARTIAL
    full = states == FULL
    return BlockMask.from_kv_blocks(
        *_ordered(partial),
        *_ordered(full),
        BLOCK_SIZE=(block_q, block_kv),
        mask_mod=mask_mod,
        seq_lengths=(q_len, kv_len),
    )


def _ordered(selected: Tensor) -> tuple[Tensor, Tensor]:
    """``(num_blocks [.., Qb], indices [.., Qb, KVb])`` with the selected columns first."""
    num = selected.sum(-1, dtype=torch.int32)
    idx = torch.argsort((~selected).to(torch.int8), dim=-1, stable=True).to(torch.int32)
    return num.contiguous(), idx.contiguous()


def summary(states: Tensor) -> dict[str, int]:
    """Counts of empty / partial / full tiles."""
    return {
        "empty": int((states == EMPTY).sum()),
        "partial": int((states == PARTIAL).sum()),
        "full": int((states == FULL).sum()),
        "total": states.numel(),
    }
