"""Layers x heads heatmaps of tuned sparsity or thresholds.

A value that is not known (NaN: e.g. the sparsity of a SpargeAttn file's sparse heads, which
the file does not record) is drawn in ``UNKNOWN_COLOR`` with a legend entry saying so, never
as a blank cell that reads like a value."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.colors import to_rgba
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from matplotlib.transforms import ScaledTranslation

from ._style import new_figure, save

#: Cells get their value written in when the grid has at most this many.
ANNOTATE_LIMIT = 256
#: Unknown values (NaN) and heads a panel does not apply to (dense heads' thresholds).
UNKNOWN_COLOR = "#d9d9d9"
NOT_APPLICABLE_COLOR = "#ffffff"
#: Smallest new figure (inches): titles, labels and the colour bar need this much.
MIN_FIGSIZE = (5.0, 3.6)
#: At most this many tick labels per axis.
MAX_TICKS = 16
#: What ``plot_tuned`` draws, in order, when present in the parameters.
TUNED_FIELDS = ("sparsity", "simthreshd1", "cdfthreshd")


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
    not_applicable=None,
    legend: bool = True,
) -> Figure:
    """Heatmap of a per-layer, per-head quantity (rows: layers, columns: heads).

    Args:
        params_or_stats: ``[L, H]`` tensor / array / list, a dict holding ``key``, or an
            object with attribute ``key`` (see ``head_values``).
        key: which entry / attribute to plot (``"sparsity"``, ``"simthreshd1"``, ...).
        annotate: write values in the cells (default: when there are <= 256 cells).
        vmin, vmax: colour range (default: data range; [0, 1] for sparsity-like data).
        figsize: of a new figure (default from the grid, at least ``MIN_FIGSIZE``).
        not_applicable: optional bool ``[L, H]``: heads the value does not apply to (e.g.
            the thresholds of dense heads), drawn white and named in the legend.
        legend: a legend for unknown (NaN) and not-applicable cells, when there are any.

    Returns:
        The ``Figure``. Unknown (NaN) cells are grey with a legend entry "unknown".
    """
    arr = head_values(params_or_stats, key)
    layers, heads = arr.shape
    if ax is None:
        size = figsize or (min(12.0, 2.0 + 0.45 * heads), min(10.0, 1.8 + 0.35 * layers))
        size = (max(size[0], MIN_FIGSIZE[0]), max(size[1], MIN_FIGSIZE[1]))
        fig = new_figure(size, dpi, layout="constrained")
        ax = fig.add_subplot(1, 1, 1)
    else:
        fig = ax.figure
    skip = np.zeros(arr.shape, bool) if not_applicable is None else _bool_grid(
        not_applicable, arr.shape)
    shown = np.where(skip, np.nan, arr)
    unknown = ~np.isfinite(arr) & ~skip
    finite = shown[np.isfinite(shown)]
    unit_range = finite.size and finite.min() >= 0 and finite.max() <= 1
    lo = vmin if vmin is not None else (0.0 if unit_range else None)
    hi = vmax if vmax is not None else (1.0 if unit_range else None)
    colours = colormaps[cmap].with_extremes(bad=UNKNOWN_COLOR)
    im = ax.imshow(np.ma.masked_invalid(shown), cmap=colours, vmin=lo, vmax=hi,
                   aspect="auto", interpolation="nearest")
    if skip.any():
        overlay = np.zeros((*arr.shape, 4))
        overlay[skip] = to_rgba(NOT_APPLICABLE_COLOR)
        ax.imshow(overlay, aspect="auto", interpolation="nearest")
    fig.colorbar(im, ax=ax, label=key, fraction=0.05, pad=0.02)
    ax.set_xlabel("head", fontsize=8)
    ax.set_ylabel("layer", fontsize=8)
    ax.set_xticks(_ticks(heads))
    ax.set_yticks(_ticks(layers))
    ax.tick_params(labelsize=7)
    if annotate is None:
        annotate = arr.size <= ANNOTATE_LIMIT
    if annotate:
        norm = im.norm
        for (i, j), v in np.ndenumerate(shown):
            if np.isfinite(v):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=6,
                        color="white" if norm(v) < 0.5 else "black")
    handles = []
    if unknown.any():
        handles.append(Patch(facecolor=UNKNOWN_COLOR, edgecolor="#999999", lw=0.5,
                             label=f"unknown (not recorded): {int(unknown.sum())} heads"))
    if skip.any():
        handles.append(Patch(facecolor=NOT_APPLICABLE_COLOR, edgecolor="#999999", lw=0.5,
                             label=f"dense heads (not used): {int(skip.sum())}"))
    if legend and handles:
        # Below the tick labels and the x label (about 28 points), whatever the axes size.
        below = ax.transAxes + ScaledTranslation(0, -30 / 72, fig.dpi_scale_trans)
        ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, 0.0),
                  bbox_transform=below, ncol=len(handles), fontsize=7, frameon=False)
    if title is None:
        mean = f"mean {float(finite.mean()):.3f}" if finite.size else "no known values"
        title = f"{key} per layer and head ({layers} x {heads}, {mean})"
    ax.set_title(title, fontsize=9)
    if path is not None:
        save(fig, path)
    return fig


def plot_tuned(
    params,
    fields: tuple[str, ...] | None = None,
    *,
    path: str | Path | None = None,
    title: str | None = None,
    dpi: float = 100,
) -> Figure:
    """Tuned per-head parameters, one layers x heads panel per field.

    Draws what the parameters know: ``sparsity`` where it was measured (unknown heads,
    e.g. the sparse heads of a SpargeAttn file, are grey and counted in the legend) and
    the thresholds ``simthreshd1`` / ``cdfthreshd`` of the sparse heads (dense heads are
    white: their thresholds are not used).

    Args:
        params: a ``TunedParams`` (or any object with ``[L, H]`` attributes of those
            names and a bool ``is_sparse``).
        fields: the panels (default ``TUNED_FIELDS`` that are present).
        path: save to .png / .svg / .pdf.
        title: figure title (default: model, heads, and what is unknown).

    Returns:
        The ``Figure`` (one axes per field, plus their colour bars).
    """
    fields = tuple(fields) if fields is not None else tuple(
        f for f in TUNED_FIELDS if getattr(params, f, None) is not None)
    if not fields:
        raise ValueError(f"params has none of the fields {', '.join(TUNED_FIELDS)}")
    grids = {f: head_values(params, f) for f in fields}
    layers, heads = next(iter(grids.values())).shape
    sparse = getattr(params, "is_sparse", None)
    dense = None if sparse is None else ~_bool_grid(sparse, (layers, heads))
    width = max(MIN_FIGSIZE[0], min(5.4, 1.6 + 0.15 * heads)) * len(fields)
    height = max(MIN_FIGSIZE[1], min(6.0, 2.4 + 0.13 * layers))
    fig = new_figure((min(width, 17.0), height), dpi, layout="constrained")
    axes = fig.subplots(1, len(fields), squeeze=False)[0]
    for ax, field in zip(axes, fields):
        skip = None if field == "sparsity" or dense is None else dense
        grid = grids[field]
        known = grid[np.isfinite(grid) & (True if skip is None else ~skip)]
        # Thresholds span a narrow range (cdfthreshd 0.86 - 1): colour by their own range.
        lo, hi = (0.0, 1.0) if field == "sparsity" or not known.size else (
            float(known.min()), float(known.max()))
        plot_head_sparsity(grid, field, ax=ax, not_applicable=skip, vmin=lo, vmax=hi,
                           annotate=False, title=_panel_title(field, grid, skip))
    fig.suptitle(title or _tuned_title(params, grids, dense), fontsize=10)
    if path is not None:
        save(fig, path)
    return fig


def _panel_title(field: str, arr: np.ndarray, skip) -> str:
    vals = arr if skip is None else arr[~skip]
    known = vals[np.isfinite(vals)]
    what = {"sparsity": "fraction of pairs skipped",
            "simthreshd1": "similarity threshold (sparse heads)",
            "cdfthreshd": "CDF threshold (sparse heads)"}.get(field, field)
    if not known.size:
        return f"{field}: {what}\n(not known for any head)"
    return f"{field}: {what}\n{known.min():.3g} - {known.max():.3g} over {known.size} heads"


def _tuned_title(params, grids: dict, dense) -> str:
    name = getattr(params, "model", None) or "tuned parameters"
    layers, heads = next(iter(grids.values())).shape
    line = f"{name}: {layers} layers x {heads} heads"
    if dense is not None:
        line += f", {int((~dense).sum())} sparse, {int(dense.sum())} dense"
    sparsity = grids.get("sparsity")
    if sparsity is not None and not np.isfinite(sparsity).all():
        line += (f"\nsparsity not recorded for {int((~np.isfinite(sparsity)).sum())} heads "
                 "(the file stores thresholds only)")
    return line


def _bool_grid(value, shape) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    arr = np.asarray(value, dtype=bool)
    if arr.shape != tuple(shape):
        raise ValueError(f"not_applicable must have shape {tuple(shape)}, got {arr.shape}")
    return arr


def _ticks(n: int) -> list[int]:
    step = max(1, -(-n // MAX_TICKS))
    return list(range(0, n, step))
