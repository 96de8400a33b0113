"""Pictures of masks: heatmaps (token or tile level, layout-annotated), side-by-side
comparisons, scene graphs and per-head sparsity maps.

Every function returns a matplotlib ``Figure`` drawn on an Agg canvas (headless) and
saves it when given ``path=`` (.png, .svg or .pdf).

>>> from flexsparse import masks, viz
>>> fig = viz.plot_mask(masks.causal() & masks.sliding_window(64), 512)
"""

from ._style import COLORS, save
from .annotate import annotations_for
from .graph import plot_scene_graph
from .heatmap import (
    LEVELS,
    TOKEN_LEVEL_LIMIT,
    TOKEN_LEVEL_MAX,
    MaskImage,
    compare,
    plot_mask,
    render,
)
from .sparsity import head_values, plot_head_sparsity, plot_tuned

__all__ = [
    "plot_mask",
    "compare",
    "plot_scene_graph",
    "plot_head_sparsity",
    "plot_tuned",
    "render",
    "head_values",
    "annotations_for",
    "save",
    "MaskImage",
    "COLORS",
    "LEVELS",
    "TOKEN_LEVEL_LIMIT",
    "TOKEN_LEVEL_MAX",
]
