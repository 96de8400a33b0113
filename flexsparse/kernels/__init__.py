"""Quantized block-sparse attention (``backend="quant"`` of ``flexsparse.attention``).

INT8 ``Q·Kᵀ`` with smoothed K, FP8 (or 16-bit) ``P·V`` with fp32 accumulation, online
softmax, tile skipping from a block-granular mask, causal, GQA, ``q_len != kv_len`` and an
optional per-head ``pvthreshd``. ``quant_reference`` is the same arithmetic in PyTorch.
Importing this package registers the backend; Triton is imported only on first use.
"""

from ..attention import register_backend
from .quant import (
    BLOCK_M,
    TILE_N,
    mask_tiles,
    quant_attention,
    quant_reference,
    quantize_blocks,
    run,
    supports,
    to_fp8,
    v_channel_scale,
)

register_backend("quant", supports, run)

__all__ = [
    "BLOCK_M",
    "TILE_N",
    "mask_tiles",
    "quant_attention",
    "quant_reference",
    "quantize_blocks",
    "supports",
    "run",
    "to_fp8",
    "v_channel_scale",
]
