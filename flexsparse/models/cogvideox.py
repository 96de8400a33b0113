"""CogVideoX (diffusers): radial and scene-aware self-attention, on the shared video base.

``patch(pipe_or_transformer, ...)`` installs ``FlexSparseCogVideoXProcessor`` on the
self-attention (``attn1``) of every block of a ``CogVideoXTransformer3DModel`` (CogVideoX
1.0 and 1.5). The processor repeats the stock ``CogVideoXAttnProcessor2_0`` arithmetic
(text tokens first, video after; ``norm_q`` / ``norm_k``; RoPE on the video part only;
fused or separate q/k/v projections) and computes the attention with
``flexsparse.attention`` through ``SparseProcessor.attend``.

>>> from flexsparse.models import cogvideox
>>> handle = cogvideox.patch(pipe, pattern="radial", num_frames=49, height=480, width=720,
...                          dense_layers=2, dense_timesteps=5)          # doctest: +SKIP
>>> video = pipe(prompt, num_frames=49, height=480, width=720).frames[0]  # doctest: +SKIP
>>> cogvideox.unpatch(pipe)                                               # doctest: +SKIP

What is CogVideoX's own (everything else is ``flexsparse.models._video``):

- token order: ``[text, video]`` in every block's ``attn1``;
- layout: patch size and text length (``max_text_seq_length``) from the transformer
  config, VAE factors from the pipeline (``vae_scale_factor_temporal`` /
  ``_spatial``) or the config's ``temporal_compression_ratio`` and 8; latent frames
  ``(num_frames - 1) // 4 + 1`` as the pipeline computes them (8 or 24 frames are valid),
  padded to a multiple of ``patch_size_t`` for CogVideoX 1.5, where one layout frame is
  ``patch_size_t`` latent frames;
- the token grid of a call: ``hidden_states`` is ``(B, F, C, H, W)`` latents.

How the denoising step is learnt (``dense_timesteps``): ``_video.StepCounter`` reads the
transformer's ``timestep`` input; a patched pipeline's ``progress_bar`` (opened once per
generation) resets it; ``reset_steps(obj)`` resets it by hand.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .._checks import check_int
from ..layout import VideoLayout
from ._video import (
    PATTERNS,
    SparseProcessor,
    VideoAdapter,
    config_value,
    output_projection,
    qkv_heads,
    recording,
    reset_steps,
)
from ._video import build_mask as _build_mask


class FlexSparseCogVideoXProcessor(SparseProcessor):
    """``CogVideoXAttnProcessor2_0`` with the attention computed by ``flexsparse``.

    An ``attention_mask`` (which CogVideoX blocks never pass) goes to the stock processor.
    """

    def __call__(
        self,
        attn,
        hidden_states: Tensor,
        encoder_hidden_states: Tensor,
        attention_mask: Tensor | None = None,
        image_rotary_emb=None,
    ) -> tuple[Tensor, Tensor]:
        if attention_mask is not None and self.stock is not None:
            return self.stock(attn, hidden_states, encoder_hidden_states, attention_mask,
                              image_rotary_emb)
        text_len = encoder_hidden_states.size(1)
        hidden_states = torch.cat([encoder_hidden_states, hidden_states], dim=1)
        seq_len = hidden_states.shape[1]
        self.check_tokens(text_len, seq_len)

        q, k, v = qkv_heads(attn, hidden_states)  # [B, N, H, D]
        if image_rotary_emb is not None:
            # RoPE on the video tokens only (a cross-attention module keeps k as it is)
            q = _rope_video(q, image_rotary_emb, text_len)
            if not attn.is_cross_attention:
                k = _rope_video(k, image_rotary_emb, text_len)
        out = output_projection(attn, self.attend_tokens(q, k, v))
        encoder_out, video_out = out.split([text_len, seq_len - text_len], dim=1)
        return video_out, encoder_out


def _rope_video(x: Tensor, rope, text_len: int) -> Tensor:
    """RoPE on the tokens after the first ``text_len`` of ``x`` ``[B, N, H, D]``; cat
    instead of the stock in-place write."""
    from diffusers.models.embeddings import apply_rotary_emb

    return torch.cat([x[:, :text_len], apply_rotary_emb(x[:, text_len:], rope,
                                                        sequence_dim=1)], dim=1)


class CogVideoXAdapter(VideoAdapter):
    """CogVideoX 1.0 / 1.5: ``attn1`` of every block, text first; latents ``(B, F, C, H,
    W)``; text length ``max_text_seq_length`` from the config."""

    kind = "cogvideox"
    transformer_classes = ("CogVideoXTransformer3DModel",)
    radial_model = "cogvideox"
    text_position = "start"
    processor = FlexSparseCogVideoXProcessor
    latent_dims = "BFCHW"

    def attention_modules(self, transformer) -> list:
        blocks = getattr(transformer, "transformer_blocks", None)
        if blocks is None:
            raise TypeError(f"{type(transformer).__name__} has no transformer_blocks: "
                            "not a CogVideoX transformer")
        return [block.attn1 for block in blocks]

    def default_vae(self, transformer) -> tuple[int, int]:
        return config_value(transformer, "temporal_compression_ratio", 4), 8

    def layout_text_tokens(self, transformer) -> int:
        return check_int("max_text_seq_length",
                         config_value(transformer, "max_text_seq_length", 226))

    def default_video(self, transformer, pipe) -> tuple[int, int, int]:
        """The pipeline's defaults: ``sample_frames`` and ``sample_height / _width`` x the
        VAE's spatial factor (CogVideoX-2b: 49 x 480 x 720)."""
        _, spatial = self.vae_factors(transformer, pipe)
        return (config_value(transformer, "sample_frames", 49),
                config_value(transformer, "sample_height", 60) * spatial,
                config_value(transformer, "sample_width", 90) * spatial)


ADAPTER = CogVideoXAdapter()
patch, unpatch, layout_for = ADAPTER.patch, ADAPTER.unpatch, ADAPTER.layout_for


def build_mask(layout: VideoLayout, pattern: str = "radial", *, decay_factor: float = 1.0,
               scenes=None, block_size: int = 128):
    """``_video.build_mask`` with CogVideoX's radial rule (None = dense)."""
    return _build_mask(layout, pattern, model="cogvideox", decay_factor=decay_factor,
                       scenes=scenes, block_size=block_size)


__all__ = [
    "ADAPTER",
    "CogVideoXAdapter",
    "FlexSparseCogVideoXProcessor",
    "PATTERNS",
    "build_mask",
    "layout_for",
    "patch",
    "recording",
    "reset_steps",
    "unpatch",
]
