"""``Mask``: one description of a sparse pattern, from which everything else is derived.

A ``Mask`` holds

- ``mask_mod(b, h, q_idx, kv_idx) -> bool``: the element rule, vmap-safe (it only indexes
  lookup tensors it captured and combines them with tensor operators);
- optionally a *tile rule* ``rule(grid: TileGrid) -> int8 [..., Qb, KVb]`` that classifies
  tiles as empty / partial / full from per-tile summaries, in O((N/B)^2).

From those it builds the ``BlockMask`` (directly from the tile rule when there is one,
else through ``create_block_mask``), the dense matrix ``to_dense()`` that every fast path
is tested against, and ``density()``. Like xformers' attention-bias objects it can both
drive a kernel and materialise itself for a reference.

Masks compose with ``&``, ``|`` and ``~``; the composition keeps the tile fast path when
both sides have one. A tile is reported full only when the composed mask is all-true on
it and empty only when it is all-false; tiles that both sides call partial are settled by
evaluating ``mask_mod`` on those tiles alone (within ``REFINE_BUDGET`` elements).
"""

from __future__ import annotations

import contextlib
import functools
import threading
from collections import OrderedDict
from collections.abc import Callable

import torch
from torch import Tensor
from torch.nn.attention.flex_attention import (
    BlockMask,
    and_masks,
    create_block_mask,
    noop_mask,
    or_masks,
)

from . import tiles as T
from ._checks import block_pair, check_bool, check_choice, check_int

MaskMod = Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]
TileRule = Callable[[T.TileGrid], Tensor]

#: Elements evaluated at most to settle tiles both operands of ``&`` / ``|`` call partial.
REFINE_BUDGET = 1 << 24
#: Rows materialised at a time when a mask without a tile rule is classified.
_ROW_CHUNK = 1024
_CACHE_SIZE = 16
#: What ``sdpa_hint`` may say (None: nothing SDPA can use).
SDPA_HINTS = ("causal", "full")


