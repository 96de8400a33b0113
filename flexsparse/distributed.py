"""Sequence-parallel sparse attention (DeepSpeed-Ulysses) on ``torch.distributed``.

Each of the ``P`` ranks of a process group holds a contiguous shard of the sequence, all
heads: ``q_local [B, Hq, n_r, D]``. One all-to-all turns that into *all* tokens of
``Hq / P`` heads, the rank runs ``flexsparse.attention`` with the full mask restricted to
its heads (a ``BlockMask`` built for those heads only), and the inverse all-to-all turns
the output back into the rank's sequence shard::

    rank r:  [B, H, n_r, D] --all_to_all--> [B, H/P, N, D] --attention--> [B, H/P, N, D]
             --all_to_all--> [B, H, n_r, D]

Shards are contiguous and as even as possible: the first ``N % P`` ranks hold one token
more (``shard_sizes``). Uneven shards are padded to the longest one for the collective and
unpadded after it, so any ``N`` works. Only ``torch.distributed`` collectives are used
(``all_to_all_single``, ``all_gather``): gloo on the CPU, NCCL on GPUs.

Without an initialised process group (and ``group=None``) everything degrades to one
rank: ``shard``/``gather`` return their input and ``ulysses_attention`` is
``flexsparse.attention``.
"""

from __future__ import annotations

import math
import weakref

import torch
import torch.distributed as dist
from torch import Tensor

from . import tiles as T
from ._checks import check_int
from .attention import BACKENDS, attention
from .mask import DynamicMask, Mask, _ComposedDynamic

__all__ = [
    "shard_sizes",
    "shard_offsets",
    "shard",
    "gather",
    "slice_heads",
    "scatter_heads",
    "gather_heads",
    "ulysses_attention",
]


# -- process group ---------------------------------------------------------------------------
def _world(group) -> tuple[int, int]:
    """``(world_size, rank)`` of ``group``; ``(1, 0)`` when torch.distributed is not set up."""
    if not (dist.is_available() and dist.is_initialized()):
        if group is not None:
            raise RuntimeError(
                "a process group was passed but torch.distributed is not initialised; call "
                "torch.distributed.init_process_group first (or pass group=None)"
            )
        return 1, 0
    return dist.get_world_size(group), dist.get_rank(group)


def shard_sizes(seq_len: int, world_size: int) -> list[int]:
    """Token counts of the contiguous shards of a ``seq_len``-token sequence over
    ``world_size`` ranks: the first ``seq_len % world_size`` ranks hold one token more.

    >>> shard_sizes(10, 3)
    [4, 3, 3]
    """
    seq_len = check_int("seq_len", seq_len, minimum=1)
    world_size = check_int("world_size", world_size, minimum=1)
    if seq_len < world_size:
        raise ValueError(
            f"seq_len ({seq_len}) must be >= world_size ({world_size}): every rank needs at "
            "least one token"
        )
    base, extra = divmod(seq_len, world_size)
    return [base + (r < extra) for r in range(world_size)]


def shard_offsets(seq_len: int, world_size: int) -> list[int]:
    """First token position of each rank's shard (``len == world_size + 1``, last = N)."""
    offsets = [0]
    for n in shard_sizes(seq_len, world_size):
        offsets.append(offsets[-1] + n)
    return offsets


def shard(x: Tensor, group=None, dim: int = 2) -> Tensor:
    """This rank's contiguous slice of the full tensor ``x`` along ``dim`` (a view).

    Args:
        x: the full tensor, identical on every rank (e.g. ``[B, H, N, D]``).
        group: process group (None = the default group).
        dim: the sequence dimension.
    """
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    dim = _check_dim(x, dim)
    world, rank = _world(group)
    offsets = shard_offsets(x.shape[dim], world)
    return x.narrow(dim, offsets[rank], offsets[rank + 1] - offsets[rank])


def gather(x_local: Tensor, group=None, seq_len: int | None = None, dim: int = 2) -> Tensor:
    """Inverse of ``shard``: the full tensor on every rank, from each rank's shard.

    Args:
        x_local: this rank's shard along ``dim`` (``shard_sizes(seq_len, P)[rank]`` long).
        group: process group (None = the default group).
        seq_len: length of the full sequence; None learns it from the ranks (one extra
            small collective).
        dim: the sequence dimension.

    Returns:
        The concatenation of all shards along ``dim`` (``seq_len`` long), on every rank.
    """
    if not isinstance(x_local, Tensor):
        raise TypeError(f"x_local must be a torch.Tensor, got {type(x_local).__name__}")
    dim = _check_dim(x_local, dim)
    world, rank = _world(group)
    if seq_len is None:
        seq_len = _total_length(x_local.shape[dim], x_local.device, group, world)
    sizes = shard_sizes(seq_len, world)
    _check_shard("x_local", x_local, dim, sizes, rank, seq_len)
    if world == 1:
        return x_local
    n_max = sizes[0]
    padded = _pad_to(x_local.contiguous(), dim, n_max)
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded, group=group)
    return torch.cat([p.narrow(dim, 0, n) for p, n in zip(parts, sizes)], dim=dim)


