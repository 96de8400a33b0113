"""Pattern library: radial, scenes, segments (issue 3).

Every fast path is checked against the materialised mask: tile states against
``states_from_dense(to_dense())``, BlockMasks against ``create_block_mask``, FlexAttention
against the float64 dense reference (atol 1e-10). The radial block map is checked tile for
tile against a literal re-implementation of the published algorithm.
"""

import itertools
import time

import networkx as nx
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.nn.attention.flex_attention import create_block_mask

import flexsparse as fs
from flexsparse import masks
from flexsparse import tiles as T

from .helpers import block_mask_tiles

ATOL = 1e-10  # float64 eager FlexAttention vs float64 SDPA


# -- literal reference of the published Radial Attention block map --------------------------
def ref_window_width(d, t, model, decay, block):
    if model in ("hunyuan", "wan") and d <= 1:
        return t
    if model == "cogvideox" and d == 0:
        return t
    if model == "cogvideox" and d == 1:
        return t // 2
    decay_length = 2 ** t.bit_length() / 2 ** d.bit_length() * decay
    return decay_length if decay_length >= block else block


def ref_split_mask(d, t):
    decay_length = 2 ** t.bit_length() / 2 ** d.bit_length()
    if decay_length >= 128:
        return torch.ones(t, t, dtype=torch.bool)
    if d % int(128 / decay_length) == 0:
        return torch.ones(t, t, dtype=torch.bool)
    return torch.zeros(t, t, dtype=torch.bool)


def ref_shrink(mask, block):
    """``shrinkMaskStrict``: float32 column densities, as in the original."""
    num = mask.shape[0] // block
    mask = mask[: num * block, : num * block].view(num, block, num, block)
    dens = mask.sum(dim=1) / block
    nonzero = dens > 0
    high = dens > 1 / 3
    frac = high.sum(dim=-1) / (nonzero.sum(dim=-1) + 1e-9)
    return frac > 0.6


