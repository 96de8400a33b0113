"""flexsparse: sparse attention patterns compiled into FlexAttention BlockMasks.

>>> import flexsparse as fs
>>> from flexsparse import masks
>>> m = masks.causal() & masks.sliding_window(256)
>>> round(m.density(1024), 3)
0.219
"""

from . import masks, tiles
from .attention import attention, explain, reference
from .layout import MODEL_PRESETS, SegmentLayout, VideoLayout
from .mask import DynamicMask, Mask

__version__ = "0.1.0"

__all__ = [
    "Mask",
    "DynamicMask",
    "VideoLayout",
    "SegmentLayout",
    "MODEL_PRESETS",
    "attention",
    "explain",
    "reference",
    "masks",
    "tiles",
]