def _total_length(n_local: int, device, group, world: int) -> int:
    if world == 1:
        return n_local
    size = torch.tensor([n_local], device=device, dtype=torch.long)
    sizes = [torch.empty_like(size) for _ in range(world)]
    dist.all_gather(sizes, size, group=group)
    return int(torch.cat(sizes).sum())


def _check_dim(x: Tensor, dim: int) -> int:
    dim = check_int("dim", dim, minimum=None)
    if not -x.dim() <= dim < x.dim():
        raise ValueError(f"dim must be in [{-x.dim()}, {x.dim()}) for a {x.dim()}-d tensor, "
                         f"got {dim}")
    return dim % x.dim()


def _check_shard(name: str, x: Tensor, dim: int, sizes: list[int], rank: int, seq_len: int):
    if x.shape[dim] != sizes[rank]:
        raise ValueError(
            f"{name} holds {x.shape[dim]} tokens along dim {dim} on rank {rank}, but a "
            f"{seq_len}-token sequence over {len(sizes)} ranks gives rank {rank} "
            f"{sizes[rank]} (shard_sizes: {sizes})"
        )


def _pad_to(x: Tensor, dim: int, n: int) -> Tensor:
    if x.shape[dim] == n:
        return x
    shape = list(x.shape)
    shape[dim] = n - x.shape[dim]
    return torch.cat([x, x.new_zeros(shape)], dim=dim)


# -- all-to-all ------------------------------------------------------------------------------
def _all_to_all(send: Tensor, group) -> Tensor:
    """``all_to_all_single`` with equal splits along dim 0; differentiable when needed."""
    recv = torch.empty_like(send)
    if send.requires_grad and torch.is_grad_enabled():
        import torch.distributed.nn.functional as dnn

        return dnn.all_to_all_single(
            recv, send, group=group if group is not None else dist.group.WORLD
        )
    dist.all_to_all_single(recv, send, group=group)
    return recv


