"""The pattern library: every function returns a ``flexsparse.Mask`` (or a
``DynamicMask`` for data-dependent patterns)."""

from .basic import causal, document, full, kv_prefix, prefix_lm, sliding_window
from .frames import frame_window
from .meansim import MeansimMask, meansim
from .radial import radial
from .scenes import parse_adjacency, scenes
from .segments import segments

__all__ = [
    "radial",
    "scenes",
    "parse_adjacency",
    "segments",
    "meansim",
    "MeansimMask",
    "full",
    "causal",
    "sliding_window",
    "kv_prefix",
    "prefix_lm",
    "document",
    "frame_window",
]
