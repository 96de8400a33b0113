"""``AttentionCall``: one attention call, validated once, and the ``Backend`` protocol.

``flexsparse.attention`` validates its arguments into an ``AttentionCall`` and walks a fixed
priority list of backends. Each backend answers ``not_supported_reasons(call)`` (an empty
list means it can run the call) and ``run(call)``. Backends never validate again and never
import ``flexsparse.attention``: this module is all they share with it.

The lowered form every backend consumes is the ``BlockMask`` (``call.block_mask(...)``),
cached on the mask per (lengths, device, heads, batch, tile size), so a tile map is
computed once however many backends look at it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import torch
from torch import Tensor

if TYPE_CHECKING:
    from torch.nn.attention.flex_attention import BlockMask

    from .mask import Mask


@dataclass(frozen=True, eq=False)
class AttentionCall:
    """A validated attention call.

    Attributes:
        q: ``[B, Hq, Q, D]``; k, v: ``[B, Hkv, KV, D]`` (one dtype, one device).
        mask: a bound ``Mask`` (a ``DynamicMask`` was predicted from ``q, k`` already), or
            None for full attention. Query row ``r`` sits at row ``r + KV - Q`` of the mask's
            ``KV x KV`` matrix (``offset``).
        scale: the softmax scale, resolved (``D ** -0.5`` by default), finite and > 0.
        gqa: ``Hq != Hkv`` (``Hq`` a multiple of ``Hkv``).
        block_size: the tile size asked for (``(Bq, Bkv)``) or None for the backend's own.
        compile: compile FlexAttention (None: on CUDA only).
        notes: what lowering decided on the way (e.g. a predicted map dropped for the
            dense kernel); ``explain`` shows them.
        census: ``(block_size, TileCounts)``: the mask's tile census at that tile size,
            already known from lowering (a predicted map counted where it was predicted),
            so that ``tile_counts`` at that size builds no ``BlockMask`` and reads nothing
            from the device.
    """

    q: Tensor
    k: Tensor
    v: Tensor
    mask: Mask | None
    scale: float
    gqa: bool
    block_size: tuple[int, int] | None = None
    compile: bool | None = None
    notes: tuple[str, ...] = ()
    census: tuple[tuple[int, int], TileCounts] | None = None
    # BlockMasks this call already asked its mask for: backends ask for the same one up
    # to four times on the way down (a hit in the mask's cache: ~7 us, CPU machine).
    _block_masks: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    @property
    def q_len(self) -> int:
        return self.q.shape[2]

    @property
    def kv_len(self) -> int:
        return self.k.shape[2]

    @property
    def offset(self) -> int:
        """Position of query row 0 in the mask's ``KV x KV`` matrix."""
        return self.kv_len - self.q_len

    @property
    def device(self) -> torch.device:
        return self.q.device

    @property
    def head_dim(self) -> int:
        return self.q.shape[3]

    @property
    def needs_backward(self) -> bool:
        """Autograd is on and one of q, k, v requires a gradient."""
        return needs_backward(self.q, self.k, self.v)

    def block_mask(self, block_size: tuple[int, int], *, noop: bool = True) -> BlockMask:
        """The mask's ``BlockMask`` for this call at ``block_size`` tiles (cached on the
        mask). With ``noop`` (the default: kernels that read the tile lists) a map whose
        tiles are all empty or full carries ``noop_mask``; eager FlexAttention, which
        ignores the tile lists and applies only ``mask_mod``, asks with ``noop=False``."""
        from .masks.basic import full

        key = (tuple(block_size), noop, self.needs_backward)
        hit = self._block_masks.get(key)
        if hit is None:
            mask = full() if self.mask is None else self.mask
            hit = mask.block_mask(
                self.q_len, self.kv_len, device=self.device, heads=mask.heads,
                batch=mask.batch, block_size=block_size, noop=noop, backward=key[2],
            )
            self._block_masks[key] = hit
        return hit

    def tile_counts(self, block_size: tuple[int, int]) -> TileCounts:
        """Empty / partial / full tiles of ``block_mask(block_size)``, summed over the
        mask's heads and batch (the call's ``census`` at its tile size, else computed
        once per BlockMask: one host sync)."""
        if self.census is not None and self.census[0] == tuple(block_size):
            return self.census[1]
        bm = self.block_mask(block_size)
        # Kept on the BlockMask itself, not in a weak-keyed table: Dynamo traces this
        # lookup in a caller's compiled model, and a table that the garbage collector
        # shrinks while Dynamo reads it fails the compile ("dictionary changed size").
        hit = getattr(bm, "_flexsparse_counts", None)
        if hit is None:
            hit = _count_tiles(bm)
            bm._flexsparse_counts = hit
        return hit


def needs_backward(*tensors: Tensor) -> bool:
    """Autograd is on and one of ``tensors`` requires a gradient: a BlockMask for them
    needs the query-side lists that FlexAttention's backward reads."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


@dataclass(frozen=True)
class TileCounts:
    """Tile census of a ``BlockMask``."""

    empty: int
    partial: int
    full: int

    @property
    def total(self) -> int:
        return self.empty + self.partial + self.full

    @property
    def kept_fraction(self) -> float:
        """Fraction of tiles computed (partial or full)."""
        return (self.partial + self.full) / max(1, self.total)


def _count_tiles(bm: BlockMask) -> TileCounts:
    kv_blocks = -(-bm.seq_lengths[1] // bm.BLOCK_SIZE[1])
    total = bm.kv_num_blocks.numel() * kv_blocks
    partial = int(bm.kv_num_blocks.sum())
    full = 0 if bm.full_kv_num_blocks is None else int(bm.full_kv_num_blocks.sum())
    return TileCounts(total - partial - full, partial, full)


class Backend(Protocol):
    """What ``flexsparse.attention`` needs of a backend."""

    name: str

    def not_supported_reasons(self, call: AttentionCall) -> list[str]:
        """Why this backend cannot run ``call``; empty when it can."""
        ...

    def run(self, call: AttentionCall) -> Tensor:
        """``[B, Hq, Q, D]`` in ``q``'s dtype; rows with no kept key are zeros."""
        ...
