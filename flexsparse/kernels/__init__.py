"""Quantized block-sparse attention (``backend="quant"`` of ``flexsparse.attention``).

INT8 ``Q·Kᵀ`` with smoothed K, FP8 (or 16-bit) ``P·V`` with fp32 accumulation, online
softmax; full tiles from the call's BlockMask without a rule, partial tiles with the token
rule from packed bits; causal, GQA, ``q_len != kv_len`` and an optional per-head
``pvthreshd``. ``quant_reference`` is the same arithmetic in PyTorch. ``QuantBackend`` is
what ``flexsparse.attention`` runs; this package never imports ``flexsparse.attention``.
Triton is imported only on first use.
"""

from .quant import (
    BLOCK_M,
    TILE_N,
    TILE_SIZES,
    QuantBackend,
    TileLists,
    quant_attention,
    quant_reference,
    quantize_blocks,
    tile_lists,
    to_fp8,
    v_channel_scale,
)

__all__ = [
    "BLOCK_M",
    "TILE_N",
    "TILE_SIZES",
    "QuantBackend",
    "TileLists",
    "quant_attention",
    "quant_reference",
    "quantize_blocks",
    "tile_lists",
    "to_fp8",
    "v_channel_scale",
]
