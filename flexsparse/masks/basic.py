"""Basic patterns: full, causal, sliding window, prefix LM, documents.

Each is a ``Mask`` with a vmap-safe ``mask_mod`` and an exact tile rule derived from the
first/last position of each tile.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .. import tiles as T
from .._checks import check_bool, check_int
from ..mask import Mask


def full() -> Mask:
    """Every query sees every key."""

    def mask_mod(b, h, q_idx, kv_idx):
        return (q_idx >= 0) | (kv_idx >= 0)

    return Mask(T.broadcasts(mask_mod), T.full_states, name="full", sdpa_hint="full")


def causal() -> Mask:
    """Query ``i`` sees keys ``j <= i`` (positions are absolute: a decode step's rows are
    the last rows of the mask)."""

    def mask_mod(b, h, q_idx, kv_idx):
        return kv_idx <= q_idx

    def rule(grid: T.TileGrid):
        q_lo, q_hi = grid.rows()
        kv_lo, kv_hi = grid.cols()
        return T.from_bounds(kv_hi <= q_lo, kv_lo <= q_hi)

    return Mask(T.broadcasts(mask_mod), rule, name="causal", sdpa_hint="causal")


def sliding_window(window: int) -> Mask:
    """Keys within ``window`` positions on either side: ``|q - kv| < window``.

    Compose with ``causal()`` for the usual causal sliding window (Mistral: the query and
    the ``window - 1`` tokens before it)."""
    w = check_int("window", window, minimum=1)

    def mask_mod(b, h, q_idx, kv_idx):
        return (q_idx - kv_idx < w) & (kv_idx - q_idx < w)

    def rule(grid: T.TileGrid):
        q_lo, q_hi = grid.rows()
        kv_lo, kv_hi = grid.cols()
        d_min, d_max = q_lo - kv_hi, q_hi - kv_lo
        return T.from_bounds((d_max < w) & (-d_min < w), (d_min < w) & (-d_max < w))

    return Mask(T.broadcasts(mask_mod), rule, name=f"window({w})")


def kv_prefix(n: int) -> Mask:
    """Every query sees the first ``n`` keys."""
    n = check_int("n", n, minimum=0)

    def mask_mod(b, h, q_idx, kv_idx):
        return (kv_idx < n) & (q_idx >= 0)

    def rule(grid: T.TileGrid):
        kv_lo, kv_hi = grid.cols()
        states = T.from_bounds(kv_hi < n, kv_lo < n)
        return states.expand(grid.shape).contiguous()

    return Mask(T.broadcasts(mask_mod), rule, name=f"kv_prefix({n})")


def prefix_lm(n: int) -> Mask:
    """Bidirectional attention inside the first ``n`` tokens, causal after them."""
    m = causal() | kv_prefix(n)
    m.name = f"prefix_lm({n})"
    return m


def document(lengths: Sequence[int], *, causal: bool = True) -> Mask:  # noqa: F811
    """Packed documents of the given ``lengths``: a token sees only its own document
    (causally by default). The mask is bound to ``sum(lengths)`` tokens."""
    check_bool("causal", causal)
    if isinstance(lengths, (int, str)) or not hasattr(lengths, "__iter__"):
        raise TypeError(f"lengths must be a list of document lengths, got {lengths!r}")
    lengths = [check_int(f"lengths[{i}]", n, minimum=1) for i, n in enumerate(lengths)]
    if not lengths:
        raise ValueError("lengths must hold at least one document length, got []")
    total = sum(lengths)
    doc_of = torch.bucketize(torch.arange(total), torch.tensor(lengths).cumsum(0), right=True)

    def on_device(device):
        docs = doc_of.to(device)

        def mask_mod(b, h, q_idx, kv_idx):
            q_doc = docs[torch.clamp(q_idx, 0, total - 1)]
            kv_doc = docs[torch.clamp(kv_idx, 0, total - 1)]
            return q_doc == kv_doc

        def rule(grid: T.TileGrid):
            q_lo, q_hi = docs[grid.q_lo][:, None], docs[grid.q_hi][:, None]
            kv_lo, kv_hi = docs[grid.kv_lo][None, :], docs[grid.kv_hi][None, :]
            all_same = (q_lo == q_hi) & (kv_lo == kv_hi) & (q_lo == kv_lo)
            overlap = torch.maximum(q_lo, kv_lo) <= torch.minimum(q_hi, kv_hi)
            return T.from_bounds(all_same, overlap)

        return mask_mod, rule

    name = f"document({len(lengths)} docs)"
    m = Mask(on_device=on_device, has_tile_rule=True, name=name, length=total)
    if causal:
        m = causal_mask() & m
        m.name = f"causal_document({len(lengths)} docs)"
    return m


causal_mask = causal
