"""Wan 2.1 / 2.2 (diffusers): radial and scene-aware self-attention, on the shared video base.

``patch(pipe_or_transformer, ...)`` installs ``FlexSparseWanProcessor`` on the
self-attention (``attn1``) of every block of a ``WanTransformer3DModel``: Wan 2.1 and 2.2,
T2V and I2V (``WanPipeline``, ``WanImageToVideoPipeline``). A pipeline with two
transformers (Wan 2.2 A14B: ``transformer`` for the high-noise steps, ``transformer_2``
for the low-noise ones) gets both patched, counting denoising steps together. The
processor repeats the stock ``WanAttnProcessor`` arithmetic for self-attention and
computes it with ``flexsparse.attention`` through ``SparseProcessor.attend``.

>>> from flexsparse.models import wan
>>> handle = wan.patch(pipe, num_frames=81, height=720, width=1280, decay_factor=0.2,
...                    dense_timesteps=12)                                  # doctest: +SKIP
>>> video = pipe(prompt, num_frames=81, height=720, width=1280).frames[0]  # doctest: +SKIP
>>> wan.unpatch(pipe)                                                       # doctest: +SKIP

What is Wan's own (everything else is ``flexsparse.models._video``):

- token order: video only in self-attention (``attn1``, no text: the layout has
  ``text_tokens=0``); text (and the CLIP image tokens of 2.1 I2V) reach the video through
  cross-attention (``attn2``), which is not patched;
- layout: patch size ``(t, h, w)`` from the config; VAE factors from the pipeline
  (``vae_scale_factor_temporal`` / ``_spatial``), else 4 and 8, or 16 spatial for the
  Wan 2.2 VAE (48 latent channels, TI2V 5B); ``num_frames`` rounded like the pipelines
  (to ``num_frames // 4 * 4 + 1``: 80 -> 81), then ``(num_frames - 1) // 4 + 1`` latent
  frames;
- the step count reads the largest timestep of a call: Wan 2.2 TI2V passes one timestep
  per token, 0 on the conditioning frame;
- the token grid of a call: ``hidden_states`` is ``(B, C, F, H, W)`` latents.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from types import SimpleNamespace

import torch
from torch import Tensor

from .._checks import check_int
from ._patch import ATTR, PatchHandle
from ._video import (
    PATTERNS,
    SparseProcessor,
    TraceEntry,
    VideoAdapter,
    output_projection,
    project_qkv,
    split_heads,
    split_pipeline,
    video_state,
)
from ._video import reset_steps as _reset_steps

#: Latent channels of the Wan 2.2 VAE (16x spatial compression; TI2V 5B).
WAN22_LATENT_CHANNELS = 48


def _rope(x: Tensor, freqs_cos: Tensor, freqs_sin: Tensor) -> Tensor:
    """Wan's RoPE on ``x`` ``[B, N, H, D]`` (pairs of channels), as the stock processor."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = freqs_cos[..., 0::2], freqs_sin[..., 1::2]
    return torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).flatten(-2).type_as(x)


class FlexSparseWanProcessor(SparseProcessor):
    """``WanAttnProcessor`` with self-attention computed by ``flexsparse``.

    Cross-attention (``encoder_hidden_states`` given), an explicit ``attention_mask`` or a
    module with image projections goes to the stock processor.
    """

    def __call__(
        self,
        attn,
        hidden_states: Tensor,
        encoder_hidden_states: Tensor | None = None,
        attention_mask: Tensor | None = None,
        rotary_emb: tuple[Tensor, Tensor] | None = None,
    ) -> Tensor:
        if (encoder_hidden_states is not None or attention_mask is not None
                or getattr(attn, "add_k_proj", None) is not None):
            return self.stock(attn, hidden_states, encoder_hidden_states, attention_mask,
                              rotary_emb)
        self.check_tokens(0, hidden_states.shape[1])
        q, k, v = project_qkv(attn, hidden_states)
        q, k = attn.norm_q(q), attn.norm_k(k)  # Wan's norms span all heads: before the split
        q, k, v = split_heads(attn, q, k, v)
        if rotary_emb is not None:
            q, k = _rope(q, *rotary_emb), _rope(k, *rotary_emb)
        return output_projection(attn, self.attend_tokens(q, k, v))


def pipeline_frames(num_frames: int, temporal: int) -> int:
    """``num_frames`` as the Wan pipelines round it when ``num_frames - 1`` is not a multiple
    of ``temporal``: ``num_frames // temporal * temporal + 1`` (80 -> 81, 78 -> 77 at 4)."""
    num_frames = check_int("num_frames", num_frames, minimum=1)
    if num_frames % temporal != 1:
        num_frames = num_frames // temporal * temporal + 1
    return max(num_frames, 1)


