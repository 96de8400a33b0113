"""Segment isolation for self-ensembles: paraphrases that share a prompt but not each other.

With a ``SegmentLayout`` (ids: 0 = prefix, 1..k = segments, k + 1 = suffix and every
generated token after the layout), attention is causal and

- a prefix token sees the prefix;
- a segment token sees the prefix and its own segment;
- suffix and generated tokens see everything before them.

The tile rule is exact and is written for the causal composition directly, so tiles
between two different segments are empty and isolated paraphrases cost nothing.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import tiles as T
from ..layout import SegmentLayout
from ..mask import Mask


def segments(seg_layout: SegmentLayout) -> Mask:
    """Causal segment isolation over ``seg_layout``.

    Args:
        seg_layout: ``SegmentLayout(prefix, segments, suffix)``.

    Returns:
        A ``Mask`` for any length: positions past ``seg_layout.length`` are suffix (so a
        decode step with a longer KV cache needs no new layout). Its ``mask_mod`` is
        ``kv <= q & (seg(kv) == 0 | seg(kv) == seg(q) | seg(q) == k + 1)``.
    """
    if not isinstance(seg_layout, SegmentLayout):
        raise TypeError(
            f"seg_layout must be a flexsparse.SegmentLayout, got {type(seg_layout).__name__}"
        )
    n = seg_layout.length
    suffix = seg_layout.suffix_id
    ids_cpu = seg_layout.segment_ids()

    def on_device(device):
        ids = ids_cpu.to(device)

        def seg_of(idx: Tensor) -> Tensor:
            # Past the layout every token is suffix; the clamp keeps the lookup in range.
            return torch.where(idx >= n, suffix, ids[torch.clamp(idx, 0, n - 1)])

        def mask_mod(b, h, q_idx, kv_idx):
            sq, sk = seg_of(q_idx), seg_of(kv_idx)
            allowed = (sk == 0) | (sk == sq) | (sq == suffix)
            return (kv_idx <= q_idx) & allowed

        def rule(grid: T.TileGrid) -> Tensor:
            q_lo, q_hi = grid.rows()
            kv_lo, kv_hi = grid.cols()
            return _tile_states(seg_of(q_lo), seg_of(q_hi), seg_of(kv_lo), seg_of(kv_hi),
                                q_lo, q_hi, kv_lo, kv_hi, suffix)

        return mask_mod, rule

    return Mask(
        on_device=on_device, has_tile_rule=True,
        name=f"segments({seg_layout.num_segments})",
    )


def _tile_states(sq_lo, sq_hi, sk_lo, sk_hi, q_lo, q_hi, kv_lo, kv_hi, suffix: int) -> Tensor:
    """Exact states. Segment ids are monotone in position and every id between a tile's
    first and last is present in it (segments are non-empty), so the ids of a tile are the
    whole range ``[lo, hi]`` on each side."""
    causal_any = kv_lo <= q_hi
    causal_all = kv_hi <= q_lo
    overlap = torch.maximum(sq_lo, sk_lo) <= torch.minimum(sq_hi, sk_hi)
    # Some pair is allowed: a prefix key (the earliest key), a suffix query (the latest
    # query), or a segment shared by both sides; each also meets causality iff the
    # earliest key precedes the latest query.
    any_true = causal_any & ((sk_lo == 0) | (sq_hi == suffix) | overlap)
    # Every pair is allowed: every query is suffix; or every key is prefix; or the queries
    # are one non-suffix segment s (plus possibly suffix ones) and keys are only 0 and s.
    top = torch.clamp(sq_hi, max=suffix - 1)  # highest non-suffix query id
    one_seg = sq_lo == top
    n_ids = sk_hi - sk_lo + 1
    others = n_ids - (sk_lo == 0).to(n_ids.dtype) - (
        (sk_lo <= sq_lo) & (sq_lo <= sk_hi) & (sq_lo != 0)
    ).to(n_ids.dtype)
    all_allowed = (sq_lo == suffix) | (sk_hi == 0) | (one_seg & (others == 0))
    return T.from_bounds(causal_all & all_allowed, any_true)
