"""Shared test helpers."""

import torch


def tiles_of(num_blocks: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """Dense bool tile map ``[B, H, Qb, KVb]`` from BlockMask ``(num, indices)``."""
    kvb = indices.shape[-1]
    order = torch.arange(kvb)
    chosen = order < num_blocks[..., None]
    dense = torch.zeros(*indices.shape[:-1], kvb + 1, dtype=torch.bool)
    idx = torch.where(chosen, indices.long(), kvb)
    dense.scatter_(-1, idx, True)
    return dense[..., :kvb]


def block_mask_tiles(bm):
    """(kept, full) tile maps of a BlockMask, ``[B, H, Qb, KVb]`` each."""
    partial = tiles_of(bm.kv_num_blocks.cpu(), bm.kv_indices.cpu())
    if bm.full_kv_num_blocks is None:
        full = torch.zeros_like(partial)
    else:
        full = tiles_of(bm.full_kv_num_blocks.cpu(), bm.full_kv_indices.cpu())
    return partial | full, full