def transformers_of(pipe_or_transformer) -> list:
    """The Wan transformers of a pipeline (``transformer``, then ``transformer_2`` when
    present) or ``[transformer]``."""
    transformer, pipe = split_pipeline(pipe_or_transformer)
    if pipe is None:
        second = getattr(pipe_or_transformer, "transformer_2", None)
        if isinstance(second, torch.nn.Module) and getattr(
                pipe_or_transformer, "transformer", None) is None:
            return [second]  # a pipeline holding only its low-noise transformer
        return [transformer]
    second = getattr(pipe, "transformer_2", None)
    return [transformer] + ([second] if isinstance(second, torch.nn.Module) else [])


class WanAdapter(VideoAdapter):
    """Wan 2.1 / 2.2: ``attn1`` of every block, video tokens only."""

    kind = "wan"
    transformer_classes = ("WanTransformer3DModel",)
    radial_model = "wan"
    text_position = None
    processor = FlexSparseWanProcessor
    default_pixels = (81, 480, 832)  # WanPipeline.__call__'s defaults

    def attention_modules(self, transformer) -> list:
        blocks = getattr(transformer, "blocks", None)
        if blocks is None:
            raise TypeError(f"{type(transformer).__name__} has no blocks: not a Wan transformer")
        return [block.attn1 for block in blocks]

    def patch_sizes(self, transformer) -> tuple[int, int, int]:
        return tuple(transformer.config.patch_size)

    def default_vae(self, transformer) -> tuple[int, int]:
        config = getattr(transformer, "config", None)
        channels = getattr(config, "in_channels", None), getattr(config, "out_channels", None)
        return 4, 16 if WAN22_LATENT_CHANNELS in channels else 8

    def pixel_frames(self, num_frames: int, temporal: int) -> int:
        return pipeline_frames(num_frames, temporal)

    def patch(self, pipe_or_transformer, mask=None, **kwargs) -> PatchHandle:
        """``VideoAdapter.patch`` with every option, on each Wan transformer of a pipeline
        (``transformer`` and ``transformer_2``; they share one step counter, so
        ``dense_timesteps`` counts the steps of the whole generation).

        Returns:
            The handle of the first transformer patched (``pipe.transformer``); the second
            one's is ``pipe.transformer_2._flexsparse_patch``.
        """
        first, *rest = transformers_of(pipe_or_transformer)
        for transformer in (first, *rest):
            self.transformer_of(transformer)
        _, pipe = split_pipeline(pipe_or_transformer)
        target = pipe_or_transformer if pipe is not None and first is pipe.transformer else first
        handle = VideoAdapter.patch(self, target, mask, **kwargs)
        steps = handle.state.steps
        for other in rest:
            # the pipeline's VAE factors without its progress bar: the first transformer's
            # patch resets the shared counter once per generation
            view = SimpleNamespace(
                transformer=other,
                vae_scale_factor_temporal=getattr(pipe, "vae_scale_factor_temporal", None),
                vae_scale_factor_spatial=getattr(pipe, "vae_scale_factor_spatial", None))
            VideoAdapter.patch(self, view, mask, **kwargs).state.steps = steps
        return handle

    def unpatch(self, pipe_or_transformer) -> None:
        """Restore the stock processors of every Wan transformer (no-op if unpatched)."""
        for transformer in transformers_of(pipe_or_transformer):
            target = pipe_or_transformer if transformer is getattr(
                pipe_or_transformer, "transformer", None) else transformer
            VideoAdapter.unpatch(self, target)


ADAPTER = WanAdapter()
patch, unpatch, layout_for = ADAPTER.patch, ADAPTER.unpatch, ADAPTER.layout_for


def _patched(pipe_or_transformer) -> list:
    return [t for t in transformers_of(pipe_or_transformer) if getattr(t, ATTR, None) is not None]


@contextlib.contextmanager
def recording(pipe_or_transformer) -> Iterator[list[TraceEntry]]:
    """Record ``(step, layer_idx, "dense" | "sparse")`` for every patched attention call
    inside the block, of both transformers of a Wan 2.2 A14B pipeline (one list)."""
    states = [video_state(t) for t in _patched(pipe_or_transformer)] or [
        video_state(pipe_or_transformer)]
    trace: list[TraceEntry] = []
    for state in states:
        state.trace = trace
    try:
        yield trace
    finally:
        for state in states:
            state.trace = None


def reset_steps(pipe_or_transformer) -> None:
    """Start counting denoising steps from 0 again (shared by both transformers)."""
    targets = _patched(pipe_or_transformer) or [pipe_or_transformer]
    for transformer in targets:
        _reset_steps(transformer)


__all__ = [
    "ADAPTER",
    "FlexSparseWanProcessor",
    "PATTERNS",
    "WanAdapter",
    "layout_for",
    "patch",
    "pipeline_frames",
    "recording",
    "reset_steps",
    "transformers_of",
    "unpatch",
]
