"""Radial ``keep_diagonal``: no video query token is left blind to its own frame."""

import pytest
import torch

import flexsparse as fs
from flexsparse import masks
from flexsparse.masks.radial import blind_tokens


def blind_by_dense(mask, layout):
    """Video query tokens that see no key of their own frame, from the dense matrix."""
    dense = mask.to_dense(layout.length, layout.length)
    frame = layout.lookups()["frame"]
    same = (frame[:, None] == frame[None, :]) & (frame[:, None] >= 0)
    return int(((frame >= 0) & ~(dense & same).any(1)).sum())


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
        assert blind_by_dense(published, layout) == blind_tokens(
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
    assert blind_tokens(published, layout, block) > 0
    assert blind_tokens(kept, layout, block) == 0
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
