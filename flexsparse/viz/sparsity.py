"""Layers x heads heatmaps of tuned sparsity or thresholds."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from ._style import new_figure, save

#: Cells get their value written in when the grid has at most this many.
ANNOTATE_LIMIT = 256


def head_values(params_or_stats, key: str = "sparsity") -> np.ndarray:
    """The ``[L, H]`` float array held by ``params_or_stats``.

    Accepted (duck-typed, so tuning results need not import this module):

    - a ``[L, H]`` tensor, array or nested list;
    - a mapping with ``params_or_stats[key]`` of that shape (e.g. ``{"sparsity": ...}``);
    - an object with an attribute ``key`` of that shape (e.g. ``params.sparsity``).
    """
    value = params_or_stats
    if isinstance(value, Mapping):
        if key not in value:
            raise ValueError(
                f"params_or_stats has no {key!r} entry; keys: {sorted(map(str, value))}"
            )
        value = value[key]
    elif not isinstance(value, (torch.Tensor, np.ndarray, list, tuple)):
        if not hasattr(value, key):
            raise TypeError(
                f"params_or_stats must be a [L, H] tensor/array, a dict with {key!r} or an "
                f"object with a .{key} attribute, got {type(value).__name__}"
            )
        value = getattr(value, key)
    if isinstance(value, torch.Tensor):
        value = value.detach().to("cpu", torch.float64).numpy()
    try:
        arr = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise TypeError(f"{key} must be numeric [layers, heads], got {value!r}") from None
    if arr.ndim != 2 or 0 in arr.shape:
        raise ValueError(f"{key} must have shape [layers, heads], got {arr.shape}")
    return arr


def plot_head_sparsity(
    params_or_stats,
    key: str = "sparsity",
    *,
    ax: Axes | None = None,
    path: str | Path | None = None,
    title: str | None = None,
    cmap: str = "viridis",
    vmin: float | None = None,
    vmax: float | None = None,
    annotate: bool | None = None,
    figsize: tuple[float, float] | None = None,
    dpi: float = 100,
) -> Figure:
    """Heatmap of a per-layer, per-head quantity (rows: layers, columns: heads).

    Args:
        params_or_stats: ``[L, H]`` tensor / array / list, a dict holding ``key``, or an
            object with attribute ``key`` (see ``head_values``).
        key: which entry / attribute to plot (``"sparsity"``, ``"simthreshd1"``, ...).
        annotate: write values in the cells (default: when there are <= 256 cells).
        vmin, vmax: colour range (default: data range; [0, 1] for sparsity-like data).

    Returns:
        The ``Figure``.
    """
    arr = head_values(params_or_stats, key)
    layers, heads = arr.shape
    if ax is None:
        size = figsize or (min(12.0, 2.0 + 0.45 * heads), min(10.0, 1.8 + 0.35 * layers))
        fig = new_figure(size, dpi)
        ax = fig.add_subplot(1, 1, 1)
    else:
        fig = ax.figure
    finite = arr[np.isfinite(arr)]
    unit_range = finite.size and finite.min() >= 0 and finite.max() <= 1
    lo = vmin if vmin is not None else (0.0 if unit_range else None)
    hi = vmax if vmax is not None else (1.0 if unit_range else None)
    im = ax.imshow(arr, cmap=cmap, vmin=lo, vmax=hi, aspect="auto", interpolation="nearest")
    fig.colorbar(im, ax=ax, label=key, fraction=0.05, pad=0.02)
    ax.set_xlabel("head", fontsize=8)
    ax.set_ylabel("layer", fontsize=8)
    ax.set_xticks(range(heads))
    ax.set_yticks(range(layers))
    ax.tick_params(labelsize=7)
    if annotate is None:
        annotate = arr.size <= ANNOTATE_LIMIT
    if annotate:
        norm = im.norm
        for (i, j), v in np.ndenumerate(arr):
            dark = np.isfinite(v) and norm(v) < 0.5
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=6,
                    color="white" if dark else "black")
    mean = float(np.nanmean(arr)) if finite.size else float("nan")
    ax.set_title(title or f"{key} per layer and head ({layers} x {heads}, mean {mean:.3f})",
                 fontsize=9)
    if path is not None:
        save(fig, path)
    return fig
