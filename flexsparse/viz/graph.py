"""The scene graph of a multi-scene video, next to the mask it induces."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import networkx as nx
import numpy as np
from matplotlib.figure import Figure

from ..layout import VideoLayout
from ..mask import Mask
from ..masks.scenes import parse_adjacency
from ._style import SPAN_PALETTE, new_figure, palette_image, save
from .heatmap import plot_mask


def adjacency_matrix(adjacency) -> tuple[np.ndarray, list[str]]:
    """``(bool [S, S], node names)`` from anything ``masks.scenes.parse_adjacency`` takes
    (nested lists / array / tensor of 0/1, the text forms, a file) or a networkx graph,
    whose nodes may have any names (in insertion order; the diagonal is set)."""
    if isinstance(adjacency, nx.Graph):
        nodes = list(adjacency.nodes)
        if not nodes:
            raise ValueError("adjacency graph has no nodes")
        numbered = nx.relabel_nodes(adjacency, {n: i for i, n in enumerate(nodes)})
        mat = parse_adjacency(numbered, num_scenes=len(nodes)).numpy()
        np.fill_diagonal(mat, True)
        return mat, [str(n) for n in nodes]
    mat = parse_adjacency(adjacency).numpy()
    return mat, [f"scene {i}" for i in range(mat.shape[0])]


def plot_scene_graph(
    adjacency,
    mask: Mask | None = None,
    layout: VideoLayout | None = None,
    *,
    boundaries: Sequence[int] | None = None,
    names: Sequence[str] | None = None,
    path: str | Path | None = None,
    title: str | None = None,
    figsize: tuple[float, float] = (11.0, 5.6),
    dpi: float = 100,
) -> Figure:
    """Scene adjacency drawn as a graph (left) and the mask it induces (right).

    Args:
        adjacency: ``[S, S]`` 0/1 (nested lists, array, tensor; ``adjacency[i][j] = 1``
            lets scene ``i`` attend to scene ``j``) or a networkx graph.
        mask: the induced mask to show on the right (e.g. ``masks.scenes(...)``). Without
            it, ``masks.scenes(layout, boundaries, adjacency)`` is built when ``layout`` and
            ``boundaries`` are given, else the scene-level ``S x S`` matrix is shown.
        layout: the ``VideoLayout`` of the mask (annotations).
        boundaries: first latent frame of each scene.
        names: scene names (default: ``scene 0``.. or the graph's node names).
        path: save to .png / .svg / .pdf.

    Returns:
        The ``Figure`` (two axes: graph, mask).
    """
    mat, default_names = adjacency_matrix(adjacency)
    n = mat.shape[0]
    names = [str(x) for x in names] if names is not None else default_names
    if len(names) != n:
        raise ValueError(f"names needs {n} entries (one per scene), got {len(names)}")
    if boundaries is not None and len(boundaries) != n:
        raise ValueError(
            f"boundaries has {len(boundaries)} scenes but adjacency is {n} x {n}"
        )
    fig = new_figure(figsize, dpi)
    ax_graph = fig.add_axes([0.03, 0.12, 0.40, 0.70])
    ax_mask = fig.add_axes([0.55, 0.12, 0.40, 0.62])
    _draw_graph(ax_graph, mat, names)
    if mask is None and layout is not None and boundaries is not None:
        from .. import masks

        if hasattr(masks, "scenes"):
            mask = masks.scenes(layout, boundaries=list(boundaries), adjacency=mat.tolist())
    if mask is not None:
        plot_mask(mask, layout=layout, ax=ax_mask, scenes=boundaries, scene_names=names,
                  legend=True)
    else:
        _scene_matrix(ax_mask, mat, names)
    if title:
        fig.suptitle(title, fontsize=10)
    if path is not None:
        save(fig, path)
    return fig


def _draw_graph(ax, mat: np.ndarray, names: list[str]) -> None:
    n = mat.shape[0]
    directed = not np.array_equal(mat, mat.T)
    graph = nx.DiGraph() if directed else nx.Graph()
    graph.add_nodes_from(range(n))
    graph.add_edges_from((i, j) for i in range(n) for j in range(n) if mat[i, j] and i != j)
    # Scenes are in temporal order: put them on a line, and arc the edges that jump.
    pos = {i: (float(i), 0.0) for i in range(n)}
    near = [(i, j) for i, j in graph.edges if abs(i - j) == 1]
    far = [(i, j) for i, j in graph.edges if abs(i - j) > 1]
    colors = [SPAN_PALETTE[i % len(SPAN_PALETTE)] for i in range(n)]
    nx.draw_networkx_nodes(graph, pos, ax=ax, node_color=colors, node_size=1300,
                           edgecolors="#4d4d4d")
    nx.draw_networkx_labels(graph, pos, ax=ax, labels={i: names[i] for i in range(n)},
                            font_size=6)
    style = "-|>" if directed else "-"
    nx.draw_networkx_edges(graph, pos, ax=ax, edgelist=near, width=1.6, arrows=True,
                           arrowstyle=style, node_size=1300, edge_color="#4d4d4d")
    nx.draw_networkx_edges(graph, pos, ax=ax, edgelist=far, width=1.2, arrows=True,
                           arrowstyle=style, node_size=1300, edge_color="#c0392b",
                           connectionstyle="arc3,rad=-0.45")
    ax.set_xlim(-0.7, n - 0.3)
    ax.set_ylim(-0.6, 0.25 * max(n - 1, 1) + 0.6)
    ax.set_axis_off()
    kind = "directed" if directed else "undirected"
    ax.set_title(f"scene graph: {n} scenes, {len(graph.edges)} {kind} edges", fontsize=9)


def _scene_matrix(ax, mat: np.ndarray, names: list[str]) -> None:
    n = mat.shape[0]
    ax.imshow(palette_image(mat.astype(np.int64), ["empty", "full"]),
              interpolation="nearest", extent=(0, n, n, 0))
    ax.set_xticks([i + 0.5 for i in range(n)], names, fontsize=7, rotation=45)
    ax.set_yticks([i + 0.5 for i in range(n)], names, fontsize=7)
    ax.set_title("scene-level mask (query scene x key scene)", fontsize=9)
