"""flexsparse.viz: rendered files, pixel colours at known positions, annotations, errors.

Pixel checks map a data position (key x, query y) through the axes transform to the saved
PNG (saved at the figure's own size and dpi, no tight bbox) and compare the RGB value with
``viz.COLORS`` (tolerance 0.02 per channel: PNG quantisation is 1/255).
"""

import matplotlib.image as mpimg
import numpy as np
import pytest
import torch
from matplotlib.colors import to_rgb

import flexsparse as fs
from flexsparse import masks, viz
from flexsparse.mask import DynamicMask, Mask

TOL = 0.02


def pixel(fig, ax, img, x, y):
    """RGB of the saved image at data position (x, y) of ``ax``."""
    px, py = ax.transData.transform((x, y))
    return img[int(img.shape[0] - py), int(px), :3]


def assert_colour(rgb, name):
    np.testing.assert_allclose(rgb, to_rgb(viz.COLORS[name]), atol=TOL, err_msg=name)


def test_block_level_tile_colours_and_size(tmp_path):
    # causal at 512 tokens, 128-token tiles: above the diagonal empty, on it partial,
    # below it full.
    path = tmp_path / "causal.png"
    fig = viz.plot_mask(masks.causal(), 512, level="block", block_size=128, path=path,
                        figsize=(4, 4), dpi=100)
    img = mpimg.imread(path)
    assert img.shape[:2] == (400, 400)
    ax = fig.axes[0]
    centre = lambda t: t * 128 + 64  # noqa: E731
    assert_colour(pixel(fig, ax, img, centre(0), centre(2)), "full")  # q tile 2, kv tile 0
    assert_colour(pixel(fig, ax, img, centre(1), centre(3)), "full")
    assert_colour(pixel(fig, ax, img, centre(2), centre(2)), "partial")
    assert_colour(pixel(fig, ax, img, centre(0), centre(0)), "partial")
    assert_colour(pixel(fig, ax, img, centre(3), centre(0)), "empty")
    assert_colour(pixel(fig, ax, img, centre(2), centre(1)), "empty")
    assert "density 0.501" in ax.get_title()  # (512 * 513 / 2) / 512**2 = 0.50098


def test_token_level_pixels(tmp_path):
    m = masks.sliding_window(16)  # |q - k| < 16, both sides
    path = tmp_path / "w.png"
    fig = viz.plot_mask(m, 64, level="token", path=path, figsize=(5, 5), dpi=100)
    img = mpimg.imread(path)
    ax = fig.axes[0]
    dense = m.to_dense(64)
    for q, k in [(40, 36), (40, 50), (10, 40), (60, 2), (5, 5), (30, 45), (30, 46)]:
        want = "full" if dense[q, k] else "empty"
        assert_colour(pixel(fig, ax, img, k + 0.5, q + 0.5), want)
    assert f"density {dense.float().mean().item():.3f}" in ax.get_title()


def test_decode_rows_are_the_last_rows(tmp_path):
    # 100 query rows of a 512-token causal mask: rows 412..511.
    path = tmp_path / "decode.png"
    fig = viz.plot_mask(masks.causal(), 100, 512, level="token", path=path)
    img = mpimg.imread(path)
    ax = fig.axes[0]
    assert ax.get_ylim() == (512, 412)
    assert_colour(pixel(fig, ax, img, 400.5, 450.5), "full")
    assert_colour(pixel(fig, ax, img, 480.5, 450.5), "empty")
    assert "last 100 query rows" in ax.get_title()


def test_head_dependent_mask_shows_the_chosen_head(tmp_path):
    kept = torch.zeros(2, 4, 4, dtype=torch.bool)
    kept[0, 0, 3] = True
    kept[1, 3, 0] = True
    m = Mask.from_tiles(kept, 32, name="per-head")
    for head, on, off in [(0, (3, 0), (0, 3)), (1, (0, 3), (3, 0))]:
        path = tmp_path / f"h{head}.png"
        fig = viz.plot_mask(m, 128, level="block", block_size=32, head=head, path=path)
        img = mpimg.imread(path)
        ax = fig.axes[0]
        assert_colour(pixel(fig, ax, img, on[0] * 32 + 16, on[1] * 32 + 16), "full")
        assert_colour(pixel(fig, ax, img, off[0] * 32 + 16, off[1] * 32 + 16), "empty")
        assert f"head {head}" in ax.get_title()
    with pytest.raises(ValueError, match="head must be < 2"):
        viz.plot_mask(m, 128, head=2)