def _seq_to_heads(xs: list[Tensor], group, seq_len: int, world: int) -> list[Tensor]:
    """One all-to-all for all of ``xs``: ``[B, H_i, n_r, D]`` sequence shards to
    ``[B, H_i / P, N, D]`` head shards (rank r gets heads ``[r H_i/P, (r+1) H_i/P)``)."""
    sizes = shard_sizes(seq_len, world)
    n_max, n_mine = sizes[0], xs[0].shape[2]
    widths = [x.shape[0] * x.shape[1] * n_max * x.shape[3] // world for x in xs]
    # Row j of the send buffer is what rank j receives: my tokens of its heads, padded to
    # the longest shard; each tensor is copied in once (no separate pad / cat copies).
    send = xs[0].new_empty(world, sum(widths))
    start = 0
    for x, width in zip(xs, widths):
        b, h, _, d = x.shape
        dst = send[:, start:start + width].view(world, b, h // world, n_max, d)
        # reshape: a view for contiguous shards, a copy for e.g. [B, N, H, D].transpose(1, 2)
        dst[..., :n_mine, :].copy_(x.reshape(b, world, h // world, n_mine, d).transpose(0, 1))
        if n_mine < n_max:
            dst[..., n_mine:, :].zero_()
        start += width
    recv = _all_to_all(send, group)
    outs, start = [], 0
    for x, width in zip(xs, widths):
        b, h, _, d = x.shape
        part = recv[:, start:start + width].view(world, b, h // world, n_max, d)
        start += width
        # row j holds rank j's (padded) tokens: unpad and put them in sequence order.
        outs.append(torch.cat([part[j, ..., :n, :] for j, n in enumerate(sizes)], dim=2))
    return outs


def _heads_to_seq(x: Tensor, group, seq_len: int, world: int) -> Tensor:
    """Inverse of ``_seq_to_heads``: ``[B, H/P, N, D]`` to ``[B, H, n_r, D]``."""
    sizes = shard_sizes(seq_len, world)
    offsets = shard_offsets(seq_len, world)
    n_max = sizes[0]
    b, h, _, d = x.shape
    send = x.new_empty(world, b, h, n_max, d)  # row j: rank j's tokens of my heads
    for j, n in enumerate(sizes):
        send[j, ..., :n, :].copy_(x[:, :, offsets[j]:offsets[j + 1]])
        if n < n_max:
            send[j, ..., n:, :].zero_()
    recv = _all_to_all(send.view(world, -1), group).view(world, b, h, n_max, d)
    rank = dist.get_rank(group)
    # row j holds heads [j h, (j+1) h) of my tokens.
    return recv.transpose(0, 1).reshape(b, world * h, n_max, d)[:, :, : sizes[rank]]


def scatter_heads(x_local: Tensor, group=None, *, seq_len: int) -> Tensor:
    """The forward all-to-all alone: ``[B, H, n_r, D]`` (rank r's tokens, all heads) to
    ``[B, H/P, seq_len, D]`` (all tokens of heads ``[r H/P, (r+1) H/P)``)."""
    world, rank = _world(group)
    _check_bhnd("x_local", x_local)
    _check_shard("x_local", x_local, 2, shard_sizes(seq_len, world), rank, seq_len)
    _check_divisible("heads of x_local", x_local.shape[1], world)
    if world == 1:
        return x_local
    return _seq_to_heads([x_local], group, seq_len, world)[0]


def gather_heads(x_heads: Tensor, group=None, *, seq_len: int) -> Tensor:
    """The inverse all-to-all alone: ``[B, H/P, seq_len, D]`` to ``[B, H, n_r, D]``."""
    world, _ = _world(group)
    _check_bhnd("x_heads", x_heads)
    if x_heads.shape[2] != seq_len:
        raise ValueError(f"x_heads must hold all seq_len={seq_len} tokens along dim 2, got "
                         f"shape {tuple(x_heads.shape)}")
    if world == 1:
        return x_heads
    return _heads_to_seq(x_heads, group, seq_len, world)


def _check_bhnd(name: str, x) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"{name} must be [B, H, N, D], got shape {tuple(x.shape)}")


def _check_divisible(what: str, heads: int, world: int) -> None:
    if heads % world:
        raise ValueError(
            f"{what} ({heads}) must be divisible by the number of ranks ({world}): Ulysses "
            "gives every rank the same number of heads"
        )


# -- masks restricted to a range of heads ----------------------------------------------------
_SLICES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def slice_heads(mask, start: int, stop: int):
    """``mask`` restricted to heads ``[start, stop)``: local head ``h`` is global head
    ``start + h``.

    - a static ``Mask`` without ``heads`` is head independent and returned as is;
    - a static ``Mask`` with ``heads`` gives a ``Mask`` with ``stop - start`` heads whose
      ``mask_mod`` maps heads and whose tile rule is the original rule's head slice (so
      composed and refined masks keep their exact tiles); cached per mask and range;
    - a ``DynamicMask`` with a ``heads_slice(start, stop)`` method (per-head predictor
      parameters, e.g. tuned meansim) is sliced by it; one without it must have
      head-independent parameters (its ``heads`` attribute absent or None);
    - ``dyn & m`` / ``dyn | m`` compositions are sliced part by part.
    """
    start = check_int("start", start, minimum=0)
    stop = check_int("stop", stop, minimum=start + 1)
    if mask is None:
        return None
    if isinstance(mask, _ComposedDynamic):
        return _ComposedDynamic(
            slice_heads(mask.dyn, start, stop), slice_heads(mask.other, start, stop), mask.op
        )
    if isinstance(mask, DynamicMask):
        if hasattr(mask, "heads_slice"):
            return mask.heads_slice(start, stop)
        per_head = _per_head_params(mask)
        heads = getattr(mask, "heads", None)
        if (heads is not None and not (start == 0 and stop == heads)) or per_head:
            raise ValueError(
                f"dynamic mask {mask.name!r} has per-head parameters "
                f"({', '.join(per_head) or f'heads={heads}'}) but no heads_slice(start, stop) "
                f"method, so it cannot be restricted to heads [{start}, {stop}); give the "
                "class a heads_slice method or use head-independent parameters"
            )
        return mask
    if not isinstance(mask, Mask):
        raise TypeError(
            f"mask must be a flexsparse Mask, DynamicMask or None, got {type(mask).__name__}"
        )
    if mask.heads is None or (start == 0 and stop == mask.heads):
        return mask
    if stop > mask.heads:
        raise ValueError(
            f"heads [{start}, {stop}) are out of range for mask {mask.name!r} with "
            f"{mask.heads} heads"
        )
    per_mask = _SLICES.setdefault(mask, {})
    if (start, stop) not in per_mask:
        per_mask[(start, stop)] = _head_slice_mask(mask, start, stop)
    return per_mask[(start, stop)]


def _per_head_params(mask: DynamicMask) -> list[str]:
    """Attributes of ``mask`` that look like per-head parameters (tensors with more than
    one value); without ``heads_slice`` they cannot be restricted to a rank's heads."""
    return [name for name, value in vars(mask).items()
            if isinstance(value, Tensor) and value.dim() >= 1 and value.numel() > 1]


def _head_slice_mask(mask: Mask, start: int, stop: int) -> Mask:
    total = mask.heads

    def on_device(device):
        mod, rule = mask._resolve(device)

        def mask_mod(b, h, q_idx, kv_idx):
            return mod(b, h + start, q_idx, kv_idx)

        if rule is None:
            return mask_mod, None

        def tile_rule(grid: T.TileGrid) -> Tensor:
            states = rule(grid)
            if states.dim() >= 3 and states.shape[-3] == total:
                states = states[..., start:stop, :, :]
            return states

        return mask_mod, tile_rule

    return Mask(
        on_device=on_device, has_tile_rule=mask.has_tile_rule,
        name=f"{mask.name}[heads {start}:{stop}]", heads=stop - start, batch=mask.batch,
        length=mask.length, binary_tiles=mask.binary_tiles, sdpa_hint=mask.sdpa_hint,
    )


# -- Ulysses attention -----------------------------------------------------------------------
def ulysses_attention(
    q_local: Tensor,
    k_local: Tensor,
    v_local: Tensor,
    mask: Mask | DynamicMask | None,
    group=None,
    *,
    seq_len: int,
    backend: str = "auto",
    scale: float | None = None,
    enable_gqa: bool | None = None,
    block_size: int | tuple[int, int] = 128,
) -> Tensor:
    """Sequence-parallel ``flexsparse.attention`` (DeepSpeed-Ulysses).

    Args:
        q_local: ``[B, Hq, n_r, D]``, rank r's contiguous shard of the ``seq_len`` queries
            (``n_r = shard_sizes(seq_len, P)[r]``).
        k_local, v_local: ``[B, Hkv, n_r, D]``, the same shard of keys and values.
        mask: the mask of the *full* ``seq_len x seq_len`` attention (static or dynamic);
            every rank passes the same one. It is restricted to the rank's heads
            (``slice_heads``); a ``DynamicMask`` is bound on the rank's full-sequence q, k.
        group: process group (None = the default group).
        seq_len: tokens of the full sequence (sum of the shards).
        backend, scale: as for ``flexsparse.attention`` (run on each rank for its heads).
        enable_gqa: None infers GQA from the head counts; False forbids ``Hq != Hkv``.
        block_size: tile size of each rank's ``BlockMask`` (as for ``attention``).

    Returns:
        ``[B, Hq, n_r, D]``: rank r's shard of the attention output; gathered over ranks it
        equals ``flexsparse.attention(q, k, v, mask)`` on the full tensors.

    ``Hq`` must be divisible by ``P``. GQA keeps every kv head with its q heads: when
    ``Hkv`` is not divisible by ``P`` (e.g. ``Hkv < P``) each kv head is replicated
    ``lcm(Hkv, P) / Hkv`` times before the all-to-all (always possible since ``P`` and
    ``Hkv`` both divide ``Hq``), which sends that many copies of k and v.
    """
    world, rank = _world(group)
    for name, t in (("q_local", q_local), ("k_local", k_local), ("v_local", v_local)):
        _check_bhnd(name, t)
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(map(repr, BACKENDS))}; "
                         f"got {backend!r}")
    sizes = shard_sizes(seq_len, world)
    for name, t in (("q_local", q_local), ("k_local", k_local), ("v_local", v_local)):
        _check_shard(name, t, 2, sizes, rank, seq_len)
    hq, hkv = q_local.shape[1], k_local.shape[1]
    if v_local.shape[1] != hkv:
        raise ValueError(f"k_local and v_local must have the same heads, got {hkv} and "
                         f"{v_local.shape[1]}")
    if hq != hkv and (enable_gqa is False or hq % hkv):
        raise ValueError(
            f"q_local has {hq} heads and k_local/v_local {hkv}: allowed are equal heads, or "
            "(GQA) q heads a multiple of kv heads with enable_gqa left None or True"
        )
    if world == 1:
        return attention(q_local, k_local, v_local, mask, scale=scale, backend=backend,
                         enable_gqa=enable_gqa, block_size=block_size)
    _check_divisible("q heads", hq, world)
    if isinstance(mask, Mask) and mask.heads is not None and mask.heads != hq:
        raise ValueError(f"mask {mask.name!r} has {mask.heads} heads but q_local has {hq}")
    rep = math.lcm(hkv, world) // hkv
    if rep > 1:  # kv head j becomes heads [j rep, (j+1) rep): same q heads per copy
        k_local = k_local.repeat_interleave(rep, dim=1)
        v_local = v_local.repeat_interleave(rep, dim=1)
    q, k, v = _seq_to_heads([q_local, k_local, v_local], group, seq_len, world)
    h_local = hq // world
    local_mask = slice_heads(mask, rank * h_local, (rank + 1) * h_local)
    out = attention(q, k, v, local_mask, scale=scale, backend=backend, block_size=block_size)
    return _heads_to_seq(out, group, seq_len, world)
