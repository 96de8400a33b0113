"""Colours, figure creation and saving shared by the plots.

Figures are built with the object-oriented API on an Agg canvas (no ``pyplot``), so
nothing ever opens a window and figures are freed when dropped. Jupyter still displays
a returned ``Figure``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import to_rgb
from matplotlib.figure import Figure

#: Colours of the heatmaps. ``empty`` / ``partial`` / ``full`` are tile states (block
#: level); at token level a kept pair is ``full`` and a dropped pair ``empty``.
#: ``only_a`` / ``only_b`` / ``both`` are the difference panel of ``compare``.
COLORS: dict[str, str] = {
    "empty": "#f2f2f2",
    "partial": "#f0a830",
    "full": "#23537d",
    "only_a": "#d62728",
    "only_b": "#2ca02c",
    "both": "#5b5b5b",
    "neither": "#f2f2f2",
    "text": "#9b59b6",
    "line": "#7f7f7f",
    "scene_line": "#c0392b",
}

#: Alternating band colours for frames / spans, and a palette for named spans.
BAND_GREYS = ("#d9d9d9", "#bdbdbd")
SPAN_PALETTE = ("#8dd3c7", "#fdb462", "#bebada", "#fb8072", "#80b1d3", "#b3de69", "#fccde5",
                "#ffffb3", "#bc80bd", "#ccebc5")

SAVE_FORMATS = ("png", "svg", "pdf")


def rgb(name: str) -> np.ndarray:
    """``COLORS[name]`` as a float RGB triple in [0, 1]."""
    return np.asarray(to_rgb(COLORS[name]), dtype=np.float32)


def palette_image(codes: np.ndarray, names: list[str]) -> np.ndarray:
    """RGB image ``[R, C, 3]`` (uint8: 3 bytes a cell) from integer ``codes`` ``[R, C]``
    where code ``i`` gets colour ``COLORS[names[i]]``. Built by indexing so that no
    colormap interpolation can mix categories."""
    table = np.round(np.stack([rgb(n) for n in names]) * 255).astype(np.uint8)
    return table[codes]


def new_figure(
    figsize: tuple[float, float], dpi: float = 100, layout: str | None = None
) -> Figure:
    """A Figure on an Agg canvas (headless); ``layout="constrained"`` makes room for
    titles, labels and colour bars whatever the size."""
    fig = Figure(figsize=figsize, dpi=dpi, layout=layout)
    FigureCanvasAgg(fig)
    return fig


def save(fig: Figure, path: str | Path) -> Path:
    """Save ``fig`` to ``path`` in the format given by its extension (png, svg, pdf), at the
    figure's own dpi and size (no tight bbox, so pixel positions are predictable)."""
    path = Path(path)
    ext = path.suffix.lower().lstrip(".")
    if ext not in SAVE_FORMATS:
        raise ValueError(
            f"path must end in one of {', '.join('.' + e for e in SAVE_FORMATS)}, got {str(path)!r}"
        )
    if path.parent and not path.parent.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format=ext, dpi=fig.dpi)
    return path
