"""Layouts: what each token of a sequence is (text, which frame, which segment).

A layout turns a sequence description into *lookup tensors* (one entry per token) that
``mask_mod`` functions index, and into per-tile summaries that block rules use to
classify tiles without touching every element.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ._checks import check_choice, check_int

#: Compression and patching of the video models we know, checked against diffusers'
#: configs: the VAE's ``scale_factor_temporal`` / ``scale_factor_spatial``, the
#: transformer's ``patch_size`` (spatial) and ``patch_size_t`` (temporal), the text tokens
#: that share self-attention with the video (CogVideoX: 226 T5 tokens first; HunyuanVideo:
#: 256 LLaMA tokens after the video; Wan: text only in cross-attention) and the radial
#: rule variant. Latent frames = (F - 1) // temporal + 1 (the pipelines' rule), padded to
#: a multiple of ``patch_t`` (CogVideoX 1.5); tokens per frame = (H / s / p) * (W / s / p).
_COGVIDEOX = dict(temporal=4, spatial=8, patch=2, patch_t=1, text_tokens=226,
                  text_position="start", radial="cogvideox")
_HUNYUAN = dict(temporal=4, spatial=8, patch=2, patch_t=1, text_tokens=256,
                text_position="end", radial="hunyuan")
_WAN21 = dict(temporal=4, spatial=8, patch=2, patch_t=1, text_tokens=0, text_position="end",
              radial="wan")
MODEL_PRESETS: dict[str, dict] = {
    "cogvideox": _COGVIDEOX,  # CogVideoX-2b / 5b: 49 x 480 x 720 -> 13 x 1350 + 226
    "cogvideox1.5": dict(_COGVIDEOX, patch_t=2),  # 81 x 768 x 1360 -> 11 x 4080 + 226
    "hunyuan": _HUNYUAN,  # 117 x 768 x 1280 -> 30 x 3840 + 256 = 115,456
    "hunyuan_video": _HUNYUAN,
    "wan": _WAN21,  # Wan 2.1 (and 2.2 A14B): 81 x 720 x 1280 -> 21 x 3600 = 75,600
    "wan2.1": _WAN21,
    "wan2.2-5b": dict(_WAN21, spatial=16),  # 16x VAE: 121 x 704 x 1280 -> 31 x 880
}


@dataclass(frozen=True)
class VideoLayout:
    """Text tokens and ``frames`` latent frames of ``tokens_per_frame`` tokens each.

    ``text_position="start"`` puts the text first (CogVideoX), ``"end"`` puts it after the
    video (HunyuanVideo). Token ``t`` of the sequence is text, or token
    ``local = (t - video_start) % tokens_per_frame`` of frame ``(t - video_start) //
    tokens_per_frame``.

    >>> VideoLayout.from_video(49, 480, 720).length
    17776
    """

    frames: int
    tokens_per_frame: int
    text_tokens: int = 0
    text_position: str = "start"
    temporal_compression: int = field(default=4, compare=False)

    def __post_init__(self):
        check_int("frames", self.frames, minimum=1)
        check_int("tokens_per_frame", self.tokens_per_frame, minimum=1)
        check_int("text_tokens", self.text_tokens, minimum=0)
        check_choice("text_position", self.text_position, ("start", "end"))
        check_int("temporal_compression", self.temporal_compression, minimum=1)

    @classmethod
    def from_video(
        cls,
        num_frames: int,
        height: int,
        width: int,
        model: str = "cogvideox",
        *,
        text_tokens: int | None = None,
        text_position: str | None = None,
        temporal_compression: int | None = None,
        spatial_compression: int | None = None,
        patch_size: int | None = None,
    ) -> VideoLayout:
        """Latent layout of a ``num_frames x height x width`` pixel video for ``model``.

        ``model`` is a key of ``MODEL_PRESETS``: ``"cogvideox"`` (2b / 5b),
        ``"cogvideox1.5"``, ``"hunyuan"`` / ``"hunyuan_video"``, ``"wan"`` / ``"wan2.1"``,
        ``"wan2.2-5b"``. Latent frames follow the pipelines' rule ``(num_frames - 1) //
        temporal + 1`` (so 8 frames are accepted like 9), padded to a multiple of the
        temporal patch (CogVideoX 1.5, where a layout frame is ``patch_t`` latent frames).

        CogVideoX: 49 x 480 x 720 -> 13 latent frames x 1350 tokens + 226 text tokens.
        CogVideoX 1.5: 81 x 768 x 1360 -> 11 x 4080 + 226 = 45,106.
        HunyuanVideo: 117 x 768 x 1280 -> 30 x 3840 + 256 text (at the end) = 115,456.
        Wan 2.1: 81 x 720 x 1280 -> 21 x 3600 = 75,600, no text in self-attention.
        Wan 2.2 5B: 121 x 704 x 1280 -> 31 x 880 = 27,280 (16x spatial VAE).
        """
        check_choice("model", model, MODEL_PRESETS)
        p = dict(MODEL_PRESETS[model])

        def given(name, value, default):
            # None means "the preset's"; 0 is a value, and a wrong one
            return check_int(name, default if value is None else value, minimum=1)

        t = given("temporal_compression", temporal_compression, p["temporal"])
        s = given("spatial_compression", spatial_compression, p["spatial"])
        ps = given("patch_size", patch_size, p["patch"])
        pt = p["patch_t"]
        num_frames = check_int("num_frames", num_frames, minimum=1)
        height = check_int("height", height, minimum=1)
        width = check_int("width", width, minimum=1)
        for name, size in (("height", height), ("width", width)):
            if size % (s * ps):
                raise ValueError(
                    f"{name} must be a multiple of {s * ps} (VAE {s} x patch {ps}) for "
                    f"{model!r}, got {size}"
                )
        latent = (num_frames - 1) // t + 1
        return cls(
            frames=-(-latent // pt),
            tokens_per_frame=(height // s // ps) * (width // s // ps),
            text_tokens=p["text_tokens"] if text_tokens is None else text_tokens,
            text_position=p["text_position"] if text_position is None else text_position,
            # a layout frame spans patch_t latent frames (pixel boundaries are approximate
            # there: CogVideoX 1.5 pads its first latent frame)
            temporal_compression=t * pt,
        )

    # -- sizes -------------------------------------------------------------------------
    @property
    def video_tokens(self) -> int:
        return self.frames * self.tokens_per_frame

    @property
    def length(self) -> int:
        """Total tokens: text + video."""
        return self.text_tokens + self.video_tokens

    @property
    def video_start(self) -> int:
        return self.text_tokens if self.text_position == "start" else 0

    @property
    def text_start(self) -> int:
        return 0 if self.text_position == "start" else self.video_tokens

    def frame_start(self, frame: int) -> int:
        """Sequence position of the first token of latent frame ``frame``."""
        return self.video_start + frame * self.tokens_per_frame

    def latent_frame(self, pixel_frame: int) -> int:
        """Latent frame holding pixel frame ``pixel_frame`` (causal VAE: frame 0 alone,
        then ``temporal_compression`` pixel frames per latent frame)."""
        check_int("pixel_frame", pixel_frame, minimum=0)
        return -(-pixel_frame // self.temporal_compression)

    # -- lookup tensors -----------------------------------------------------------------
    def lookups(self, device="cpu") -> dict[str, Tensor]:
        """Per-token lookup tensors of length ``length``:

        - ``frame``: long, latent frame of the token, -1 for text;
        - ``local``: long, index of the token inside its frame, -1 for text;
        - ``is_text``: bool.
        """
        return _video_lookups(self, torch.device(device))

    def tile_frames(self, lo: Tensor, hi: Tensor) -> dict[str, Tensor]:
        """Summaries of the token ranges ``[lo, hi]`` (inclusive; any broadcastable shape).

        Returns ``first_frame`` / ``last_frame`` (of the video tokens in the range; only
        meaningful where ``has_video``), ``has_video``, ``has_text`` and ``all_text``.
        """
        vs, ve, T = self.video_start, self.video_start + self.video_tokens, self.tokens_per_frame
        vlo = torch.clamp(lo, min=vs)
        vhi = torch.clamp(hi, max=ve - 1)
        has_video = vlo <= vhi
        ts, te = self.text_start, self.text_start + self.text_tokens
        has_text = (torch.clamp(hi, max=te - 1) >= torch.clamp(lo, min=ts)) & (te > ts)
        return dict(
            first_frame=torch.div(vlo - vs, T, rounding_mode="floor"),
            last_frame=torch.div(vhi - vs, T, rounding_mode="floor"),
            has_video=has_video,
            has_text=has_text,
            all_text=~has_video,
        )

    def block_summary(self, block_size: int, device="cpu") -> dict[str, Tensor]:
        """Per-block summaries for blocks of ``block_size`` tokens (``[ceil(N / B)]`` each):
        first/last frame of the block's video tokens, whether it holds video / text."""
        lo = torch.arange(0, self.length, block_size, device=device)
        hi = torch.clamp(lo + block_size - 1, max=self.length - 1)
        return self.tile_frames(lo, hi)


