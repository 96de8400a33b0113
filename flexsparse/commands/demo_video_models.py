"""``flexsparse demo`` sections for HunyuanVideo and Wan: a tiny random transformer patched
with the radial pattern against the stock processor given the same mask (the CogVideoX
section's table, ``demo_sections.cogvideox_section``, for these models).

Each section builds its model from a config with random weights (no download) and runs in
a few seconds on a small CPU. Register them in ``flexsparse.commands.demo.SECTIONS``.
"""

from __future__ import annotations

import torch

from .demo import DemoContext, SectionResult
from .demo_sections import VIDEO_COLUMNS, _MaskedStock, compare_with_masked_stock

FRAMES, HW, BLOCK = 17, 64, 16  # 5 latent frames x (4 x 4) patches
MASKED_NOTE = ("masked stock: the stock processor with the patch's mask materialised as an "
               "additive float attention_mask (should agree to ~1e-5); max diff vs dense: how "
               "far the sparse output is from unpatched dense attention.")


def _skipped(title: str, exc: Exception) -> SectionResult:
    return SectionResult(title, notes=[
        f"skipped: diffusers is not available ({exc}); pip install -e '.[hf]'"])


def _compare(module, model, forward, stock, masked, res: SectionResult) -> None:
    """One row per backend: the radial patch vs the stock processors given its mask."""
    layout = module.layout_for(model, FRAMES, HW, HW)
    patch = dict(pattern="radial", num_frames=FRAMES, height=HW, width=HW, block_size=BLOCK)
    for row in compare_with_masked_stock(module, model, forward, stock, masked, patch):
        res.rows.append(row.video_row(layout.length))


# -- HunyuanVideo ------------------------------------------------------------------------------
class _PaddedMaskedStock:
    """``_MaskedStock`` with the block's text padding (the same for every row) and-ed in."""

    def __init__(self, dense: torch.Tensor, stock):
        self.dense, self.stock = dense, stock

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 image_rotary_emb=None):
        keep = self.dense
        if attention_mask is not None:
            keep = keep & attention_mask.reshape(-1, keep.shape[-1])[0].bool()
        return _MaskedStock(keep, self.stock)(attn, hidden_states, encoder_hidden_states, None,
                                              image_rotary_emb)


def hunyuan_video_section(ctx: DemoContext) -> SectionResult:
    """A tiny random HunyuanVideoTransformer3DModel (1 dual- + 1 single-stream block),
    radial patch vs the stock processor given the mask and the text padding."""
    title = "HunyuanVideo: tiny random transformer, radial patch vs stock"
    try:
        from diffusers import HunyuanVideoTransformer3DModel
        from diffusers.models.transformers.transformer_hunyuan_video import (
            HunyuanVideoAttnProcessor2_0 as Stock,
        )
    except ImportError as exc:
        return _skipped(title, exc)
    from ..models import hunyuan_video

    text, valid = 8, 5
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = HunyuanVideoTransformer3DModel(
            in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16,
            num_layers=1, num_single_layers=1, num_refiner_layers=1, text_embed_dim=16,
            pooled_projection_dim=8, rope_axes_dim=(4, 6, 6), guidance_embeds=False).eval()
    g = torch.Generator().manual_seed(1)
    latents = torch.randn(2, 4, (FRAMES - 1) // 4 + 1, HW // 8, HW // 8, generator=g)
    prompt = torch.randn(2, text, 16, generator=g)
    prompt_mask = (torch.arange(text) < valid).long().expand(2, -1)
    pooled = torch.randn(2, 8, generator=g)

    def forward():
        with torch.no_grad():
            return model(latents, torch.full((2,), 500), prompt, prompt_mask, pooled,
                         return_dict=False)[0]

    module = _TextLength(hunyuan_video, text)
    res = SectionResult(title, columns=VIDEO_COLUMNS)
    _compare(module, model, forward, Stock, lambda d: _PaddedMaskedStock(d, Stock()), res)
    layout = module.layout_for(model, FRAMES, HW, HW)
    res.notes += [
        f"model: HunyuanVideoTransformer3DModel, 1 dual-stream + 1 single-stream block, 2 "
        f"heads x 16, random weights; input {FRAMES} frames at {HW}x{HW} -> {layout.frames} "
        f"latent frames x {layout.tokens_per_frame} tokens + {text} text tokens (after the "
        f"video; {valid} valid, {text - valid} padding), batch 2, float32.",
        MASKED_NOTE + " HunyuanVideo's text padding mask is and-ed in on both sides.",
    ]
    return res


class _TextLength:
    """``hunyuan_video`` with ``max_sequence_length`` fixed (the demo's short prompt)."""

    def __init__(self, module, text: int):
        self.module, self.text = module, text
        self.ADAPTER = module.ADAPTER

    def patch(self, *args, **kwargs):
        return self.module.patch(*args, max_sequence_length=self.text, **kwargs)

    def unpatch(self, *args):
        return self.module.unpatch(*args)

    def layout_for(self, *args):
        return self.module.layout_for(*args, max_sequence_length=self.text)


# -- Wan ---------------------------------------------------------------------------------------
def wan_section(ctx: DemoContext) -> SectionResult:
    """A tiny random WanTransformer3DModel (2 blocks): radial self-attention vs the stock
    processor given the mask; text cross-attention untouched."""
    title = "Wan: tiny random transformer, radial patch vs stock"
    try:
        from diffusers import WanTransformer3DModel
        from diffusers.models.transformers.transformer_wan import WanAttnProcessor as Stock
    except ImportError as exc:
        return _skipped(title, exc)
    from ..models import wan

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = WanTransformer3DModel(
            patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4,
            out_channels=4, text_dim=16, freq_dim=16, ffn_dim=32, num_layers=2,
            rope_max_seq_len=32).eval()
    g = torch.Generator().manual_seed(1)
    latents = torch.randn(2, 4, (FRAMES - 1) // 4 + 1, HW // 8, HW // 8, generator=g)
    prompt = torch.randn(2, 8, 16, generator=g)

    def forward():
        with torch.no_grad():
            return model(latents, torch.full((2,), 500), prompt, return_dict=False)[0]

    res = SectionResult(title, columns=VIDEO_COLUMNS)
    _compare(wan, model, forward, Stock, lambda d: _MaskedStock(d, Stock()), res)
    layout = wan.layout_for(model, FRAMES, HW, HW)
    res.notes += [
        f"model: WanTransformer3DModel, 2 blocks, 2 heads x 16, random weights; input "
        f"{FRAMES} frames at {HW}x{HW} -> {layout.frames} latent frames x "
        f"{layout.tokens_per_frame} tokens (video only in self-attention; 8 text tokens in "
        "cross-attention, not patched), batch 2, float32.",
        MASKED_NOTE,
    ]
    return res


__all__ = ["hunyuan_video_section", "wan_section"]