def test_auto_level_large_mask_never_builds_dense(monkeypatch):
    def no_dense(self, *a, **k):
        raise AssertionError("to_dense called at block level")

    monkeypatch.setattr(Mask, "to_dense", no_dense)
    m = masks.causal() & masks.sliding_window(4096)
    img = viz.render(m, 115_456, level="auto")
    assert img.level == "block" and img.block == 128
    assert img.codes.shape == (902, 902)  # ceil(115456 / 128)
    assert img.tiles["total"] == 902 * 902
    # Beyond 131k tokens the tiles grow so that at most 1024 are drawn per side.
    assert viz.heatmap.auto_block_size(200_000) == 256
    fig = viz.plot_mask(m, 115_456)  # renders, no N^2 tensor
    assert "115,456 tokens" in fig.axes[0].get_title()


def test_auto_level_small_is_token():
    img = viz.render(masks.causal(), 256)
    assert img.level == "token" and img.codes.shape == (256, 256)
    assert img.kept.sum() == 256 * 257 // 2


def test_compare_difference_colours_and_counts(tmp_path):
    a = masks.sliding_window(16)  # both sides
    b = masks.causal() & masks.sliding_window(24)
    path = tmp_path / "cmp.png"
    fig = viz.compare(a, b, 64, path=path, names=("a", "b"), figsize=(12, 4.5))
    img = mpimg.imread(path)
    assert img.shape[:2] == (450, 1200)
    diff_ax = fig.axes[2]
    cases = {(10, 20): "only_a", (40, 20): "only_b", (40, 38): "both", (10, 60): "neither"}
    for (q, k), name in cases.items():
        assert_colour(pixel(fig, diff_ax, img, k + 0.5, q + 0.5), name)
    da, db = a.to_dense(64), b.to_dense(64)
    title = diff_ax.get_title()
    assert f"only a: {int((da & ~db).sum()):,}" in title
    assert f"only b: {int((db & ~da).sum()):,}" in title
    assert f"both: {int((da & db).sum()):,}" in title


def test_compare_block_level_and_dense_tensor_input():
    a = masks.causal()
    fig = viz.compare(a, masks.full(), 1024, level="block", block_size=256)
    title = fig.axes[2].get_title()
    assert "only full: 6 · both: 10" in title  # 4x4 tiles: causal computes 10 of 16
    dense = masks.causal().to_dense(32)
    fig = viz.compare(dense, masks.causal(), 32)
    assert "only matrix: 0 · only causal: 0" in fig.axes[2].get_title()
    with pytest.raises(ValueError, match="different shapes"):
        viz.compare(dense, masks.causal(), 48)


def test_video_layout_annotations():
    layout = fs.VideoLayout(frames=4, tokens_per_frame=32, text_tokens=16)
    m = masks.causal()
    fig = viz.plot_mask(m, layout=layout)  # length from the layout: 144
    ax = fig.axes[0]
    assert "144 tokens" in ax.get_title()
    assert [t.get_text() for t in ax.get_xticklabels()] == ["0", "1", "2", "3"]
    assert [t.get_position()[0] for t in ax.get_xticklabels()] == [32, 64, 96, 128]
    assert "text" in [t.get_text().strip() for t in ax.texts]
    # 3 frame boundaries + the text/video edge, on both axes.
    xs = sorted({line.get_xdata()[0] for line in ax.lines if line.get_xdata()[0] ==
                 line.get_xdata()[1]})
    assert xs == [16, 48, 80, 112]
    assert "latent frame" in ax.get_xlabel()


def test_scene_annotations(tmp_path):
    layout = fs.VideoLayout(frames=6, tokens_per_frame=16, text_tokens=8)
    fig = viz.plot_mask(masks.causal(), layout=layout, scenes=[0, 2, 5],
                        scene_names=["intro", "walk", "end"])
    labels = {t.get_text() for t in fig.axes[0].texts}
    assert {"intro", "walk", "end"} <= labels
    scene_lines = [ln.get_xdata()[0] for ln in fig.axes[0].lines
                   if ln.get_color() == viz.COLORS["scene_line"]
                   and ln.get_xdata()[0] == ln.get_xdata()[1]]  # vertical ones
    assert sorted(set(scene_lines)) == [8 + 2 * 16, 8 + 5 * 16]
    with pytest.raises(ValueError, match="past the last latent frame"):
        viz.plot_mask(masks.causal(), layout=layout, scenes=[0, 6])
    with pytest.raises(ValueError, match="increasing"):
        viz.plot_mask(masks.causal(), layout=layout, scenes=[0, 3, 2])


def test_segment_layout_annotations():
    seg = fs.SegmentLayout(prefix=12, segments=[20, 18, 22], suffix=6)
    fig = viz.plot_mask(masks.causal(), 90, layout=seg)
    labels = {t.get_text() for t in fig.axes[0].texts}
    assert {"prefix", "seg 1", "seg 2", "seg 3", "suffix", "generated"} <= labels
    fig = viz.plot_mask(masks.causal(), 78, layout=seg, labels={"seg 2": "doc B"})
    labels = {t.get_text() for t in fig.axes[0].texts}
    assert "doc B" in labels and "seg 2" not in labels


