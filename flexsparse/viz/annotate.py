"""Layout-aware annotations of a mask heatmap: what the positions on the axes *are*.

``annotations_for`` turns a layout (``VideoLayout``, ``SegmentLayout``) and optional scene
boundaries into an ``Annotations`` record (coloured bands along the top and left edges,
boundary lines across the heatmap, shaded regions, tick labels); ``draw`` puts it on an
axes whose data coordinates are token positions (x: key, y: query, y pointing down).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from matplotlib.font_manager import FontProperties
from matplotlib.patches import Rectangle
from matplotlib.textpath import TextToPath
from matplotlib.transforms import blended_transform_factory

from .._checks import check_int
from ..layout import SegmentLayout, VideoLayout
from ._style import BAND_GREYS, COLORS, SPAN_PALETTE

#: Font size of band labels (points).
LABEL_FONTSIZE = 6
#: A label is shortened to fit its span; below this many characters it is left out.
MIN_LABEL_CHARS = 3
#: Labels written outside the heatmap (narrow first / last spans) are cut to this length.
OUTSIDE_LABEL_CHARS = 10
#: At most this many frame numbers on an axis.
MAX_TICKS = 16
BAND_HEIGHT = 0.035  # axes fraction per band row
_TEXT_TO_PATH = TextToPath()


@dataclass
class Span:
    """A named token range ``[start, end)`` drawn as a band."""

    label: str
    start: int
    end: int
    color: str
    #: shorter names, longest first, used when ``label`` does not fit (``("seg 2", "2")``
    #: for ``"seg 2: What is ..."``)
    short: tuple[str, ...] = ()


@dataclass
class Annotations:
    """What to draw over / around a heatmap (all positions in tokens).

    Attributes:
        bands: rows of spans drawn outside the top and left edges, first row nearest.
        lines: ``(position, colour, linewidth)`` boundary lines across the heatmap.
        shade: ``(start, end, colour)`` token ranges shaded lightly (rows and columns).
        ticks: ``(position, label)`` replacing the numeric ticks, or None.
        axis_name: what the ticks count ("latent frame", "token").
    """

    bands: list[list[Span]] = field(default_factory=list)
    lines: list[tuple[float, str, float]] = field(default_factory=list)
    shade: list[tuple[int, int, str]] = field(default_factory=list)
    ticks: list[tuple[float, str]] | None = None
    axis_name: str = "token"


def annotations_for(
    layout: VideoLayout | SegmentLayout | None,
    *,
    total: int | None = None,
    scenes: Sequence[int] | None = None,
    scene_names: Sequence[str] | None = None,
    labels: Mapping[str, str] | Sequence[str] | None = None,
) -> Annotations:
    """Annotations of ``layout``.

    Args:
        layout: a ``VideoLayout`` (text shaded, frame lines, frame numbers), a
            ``SegmentLayout`` (prefix / seg 1..k / suffix / generated bands) or None.
        total: sequence length shown (tokens past a ``SegmentLayout`` are "generated").
        scenes: first latent frame of every scene (``VideoLayout`` only), e.g. ``[0, 5, 9]``.
        scene_names: one name per scene (default ``scene 0``, ``scene 1``, ...).
        labels: text for ``SegmentLayout`` spans, by span name (``{"seg 1": "doc A"}``) or
            in order.
    """
    if layout is None:
        if scenes is not None:
            raise ValueError("scenes needs a VideoLayout (layout=...) to place the boundaries")
        return Annotations()
    if isinstance(layout, VideoLayout):
        ann = _video(layout)
        if scenes is not None:
            _add_scenes(ann, layout, scenes, scene_names)
        return ann
    if isinstance(layout, SegmentLayout):
        if scenes is not None:
            raise ValueError("scenes is only meaningful with a VideoLayout, got a SegmentLayout")
        return _segments(layout, total, labels)
    raise TypeError(
        f"layout must be a VideoLayout, a SegmentLayout or None, got {type(layout).__name__}"
    )


def _video(layout: VideoLayout) -> Annotations:
    ann = Annotations(axis_name="latent frame")
    row: list[Span] = []
    if layout.text_tokens:
        ts = layout.text_start
        row.append(Span("text", ts, ts + layout.text_tokens, COLORS["text"]))
        ann.shade.append((ts, ts + layout.text_tokens, COLORS["text"]))
        # The text / video boundary matters more than a frame boundary: draw it stronger.
        edge = layout.video_start if layout.text_position == "start" else layout.text_start
        ann.lines.append((edge, "#4d4d4d", 0.9))
    for f in range(layout.frames):
        start = layout.frame_start(f)
        row.append(Span("", start, start + layout.tokens_per_frame, BAND_GREYS[f % 2]))
        if f:
            ann.lines.append((start, COLORS["line"], 0.4))
    ann.bands.append(row)
    step = max(1, math.ceil(layout.frames / MAX_TICKS))
    ann.ticks = [
        (layout.frame_start(f) + layout.tokens_per_frame / 2, str(f))
        for f in range(0, layout.frames, step)
    ]
    return ann


def _add_scenes(ann: Annotations, layout: VideoLayout, scenes, names) -> None:
    bounds = [check_int(f"scenes[{i}]", b, minimum=0) for i, b in enumerate(scenes)]
    if not bounds or bounds[0] != 0 or any(b >= c for b, c in zip(bounds, bounds[1:])):
        raise ValueError(f"scenes must be increasing latent frames starting at 0, got {bounds}")
    if bounds[-1] >= layout.frames:
        raise ValueError(
            f"scenes boundary {bounds[-1]} is past the last latent frame ({layout.frames - 1})"
        )
    if names is not None and len(names) != len(bounds):
        raise ValueError(f"scene_names needs {len(bounds)} names, got {len(names)}")
    ends = bounds[1:] + [layout.frames]
    row = []
    for i, (b, e) in enumerate(zip(bounds, ends)):
        name = names[i] if names is not None else f"scene {i}"
        row.append(Span(str(name), layout.frame_start(b), layout.frame_start(e),
                        SPAN_PALETTE[i % len(SPAN_PALETTE)]))
        if b:
            ann.lines.append((layout.frame_start(b), COLORS["scene_line"], 1.2))
    ann.bands.append(row)


def _segments(layout: SegmentLayout, total, labels) -> Annotations:
    ann = Annotations(axis_name="token")
    spans = layout.spans(total=total)
    if isinstance(labels, Mapping):
        text = {name: labels.get(name, name) for name, _, _ in spans}
    elif labels is not None:
        labels = list(labels)
        if len(labels) > len(spans):
            raise ValueError(
                f"labels has {len(labels)} entries but the layout {len(spans)} spans"
            )
        text = {n: labels[i] if i < len(labels) else n for i, (n, _, _) in enumerate(spans)}
    else:
        text = {name: name for name, _, _ in spans}
    row = []
    for i, (name, start, end) in enumerate(spans):
        if name.startswith("seg "):
            color = SPAN_PALETTE[(int(name[4:]) - 1) % len(SPAN_PALETTE)]
        elif name == "generated":
            color = COLORS["text"]
        else:
            color = BAND_GREYS[1]
        short = (name, name[4:]) if name.startswith("seg ") else (name, name[:1].upper())
        row.append(Span(str(text[name]), start, end, color, short))
        if i:
            ann.lines.append((start, "#4d4d4d", 0.8))
    ann.bands.append(row)
    return ann


def draw(ax, ann: Annotations, q_range: tuple[int, int], kv_range: tuple[int, int]) -> None:
    """Draw ``ann`` on ``ax`` (data coordinates: x = key position, y = query position).

    ``q_range`` / ``kv_range`` are the shown ``[start, end)`` positions; annotations outside
    them are clipped away.
    """
    for start, end, color in ann.shade:
        ax.axvspan(start, end, color=color, alpha=0.10, lw=0, zorder=2)
        lo, hi = max(start, q_range[0]), min(end, q_range[1])
        if lo < hi:
            ax.axhspan(lo, hi, color=color, alpha=0.10, lw=0, zorder=2)
    for pos, color, lw in ann.lines:
        if kv_range[0] < pos < kv_range[1]:
            ax.axvline(pos, color=color, lw=lw, alpha=0.7, zorder=3)
        if q_range[0] < pos < q_range[1]:
            ax.axhline(pos, color=color, lw=lw, alpha=0.7, zorder=3)
    top = blended_transform_factory(ax.transData, ax.transAxes)
    left = blended_transform_factory(ax.transAxes, ax.transData)
    width_pt, height_pt = _axes_size_pt(ax)
    for r, row in enumerate(ann.bands):
        y0 = 1.0 + 0.005 + r * BAND_HEIGHT
        x0 = -0.005 - (r + 1) * BAND_HEIGHT
        for span in row:
            _band(ax, top, span, kv_range, y0, width_pt, horizontal=True)
            _band(ax, left, span, q_range, x0, height_pt, horizontal=False)
    if ann.ticks is not None:
        kv_ticks = [(p, s) for p, s in ann.ticks if kv_range[0] <= p < kv_range[1]]
        q_ticks = [(p, s) for p, s in ann.ticks if q_range[0] <= p < q_range[1]]
        ax.set_xticks([p for p, _ in kv_ticks], [s for _, s in kv_ticks], fontsize=7)
        ax.set_yticks([p for p, _ in q_ticks], [s for _, s in q_ticks], fontsize=7)
        ax.tick_params(length=2)
    if ann.bands:
        # Keep numeric ticks off the left edge, where the bands are.
        ax.tick_params(axis="y", pad=2 + 11 * len(ann.bands))
    ax.set_xlabel(f"key ({ann.axis_name})", fontsize=8)
    ax.set_ylabel(f"query ({ann.axis_name})", fontsize=8)


def _axes_size_pt(ax) -> tuple[float, float]:
    """Width and height of ``ax`` in points (what a label has to fit in)."""
    box = ax.get_position()
    w, h = ax.figure.get_size_inches()
    return box.width * w * 72, box.height * h * 72


def text_width_pt(text: str, fontsize: float = LABEL_FONTSIZE) -> float:
    """Width of ``text`` in points in matplotlib's default font (no drawing needed)."""
    width, _, _ = _TEXT_TO_PATH.get_text_width_height_descent(
        text, FontProperties(size=fontsize), ismath=False)
    return width


