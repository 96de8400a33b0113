"""Layouts: sizes from pixel dimensions, lookup tensors, per-tile summaries."""

import pytest
import torch

import flexsparse as fs


@pytest.mark.parametrize(
    "model,video,expected",
    [
        ("cogvideox", (49, 480, 720), (13, 1350, 226, "start", 17776)),
        ("cogvideox", (97, 480, 720), (25, 1350, 226, "start", 33976)),
        ("hunyuan", (117, 768, 1280), (30, 3840, 256, "end", 115456)),
        ("wan", (69, 768, 1280), (18, 3840, 0, "end", 69120)),
        # checked against diffusers' configs: VAE scale factors, patch_size(_t), text
        ("cogvideox", (8, 480, 720), (2, 1350, 226, "start", 2926)),  # pipelines floor
        ("cogvideox1.5", (81, 768, 1360), (11, 4080, 226, "start", 45106)),  # 21 -> 22 / 2
        ("cogvideox1.5", (85, 768, 1360), (11, 4080, 226, "start", 45106)),
        ("hunyuan_video", (117, 768, 1280), (30, 3840, 256, "end", 115456)),
        ("hunyuan_video", (129, 720, 1280), (33, 3600, 256, "end", 119056)),
        ("wan2.1", (81, 720, 1280), (21, 3600, 0, "end", 75600)),
        ("wan", (81, 480, 832), (21, 1560, 0, "end", 32760)),
        ("wan2.2-5b", (121, 704, 1280), (31, 880, 0, "end", 27280)),
    ],
)
def test_from_video(model, video, expected):
    lay = fs.VideoLayout.from_video(*video, model=model)
    got = (lay.frames, lay.tokens_per_frame, lay.text_tokens, lay.text_position, lay.length)
    assert got == expected


@pytest.mark.parametrize("position", ["start", "end"])
def test_lookups_and_tile_summaries(position):
    lay = fs.VideoLayout(frames=4, tokens_per_frame=7, text_tokens=5, text_position=position)
    lk = lay.lookups()
    n = lay.length
    assert n == 33 and lk["frame"].shape == (n,)
    assert int(lk["is_text"].sum()) == 5
    text_slice = slice(0, 5) if position == "start" else slice(28, 33)
    assert lk["is_text"][text_slice].all()
    video = ~lk["is_text"]
    assert torch.equal(lk["frame"][video], torch.arange(4).repeat_interleave(7))
    assert torch.equal(lk["local"][video], torch.arange(7).repeat(4))
    assert lay.frame_start(2) == (5 if position == "start" else 0) + 14
    # tile summaries equal brute force over every range
    lo = torch.arange(n)[:, None].expand(n, n)
    hi = torch.arange(n)[None, :].expand(n, n)
    ok = lo <= hi
    s = lay.tile_frames(lo[ok], hi[ok])
    for a, b, first, last, hv, ht in zip(
        lo[ok].tolist(), hi[ok].tolist(), s["first_frame"].tolist(), s["last_frame"].tolist(),
        s["has_video"].tolist(), s["has_text"].tolist(),
    ):
        frames = lk["frame"][a : b + 1]
        vids = frames[frames >= 0]
        assert hv == (vids.numel() > 0)
        assert ht == bool(lk["is_text"][a : b + 1].any())
        if hv:
            assert (first, last) == (int(vids.min()), int(vids.max()))
    summary = lay.block_summary(8)
    assert summary["has_video"].shape == (5,)


def test_latent_frame_of_pixel_frame():
    lay = fs.VideoLayout.from_video(49, 480, 720)
    assert [lay.latent_frame(p) for p in (0, 1, 4, 5, 48)] == [0, 1, 1, 2, 12]


def test_segment_layout():
    seg = fs.SegmentLayout(prefix=3, segments=[4, 2, 5], suffix=2)
    assert seg.length == 16 and seg.num_segments == 3 and seg.suffix_id == 4
    ids = seg.segment_ids(length=19)
    assert ids.tolist() == [0] * 3 + [1] * 4 + [2] * 2 + [3] * 5 + [4] * 5
    aligned = seg.position_ids("aligned", length=18)
    assert aligned.tolist() == [0, 1, 2, 3, 4, 5, 6, 3, 4, 3, 4, 5, 6, 7, 8, 9, 10, 11]
    assert seg.position_ids("continuous", length=18).tolist() == list(range(18))
    names = [s[0] for s in seg.spans(total=18)]
    assert names == ["prefix", "seg 1", "seg 2", "seg 3", "suffix", "generated"]
    no_prefix = fs.SegmentLayout(prefix=0, segments=[2, 2])
    assert no_prefix.segment_ids().tolist() == [1, 1, 2, 2]


def test_layout_errors():
    with pytest.raises(ValueError, match="frames must be >= 1"):
        fs.VideoLayout(frames=0, tokens_per_frame=4)
    with pytest.raises(ValueError, match="text_position must be one of"):
        fs.VideoLayout(frames=2, tokens_per_frame=4, text_position="middle")
    with pytest.raises(ValueError, match="model must be one of"):
        fs.VideoLayout.from_video(49, 480, 720, model="sora")
    with pytest.raises(ValueError, match="height must be a multiple of 16"):
        fs.VideoLayout.from_video(49, 481, 720)
    with pytest.raises(ValueError, match="width must be a multiple of 32 .*'wan2.2-5b'"):
        fs.VideoLayout.from_video(121, 704, 1296, "wan2.2-5b")
    for name in ("patch_size", "spatial_compression", "temporal_compression"):
        with pytest.raises(ValueError, match=f"{name} must be >= 1, got 0"):
            fs.VideoLayout.from_video(49, 480, 720, **{name: 0})
    with pytest.raises(ValueError, match="text_position must be one of"):
        fs.VideoLayout.from_video(49, 480, 720, text_position="")
    with pytest.raises(ValueError, match=r"segments\[1\] must be >= 1"):
        fs.SegmentLayout(prefix=1, segments=[3, 0])
    with pytest.raises(TypeError, match="segments must be a list"):
        fs.SegmentLayout(prefix=1, segments=3)
    with pytest.raises(ValueError, match="at least one segment"):
        fs.SegmentLayout(prefix=1, segments=[])
    with pytest.raises(ValueError, match="mode must be one of"):
        fs.SegmentLayout(prefix=1, segments=[2]).position_ids("relative")