def test_save_formats_and_bad_extension(tmp_path):
    m = masks.causal()
    for ext in ("svg", "pdf", "png"):
        path = tmp_path / "sub" / f"m.{ext}"
        viz.plot_mask(m, 64, path=path)
        assert path.stat().st_size > 1000
    assert (tmp_path / "sub" / "m.svg").read_text().lstrip().startswith("<?xml")
    assert (tmp_path / "sub" / "m.pdf").read_bytes()[:4] == b"%PDF"
    with pytest.raises(ValueError, match=r"path must end in one of .png, .svg, .pdf.*m\.jpg"):
        viz.plot_mask(m, 64, path=tmp_path / "m.jpg")


def test_bad_arguments():
    with pytest.raises(ValueError, match="level must be one of"):
        viz.plot_mask(masks.causal(), 64, level="pixels")
    with pytest.raises(ValueError, match="has no length of its own"):
        viz.plot_mask(masks.causal())
    with pytest.raises(TypeError, match="mask must be a flexsparse.Mask"):
        viz.plot_mask("causal", 64)
    with pytest.raises(ValueError, match="bool"):
        viz.plot_mask(torch.zeros(4, 4), 4)
    with pytest.raises(TypeError, match="layout must be"):
        viz.plot_mask(masks.causal(), 64, layout="video")

    class Dyn(DynamicMask):
        def bind(self, q, k):
            return masks.causal()

    with pytest.raises(TypeError, match=r"DynamicMask .*mask.bind\(q, k\)"):
        viz.plot_mask(Dyn(), 64)


def test_existing_axes_is_used():
    from flexsparse.viz._style import new_figure

    fig = new_figure((8, 4))
    ax1, ax2 = fig.subplots(1, 2)
    out = viz.plot_mask(masks.causal(), 64, ax=ax2, legend=False)
    assert out is fig and len(fig.axes) == 2
    assert ax2.images and not ax1.images


def test_scene_graph_matrix_and_graph(tmp_path):
    adjacency = [[1, 1, 0], [1, 1, 1], [0, 1, 1]]
    path = tmp_path / "graph.png"
    fig = viz.plot_scene_graph(adjacency, path=path)
    img = mpimg.imread(path)
    assert img.shape[:2] == (560, 1100)
    graph_ax, mat_ax = fig.axes
    assert "3 scenes, 2 undirected edges" in graph_ax.get_title()
    assert_colour(pixel(fig, mat_ax, img, 2.5, 0.5), "empty")  # scene 0 -> scene 2
    assert_colour(pixel(fig, mat_ax, img, 1.5, 0.5), "full")
    assert_colour(pixel(fig, mat_ax, img, 0.5, 2.5), "empty")


def test_scene_graph_networkx_input_and_mask_panel():
    import networkx as nx

    g = nx.Graph()
    g.add_edges_from([("a", "b"), ("b", "c"), ("a", "c")])
    layout = fs.VideoLayout(frames=6, tokens_per_frame=16, text_tokens=8)
    fig = viz.plot_scene_graph(g, mask=masks.causal(), layout=layout, boundaries=[0, 2, 4])
    graph_ax, mask_ax = fig.axes
    assert "3 undirected edges" in graph_ax.get_title()
    assert "104 tokens" in mask_ax.get_title()
    assert {"a", "b", "c"} <= {t.get_text() for t in mask_ax.texts}
    with pytest.raises(ValueError, match="square 0/1 matrix"):
        viz.plot_scene_graph([[1, 0, 1], [1, 1]])
    with pytest.raises(ValueError, match="0 or 1"):
        viz.plot_scene_graph([[1, 2], [0, 1]])
    with pytest.raises(ValueError, match="boundaries has 1 scenes but adjacency is 2 x 2"):
        viz.plot_scene_graph([[1, 1], [1, 1]], boundaries=[0])
    digraph = viz.plot_scene_graph([[1, 1], [0, 1]])
    assert "1 directed edges" in digraph.axes[0].get_title()


