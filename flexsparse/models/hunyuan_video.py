"""HunyuanVideo (diffusers): radial and scene-aware joint attention, on the shared video base.

``patch(pipe_or_transformer, ...)`` installs ``FlexSparseHunyuanVideoProcessor`` on the
attention of every dual-stream block (``transformer_blocks``) and then every single-stream
block (``single_transformer_blocks``) of a ``HunyuanVideoTransformer3DModel`` (T2V and the
I2V variants, ``latent_concat`` and ``token_replace``). The processor repeats the stock
``HunyuanVideoAttnProcessor2_0`` arithmetic and computes the attention with
``flexsparse.attention`` through ``SparseProcessor.attend``.

>>> from flexsparse.models import hunyuan_video
>>> handle = hunyuan_video.patch(pipe, num_frames=117, height=768, width=1280,
...                              decay_factor=0.95, dense_timesteps=12)      # doctest: +SKIP
>>> video = pipe(prompt, num_frames=117, height=768, width=1280).frames[0]  # doctest: +SKIP
>>> hunyuan_video.unpatch(pipe)                                             # doctest: +SKIP

What is HunyuanVideo's own (everything else is ``flexsparse.models._video``):

- token order: ``[video, text]`` in both kinds of block (dual-stream blocks project the
  text with the ``add_*_proj`` layers and append it; single-stream blocks get it
  concatenated); RoPE on the video part only. The token refiner inside
  ``context_embedder`` (text-only attention) is not patched;
- the text padding: the transformer passes every block a key mask ``[B, 1, 1, N]`` that
  drops padded text keys (from ``encoder_attention_mask``); it is and-ed into the
  pattern (``text_padding_mask``) so padded keys stay masked exactly as the stock
  processor masks them; an all-valid mask adds nothing;
- layout: patch sizes from the config, VAE factors from the pipeline
  (``vae_scale_factor_temporal`` / ``_spatial``, else 4 and 8), latent frames
  ``(num_frames - 1) // 4 + 1``; text tokens: the pipeline's ``max_sequence_length``
  (256 by default; ``patch(..., max_sequence_length=N)`` for another);
- the token grid of a call: ``hidden_states`` is ``(B, C, F, H, W)`` latents.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor

from .. import tiles as T
from .._checks import check_int
from ..layout import MODEL_PRESETS, VideoLayout
from ..mask import Mask
from ._patch import PatchHandle
from ._video import (
    PATTERNS,
    SparseProcessor,
    VideoAdapter,
    output_projection,
    qkv_heads,
    recording,
    reset_steps,
)

#: Text tokens of the stock pipeline (``max_sequence_length=256``; the layout preset's).
TEXT_TOKENS = MODEL_PRESETS["hunyuan_video"]["text_tokens"]


# -- the text padding ----------------------------------------------------------------------------
def key_mask(valid: Tensor) -> Mask:
    """A mask keeping the keys where ``valid`` is True, for every query.

    Args:
        valid: bool ``[N]`` (the same keys for every row of the batch) or ``[B, N]``.

    Returns:
        A ``Mask`` bound to ``N`` tokens, batch dependent for a ``[B, N]`` input; its tile
        rule counts the valid keys of each key tile (full / partial / empty).
    """
    if not isinstance(valid, Tensor) or valid.dtype != torch.bool or valid.dim() not in (1, 2):
        raise TypeError("valid must be a bool tensor [N] or [B, N], got "
                        f"{getattr(valid, 'dtype', type(valid).__name__)} "
                        f"{tuple(getattr(valid, 'shape', ()))}")
    batch = valid.shape[0] if valid.dim() == 2 else None
    rows = valid if batch is not None else valid[None]
    n = rows.shape[-1]
    counts = torch.nn.functional.pad(rows.to(torch.int32).cumsum(-1), (1, 0))  # [B', N + 1]

    def on_device(device):
        keep, cum = rows.to(device), counts.to(device)

        def mask_mod(b, h, q_idx, kv_idx):
            row = b if batch is not None else torch.zeros_like(b)
            return keep[row, torch.clamp(kv_idx, 0, n - 1)] & (q_idx >= 0)

        def rule(grid: T.TileGrid):
            inside = cum[:, grid.kv_hi + 1] - cum[:, grid.kv_lo]  # [B', KVb] valid keys
            size = grid.kv_hi - grid.kv_lo + 1
            states = T.from_bounds(inside == size, inside > 0)[:, None, None, :]
            states = states.expand(states.shape[0], 1, grid.shape[0], grid.shape[1])
            return states.contiguous() if batch is not None else states[0, 0].contiguous()

        return mask_mod, rule

    kept = int(rows.sum(-1).min())
    return Mask(on_device=on_device, has_tile_rule=True, batch=batch, length=n,
                name=f"text_padding({kept}/{n} keys)" if batch is None
                else f"text_padding(batch {batch})")


#: ``(attention_mask, version, mask)`` of the last forward: every block of one forward gets
#: the same tensor, so the host sync that inspects it happens once per forward.
_LAST: list = [None]


def text_padding_mask(attention_mask: Tensor | None, seq_len: int) -> Mask | None:
    """The key mask HunyuanVideo passes its blocks, as a flexsparse ``Mask`` (None when
    every key is valid: the pattern alone).

    Args:
        attention_mask: bool ``[B, 1, 1, N]`` (or anything reshaping to ``[B, N]``): True
            keeps the key; float masks keep where the value is above half the lowest.
        seq_len: ``N``, video + text tokens of the call.
    """
    if attention_mask is None:
        return None
    last = _LAST[0]
    if last is not None and last[0] is attention_mask and last[1] == (
            attention_mask._version, seq_len):
        return last[2]
    valid = attention_mask
    if valid.dtype != torch.bool:
        valid = valid > torch.finfo(valid.dtype).min / 2
    if valid.numel() % seq_len or valid.shape[-1] != seq_len:
        raise ValueError(f"attention_mask must be a key mask [B, 1, 1, {seq_len}], got shape "
                         f"{tuple(attention_mask.shape)}")
    valid = valid.reshape(-1, seq_len)
    # one host sync per forward (cached below): decides dense-text vs batch-dependent mask
    if bool(valid.all()):
        mask = None
    elif bool((valid == valid[:1]).all()):
        mask = key_mask(valid[0])
    else:
        mask = key_mask(valid)
    _LAST[0] = (attention_mask, (attention_mask._version, seq_len), mask)
    return mask


# -- the processor -------------------------------------------------------------------------------
class FlexSparseHunyuanVideoProcessor(SparseProcessor):
    """``HunyuanVideoAttnProcessor2_0`` with the attention computed by ``flexsparse``.

    Returns ``(video_out [B, Nv, C], text_out [B, Nt, C])`` like the stock processor. A call
    without text (not made by HunyuanVideo's blocks) goes to the stock processor.
    """

    def __call__(
        self,
        attn,
        hidden_states: Tensor,
        encoder_hidden_states: Tensor | None = None,
        attention_mask: Tensor | None = None,
        image_rotary_emb=None,
    ):
        if encoder_hidden_states is None:
            return self.stock(attn, hidden_states, encoder_hidden_states, attention_mask,
                              image_rotary_emb)
        dual = attn.add_q_proj is not None
        video_len, text_len = hidden_states.shape[1], encoder_hidden_states.shape[1]
        seq_len = video_len + text_len
        self.check_tokens(text_len, seq_len)

        x = hidden_states if dual else torch.cat([hidden_states, encoder_hidden_states], dim=1)
        q, k, v = qkv_heads(attn, x)  # [B, N, H, D]
        if image_rotary_emb is not None:
            q, k = (_rope_video(t, image_rotary_emb, video_len) for t in (q, k))
        if dual:
            eq, ek, ev = qkv_heads(attn, encoder_hidden_states, added=True)
            q, k, v = (torch.cat([a, b], dim=1) for a, b in ((q, eq), (k, ek), (v, ev)))

        out = self.attend_tokens(q, k, v, extra=text_padding_mask(attention_mask, seq_len))
        video_out, text_out = out[:, :video_len], out[:, video_len:]
        if getattr(attn, "to_out", None) is not None:
            video_out = output_projection(attn, video_out)
        if getattr(attn, "to_add_out", None) is not None:
            text_out = attn.to_add_out(text_out)
        return video_out, text_out


def _rope_video(x: Tensor, rope, video_len: int) -> Tensor:
    """RoPE on the first ``video_len`` tokens of ``x`` ``[B, N, H, D]``, text untouched."""
    from diffusers.models.embeddings import apply_rotary_emb

    if x.shape[1] == video_len:
        return apply_rotary_emb(x, rope, sequence_dim=1)
    return torch.cat([apply_rotary_emb(x[:, :video_len], rope, sequence_dim=1),
                      x[:, video_len:]], dim=1)


# -- the adapter ---------------------------------------------------------------------------------
class HunyuanVideoAdapter(VideoAdapter):
    """HunyuanVideo: the dual-stream blocks' attention, then the single-stream blocks'; text
    after the video. ``text_tokens``: the text length the layout assumes."""

    kind = "hunyuan_video"
    transformer_classes = ("HunyuanVideoTransformer3DModel",)
    radial_model = "hunyuan"
    text_position = "end"
    processor = FlexSparseHunyuanVideoProcessor
    default_pixels = (129, 720, 1280)  # HunyuanVideoPipeline.__call__'s defaults

    def __init__(self, text_tokens: int = TEXT_TOKENS):
        self.text_tokens = check_int("max_sequence_length", text_tokens, minimum=1)

    def with_text(self, max_sequence_length: int | None) -> HunyuanVideoAdapter:
        """This adapter, or a copy assuming ``max_sequence_length`` text tokens."""
        if max_sequence_length is None or max_sequence_length == self.text_tokens:
            return self
        other = copy.copy(self)
        other.text_tokens = check_int("max_sequence_length", max_sequence_length, minimum=1)
        return other

    def attention_modules(self, transformer) -> list:
        dual = getattr(transformer, "transformer_blocks", None)
        single = getattr(transformer, "single_transformer_blocks", None)
        if dual is None or single is None:
            raise TypeError(f"{type(transformer).__name__} has no transformer_blocks / "
                            "single_transformer_blocks: not a HunyuanVideo transformer")
        return [block.attn for block in dual] + [block.attn for block in single]

    def layout_text_tokens(self, transformer) -> int:
        return self.text_tokens

    def patch(self, pipe_or_transformer, mask=None, *, max_sequence_length: int | None = None,
              **kwargs) -> PatchHandle:
        """``VideoAdapter.patch`` (every option), plus ``max_sequence_length``: the text
        tokens the pipeline will be called with (its own argument; default 256)."""
        return VideoAdapter.patch(self.with_text(max_sequence_length), pipe_or_transformer,
                                  mask, **kwargs)

    def layout_for(self, pipe_or_transformer, num_frames: int | None = None,
                   height: int | None = None, width: int | None = None, *,
                   max_sequence_length: int | None = None) -> VideoLayout:
        """Token layout of a ``num_frames x height x width`` generation with
        ``max_sequence_length`` text tokens (default 256), text last."""
        return VideoAdapter.layout_for(self.with_text(max_sequence_length),
                                       pipe_or_transformer, num_frames, height, width)


ADAPTER = HunyuanVideoAdapter()
patch, unpatch, layout_for = ADAPTER.patch, ADAPTER.unpatch, ADAPTER.layout_for

__all__ = [
    "ADAPTER",
    "FlexSparseHunyuanVideoProcessor",
    "HunyuanVideoAdapter",
    "PATTERNS",
    "TEXT_TOKENS",
    "key_mask",
    "layout_for",
    "patch",
    "recording",
    "reset_steps",
    "text_padding_mask",
    "unpatch",
]
