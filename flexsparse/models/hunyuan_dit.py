"""HunyuanDiT (diffusers): meansim, tuned or explicit sparse masks on the image
self-attention, on the shared image adapter base (``_image.ImageAdapter``).

``patch(pipe_or_transformer, ...)`` installs ``FlexSparseHunyuanDiTProcessor`` on the
self-attention ``attn1`` of every block of a ``HunyuanDiT2DModel``; the cross-attention to
the text (``attn2``: BERT + mT5 tokens) keeps its stock processor. The processor repeats
the stock ``HunyuanAttnProcessor2_0`` arithmetic for self-attention (fused or separate
projections, LayerNorm q/k norms, 2-D RoPE on q and k) and computes the attention with
``flexsparse.attention`` through ``SparseProcessor.attend``.

>>> from flexsparse.models import hunyuan_dit
>>> handle = hunyuan_dit.patch(pipe, dense_timesteps=5)       # doctest: +SKIP
>>> image = pipe(prompt, height=1024, width=1024).images[0]  # doctest: +SKIP
>>> hunyuan_dit.unpatch(pipe)                                # doctest: +SKIP

**Token order.** ``attn1`` sees the image tokens only, row by row: an ``H x W`` pixel
image is ``(H / 8 / p) x (W / 8 / p)`` tokens with the config's ``patch_size`` ``p`` (2):
1024 x 1024 is 64 x 64 = 4,096 tokens. ``layout_for(obj, height, width)`` gives it (one
frame, no text); a ``mask=`` must be built for that length.

**What runs** is as for Flux (``flux`` module docstring): ``pattern=None`` with neither
``mask`` nor ``tuned``: meansim with SpargeAttn's defaults (``flux.SPARGE_DEFAULTS``);
``tuned=``: a flexsparse file or a SpargeAttn state dict with one entry per block
(``blocks.N.attn1...``).

Calls the processor does not own (cross-attention, a spatial / group norm, 4-D inputs)
go to the stock processor unchanged.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from ._image import SPARGE_DEFAULTS, ImageAdapter, ImageGrid, ImageProcessor, vae_factor
from ._video import (
    TokenGrid,
    config_value,
    output_projection,
    qkv_heads,
    recording,
    reset_steps,
)


class FlexSparseHunyuanDiTProcessor(ImageProcessor):
    """``HunyuanAttnProcessor2_0`` for self-attention, computed by ``flexsparse``."""

    def __call__(
        self,
        attn,
        hidden_states: Tensor,
        encoder_hidden_states: Tensor | None = None,
        attention_mask: Tensor | None = None,
        temb: Tensor | None = None,
        image_rotary_emb=None,
    ) -> Tensor:
        if (encoder_hidden_states is not None or hidden_states.dim() != 3
                or attn.spatial_norm is not None or attn.group_norm is not None):
            return self.stock(attn, hidden_states, encoder_hidden_states, attention_mask,
                              temb, image_rotary_emb)
        from diffusers.models.embeddings import apply_rotary_emb

        residual = hidden_states
        batch, seq_len, _ = hidden_states.shape
        self.check_tokens(0, seq_len)
        if attention_mask is not None:
            # the stock processor's own preparation, then SDPA's broadcasting rules
            attention_mask = attn.prepare_attention_mask(attention_mask, seq_len, batch)
            attention_mask = attention_mask.view(batch, attn.heads, -1,
                                                 attention_mask.shape[-1])
        q, k, v = qkv_heads(attn, hidden_states)  # [B, N, H, D]
        if image_rotary_emb is not None:
            q = apply_rotary_emb(q, image_rotary_emb, sequence_dim=1)
            k = apply_rotary_emb(k, image_rotary_emb, sequence_dim=1)
        out = self.attend_tokens(q, k, v, extra=self.extra_mask(attention_mask, seq_len))
        out = output_projection(attn, out)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


class HunyuanDiTAdapter(ImageAdapter):
    """HunyuanDiT 1.x: ``attn1`` of every block, image tokens only."""

    kind = "hunyuan_dit"
    transformer_classes = ("HunyuanDiT2DModel",)
    text_position = None
    default_text_tokens = 0
    processor = FlexSparseHunyuanDiTProcessor

    def attention_modules(self, transformer) -> list:
        blocks = getattr(transformer, "blocks", None)
        if blocks is None:
            raise TypeError(f"{type(transformer).__name__} has no blocks: not a HunyuanDiT "
                            "transformer")
        return [block.attn1 for block in blocks]

    def spatial(self, transformer, pipe) -> int:
        return vae_factor(pipe) * int(config_value(transformer, "patch_size", 2))

    def default_size(self, transformer, pipe) -> tuple[int, int]:
        """HunyuanDiTPipeline's default: ``sample_size`` (128) x the VAE factor = 1024."""
        side = int(config_value(transformer, "sample_size", 128)) * vae_factor(pipe)
        return side, side

    def token_grid(self, transformer, inputs: dict[str, Any]) -> TokenGrid | None:
        latents = inputs.get("hidden_states")
        if not isinstance(latents, Tensor) or latents.dim() != 4:
            return None
        patch = int(config_value(transformer, "patch_size", 2))
        _, _, height, width = latents.shape  # (B, C, H, W)
        return ImageGrid(1, height // patch, width // patch)


ADAPTER = HunyuanDiTAdapter()
patch, unpatch, layout_for = ADAPTER.patch, ADAPTER.unpatch, ADAPTER.layout_for


__all__ = [
    "ADAPTER",
    "FlexSparseHunyuanDiTProcessor",
    "HunyuanDiTAdapter",
    "SPARGE_DEFAULTS",
    "layout_for",
    "patch",
    "recording",
    "reset_steps",
    "unpatch",
]