def test_head_sparsity_inputs_and_colours(tmp_path):
    values = torch.tensor([[0.0, 1.0, 0.5], [1.0, 0.0, 0.25]])

    class Params:
        sparsity = values

    from matplotlib import colormaps

    for src in (values, values.numpy(), values.tolist(), {"sparsity": values}, Params()):
        path = tmp_path / "hs.png"
        fig = viz.plot_head_sparsity(src, path=path, annotate=False)
        img = mpimg.imread(path)
        ax = fig.axes[0]
        cmap = colormaps["viridis"]
        np.testing.assert_allclose(pixel(fig, ax, img, 0, 0), cmap(0.0)[:3], atol=TOL)
        np.testing.assert_allclose(pixel(fig, ax, img, 1, 0), cmap(1.0)[:3], atol=TOL)
        np.testing.assert_allclose(pixel(fig, ax, img, 2, 1), cmap(0.25)[:3], atol=TOL)
        assert "2 x 3" in ax.get_title()
    fig = viz.plot_head_sparsity({"simthreshd1": [[0.3, 0.9]]}, key="simthreshd1")
    assert [t.get_text() for t in fig.axes[0].texts] == ["0.30", "0.90"]
    with pytest.raises(ValueError, match=r"shape \[layers, heads\]"):
        viz.plot_head_sparsity(torch.rand(4))
    with pytest.raises(ValueError, match="no 'sparsity' entry"):
        viz.plot_head_sparsity({"density": torch.rand(2, 2)})
    with pytest.raises(TypeError, match=r"\.sparsity attribute"):
        viz.plot_head_sparsity(object())


def _text_boxes(fig, ax):
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    return [(t.get_text(), t.get_window_extent(renderer)) for t in ax.texts if t.get_text()]


def test_segment_labels_of_a_real_packed_prompt_never_overlap():
    from flexsparse.ensemble import PromptPacker
    from flexsparse.models import tiny

    paras = ["What is the capital city of France, the country in western Europe?",
             "Name the French capital.", "Which city is France's capital?", "Capital?",
             "In which city does the French government sit, and what is its name?"]
    packed = PromptPacker(tiny.build_tokenizer()).pack(paras, "Answer in a few words.", "A:")
    n = packed.layout.length
    labels = {name: f"{name}: {text}" for name, text in packed.pieces}
    fig = viz.plot_mask(masks.segments(packed.layout), n, n, layout=packed.layout,
                        labels=labels)
    boxes = _text_boxes(fig, fig.axes[0])
    top = sorted((b for _, b in boxes if b.width > b.height), key=lambda b: b.x0)
    left = sorted((b for _, b in boxes if b.height > b.width), key=lambda b: b.y0)
    assert len(top) >= 5 and len(left) >= 5
    for row, lo, hi in ((top, "x0", "x1"), (left, "y0", "y1")):
        for a, b in zip(row, row[1:]):
            assert getattr(a, hi) <= getattr(b, lo) + 0.5, "labels overlap"
    texts = [t for t, _ in boxes]
    assert any(t.endswith("…") for t in texts)  # long labels are cut, not dropped
    assert viz.annotate.fit_label("seg 4: Capital?", ("seg 4", "4"), 5.0) == "4"
    assert viz.annotate.fit_label("seg 4: Capital?", ("seg 4", "4"), 1.0) == ""


def test_compare_labels_axes_and_has_a_difference_legend():
    fig = viz.compare(masks.causal(), masks.sliding_window(8), 32, names=("a", "b"))
    assert [ax.get_xlabel() for ax in fig.axes] == ["key position"] * 3
    assert [ax.get_ylabel() for ax in fig.axes] == ["query position"] * 3
    entries = {t.get_text(): h.get_facecolor()[:3] for leg in fig.legends
               for t, h in zip(leg.get_texts(), leg.legend_handles)}
    np.testing.assert_allclose(entries["both"], to_rgb(viz.COLORS["both"]))
    np.testing.assert_allclose(entries["kept"], to_rgb(viz.COLORS["full"]))
    assert not np.allclose(to_rgb(viz.COLORS["both"]), to_rgb(viz.COLORS["full"]))


def test_head_map_marks_unknown_values_and_fits_small_grids(tmp_path):
    from flexsparse.viz.sparsity import UNKNOWN_COLOR

    path = tmp_path / "small.png"
    values = [[0.25, float("nan")]]
    fig = viz.plot_head_sparsity({"sparsity": values}, path=path, annotate=False)
    img = mpimg.imread(path)
    ax = fig.axes[0]
    assert_rgb = np.testing.assert_allclose
    assert_rgb(pixel(fig, ax, img, 1, 0), to_rgb(UNKNOWN_COLOR), atol=TOL)
    assert ax.get_legend().get_texts()[0].get_text() == "unknown (not recorded): 1 heads"
    renderer = fig.canvas.get_renderer()
    canvas = fig.bbox
    for artist in (ax.title, ax.xaxis.label, ax.yaxis.label, ax.get_legend()):
        box = artist.get_window_extent(renderer)
        assert canvas.x0 <= box.x0 and box.x1 <= canvas.x1, artist
        assert canvas.y0 <= box.y0 and box.y1 <= canvas.y1, artist
