"""Radial ``keep_diagonal``: no video query token is left blind to its own frame."""

import pytest
import torch

import flexsparse as fs
from flexsparse import masks


def blind_by_dense(mask, layout):
    """Video query tokens that see no key of their own frame, from the dense matrix."""
    dense = mask.to_dense(layout.length, layout.length)
    frame = layout.lookups()["frame"]
    same = (frame[:, None] == frame[None, :]) & (frame[:, None] >= 0)
    return int(((frame >= 0) & ~(dense & same).any(1)).sum())


def blind_by_tiles(kept, layout, block):
    """The same count from a block-granular map without N^2 work: token ``i`` of frame
    ``f`` in block row ``r`` sees its frame iff a kept tile of row ``r`` overlaps the key
    blocks of frame ``f`` (prefix sums along the row)."""
    t, vs = layout.tokens_per_frame, layout.video_start
    sums = torch.nn.functional.pad(kept.to(torch.int64).cumsum(1), (1, 0))
    blind = 0
    for f in range(layout.frames):
        lo, hi = vs + f * t, vs + (f + 1) * t - 1
        for row in range(lo // block, hi // block + 1):
            if sums[row, hi // block + 1] == sums[row, lo // block]:
                blind += min(hi, row * block + block - 1) - max(lo, row * block) + 1
    return blind


SMALL = [  # frames, tokens per frame, text, text position, block: the published map has holes
    (3, 27, 0, "start", 32),
    (3, 27, 0, "end", 32),
    (3, 20, 13, "start", 32),
    (3, 20, 5, "start", 16),
]


@pytest.mark.parametrize("config", SMALL)
def test_small_layouts_every_token_sees_itself(config):
    *shape, block = config
    layout = fs.VideoLayout(*shape)
    for model in ("cogvideox", "hunyuan", "wan"):
        published = masks.radial(layout, 1.0, model, block, keep_diagonal=False)
        kept = masks.radial(layout, 1.0, model, block)
        n = layout.length
        # the counter on tiles agrees with the dense matrix
        assert blind_by_dense(published, layout) == blind_by_tiles(
            published.block_map(n, n, block), layout, block) > 0
        assert blind_by_dense(kept, layout) == 0
        dense = kept.to_dense(n, n)
        video = ~layout.lookups()["is_text"]
        assert dense.diagonal()[video].all()
        # keep_diagonal only adds tiles
        old, new = published.block_map(n, n, block), kept.block_map(n, n, block)
        assert (new >= old).all()
        # the token rule has no hole to fill
        assert blind_by_dense(masks.radial(layout, 1.0, model, block, "token"), layout) == 0


@pytest.mark.parametrize("layout", [
    fs.VideoLayout(25, 1350, 226, "start"),  # CogVideoX 97 x 480 x 720
    fs.VideoLayout(11, 4080, 226, "start"),  # CogVideoX 1.5 81 x 768 x 1360
    fs.VideoLayout(11, 4080, 226, "end"),  # the same in the original's text-last order
], ids=["cogvideox-97f", "cogvideox1.5-text-first", "cogvideox1.5-text-last"])
def test_real_layouts_every_video_token_sees_its_frame(layout):
    n, block = layout.length, 128
    published = masks.radial(layout, keep_diagonal=False).block_map(n, n, block)
    kept = masks.radial(layout).block_map(n, n, block)
    assert blind_by_tiles(published, layout, block) > 0
    assert blind_by_tiles(kept, layout, block) == 0
    assert (kept >= published).all()
    added = kept & ~published
    assert torch.equal(added, torch.diag(added.diagonal()))


def test_keep_diagonal_must_be_bool():
    layout = fs.VideoLayout(3, 27)
    for bad in ("no", 1, None):
        with pytest.raises(TypeError, match="keep_diagonal must be True or False"):
            masks.radial(layout, keep_diagonal=bad)


def test_published_name_differs():
    layout = fs.VideoLayout(3, 27)
    names = {masks.radial(layout, keep_diagonal=k).name for k in (True, False)}
    assert len(names) == 2 and all(name.startswith("radial(") for name in names)
