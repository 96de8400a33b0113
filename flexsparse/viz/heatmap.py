"""Heatmaps of masks: which (query, key) pairs or tiles are computed.

Two levels:

- ``"token"``: one cell per (query, key) pair from ``mask.to_dense`` (kept / dropped).
  Costs ``q_len x kv_len`` booleans: for small sequences.
- ``"block"``: one cell per tile from ``mask.tile_states`` (empty / partial / full), never
  an ``N^2`` tensor, so a 115k-token mask renders in seconds.

``"auto"`` takes ``"token"`` up to ``TOKEN_LEVEL_LIMIT`` pairs and ``"block"`` beyond; an
explicit ``"token"`` is refused above ``TOKEN_LEVEL_MAX`` pairs (a picture cannot show more
pairs than it has pixels, and the dense matrix and its colours would need gigabytes).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from torch import Tensor

from .. import tiles as T
from .._checks import check_choice, check_int
from ..layout import SegmentLayout, VideoLayout
from ..mask import DynamicMask, Mask
from . import annotate
from ._style import COLORS, new_figure, palette_image, save

LEVELS = ("auto", "token", "block")
#: ``level="auto"`` renders pairs up to this many (q_len * kv_len), tiles beyond.
TOKEN_LEVEL_LIMIT = 2048 * 2048
#: ``level="token"`` refuses more pairs than this (4096 x 4096: about 100 MB in all).
TOKEN_LEVEL_MAX = 4096 * 4096
#: ``level="block"`` without ``block_size`` uses 128-token tiles, larger ones when that
#: would give more than this many tiles along the key axis.
MAX_TILES_PER_SIDE = 1024


@dataclass
class MaskImage:
    """A mask rendered to category codes.

    Attributes:
        codes: int ``[rows, cols]``: index into ``names``.
        names: colour names (keys of ``COLORS``) of the codes.
        level: ``"token"`` or ``"block"``.
        block: tile size (block level) or 1.
        q_range, kv_range: shown token positions ``[start, end)``.
        density: fraction of pairs kept (all heads).
        tiles: tile counts (``tiles.summary``) at ``block``, or None at token level.
        name: the mask's name.
        head: the head shown for head-dependent masks, else None.
        kept: bool ``[rows, cols]``: pairs (token) or tiles (block) that are computed.
    """

    codes: np.ndarray
    names: list[str]
    level: str
    block: int
    q_range: tuple[int, int]
    kv_range: tuple[int, int]
    density: float
    tiles: dict | None
    name: str
    head: int | None
    kept: np.ndarray


def render(
    mask: Mask | Tensor,
    q_len: int | None = None,
    kv_len: int | None = None,
    *,
    layout: VideoLayout | SegmentLayout | None = None,
    level: str = "auto",
    block_size: int | None = None,
    head: int = 0,
) -> MaskImage:
    """Evaluate ``mask`` into a ``MaskImage`` (see ``plot_mask`` for the arguments)."""
    check_choice("level", level, LEVELS)
    if isinstance(mask, DynamicMask):
        raise TypeError(
            "mask is a DynamicMask (decided from q and k): plot mask.bind(q, k) instead"
        )
    if isinstance(mask, Tensor):
        return _render_matrix(mask)
    if not isinstance(mask, Mask):
        raise TypeError(
            f"mask must be a flexsparse.Mask or a bool tensor, got {type(mask).__name__}"
        )
    q_len, kv_len = _lengths(mask, q_len, kv_len, layout)
    if level == "auto":
        level = "token" if q_len * kv_len <= TOKEN_LEVEL_LIMIT else "block"
    lead = [d for d in (mask.batch, mask.heads) if d is not None]
    shown_head = None
    if mask.heads is not None:
        shown_head = check_int("head", head, minimum=0)
        if shown_head >= mask.heads:
            raise ValueError(f"head must be < {mask.heads} (the mask's heads), got {head}")
    q0 = kv_len - q_len
    if level == "token":
        check_token_level(q_len, kv_len)
        dense = mask.to_dense(q_len, kv_len)
        density = float(dense.float().mean())
        kept = _pick(dense, lead, mask.heads, shown_head).numpy()
        return MaskImage(kept.astype(np.uint8), ["empty", "full"], "token", 1, (q0, kv_len),
                         (0, kv_len), density, None, mask.name, shown_head, kept)
    block = auto_block_size(kv_len) if block_size is None else check_int(
        "block_size", block_size, minimum=1)
    states = mask.tile_states(q_len, kv_len, block)
    counts = T.summary(states)
    codes = _pick(states, lead, mask.heads, shown_head).to(torch.uint8).numpy()
    return MaskImage(codes, ["empty", "partial", "full"], "block", block, (q0, kv_len),
                     (0, kv_len), mask.density(q_len, kv_len), counts, mask.name, shown_head,
                     codes != T.EMPTY)


def check_token_level(q_len: int, kv_len: int) -> None:
    """Refuse a token-level picture of more than ``TOKEN_LEVEL_MAX`` pairs."""
    if q_len * kv_len > TOKEN_LEVEL_MAX:
        raise ValueError(
            f"level='token' draws at most {TOKEN_LEVEL_MAX:,} pairs (4096 x 4096), got "
            f"{q_len:,} x {kv_len:,} = {q_len * kv_len:,}: use level='block' (tiles) or 'auto'"
        )


def auto_block_size(kv_len: int) -> int:
    """128, or the smallest multiple of 128 giving at most ``MAX_TILES_PER_SIDE`` tiles."""
    return 128 * max(1, math.ceil(kv_len / (128 * MAX_TILES_PER_SIDE)))


def _render_matrix(dense: Tensor) -> MaskImage:
    if dense.dtype != torch.bool or dense.dim() != 2:
        raise ValueError(
            f"a tensor mask must be a bool [q_len, kv_len] matrix, got {dense.dtype} "
            f"{tuple(dense.shape)}"
        )
    kept = dense.cpu().numpy()
    q_len, kv_len = kept.shape
    if q_len > kv_len:
        raise ValueError(f"a tensor mask must have q_len <= kv_len, got {tuple(dense.shape)}")
    return MaskImage(kept.astype(np.uint8), ["empty", "full"], "token", 1,
                     (kv_len - q_len, kv_len), (0, kv_len), float(kept.mean()), None, "matrix",
                     None, kept)


def _lengths(mask: Mask, q_len, kv_len, layout) -> tuple[int, int]:
    if kv_len is None:
        if mask.length is not None:
            kv_len = mask.length
        elif isinstance(layout, VideoLayout):
            kv_len = layout.length
        elif q_len is not None:
            kv_len = q_len
        else:
            raise ValueError(
                f"mask {mask.name!r} has no length of its own: pass q_len / kv_len (or a "
                "VideoLayout as layout=)"
            )
    if q_len is None:
        q_len = kv_len
    return mask.check_lengths(q_len, kv_len)


def _pick(t: Tensor, lead: list[int], heads, head) -> Tensor:
    """The ``[rows, cols]`` slice shown: batch 0 and head ``head`` when present."""
    if len(lead) == 2:
        t = t[0]
    if heads is not None and t.dim() == 3:
        t = t[head]
    while t.dim() > 2:  # a rule may return extra broadcast dims
        t = t[0]
    return t.cpu()


def _show(ax: Axes, img: MaskImage) -> None:
    rgb = palette_image(img.codes, img.names)
    rows, cols = img.codes.shape
    q0, q1 = img.q_range
    k0, k1 = img.kv_range
    extent = (k0, k0 + cols * img.block, q0 + rows * img.block, q0)
    # Nearest keeps tiles crisp; above ~1k cells per side pixels would drop whole rows, so
    # let matplotlib average the RGB colours instead.
    interp = "nearest" if max(rows, cols) <= 1024 else "antialiased"
    ax.imshow(rgb, extent=extent, interpolation=interp, origin="upper",
              aspect="equal" if q1 - q0 >= (k1 - k0) / 4 else "auto", zorder=1)
    ax.set_xlim(k0, k1)
    ax.set_ylim(q1, q0)
    ax.tick_params(labelsize=7)


def _title(img: MaskImage, title: str | None) -> str:
    if title is not None:
        return title
    q0, q1 = img.q_range
    size = f"{img.kv_range[1]:,} tokens"
    if q1 - q0 != img.kv_range[1] - img.kv_range[0]:
        size += f", last {q1 - q0:,} query rows"
    line2 = f"{size} · density {img.density:.3f}"
    if img.head is not None:
        line2 += f" · head {img.head}"
    if img.tiles is not None:
        skipped = img.tiles["empty"] / img.tiles["total"]
        line2 += (f"\n{img.block}×{img.block} tiles: {skipped:.0%} skipped, "
                  f"{img.tiles['partial']:,} partial")
    return f"{img.name}\n{line2}"


def _legend_handles(img: MaskImage) -> list[Patch]:
    if img.level == "token":
        labels = {"empty": "dropped", "full": "kept"}
    else:
        labels = {"empty": "empty (skipped)", "partial": "partial", "full": "full"}
    return [Patch(facecolor=COLORS[n], edgecolor="#999999", lw=0.5, label=labels[n])
            for n in img.names]


def _difference_handles(names) -> list[Patch]:
    labels = {"only_a": f"only {names[0]}", "only_b": f"only {names[1]}",
              "both": "both", "neither": "neither"}
    return [Patch(facecolor=COLORS[n], edgecolor="#999999", lw=0.5, label=text)
            for n, text in labels.items()]


def _axis_labels(ax: Axes, ann, layout, img: MaskImage) -> None:
    """Layout annotations when there is a layout, else plain position labels."""
    if layout is not None:
        annotate.draw(ax, ann, img.q_range, img.kv_range)
    else:
        ax.set_xlabel("key position", fontsize=8)
        ax.set_ylabel("query position", fontsize=8)


def _prepare_axes(ax: Axes | None, figsize, dpi) -> tuple[Figure, Axes, bool]:
    if ax is not None:
        return ax.figure, ax, False
    fig = new_figure(figsize, dpi)
    return fig, fig.add_axes([0.16, 0.13, 0.78, 0.66]), True


def plot_mask(
    mask: Mask | Tensor,
    q_len: int | None = None,
    kv_len: int | None = None,
    layout: VideoLayout | SegmentLayout | None = None,
    level: str = "auto",
    ax: Axes | None = None,
    path: str | Path | None = None,
    title: str | None = None,
    *,
    block_size: int | None = None,
    head: int = 0,
    scenes: Sequence[int] | None = None,
    scene_names: Sequence[str] | None = None,
    labels: Mapping[str, str] | Sequence[str] | None = None,
    legend: bool = True,
    figsize: tuple[float, float] = (6.0, 6.4),
    dpi: float = 100,
) -> Figure:
    """Heatmap of the (query, key) pairs ``mask`` computes.

    Args:
        mask: a ``Mask`` or a bool ``[q_len, kv_len]`` tensor.
        q_len, kv_len: shape of the call; query rows are the last ``q_len`` rows.
            Default: the mask's own length, else ``layout.length`` (VideoLayout).
        layout: annotates the axes: ``VideoLayout`` (text region shaded and labelled,
            frame boundaries, frame numbers), ``SegmentLayout`` (prefix, seg 1..k, suffix,
            generated spans).
        level: ``"token"`` (one cell per pair: kept / dropped), ``"block"`` (one cell per
            tile: empty / partial / full, no ``N^2`` tensor) or ``"auto"`` (token up to
            ``TOKEN_LEVEL_LIMIT`` pairs). ``"token"`` raises ``ValueError`` above
            ``TOKEN_LEVEL_MAX`` pairs.
        ax: draw into this axes (of your figure) instead of a new figure.
        path: save to this file; the format follows the extension (.png, .svg, .pdf).
        title: replaces the default title (pattern, length, density, tile counts).
        block_size: tile size at block level (default 128, larger beyond 131k tokens).
        head: the head shown when the mask depends on the head.
        scenes: first latent frame of each scene (e.g. ``[0, 5, 9]``), drawn as boundaries
            with names.
        scene_names: names of the scenes.
        labels: text for ``SegmentLayout`` spans (by span name, or in order).
        legend: draw the colour legend.
        figsize, dpi: size of a new figure (pixels = figsize * dpi).

    Returns:
        The matplotlib ``Figure`` (rendered on an Agg canvas: nothing pops up).
    """
    img = render(mask, q_len, kv_len, layout=layout, level=level, block_size=block_size,
                 head=head)
    fig, ax, own = _prepare_axes(ax, figsize, dpi)
    _show(ax, img)
    if layout is not None or scenes is not None:
        ann = annotate.annotations_for(layout, total=img.kv_range[1], scenes=scenes,
                                       scene_names=scene_names, labels=labels)
        annotate.draw(ax, ann, img.q_range, img.kv_range)
        # Lift the title above the bands (their height is a fraction of the axes).
        height_pt = ax.get_position().height * fig.get_figheight() * 72
        pad = 4 + len(ann.bands) * annotate.BAND_HEIGHT * height_pt
    else:
        ax.set_xlabel("key position", fontsize=8)
        ax.set_ylabel("query position", fontsize=8)
        pad = 6
    ax.set_title(_title(img, title), fontsize=9, pad=pad)
    if legend:
        anchor = (0.5, 0.01) if own else (0.5, -0.2)
        where = fig if own else ax
        where.legend(handles=_legend_handles(img), loc="lower center", ncol=3, fontsize=7,
                     frameon=False, bbox_to_anchor=anchor)
    if path is not None:
        save(fig, path)
    return fig


def compare(
    mask_a: Mask | Tensor,
    mask_b: Mask | Tensor,
    q_len: int | None = None,
    kv_len: int | None = None,
    layout: VideoLayout | SegmentLayout | None = None,
    level: str = "auto",
    path: str | Path | None = None,
    title: str | None = None,
    *,
    names: tuple[str, str] | None = None,
    block_size: int | None = None,
    head: int = 0,
    figsize: tuple[float, float] = (14.0, 5.4),
    dpi: float = 100,
) -> Figure:
    """``mask_a`` and ``mask_b`` side by side, plus a difference panel.

    The difference panel colours each pair (token level) or computed tile (block level):
    ``only_a`` (red), ``only_b`` (green), ``both`` (blue), neither (grey); its title gives
    the counts. Use it to check a custom mask against a reference pattern.

    Args:
        mask_a, mask_b: ``Mask`` objects or bool ``[q_len, kv_len]`` tensors of one shape.
        names: panel names (default: the masks' names).
        Others as in ``plot_mask``; ``level`` applies to all three panels.

    Returns:
        The ``Figure``.
    """
    check_choice("level", level, LEVELS)
    if isinstance(mask_a, Tensor) or isinstance(mask_b, Tensor):
        level = "token"
    elif level == "auto":
        q, k = _lengths(mask_a if mask_a.length else mask_b, q_len, kv_len, layout)
        level = "token" if q * k <= TOKEN_LEVEL_LIMIT else "block"
    if level == "block" and block_size is None:
        k = kv_len or getattr(mask_a, "length", None) or getattr(layout, "length", None)
        block_size = auto_block_size(k) if k else None
    kw = dict(layout=layout, level=level, block_size=block_size, head=head)
    img_a = render(mask_a, q_len, kv_len, **kw)
    img_b = render(mask_b, q_len, kv_len, **kw)
    if img_a.codes.shape != img_b.codes.shape or img_a.q_range != img_b.q_range:
        raise ValueError(
            f"mask_a and mask_b render to different shapes: {img_a.codes.shape} covering "
            f"queries {img_a.q_range} vs {img_b.codes.shape} covering {img_b.q_range}"
        )
    names = names or (img_a.name, img_b.name)
    if len(names) != 2:
        raise ValueError(f"names must hold two names, got {names!r}")
    fig = new_figure(figsize, dpi)
    axes = [fig.add_axes([0.06 + i * 0.325, 0.16, 0.26, 0.64]) for i in range(3)]
    ann = annotate.annotations_for(layout, total=img_a.kv_range[1])
    for ax, img, name in zip(axes, (img_a, img_b), names):
        _show(ax, img)
        img.name = str(name)
        _axis_labels(ax, ann, layout, img)
        ax.set_title(_title(img, None), fontsize=8, pad=6 + 14 * len(ann.bands))
    diff_img, counts = difference(img_a, img_b)
    _show(axes[2], diff_img)
    _axis_labels(axes[2], ann, layout, diff_img)
    unit = "pairs" if level == "token" else f"{img_a.block}×{img_a.block} tiles computed"
    axes[2].set_title(
        f"difference ({unit})\nonly {names[0]}: {counts['only_a']:,} · only {names[1]}: "
        f"{counts['only_b']:,} · both: {counts['both']:,}",
        fontsize=8, pad=6 + 14 * len(ann.bands),
    )
    # Two legends: the mask panels' states under them, the difference categories under
    # the difference panel, so no colour is read against the wrong key.
    fig.legend(handles=_legend_handles(img_a), loc="lower center", ncol=3, fontsize=8,
               frameon=False, bbox_to_anchor=(0.35, 0.0))
    fig.legend(handles=_difference_handles(names), loc="lower center", ncol=2, fontsize=8,
               frameon=False, bbox_to_anchor=(0.06 + 2 * 0.325 + 0.13, -0.01))
    if title:
        fig.suptitle(title, fontsize=10)
    if path is not None:
        save(fig, path)
    return fig


def difference(a: MaskImage, b: MaskImage) -> tuple[MaskImage, dict[str, int]]:
    """The difference image of two renders of one shape and its counts
    (``only_a``, ``only_b``, ``both``, ``neither``)."""
    ka, kb = a.kept, b.kept
    codes = ka.astype(np.uint8) + 2 * kb.astype(np.uint8)  # 0 neither, 1 a, 2 b, 3 both
    counts = {
        "neither": int((codes == 0).sum()),
        "only_a": int((codes == 1).sum()),
        "only_b": int((codes == 2).sum()),
        "both": int((codes == 3).sum()),
    }
    img = MaskImage(codes, ["neither", "only_a", "only_b", "both"], a.level, a.block,
                    a.q_range, a.kv_range, 0.0, None, "difference", a.head, codes > 0)
    return img, counts
