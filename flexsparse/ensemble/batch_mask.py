"""Segment isolation for a batch of packed prompts of different layouts."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .. import masks
from ..layout import SegmentLayout
from ..mask import Mask


def segments_batch_mask(layouts: Sequence[SegmentLayout], heads: int | None = None) -> Mask:
    """Segment isolation (causal) for a batch of packed prompts, on each row's unpadded
    positions: token ``q`` sees key ``kv <= q`` when the key is in the prefix, in the
    query's segment, or the query is in the suffix / generated part (which sees all).

    Row ``b`` indexes a ``[B, max_len + 1]`` segment-id lookup; positions past a row's
    layout are its suffix (generated tokens), so the mask has no fixed length.
    One row is ``masks.segments(layout)``; a batch stacks the rows' exact tile rules.
    ``heads`` (optional) makes the mask's dense form ``[B, heads, Q, KV]``."""
    if not layouts:
        raise ValueError("layouts must hold at least one SegmentLayout, got []")
    for i, lay in enumerate(layouts):
        if not isinstance(lay, SegmentLayout):
            raise TypeError(f"layouts[{i}] must be a SegmentLayout, got {type(lay).__name__}")
    rows = [masks.segments(lay) for lay in layouts]
    if len(rows) == 1:
        return rows[0]  # the pattern library's mask, with its exact tile rule
    width = max(lay.length for lay in layouts) + 1
    ids = torch.stack([
        torch.cat([lay.segment_ids(), torch.full((width - lay.length,), lay.suffix_id)])
        for lay in layouts
    ])
    suffix = torch.tensor([lay.suffix_id for lay in layouts])
    batch = len(layouts)
    last = width - 1

    def on_device(device):
        ids_d, suffix_d = ids.to(device), suffix.to(device)

        def mask_mod(b, h, q_idx, kv_idx):
            qi, ki = torch.clamp(q_idx, 0, last), torch.clamp(kv_idx, 0, last)
            sq, sk, suf = ids_d[b, qi], ids_d[b, ki], suffix_d[b]
            return (kv_idx <= q_idx) & ((sk == 0) | (sq == sk) | (sq == suf))

        rules = [row.tile_rule_for(device) for row in rows]

        def rule(grid):
            # each row's exact segment tile rule, stacked over the batch: [B, 1, Qb, KVb]
            return torch.stack([r(grid) for r in rules])[:, None]

        return mask_mod, rule

    return Mask(
        on_device=on_device, has_tile_rule=True, name=f"segments(batch={len(layouts)})",
        batch=batch, heads=heads,
    )