class Mask:
    """A sparse attention pattern.

    Args:
        mask_mod: ``(b, h, q_idx, kv_idx) -> bool``; True keeps the pair. Valid for torch
            is enough (scalars under vmap): one that does not broadcast over index grids
            is detected and evaluated element-wise (``tiles.evaluate_mask_mod``).
        tile_rule: optional ``TileGrid -> int8 [Qb, KVb] | [H, Qb, KVb] | [B, H, Qb, KVb]``
            with values ``tiles.EMPTY / PARTIAL / FULL``. It must never call a tile empty
            that holds a kept pair, nor full one that holds a dropped pair.
        name: shown in reprs, tables and plot titles.
        heads: number of heads when the rule depends on ``h`` (else None).
        batch: batch size when the rule depends on ``b`` (data-dependent masks).
        length: the only sequence length the mask is defined for (layout-bound masks),
            or None when any length works.
        binary_tiles: every tile is either empty or full at the native block size
            (block-granular masks); lets compositions skip refinement.
        sdpa_hint: ``"causal"`` when the mask is exactly causal, ``"full"`` when it keeps
            everything; lets ``attention(backend="auto")`` use SDPA's own fast paths.

    Masks broadcast over heads / batch when those are None.
    """

    def __init__(
        self,
        mask_mod: MaskMod | None = None,
        tile_rule: TileRule | None = None,
        *,
        on_device: Callable[[torch.device], tuple[MaskMod, TileRule | None]] | None = None,
        name: str = "mask",
        heads: int | None = None,
        batch: int | None = None,
        length: int | None = None,
        binary_tiles: bool = False,
        sdpa_hint: str | None = None,
        has_tile_rule: bool | None = None,
    ):
        if on_device is None:
            if not callable(mask_mod):
                raise TypeError(f"mask_mod must be callable, got {type(mask_mod).__name__}")
            if tile_rule is not None and not callable(tile_rule):
                raise TypeError(
                    f"tile_rule must be callable or None, got {type(tile_rule).__name__}"
                )
            self._has_rule = tile_rule is not None
            # A user's rule need only be valid for torch (scalars under vmap); ours are
            # written to broadcast, the user's is made to.
            on_device = _fixed(T.broadcast_safe(mask_mod), tile_rule)
        else:
            if mask_mod is not None:
                raise TypeError("pass either mask_mod (and tile_rule) or on_device, not both")
            self._has_rule = tile_rule is not None or bool(has_tile_rule)
        self._on_device = on_device
        self._per_device: dict[str, tuple[MaskMod, TileRule | None]] = {}
        self.name = name
        self.heads = None if heads is None else check_int("heads", heads, minimum=1)
        self.batch = None if batch is None else check_int("batch", batch, minimum=1)
        self.length = None if length is None else check_int("length", length, minimum=1)
        self.binary_tiles = check_bool("binary_tiles", binary_tiles)
        if sdpa_hint is not None:
            check_choice("sdpa_hint", sdpa_hint, SDPA_HINTS)
        self.sdpa_hint = sdpa_hint
        #: ``(block_q, block_kv)`` the mask is naturally built at (e.g. a predicted tile
        #: map); ``attention`` uses it when the caller passes no ``block_size``.
        self.native_block_size: tuple[int, int] | None = None
        #: Extra ``(q_len, kv_len)`` validations (a tile map checks its shape); kept by
        #: compositions.
        self._length_checks: tuple[Callable[[int, int], None], ...] = ()
        self._init_caches()

    def _init_caches(self) -> None:
        self._states_cache: OrderedDict = OrderedDict()
        self._block_mask_cache: OrderedDict = OrderedDict()
        # Guards the two LRU caches; never held while a value is built.
        self._cache_lock = threading.Lock()

    def __getstate__(self) -> dict:
        # Locks cannot be copied or pickled: copies start with empty caches.
        state = self.__dict__.copy()
        for name in ("_states_cache", "_block_mask_cache", "_cache_lock"):
            state.pop(name, None)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._init_caches()

    def _locked(self):
        # Dynamo cannot trace a lock (torch.compile(fullgraph=True) of a patched model); a
        # traced lookup runs on the compiling thread alone.
        return contextlib.nullcontext() if torch.compiler.is_compiling() else self._cache_lock

    def _cache_get(self, cache: OrderedDict, key):
        with self._locked():
            hit = cache.get(key)
            if hit is not None:
                cache.move_to_end(key)
            return hit

    def _cache_put(self, cache: OrderedDict, key, value) -> None:
        with self._locked():
            cache[key] = value
            cache.move_to_end(key)
            while len(cache) > _CACHE_SIZE:
                cache.popitem(last=False)

    # -- basic properties -----------------------------------------------------------------
    @property
    def mask_mod(self) -> MaskMod:
        """The vmap-safe element rule ``(b, h, q_idx, kv_idx) -> bool`` (lookup tensors on
        the CPU; ``mask_mod_for(device)`` gives the one for another device)."""
        return self.mask_mod_for("cpu")

    def mask_mod_for(self, device) -> MaskMod:
        """``mask_mod`` whose lookup tensors live on ``device``."""
        return self._resolve(device)[0]

    def tile_rule_for(self, device) -> TileRule | None:
        return self._resolve(device)[1]

    def _resolve(self, device) -> tuple[MaskMod, TileRule | None]:
        key = str(torch.device(device))
        if key not in self._per_device:
            self._per_device[key] = self._on_device(torch.device(device))
        return self._per_device[key]

    @property
    def has_tile_rule(self) -> bool:
        return self._has_rule

    @property
    def is_dynamic(self) -> bool:
        """Static masks are not data dependent (see ``DynamicMask``)."""
        return False

    def __repr__(self) -> str:
        extra = "" if self.length is None else f", length={self.length}"
        heads = "" if self.heads is None else f", heads={self.heads}"
        return f"Mask({self.name}{extra}{heads})"

    # -- validation -----------------------------------------------------------------------
    def check_lengths(self, q_len: int, kv_len: int) -> tuple[int, int]:
        """Validate a ``(q_len, kv_len)`` request against this mask; returns them as ints."""
        q_len = check_int("q_len", q_len, minimum=1)
        kv_len = check_int("kv_len", kv_len, minimum=1)
        if q_len > kv_len:
            raise ValueError(
                f"q_len ({q_len}) must be <= kv_len ({kv_len}): query rows are the last "
                "q_len rows of the mask"
            )
        if self.length is not None and kv_len != self.length:
            raise ValueError(
                f"mask {self.name!r} was built for sequences of {self.length} tokens, got "
                f"kv_len={kv_len}; build it for this length"
            )
        for check in self._length_checks:
            check(q_len, kv_len)
        return q_len, kv_len

    def _check_heads(self, heads: int | None) -> int | None:
        if heads is None:
            return self.heads
        heads = check_int("heads", heads, minimum=1)
        if self.heads is not None and heads != self.heads:
            raise ValueError(f"heads={heads} but mask {self.name!r} was built for {self.heads}")
        return heads

    def _check_batch(self, batch: int | None) -> int | None:
        if batch is None:
            return self.batch
        batch = check_int("batch", batch, minimum=1)
        if self.batch is not None and batch != self.batch:
            raise ValueError(f"batch={batch} but mask {self.name!r} was built for {self.batch}")
        return batch

    # -- element level --------------------------------------------------------------------
    def to_dense(
        self, q_len: int | None = None, kv_len: int | None = None, *, device="cpu"
    ) -> Tensor:
        """Materialise the mask: bool ``[Q, KV]``, ``[H, Q, KV]`` when head dependent,
        ``[B, H, Q, KV]`` when batch dependent. Row ``i`` is query position
        ``kv_len - q_len + i``. Costs Q x KV booleans: for references and pictures."""
        q_len, kv_len = self._default_lengths(q_len, kv_len)
        q_len, kv_len = self.check_lengths(q_len, kv_len)
        device = torch.device(device)
        q = torch.arange(kv_len - q_len, kv_len, device=device)[:, None]
        kv = torch.arange(kv_len, device=device)[None, :]
        b, h = self._batch_head_index(device, extra_dims=2)
        out = T.evaluate_mask_mod(self.mask_mod_for(device), b, h, q, kv)
        return out.expand(self._lead_shape() + [q_len, kv_len]).clone()

    def _default_lengths(self, q_len, kv_len):
        if kv_len is None:
            kv_len = q_len if q_len is not None else self.length
        if q_len is None:
            q_len = kv_len
        if q_len is None:
            raise ValueError(f"mask {self.name!r} has no length of its own: pass q_len, kv_len")
        return q_len, kv_len

    def _lead_shape(self) -> list[int]:
        """Leading dims of dense / tile tensors: [], [H] or [B, H] (H = 1 when a
        batch-dependent mask does not depend on the head)."""
        if self.batch is not None:
            return [self.batch, self.heads or 1]
        return [self.heads] if self.heads is not None else []

    def _batch_head_index(self, device, extra_dims: int) -> tuple[Tensor, Tensor]:
        tail = (1,) * extra_dims
        zero = torch.zeros((), dtype=torch.long, device=device)
        if self.heads is not None:
            h = torch.arange(self.heads, device=device).view(self.heads, *tail)
        elif self.batch is not None:
            h = zero.view(1, *tail)
        else:
            h = zero
        if self.batch is not None:
            b = torch.arange(self.batch, device=device).view(self.batch, 1, *tail)
        else:
            b = zero
        return b, h

    # -- tile level -----------------------------------------------------------------------
    def tile_states(
        self, q_len: int, kv_len: int, block_size: int | tuple[int, int] = 128, device="cpu"
    ) -> Tensor:
        """int8 tile states (``tiles.EMPTY/PARTIAL/FULL``) ``[..., Qb, KVb]``, cached."""
        q_len, kv_len = self.check_lengths(q_len, kv_len)
        bq, bk = block_pair("block_size", block_size)
        device = torch.device(device)
        key = (q_len, kv_len, bq, bk, str(device))
        hit = self._cache_get(self._states_cache, key)
        if hit is not None:
            return hit
        grid = T.TileGrid.make(q_len, kv_len, bq, bk, device)
        rule = self.tile_rule_for(device)
        if rule is not None:
            states = rule(grid).to(torch.int8)
        else:
            states = self._states_by_rows(grid)
        self._cache_put(self._states_cache, key, states)
        return states

    def _states_by_rows(self, grid: T.TileGrid) -> Tensor:
        """Fallback classification: evaluate ``mask_mod`` a few row tiles at a time."""
        rows_per_chunk = max(1, _ROW_CHUNK // grid.block_q)
        chunks = []
        kv = torch.arange(grid.kv_len, device=grid.device)[None, :]
        b, h = self._batch_head_index(grid.device, extra_dims=2)
        mod = self.mask_mod_for(grid.device)
        for start in range(0, grid.shape[0], rows_per_chunk):
            lo = int(grid.q_lo[start])
            hi = int(grid.q_hi[min(start + rows_per_chunk, grid.shape[0]) - 1])
            q = torch.arange(lo, hi + 1, device=grid.device)[:, None]
            dense = T.evaluate_mask_mod(mod, b, h, q, kv)
            dense = dense.expand(*self._lead_shape(), hi - lo + 1, grid.kv_len)
            chunks.append(T.states_from_dense(dense, grid.block_q, grid.block_kv))
        return torch.cat(chunks, dim=-2)

    def block_map(
        self, q_len: int, kv_len: int, block_size: int | tuple[int, int] = 128, device="cpu"
    ) -> Tensor:
        """bool ``[Qb, KVb]`` (or ``[H, Qb, KVb]``): the tiles that must be computed."""
        return self.tile_states(q_len, kv_len, block_size, device) != T.EMPTY

    def block_mask(
        self,
        q_len: int,
        kv_len: int | None = None,
        *,
        device="cpu",
        heads: int | None = None,
        batch: int | None = None,
        block_size: int | tuple[int, int] = 128,
        noop: bool = False,
        backward: bool = True,
    ) -> BlockMask:
        """The FlexAttention ``BlockMask`` for a ``q_len x kv_len`` call, cached per shape,
        device, heads, batch and block size. Built from the tile rule when the mask has
        one (no N^2 work), else with ``create_block_mask``.

        ``noop``: when no tile is partial, carry torch's ``noop_mask`` instead of the
        pattern's ``mask_mod`` (faster compiled kernels). Only compiled FlexAttention may
        use such a BlockMask: eager FlexAttention ignores the tile lists and applies only
        ``mask_mod``, so the default is False; ``flexsparse.attention`` passes True where
        it runs FlexAttention compiled.

        ``backward``: also build the query-side lists that FlexAttention's backward reads
        (tile-rule masks; ``create_block_mask`` always builds them). ``flexsparse.attention``
        passes False for calls that need no gradient."""
        kv_len = q_len if kv_len is None else kv_len
        q_len, kv_len = self.check_lengths(q_len, kv_len)
        heads, batch = self._check_heads(heads), self._check_batch(batch)
        bq, bk = block_pair("block_size", block_size)
        device = torch.device(device)
        noop = check_bool("noop", noop)
        backward = check_bool("backward", backward)
        key = (q_len, kv_len, str(device), heads, batch, bq, bk, noop, backward)
        hit = self._cache_get(self._block_mask_cache, key)
        if hit is not None:
            return hit
        mod = self._offset_mask_mod(kv_len - q_len, device)
        if not noop:
            # The map asked for with noop=True may be cached (compiled calls on CUDA ask for
            # it first): with noop_mask its lists get the rule put back; a map with partial
            # tiles kept its rule and is this one. No build, so this also works while Dynamo
            # traces a caller's compiled model (which asks for the rule: eager FlexAttention
            # may run it), where a build fails.
            twin = self._cache_get(self._block_mask_cache, key[:-2] + (True, backward))
            if twin is not None:
                bm = T.with_rule(twin, mod) if twin.mask_mod is noop_mask else twin
                self._cache_put(self._block_mask_cache, key, bm)
                return bm
        if self.has_tile_rule:
            states = self.tile_states(q_len, kv_len, (bq, bk), device)
            # A block-granular map at its own tiles, rows on a tile boundary: no partial
            # tile by construction (no host read to find out).
            binary = (self.binary_tiles and self.native_block_size == (bq, bk)
                      and (kv_len - q_len) % bq == 0)
            bm = T.to_block_mask(states, mod, q_len, kv_len, bq, bk, noop=noop,
                                 has_partial=False if binary else None, backward=backward)
        else:
            bm = create_block_mask(
                mod, self.batch, self.heads, q_len, kv_len, device=device, BLOCK_SIZE=(bq, bk)
            )
        self._cache_put(self._block_mask_cache, key, bm)
        return bm

    def _offset_mask_mod(self, offset: int, device) -> MaskMod:
        mod = self.mask_mod_for(device)
        if offset == 0:
            return mod
        # A tensor, not a Python int, so that compiled kernels do not specialise per step.
        shift = torch.tensor(offset, device=device)

        def shifted(b, h, q_idx, kv_idx):
            return mod(b, h, q_idx + shift, kv_idx)

        return shifted

    def density(
        self, q_len: int | None = None, kv_len: int | None = None, *, device="cpu"
    ) -> float:
        """Exact fraction of (query, key) pairs kept, averaged over heads / batch.

        Full tiles are counted from their size and partial tiles evaluated element by
        element, so no ``Q x KV`` tensor is built."""
        q_len, kv_len = self._default_lengths(q_len, kv_len)
        q_len, kv_len = self.check_lengths(q_len, kv_len)
        bq, bk = 128, 128
        device = torch.device(device)
        states = self.tile_states(q_len, kv_len, (bq, bk), device)
        grid = T.TileGrid.make(q_len, kv_len, bq, bk, device)
        rows = (grid.q_hi - grid.q_lo + 1)[:, None]
        cols = (grid.kv_hi - grid.kv_lo + 1)[None, :]
        area = (rows * cols).expand(states.shape[-2:])
        kept = (area * (states == T.FULL)).sum(dtype=torch.float64)
        partial = (states == T.PARTIAL).nonzero()
        for chunk in partial.split(4096):
            kept += self._count_in_tiles(grid, chunk).sum(dtype=torch.float64)
        copies = states.numel() // area.numel()
        return float(kept / (q_len * kv_len * copies))

    def _count_in_tiles(self, grid: T.TileGrid, where: Tensor) -> Tensor:
        """Kept pairs in each listed tile; ``where`` rows are ``[(b), (h), qi, ki]``."""
        bq, bk = grid.block_q, grid.block_kv
        qi, ki = where[:, -2], where[:, -1]
        q = grid.q_lo[qi][:, None, None] + torch.arange(bq, device=grid.device)[None, :, None]
        kv = grid.kv_lo[ki][:, None, None] + torch.arange(bk, device=grid.device)[None, None, :]
        ok = (q <= grid.q_hi[qi][:, None, None]) & (kv <= grid.kv_hi[ki][:, None, None])
        q = torch.minimum(q, grid.q_hi[qi][:, None, None])
        kv = torch.minimum(kv, grid.kv_hi[ki][:, None, None])
        zero = torch.zeros((), dtype=torch.long, device=grid.device)
        lead = where.shape[1] - 2
        b = where[:, 0][:, None, None] if lead == 2 else zero
        h = where[:, lead - 1][:, None, None] if lead >= 1 else zero
        kept = T.evaluate_mask_mod(self.mask_mod_for(grid.device), b, h, q, kv)
        return (kept & ok).sum((-2, -1))

    def stats(self, q_len: int | None = None, kv_len: int | None = None, block_size=128) -> dict:
        """Density and tile counts (empty / partial / full) at ``block_size``."""
        q_len, kv_len = self._default_lengths(q_len, kv_len)
        states = self.tile_states(q_len, kv_len, block_size)
        counts = T.summary(states)
        return {
            "name": self.name,
            "q_len": q_len,
            "kv_len": kv_len,
            "density": self.density(q_len, kv_len),
            "tiles_skipped": counts["empty"] / counts["total"],
            **counts,
        }

    # -- composition ----------------------------------------------------------------------
    def __and__(self, other: Mask) -> Mask:
        return _compose(self, other, "&")

    def __or__(self, other: Mask) -> Mask:
        return _compose(self, other, "|")

    def __invert__(self) -> Mask:
        def on_device(device):
            mod, rule = self._resolve(device)

            def not_mod(b, h, q_idx, kv_idx):
                return ~mod(b, h, q_idx, kv_idx)

            not_rule = None if rule is None else (lambda grid: T.FULL - rule(grid))
            return not_mod, not_rule

        out = Mask(
            on_device=on_device, has_tile_rule=self.has_tile_rule, name=f"~{self.name}",
            heads=self.heads, batch=self.batch, length=self.length,
            binary_tiles=self.binary_tiles,
        )
        out._length_checks = self._length_checks
        return out

    @classmethod
    def from_tiles(
        cls,
        kept: Tensor,
        block_size: int | tuple[int, int],
        *,
        name: str = "tiles",
        length: int | None = None,
    ) -> Mask:
        """A block-granular mask: every pair of a kept tile is kept.

        Args:
            kept: bool ``[Qb, KVb]``, ``[H, Qb, KVb]`` or ``[B, H, Qb, KVb]`` at ``block_size``
                (an int or ``(block_q, block_kv)``).
            length: sequence length the map was built for, if it is bound to one.

        Asked for another tile size (or a decode offset), states come exactly from a
        summed-area table of ``kept``. A ``q_len x kv_len`` request needs exactly
        ``ceil(kv_len / block_q) x ceil(kv_len / block_kv)`` tiles (query rows are the last
        ``q_len`` rows): a map larger or smaller than that raises ``ValueError``.
        """
        if not isinstance(kept, Tensor) or kept.dtype != torch.bool:
            what = kept.dtype if isinstance(kept, Tensor) else type(kept).__name__
            raise TypeError(f"kept must be a bool tensor, got {what}")
        if kept.dim() not in (2, 3, 4):
            raise ValueError(f"kept must have 2, 3 or 4 dims, got shape {tuple(kept.shape)}")
        bq, bk = block_pair("block_size", block_size)
        qb, kb = kept.shape[-2:]
        heads = kept.shape[-3] if kept.dim() >= 3 else None
        batch = kept.shape[0] if kept.dim() == 4 else None
        last_q, last_kv = qb - 1, kb - 1
        check_shape = functools.partial(_check_tile_map, (qb, kb), bq, bk)
        if length is not None:
            check_shape(check_int("length", length, minimum=1), length)

        def on_device(device):
            kept_d = kept.to(device)
            # The summed-area table serves other tile sizes only: built on first use.
            sat = functools.lru_cache(maxsize=1)(lambda: _summed_area(kept_d))

            def mask_mod(b, h, q_idx, kv_idx):
                qi = torch.clamp(q_idx // bq, max=last_q)
                ki = torch.clamp(kv_idx // bk, max=last_kv)
                if kept_d.dim() == 4:
                    return kept_d[b, h, qi, ki]
                if kept_d.dim() == 3:
                    return kept_d[h, qi, ki]
                return kept_d[qi, ki]

            return mask_mod, functools.partial(_tiles_rule, kept_d, sat, bq, bk)

        mask = cls(
            on_device=on_device, has_tile_rule=True, name=name, heads=heads, batch=batch,
            length=length, binary_tiles=True,
        )
        mask._length_checks = (check_shape,)
        return mask


def _check_tile_map(shape: tuple[int, int], bq: int, bk: int, q_len: int, kv_len: int) -> None:
    """A tile map serves exactly the sequences it tiles: ``ceil(kv_len / B)`` per side."""
    want = (-(-kv_len // bq), -(-kv_len // bk))
    if tuple(shape) != want:
        raise ValueError(
            f"kept: the tile map has {shape[0]} x {shape[1]} tiles of {bq} x {bk}, but "
            f"q_len={q_len}, kv_len={kv_len} need exactly ceil({kv_len}/{bq}) x "
            f"ceil({kv_len}/{bk}) = {want[0]} x {want[1]} tiles (query rows are the last "
            f"q_len rows of the kv_len x kv_len map)"
        )


def _tiles_rule(
    kept: Tensor, summed_area: Callable[[], Tensor], bq: int, bk: int, grid: T.TileGrid
) -> Tensor:
    """Tile states of a block-granular map ``kept`` (tiles ``bq x bk``) on any grid."""
    rows, cols = kept.shape[-2] * bq, kept.shape[-1] * bk
    if grid.q_offset + grid.q_len > rows or grid.kv_len > cols:
        raise ValueError(
            f"the tile map covers {rows} queries x {cols} keys ({tuple(kept.shape[-2:])} tiles "
            f"of {bq} x {bk}); asked for {grid.q_offset + grid.q_len} x {grid.kv_len}"
        )
    if grid.block_q == bq and grid.block_kv == bk and grid.q_offset == 0:
        return kept.to(torch.int8) * T.FULL
    last_q, last_kv = kept.shape[-2] - 1, kept.shape[-1] - 1
    qa = torch.clamp(grid.q_lo // bq, max=last_q)[:, None]
    qz = torch.clamp(grid.q_hi // bq, max=last_q)[:, None] + 1
    ka = torch.clamp(grid.kv_lo // bk, max=last_kv)[None, :]
    kz = torch.clamp(grid.kv_hi // bk, max=last_kv)[None, :] + 1
    sat = summed_area()
    count = sat[..., qz, kz] - sat[..., qa, kz] - sat[..., qz, ka] + sat[..., qa, ka]
    return T.from_bounds(count == (qz - qa) * (kz - ka), count > 0)


def _summed_area(kept: Tensor) -> Tensor:
    s = kept.to(torch.int32).cumsum(-1).cumsum(-2)
    return torch.nn.functional.pad(s, (1, 0, 1, 0))


def _merge(a: int | None, b: int | None, what: str) -> int | None:
    if a is not None and b is not None and a != b:
        raise ValueError(f"cannot compose masks with {what}={a} and {what}={b}")
    return a if a is not None else b


def _compose(a: Mask, b: Mask, op: str) -> Mask:
    if isinstance(b, DynamicMask):
        return b._compose_other(a, op)
    if not isinstance(b, Mask):
        return NotImplemented
    heads = _merge(a.heads, b.heads, "heads")
    batch = _merge(a.batch, b.batch, "batch")
    length = _merge(a.length, b.length, "length")
    join = and_masks if op == "&" else or_masks
    combine = torch.minimum if op == "&" else torch.maximum
    has_rule = a.has_tile_rule and b.has_tile_rule
    skip_refine = a.binary_tiles or b.binary_tiles

    def on_device(device):
        (mod_a, rule_a), (mod_b, rule_b) = a._resolve(device), b._resolve(device)
        mod = join(mod_a, mod_b)
        if not has_rule:
            return mod, None

        def rule(grid: T.TileGrid) -> Tensor:
            sa, sb = rule_a(grid), rule_b(grid)
            states = combine(sa, sb)
            if skip_refine:
                return states
            ambiguous = (sa == T.PARTIAL) & (sb == T.PARTIAL)
            return _refine(states, ambiguous, mod, grid, heads, batch)

        return mod, rule

    hint = None
    if op == "&" and a.sdpa_hint == "full":
        hint = b.sdpa_hint
    elif op == "&" and b.sdpa_hint == "full":
        hint = a.sdpa_hint
    out = Mask(
        on_device=on_device, has_tile_rule=has_rule, name=f"({a.name} {op} {b.name})",
        heads=heads, batch=batch, length=length,
        binary_tiles=a.binary_tiles and b.binary_tiles, sdpa_hint=hint,
    )
    out.native_block_size = _merge_native(a, b)
    out._length_checks = a._length_checks + b._length_checks
    return out


def _merge_native(a: Mask, b: Mask) -> tuple[int, int] | None:
    """The native block size of a composition: the one side's, None on a conflict."""
    na, nb = getattr(a, "native_block_size", None), getattr(b, "native_block_size", None)
    if na is not None and nb is not None and na != nb:
        return None
    return na if na is not None else nb


def _refine(states, ambiguous, mod, grid, heads, batch) -> Tensor:
    """Settle tiles both operands call partial by evaluating the composed ``mask_mod``."""
    if batch is not None:
        return states  # data-dependent masks are settled per call, not here
    where = ambiguous.nonzero()
    if where.numel() == 0 or where.shape[0] * grid.block_q * grid.block_kv > REFINE_BUDGET:
        return states
    if ambiguous.dim() == 2:
        tiles = torch.cat([torch.zeros_like(where[:, :1]), where], dim=1)
    else:
        tiles = where
    exact = T.evaluate_tiles(mod, grid, tiles, heads if ambiguous.dim() == 3 else None)
    states = states.clone()
    states[tuple(where.unbind(1))] = exact
    return states


class DynamicMask:
    """A data-dependent mask: which tiles to compute is decided from ``q`` and ``k`` of
    each call. ``bind(q, k)`` returns the static ``Mask`` for that call (its tile map
    ``[B, H, Qb, KVb]``); ``attention`` calls it for you.

    Composing with a static mask (``dyn & m``) gives another ``DynamicMask`` whose bound
    mask is the composition of the bound masks.
    """

    name = "dynamic"

    @property
    def is_dynamic(self) -> bool:
        return True

    def bind(self, q: Tensor, k: Tensor) -> Mask:  # pragma: no cover - interface
        raise NotImplementedError

    def __and__(self, other: Mask) -> DynamicMask:
        return self._compose_other(other, "&")

    def __rand__(self, other: Mask) -> DynamicMask:
        return self._compose_other(other, "&")

    def __or__(self, other: Mask) -> DynamicMask:
        return self._compose_other(other, "|")

    def __ror__(self, other: Mask) -> DynamicMask:
        return self._compose_other(other, "|")

    def _compose_other(self, other, op: str) -> DynamicMask:
        if isinstance(other, DynamicMask):
            return _ComposedDynamic(self, other, op)
        if not isinstance(other, Mask):
            return NotImplemented
        return _ComposedDynamic(self, other, op)

    def __repr__(self) -> str:
        return f"DynamicMask({self.name})"


class _ComposedDynamic(DynamicMask):
    def __init__(self, dyn: DynamicMask, other, op: str):
        self.dyn, self.other, self.op = dyn, other, op
        self.name = f"({dyn.name} {op} {other.name})"

    def bind(self, q: Tensor, k: Tensor) -> Mask:
        other = self.other.bind(q, k) if isinstance(self.other, DynamicMask) else self.other
        bound = self.dyn.bind(q, k)
        return bound & other if self.op == "&" else bound | other


def _fixed(mask_mod: MaskMod, tile_rule: TileRule | None):
    """``on_device`` for masks whose functions capture no tensors."""

    def on_device(device):
        return mask_mod, tile_rule

    return on_device