def ref_radial_map(layout, decay, model, block):
    """Loop over frame pairs, materialise each T x T local mask, pad, shrink, OR."""
    t, frames = layout.tokens_per_frame, layout.frames
    nb = -(-layout.length // block)
    out = torch.zeros(nb, nb, dtype=torch.bool)
    idx = torch.arange(t)
    for i in range(frames):
        for j in range(frames):
            d = abs(i - j)
            if model == "wan" and j == 0:
                local = torch.ones(t, t, dtype=torch.bool)
            else:
                w = ref_window_width(d, t, model, decay, block)
                local = ((idx[None, :] - idx[:, None]).abs() <= w) & ref_split_mask(d, t)
            si, sj = layout.frame_start(i), layout.frame_start(j)
            ri, rj = si % block, sj % block
            size = ((t - 1) // block + 1) * block
            padded = torch.zeros(ri + size, rj + size, dtype=torch.bool)
            padded[ri : ri + t, rj : rj + t] = local
            shrunk = ref_shrink(padded, block)
            r0, c0 = si // block, sj // block
            view = out[r0 : r0 + shrunk.shape[0], c0 : c0 + shrunk.shape[1]]
            view |= shrunk[: view.shape[0], : view.shape[1]]
    if layout.text_position == "end":  # the original: final_log_mask[video_text_border:]
        border = layout.video_tokens // block
        out[border:] = True
        out[:, border:] = True
    elif layout.text_tokens:  # text first (not in the original): the blocks holding text
        hi = (layout.text_tokens - 1) // block
        out[: hi + 1] = True
        out[:, : hi + 1] = True
    return out


def ref_with_own_tokens(ref, layout, block):
    """The published map plus, for every video token ``i``, the tile of the pair (i, i)."""
    out = ref.clone()
    for i in range(layout.video_start, layout.video_start + layout.video_tokens):
        out[i // block, i // block] = True
    return out


RADIAL_CONFIGS = [
    # frames, tokens per frame, text tokens, text position
    (5, 100, 0, "end"),  # T < B, no text
    (7, 300, 50, "start"),  # T > B, unaligned frames
    (6, 200, 37, "end"),
    (9, 40, 10, "start"),  # many frames per tile
    (4, 513, 0, "end"),  # a frame just past 4 blocks
]


@pytest.mark.parametrize("config", RADIAL_CONFIGS)
@pytest.mark.parametrize("block", [64, 128])
def test_radial_block_map_equals_original(config, block):
    layout = fs.VideoLayout(*config)
    for model, decay in itertools.product(("cogvideox", "hunyuan", "wan"), (1.0, 0.3, 2.5)):
        mask = masks.radial(layout, decay, model, block, keep_diagonal=False)
        fast = mask.block_map(layout.length, layout.length, block_size=block)
        ref = ref_radial_map(layout, decay, model, block)
        assert torch.equal(fast, ref), (config, block, model, decay)
        kept = masks.radial(layout, decay, model, block).block_map(layout.length,
                                                                   layout.length, block)
        assert torch.equal(kept, ref_with_own_tokens(ref, layout, block))


@pytest.mark.parametrize("layout, model, decay, block", [
    (fs.VideoLayout(13, 1350, 226, "start"), "cogvideox", 1.0, 128),  # CogVideoX-2b, 49 frames
    (fs.VideoLayout(13, 1350, 226, "start"), "wan", 0.5, 64),
    (fs.VideoLayout(4, 3840, 256, "end"), "hunyuan", 0.95, 128),  # HunyuanVideo frames
    (fs.VideoLayout(3, 3840, 0, "end"), "wan", 0.2, 64),  # Wan 2.1 frames
])
def test_radial_block_map_realistic_frames_equal_original(layout, model, decay, block):
    fast = masks.radial(layout, decay, model, block, keep_diagonal=False).block_map(
        layout.length, layout.length, block)
    assert torch.equal(fast, ref_radial_map(layout, decay, model, block))


# -- hand-computed cases -------------------------------------------------------------------
def test_radial_three_frames_token_rule_by_hand():
    # T = 128: 2**bit_length(T) = 256. d = 2: g = 2, L0 = 64 < 128 -> split factor 2, and
    # 2 % 2 == 0 keeps the pair; w = max(64 * 0.5, 16) = 32. d = 1: L0 = 128, kept.
    layout = fs.VideoLayout(3, 128, text_tokens=2, text_position="start")
    for model, w1 in (("hunyuan", 128), ("cogvideox", 64), ("wan", 128)):
        mask = masks.radial(layout, 0.5, model, block_size=16, granularity="token")
        n = layout.length
        want = np.zeros((n, n), dtype=bool)
        for i in range(n):
            for j in range(n):
                if i < 2 or j < 2:
                    want[i, j] = True
                    continue
                fi, li = divmod(i - 2, 128)
                fj, lj = divmod(j - 2, 128)
                d = abs(fi - fj)
                width = {0: 128, 1: w1, 2: 32}[d]
                want[i, j] = abs(li - lj) <= width or (model == "wan" and fj == 0)
        assert torch.equal(mask.to_dense(), torch.from_numpy(want)), model


def test_radial_three_frames_block_map_by_hand():
    # T = 128, B = 32: frames are 4 aligned blocks. d <= 1: whole pair. d = 2: w = 32, so in
    # the local 4 x 4 grid a tile next to the diagonal has columns with 32..1 true rows,
    # 22 of 32 above 1/3 (> 0.6) -> kept; two tiles away nothing -> a tridiagonal pair map.
    layout = fs.VideoLayout(3, 128)
    got = masks.radial(layout, 0.25, "hunyuan", block_size=32).block_map(384, 384, 32)
    tri = torch.tensor([[abs(a - b) <= 1 for b in range(4)] for a in range(4)])
    ones = torch.ones(4, 4, dtype=torch.bool)
    want = torch.cat([
        torch.cat([ones, ones, tri], 1),
        torch.cat([ones, ones, ones], 1),
        torch.cat([tri, ones, ones], 1),
    ])
    assert torch.equal(got, want)


@pytest.mark.parametrize("block", [(1, 1), (5, 3), (16, 16), (40, 24)])
def test_radial_token_tiles_exact_at_band_edges(block):
    # Small and odd tiles put tile corners exactly on the band edge |i - j| = w.
    for layout in (fs.VideoLayout(3, 128, 2, "start"), fs.VideoLayout(4, 200, 7, "end")):
        for model in ("cogvideox", "hunyuan", "wan"):
            mask = masks.radial(layout, 0.5, model, block_size=16, granularity="token")
            n = layout.length
            for q_len in (n, 37):
                states = mask.tile_states(q_len, n, block)
                expected = T.states_from_dense(mask.to_dense(q_len, n), *block)
                assert torch.equal(states, expected), (layout, model, q_len)


def test_scenes_three_scene_graph_by_hand():
    # 6 frames of 2 tokens after 1 text token; scenes {0,1}, {2,3}, {4,5}; path 0 - 1 - 2.
    layout = fs.VideoLayout(6, 2, text_tokens=1, text_position="start")
    graph = nx.path_graph(3)
    scene = [None] + [0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2]
    for text in ("global", "none"):
        mask = masks.scenes(layout, [0, 2, 4], graph, text=text)
        want = np.zeros((13, 13), dtype=bool)
        for i in range(13):
            for j in range(13):
                if scene[i] is None or scene[j] is None:
                    want[i, j] = text == "global" or (scene[i] is None and scene[j] is None)
                else:
                    want[i, j] = abs(scene[i] - scene[j]) <= 1
        assert torch.equal(mask.to_dense(), torch.from_numpy(want)), text
    # Directed: 0 -> 2 only; scene 2 does not see scene 0.
    directed = nx.DiGraph([(0, 2)])
    directed.add_node(1)
    dense = masks.scenes(layout, [0, 2, 4], directed).to_dense()
    assert dense[1, 9] and not dense[9, 1] and not dense[1, 5] and dense[5, 5]


def test_segments_two_segments_by_hand():
    # prefix 2, segments of 2 and 3, suffix 1, then 1 generated token: ids
    # 0 0 1 1 2 2 2 3 3.
    seg = fs.SegmentLayout(prefix=2, segments=[2, 3], suffix=1)
    want = torch.tensor([
        [1, 0, 0, 0, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0, 0, 0, 0],
        [1, 1, 1, 1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 1, 0, 0, 0, 0],
        [1, 1, 0, 0, 1, 1, 0, 0, 0],
        [1, 1, 0, 0, 1, 1, 1, 0, 0],
        [1, 1, 1, 1, 1, 1, 1, 1, 0],
        [1, 1, 1, 1, 1, 1, 1, 1, 1],
    ], dtype=torch.bool)
    mask = masks.segments(seg)
    assert torch.equal(mask.to_dense(9, 9), want)
    assert torch.equal(mask.to_dense(2, 9), want[-2:])  # decode rows are the last rows
    # The tile between the two segments is empty at block 2 (positions 4-5 x 2-3).
    assert mask.tile_states(9, 9, 2)[2, 1] == T.EMPTY


# -- random layouts: every fast path against the dense mask --------------------------------
video_layouts = st.builds(
    fs.VideoLayout,
    frames=st.integers(1, 7),
    tokens_per_frame=st.integers(1, 40),
    text_tokens=st.integers(0, 20),
    text_position=st.sampled_from(["start", "end"]),
)

radial_layouts = st.builds(
    fs.VideoLayout,
    frames=st.integers(2, 5),
    tokens_per_frame=st.integers(100, 260),
    text_tokens=st.integers(0, 20),
    text_position=st.sampled_from(["start", "end"]),
)


@st.composite
def pattern_cases(draw):
    """(name, mask, kv_len, native) for a random pattern or composition; the tile rule is
    exact everywhere when ``native`` is None, else only on the ``native`` square grid
    without a decode offset."""
    kind = draw(st.sampled_from([
        "radial_token", "radial_block", "scenes", "segments", "radial&scenes",
        "radial_token&scenes", "segments&window", "~scenes",
    ]))
    if kind.startswith("radial"):
        # T >= 128 keeps distances >= 1 alive under the temporal split (bands matter).
        layout = draw(st.one_of(video_layouts, radial_layouts))
    else:
        layout = draw(video_layouts)
    model = draw(st.sampled_from(["cogvideox", "hunyuan", "wan"]))
    decay = draw(st.sampled_from([0.2, 1.0, 3.0]))
    rblock = draw(st.sampled_from([4, 8, 16]))

    def scene_mask():
        s = draw(st.integers(1, layout.frames))
        starts = [0] + sorted(draw(st.sets(st.integers(1, layout.frames - 1), min_size=s - 1,
                                           max_size=s - 1))) if layout.frames > 1 else [0]
        adj = draw(st.lists(st.lists(st.booleans(), min_size=len(starts),
                                     max_size=len(starts)),
                            min_size=len(starts), max_size=len(starts)))
        return masks.scenes(layout, starts, adj, text=draw(st.sampled_from(["global", "none"])))

    n = layout.length
    if kind == "radial_token":
        return kind, masks.radial(layout, decay, model, rblock, "token"), n, None
    if kind == "radial_block":
        return kind, masks.radial(layout, decay, model, rblock, "block"), n, None
    if kind == "scenes":
        return kind, scene_mask(), n, None
    if kind == "~scenes":
        return kind, ~scene_mask(), n, None
    if kind == "radial&scenes":
        # Block-granular & anything: exact only on the native grid (the core does not refine
        # tiles of a block-granular operand), conservative elsewhere.
        return kind, masks.radial(layout, decay, model, rblock) & scene_mask(), n, rblock
    if kind == "radial_token&scenes":
        return kind, masks.radial(layout, decay, model, rblock, "token") & scene_mask(), n, None
    seg = fs.SegmentLayout(
        prefix=draw(st.integers(0, 15)),
        segments=draw(st.lists(st.integers(1, 30), min_size=1, max_size=4)),
        suffix=draw(st.integers(0, 10)),
    )
    extra = draw(st.integers(0, 20))  # generated tokens past the layout
    if kind == "segments":
        return kind, masks.segments(seg), seg.length + extra, None
    window = draw(st.integers(1, 40))
    return kind, masks.segments(seg) & masks.sliding_window(window), seg.length + extra, None


@settings(max_examples=60, deadline=None)
@given(case=pattern_cases(), bq=st.sampled_from([4, 16, 32]), bk=st.sampled_from([8, 16]),
       q_frac=st.sampled_from([1.0, 0.3, 0.0]))
def test_tile_rules_are_exact(case, bq, bk, q_frac):
    name, mask, n, native = case
    q_len = max(1, int(n * q_frac))  # q_frac 0 -> a one-row decode step
    states = mask.tile_states(q_len, n, (bq, bk))
    expected = T.states_from_dense(mask.to_dense(q_len, n), bq, bk)
    if native is None or (bq == bk == native and q_len == n):
        assert torch.equal(states, expected), name
    else:  # never skip a kept pair, never skip mask_mod on a dropped one
        assert not ((states == T.EMPTY) & (expected != T.EMPTY)).any(), name
        assert not ((states == T.FULL) & (expected != T.FULL)).any(), name


@settings(max_examples=25, deadline=None)
@given(case=pattern_cases(), block=st.sampled_from([8, 16, 128]))
def test_block_mask_matches_create_block_mask(case, block):
    name, mask, n, native = case
    fast = mask.block_mask(n, n, block_size=block)
    slow = create_block_mask(mask.mask_mod, None, None, n, n, device="cpu", BLOCK_SIZE=block)
    kept_fast, full_fast = block_mask_tiles(fast)
    kept_slow, _ = block_mask_tiles(slow)
    truth = T.states_from_dense(mask.to_dense(n, n), block, block) == T.FULL
    if native is None or native == block:
        assert torch.equal(kept_fast, kept_slow), name
        assert torch.equal(full_fast[0, 0], truth), name
    else:
        assert not (kept_slow & ~kept_fast).any(), name
        assert not (full_fast[0, 0] & ~truth).any(), name


@settings(max_examples=20, deadline=None)
@given(case=pattern_cases(), block=st.sampled_from([16, 32]), decode=st.booleans())
def test_flex_equals_dense_reference(case, block, decode):
    name, mask, n, _ = case
    q_len = min(n, 3) if decode else n
    q = torch.randn(1, 2, q_len, 8, dtype=torch.float64)
    k = torch.randn(1, 2, n, 8, dtype=torch.float64)
    v = torch.randn(1, 2, n, 8, dtype=torch.float64)
    out = fs.attention(q, k, v, mask, backend="flex", block_size=block)
    ref = fs.reference(q, k, v, mask)
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=0, msg=name)
    assert not out.isnan().any()


def test_mask_mods_under_vmap():
    layout = fs.VideoLayout(4, 9, text_tokens=5, text_position="end")
    seg = fs.SegmentLayout(prefix=3, segments=[5, 4], suffix=2)
    cases = [
        (masks.radial(layout, 0.5, "wan", 8, "token"), layout.length),
        (masks.radial(layout, 0.5, "hunyuan", 8), layout.length),
        (masks.scenes(layout, [0, 2], [[1, 0], [1, 1]], text="none"), layout.length),
        (masks.segments(seg), seg.length + 6),
    ]
    zero = torch.tensor(0)
    for mask, n in cases:
        idx = torch.arange(n)
        rows = torch.vmap(torch.vmap(mask.mask_mod, in_dims=(None, None, None, 0)),
                          in_dims=(None, None, 0, None))(zero, zero, idx, idx)
        assert torch.equal(rows, mask.to_dense(n, n)), mask.name


def test_mask_mods_compile_without_graph_breaks():
    layout = fs.VideoLayout(3, 10, text_tokens=4)
    mask = (masks.radial(layout, 1.0, "wan", 8, "token")
            & masks.scenes(layout, [0, 1], [[1, 0], [0, 1]]))
    mod = mask.mask_mod
    compiled = torch.compile(
        lambda q, kv: mod(torch.tensor(0), torch.tensor(0), q[:, None], kv[None, :]),
        fullgraph=True, backend="eager",
    )
    idx = torch.arange(layout.length)
    assert torch.equal(compiled(idx, idx), mask.to_dense())


# -- parameters ----------------------------------------------------------------------------
def test_scenes_inputs_accepted_in_every_form():
    layout = fs.VideoLayout(9, 3, temporal_compression=4)
    adj = [[1, 0, 0], [1, 1, 0], [0, 1, 1]]
    ref = masks.scenes(layout, [0, 3, 6], adj).to_dense()
    for form in (np.array(adj, dtype=bool), torch.tensor(adj), torch.tensor(adj).bool()):
        assert torch.equal(masks.scenes(layout, [0, 3, 6], form).to_dense(), ref)
    # pixel frames 0, 9..12, 21..24 are latent frames 0, 3, 6
    assert torch.equal(masks.scenes(layout, [0, 9, 21], adj, frame_units="pixel").to_dense(), ref)
    assert torch.equal(masks.scenes(layout, [0, 12, 24], adj, frame_units="pixel").to_dense(), ref)
    # the diagonal is forced: an all-false adjacency is block-diagonal
    diag = masks.scenes(layout, [0, 3, 6], np.zeros((3, 3))).to_dense()
    scene = torch.arange(27) // 9
    assert torch.equal(diag, scene[:, None] == scene[None, :])


def test_bad_parameters_raise_clear_errors():
    layout = fs.VideoLayout(6, 4, text_tokens=2)
    with pytest.raises(ValueError, match="model must be one of"):
        masks.radial(layout, model="sora")
    for bad in (0, -1.0):
        with pytest.raises(ValueError, match="decay_factor must be > 0"):
            masks.radial(layout, decay_factor=bad)
    with pytest.raises(ValueError, match="granularity must be one of"):
        masks.radial(layout, granularity="tile")
    with pytest.raises(TypeError, match="layout must be a flexsparse.VideoLayout"):
        masks.radial(fs.SegmentLayout(2, [3]))
    with pytest.raises(ValueError, match="block_size must be >= 1"):
        masks.radial(layout, block_size=0)
    eye = np.eye(3)
    with pytest.raises(ValueError, match="adjacency must be 3 x 3"):
        masks.scenes(layout, [0, 2, 4], np.eye(2))
    with pytest.raises(ValueError, match="adjacency must be 3 x 3"):
        masks.scenes(layout, [0, 2, 4], [[1, 0, 0], [0, 1, 0]])
    with pytest.raises(ValueError, match="strictly increasing"):
        masks.scenes(layout, [0, 4, 2], eye)
    with pytest.raises(ValueError, match="start at frame 0"):
        masks.scenes(layout, [1, 2, 4], eye)
    with pytest.raises(ValueError, match="past the last latent frame 5"):
        masks.scenes(layout, [0, 2, 6], eye)
    with pytest.raises(ValueError, match="past the last pixel frame 20"):
        masks.scenes(layout, [0, 2, 21], eye, frame_units="pixel")
    with pytest.raises(ValueError, match="two scenes start in one latent frame"):
        masks.scenes(layout, [0, 5, 6], eye, frame_units="pixel")
    with pytest.raises(ValueError, match=r"nodes must be scene ids 0\.\.2"):
        masks.scenes(layout, [0, 2, 4], nx.path_graph(4))
    with pytest.raises(ValueError, match="text must be one of"):
        masks.scenes(layout, [0, 2, 4], eye, text="local")
    with pytest.raises(ValueError, match="frame_units must be one of"):
        masks.scenes(layout, [0, 2, 4], eye, frame_units="seconds")
    with pytest.raises(ValueError, match="adjacency row 'abc' is not a row of 0/1"):
        masks.scenes(layout, [0, 2, 4], "abc")
    with pytest.raises(TypeError, match="seg_layout must be a flexsparse.SegmentLayout"):
        masks.segments(layout)
    with pytest.raises(ValueError, match="built for sequences of 26 tokens"):
        masks.radial(layout).block_map(30, 30)


# -- realistic sizes -----------------------------------------------------------------------
@pytest.mark.parametrize("granularity", ["block", "token"])
def test_hunyuan_115k_maps_are_fast_and_bounded(granularity):
    layout = fs.VideoLayout.from_video(117, 768, 1280, "hunyuan")  # 30 x 3840 + 256 text
    assert layout.length == 115456
    start = time.perf_counter()
    mask = masks.radial(layout, 0.95, "hunyuan", granularity=granularity)
    states = mask.tile_states(layout.length, layout.length, 128)
    elapsed = time.perf_counter() - start
    assert elapsed < 20, elapsed
    assert states.shape == (902, 902)
    kept = (states != T.EMPTY).float().mean().item()
    assert 0.1 < kept < 0.5, kept
    # text rows (the last 256 tokens: from block 900 on) and text columns are kept
    assert (states[900:] != T.EMPTY).all() and (states[:, 900:] != T.EMPTY).all()


@pytest.mark.slow
def test_compiled_flex_on_cpu():
    layout = fs.VideoLayout(3, 100, text_tokens=20, text_position="end")
    mask = (masks.radial(layout, 0.5, "wan", 16, "token")
            & masks.scenes(layout, [0, 2], [[1, 0], [1, 1]]))
    q, k, v = (torch.randn(1, 2, layout.length, 16) for _ in range(3))
    out = fs.attention(q, k, v, mask, backend="flex", compile=True)
    ref = fs.reference(q, k, v, mask)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=0)
