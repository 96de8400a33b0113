"""Flux (diffusers): meansim, tuned or explicit sparse masks on the joint text + image
attention, on the shared adapter base.

``patch(pipe_or_transformer, ...)`` installs ``FlexSparseFluxProcessor`` on the attention
of every dual-stream block (``transformer_blocks[i].attn``, layers ``0 .. 18`` of
FLUX.1) and every single-stream block (``single_transformer_blocks[i].attn``, layers
``19 .. 56``) of a ``FluxTransformer2DModel``. The processor repeats the stock
``FluxAttnProcessor`` arithmetic (fused or separate projections, RMS q/k norms, the
text stream's own projections and norms, RoPE on the whole joint sequence) and computes
the attention with ``flexsparse.attention`` through ``SparseProcessor.attend``.

>>> from flexsparse.models import flux
>>> handle = flux.patch(pipe, height=1024, width=1024)       # doctest: +SKIP
>>> image = pipe(prompt, height=1024, width=1024).images[0]  # doctest: +SKIP
>>> flux.unpatch(pipe)                                       # doctest: +SKIP

(no mask and no tuned file: meansim with SpargeAttn's default thresholds)

**Token order.** Both block kinds attend over ``[text, image]``: ``text_tokens`` T5
tokens first (``max_sequence_length`` of the pipeline call, 512 by default, 256 for
FLUX.1-schnell), then the image tokens row by row. An ``H x W`` pixel image is
``(H / 16) x (W / 16)`` image tokens (VAE 8x, then 2 x 2 latent patches packed into one
token): 1024 x 1024 is 512 + 64 x 64 = 4,608 tokens. ``layout_for(obj, height, width,
text_tokens=)`` gives that layout; a ``mask=`` must be built on it (``mask.length`` is
checked), e.g. ``masks.full() & ...`` rules that index text as ``[0, text_tokens)``.

**What runs.** ``pattern=None`` (default): the ``mask`` and / or the ``tuned`` file;
neither given: meansim with SpargeAttn's defaults (``SPARGE_DEFAULTS``).
``pattern="meansim"``: meansim (``SPARGE_DEFAULTS`` updated by ``meansim=``) and-ed with
``mask``. ``pattern="dense"``: the stock attention (with the step trace). ``tuned=``: a
flexsparse parameter file or a SpargeAttn state dict of 57 layers (keys
``transformer_blocks.N...`` and ``single_transformer_blocks.N...``; single block ``N`` is
layer ``19 + N``), its per-layer per-head meansim and-ed with ``mask``.

**Text padding.** Flux attends to all ``text_tokens`` T5 tokens by default (the pipeline
passes no mask). A mask passed through ``joint_attention_kwargs={"attention_mask": m}``
(bool: True keeps; or additive float: 0 keeps, ``-inf`` / ``finfo.min`` drops;
broadcastable to ``[B, H, N, N]`` like SDPA's) is and-ed with the layer's mask.

The image-model pieces shared with ``hunyuan_dit`` (``ImageAdapter``, ``ImageGrid``,
``dense_attention_mask``, ``SPARGE_DEFAULTS`` ...) live in ``flexsparse.models._image`` and
are re-exported here.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ._image import (
    IMAGE_PATTERNS,
    SPARGE_DEFAULTS,
    ImageAdapter,
    ImageGrid,
    ImageProcessor,
    dense_attention_mask,
    image_grid,
    image_layout,
    mask_from_dense,
    vae_factor,
)
from ._video import (
    TokenGrid,
    config_value,
    output_projection,
    qkv_heads,
    recording,
    reset_steps,
)


class FlexSparseFluxProcessor(ImageProcessor):
    """``FluxAttnProcessor`` with the attention computed by ``flexsparse`` (dual-stream
    blocks: text + image streams; single-stream blocks: the concatenated sequence)."""

    def __call__(
        self,
        attn,
        hidden_states: Tensor,
        encoder_hidden_states: Tensor | None = None,
        attention_mask: Tensor | None = None,
        image_rotary_emb=None,
    ):
        from diffusers.models.embeddings import apply_rotary_emb

        q, k, v = qkv_heads(attn, hidden_states)  # [B, N, H, D]
        joint = encoder_hidden_states is not None and attn.added_kv_proj_dim is not None
        if joint:
            eq, ek, ev = qkv_heads(attn, encoder_hidden_states, added=True)
            q, k, v = (torch.cat(pair, dim=1) for pair in ((eq, q), (ek, k), (ev, v)))
        seq_len = q.shape[1]
        self.check_tokens(self._text_len(encoder_hidden_states if joint else None, seq_len),
                          seq_len)
        if image_rotary_emb is not None:
            q = apply_rotary_emb(q, image_rotary_emb, sequence_dim=1)
            k = apply_rotary_emb(k, image_rotary_emb, sequence_dim=1)
        out = self.attend_tokens(q, k, v, extra=self.extra_mask(attention_mask, seq_len))
        if encoder_hidden_states is None:
            return out
        text_len = encoder_hidden_states.shape[1]
        encoder_out, out = out.split_with_sizes([text_len, out.shape[1] - text_len], dim=1)
        return (output_projection(attn, out.contiguous()),
                attn.to_add_out(encoder_out.contiguous()))

    def _text_len(self, encoder_hidden_states, seq_len: int) -> int:
        if encoder_hidden_states is not None:
            return encoder_hidden_states.shape[1]
        # single-stream block: text + image already concatenated; the pre-hook saw the grid
        seen = self.state.seen
        return seq_len - seen.tokens if seen is not None else self.state.settings.layout.text_tokens


class FluxAdapter(ImageAdapter):
    """FLUX.1 (dev / schnell / Kontext-free): every ``attn`` of the dual- and single-stream
    blocks, text first."""

    kind = "flux"
    transformer_classes = ("FluxTransformer2DModel",)
    text_position = "start"
    default_text_tokens = 512
    processor = FlexSparseFluxProcessor

    def attention_modules(self, transformer) -> list:
        dual = getattr(transformer, "transformer_blocks", None)
        single = getattr(transformer, "single_transformer_blocks", None)
        if dual is None or single is None:
            raise TypeError(f"{type(transformer).__name__} has no transformer_blocks / "
                            "single_transformer_blocks: not a Flux transformer")
        return [block.attn for block in dual] + [block.attn for block in single]

    def spatial(self, transformer, pipe) -> int:
        # latents are packed 2 x 2 into one token, after the VAE's 8x
        return vae_factor(pipe) * 2 * int(config_value(transformer, "patch_size", 1))

    def default_size(self, transformer, pipe) -> tuple[int, int]:
        """FluxPipeline's default: ``default_sample_size`` (128) x the VAE factor = 1024."""
        side = int(getattr(pipe, "default_sample_size", None) or 128) * vae_factor(pipe)
        return side, side

    def token_grid(self, transformer, inputs: dict[str, Any]) -> TokenGrid | None:
        """From ``img_ids`` ``[N, 3]`` (``(0, row, col)`` per image token)."""
        ids, latents = inputs.get("img_ids"), inputs.get("hidden_states")
        if not isinstance(ids, Tensor) or not isinstance(latents, Tensor) or ids.dim() < 2:
            return None
        ids = ids[0] if ids.dim() == 3 else ids
        rows, cols = (int(ids[:, i].max()) + 1 for i in (1, 2))
        if rows * cols != latents.shape[1]:
            return None  # reference-image tokens or offsets: the token count is checked later
        return ImageGrid(1, rows, cols)

    def load_tuned(self, path):
        """Our files as they are; a SpargeAttn Flux state dict numbered like the patched
        layers (single-stream block ``N`` is layer ``19 + N``: SpargeAttn numbers both
        block lists from 0)."""
        from ..tune import load_params
        from ..tune.params import file_format, load_spargeattn

        if file_format(path) == "safetensors":
            return load_params(path)
        state = torch.load(str(path), map_location="cpu", weights_only=True)
        if not isinstance(state, dict) or not any(
                str(key).startswith("single_transformer_blocks.") for key in state):
            return load_params(path)
        dual = {int(str(key).split(".")[1]) for key in state
                if str(key).startswith("transformer_blocks.")}
        offset = max(dual) + 1 if dual else 0
        renumbered = {}
        for key, value in state.items():
            parts = str(key).split(".")
            if parts[0] == "single_transformer_blocks":
                parts = ["transformer_blocks", str(offset + int(parts[1])), *parts[2:]]
            renumbered[".".join(parts)] = value
        with tempfile.TemporaryDirectory() as tmp:
            # load_spargeattn reads files; the file name carries the l1 / pv bounds
            renamed = Path(tmp) / Path(path).name
            torch.save(renumbered, renamed)
            return load_spargeattn(renamed, model=Path(path).name)


ADAPTER = FluxAdapter()
patch, unpatch, layout_for = ADAPTER.patch, ADAPTER.unpatch, ADAPTER.layout_for


__all__ = [
    "ADAPTER",
    "FlexSparseFluxProcessor",
    "FluxAdapter",
    "IMAGE_PATTERNS",
    "ImageAdapter",
    "ImageGrid",
    "SPARGE_DEFAULTS",
    "dense_attention_mask",
    "image_grid",
    "image_layout",
    "layout_for",
    "mask_from_dense",
    "patch",
    "recording",
    "reset_steps",
    "unpatch",
]