@functools.lru_cache(maxsize=32)
def _video_lookups(layout: VideoLayout, device: torch.device) -> dict[str, Tensor]:
    pos = torch.arange(layout.length, device=device)
    rel = pos - layout.video_start
    is_video = (rel >= 0) & (rel < layout.video_tokens)
    frame = torch.where(
        is_video, torch.div(rel, layout.tokens_per_frame, rounding_mode="floor"), -1
    )
    local = torch.where(is_video, rel % layout.tokens_per_frame, -1)
    return {"frame": frame, "local": local, "is_text": ~is_video}


@dataclass(frozen=True)
class SegmentLayout:
    """A shared ``prefix``, ``k`` isolated ``segments``, a shared ``suffix``, then
    generated tokens.

    Segment ids: 0 = prefix, 1..k = the segments, k + 1 = suffix and everything after
    the layout (generated tokens), so decode steps need no new layout.

    >>> seg = SegmentLayout(prefix=2, segments=[3, 2], suffix=1)
    >>> seg.segment_ids().tolist()
    [0, 0, 1, 1, 1, 2, 2, 3]
    >>> seg.position_ids("aligned").tolist()
    [0, 1, 2, 3, 4, 2, 3, 5]
    """

    prefix: int
    segments: tuple[int, ...]
    suffix: int = 0

    def __post_init__(self):
        check_int("prefix", self.prefix, minimum=0)
        check_int("suffix", self.suffix, minimum=0)
        if isinstance(self.segments, (int, str)) or not hasattr(self.segments, "__iter__"):
            raise TypeError(f"segments must be a list of lengths, got {self.segments!r}")
        segs = tuple(check_int(f"segments[{i}]", s, minimum=1) for i, s in enumerate(self.segments))
        if not segs:
            raise ValueError("segments must hold at least one segment length, got []")
        object.__setattr__(self, "segments", segs)

    @property
    def num_segments(self) -> int:
        return len(self.segments)

    @property
    def suffix_id(self) -> int:
        return len(self.segments) + 1

    @property
    def length(self) -> int:
        return self.prefix + sum(self.segments) + self.suffix

    @property
    def bounds(self) -> list[int]:
        """Start position of every id 0..k+1, plus the layout's end: ``[k + 3]``."""
        starts = [0, self.prefix]
        for s in self.segments:
            starts.append(starts[-1] + s)
        return starts + [self.length]

    def spans(self, total: int | None = None) -> list[tuple[str, int, int]]:
        """``(name, start, end)`` of every non-empty piece; ``total`` adds generated tokens."""
        b = self.bounds
        names = ["prefix"] + [f"seg {i + 1}" for i in range(self.num_segments)] + ["suffix"]
        out = [(n, b[i], b[i + 1]) for i, n in enumerate(names) if b[i + 1] > b[i]]
        if total is not None and total > self.length:
            out.append(("generated", self.length, total))
        return out

    def segment_ids(self, length: int | None = None, device="cpu") -> Tensor:
        """Long ``[length]`` (default: the layout's length) segment id of every token."""
        n = self.length if length is None else check_int("length", length)
        pos = torch.arange(n, device=device)
        starts = torch.tensor(self.bounds[1:-1], device=device)
        return torch.bucketize(pos, starts, right=True)

    def position_ids(self, mode: str = "continuous", length: int | None = None, device="cpu"):
        """Long ``[length]`` RoPE positions.

        ``"continuous"``: 0..N-1. ``"aligned"``: every segment starts at ``prefix`` as if it
        were alone (parallel context windows); the suffix and generated tokens continue
        from ``prefix + max(segments)``.
        """
        check_choice("mode", mode, ("continuous", "aligned"))
        n = self.length if length is None else check_int("length", length)
        if mode == "continuous":
            return torch.arange(n, device=device)
        pieces = [torch.arange(self.prefix)]
        pieces += [torch.arange(self.prefix, self.prefix + s) for s in self.segments]
        after = self.prefix + max(self.segments)
        pieces.append(torch.arange(after, after + self.suffix + max(n - self.length, 0)))
        return torch.cat(pieces)[:n].to(device)