def fit_label(label: str, short: Sequence[str], room_pt: float,
              fontsize: float = LABEL_FONTSIZE) -> str:
    """``label`` made to fit ``room_pt`` points: whole; cut with an ellipsis when the cut
    keeps more than the first short name; else the longest short name that fits; else
    empty. Labels of neighbouring spans then never overlap, however narrow the spans of
    a real packed prompt are."""
    def fits(text):
        return text_width_pt(text, fontsize) <= room_pt

    if fits(label):
        return label
    keep = max(MIN_LABEL_CHARS, len(short[0]) + 4 if short else 0)
    cut = next((label[:n].rstrip() + "…" for n in range(len(label) - 1, keep - 1, -1)
                if fits(label[:n].rstrip() + "…")), "")
    if cut:
        return cut
    return next((s for s in short if s and fits(s)), "")


def _band(ax, transform, span: Span, shown: tuple[int, int], offset: float,
          axis_pt: float, horizontal: bool):
    lo, hi = max(span.start, shown[0]), min(span.end, shown[1])
    if lo >= hi:
        return
    if horizontal:
        rect = Rectangle((lo, offset), hi - lo, BAND_HEIGHT * 0.9, transform=transform)
    else:
        rect = Rectangle((offset, lo), BAND_HEIGHT * 0.9, hi - lo, transform=transform)
    rect.set(facecolor=span.color, edgecolor="white", linewidth=0.3, clip_on=False)
    ax.add_patch(rect)
    if not span.label:
        return
    middle = offset + BAND_HEIGHT * 0.45
    room = (hi - lo) / (shown[1] - shown[0]) * axis_pt - 2  # a point of margin each side
    label = " ".join(span.label.split())  # a prompt's newlines would break the band
    text = fit_label(label, span.short, room)
    kw = dict(transform=transform, va="center", fontsize=LABEL_FONTSIZE, clip_on=False)
    if text:
        mid = (lo + hi) / 2
        xy = (mid, middle) if horizontal else (middle, mid)
        ax.text(*xy, text, ha="center", rotation=0 if horizontal else 90, **kw)
        return
    # Too narrow for any label (e.g. 226 text tokens of 17,776): at the first or last
    # position, write it outside the heatmap, in the empty corner beside the band.
    outside = label if len(label) <= OUTSIDE_LABEL_CHARS else (
        label[: OUTSIDE_LABEL_CHARS - 1] + "…")
    if horizontal and lo == shown[0]:
        ax.text(lo, middle, outside + " ", ha="right", **kw)
    elif horizontal and hi == shown[1]:
        ax.text(hi, middle, " " + outside, ha="left", **kw)
