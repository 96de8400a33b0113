"""Demo sections of the image models: a tiny random Flux / HunyuanDiT transformer patched
with meansim, against the stock processor given the masks meansim predicted.

Wire them into ``flexsparse demo`` with ``SECTIONS`` entries
``("flux", "flexsparse.commands.demo_image_models:flux_section")`` and
``("hunyuan_dit", "flexsparse.commands.demo_image_models:hunyuan_dit_section")``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .demo import DemoContext, SectionResult
from .demo_sections import compare_with_masked_stock

#: meansim at the tiny models' scale: every full block self-similar, key blocks kept up to
#: half of the pooled probability (SpargeAttn's defaults use 128 x 64 tiles, more than
#: these sequences hold).
TINY_MEANSIM = dict(simthreshd1=-1.0, cdfthreshd=0.5, block_q=8, block_kv=8, smooth_k=True)
COLUMNS = ["backend", "tokens", "tiles skipped", "max err vs masked stock",
           "max diff vs dense", "ms / forward"]


class _MaskedStock:
    """A stock processor given a bool ``[B, H, N, N]`` mask as an additive float mask,
    shaped by ``shape`` for that processor (SDPA's 4-D, or ``[B * H, N, N]``). Flux and
    HunyuanDiT processors share these parameter names (diffusers passes only the names a
    processor declares)."""

    def __init__(self, stock, dense: torch.Tensor, shape: Callable):
        self.stock, self.dense, self.shape = stock, dense, shape

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 image_rotary_emb=None, temb=None):
        add = torch.zeros(self.dense.shape, dtype=hidden_states.dtype)
        add = add.masked_fill(~self.dense, torch.finfo(hidden_states.dtype).min)
        extra = {} if temb is None else {"temb": temb}
        return self.stock(attn, hidden_states, encoder_hidden_states=encoder_hidden_states,
                          attention_mask=self.shape(add), image_rotary_emb=image_rotary_emb,
                          **extra)


def _compare(ctx: DemoContext, title: str, module, model, forward, stock_cls, shape,
             video: dict, notes: list[str]) -> SectionResult:
    """Rows per backend: meansim patch vs the stock processors with the predicted masks."""
    n = module.layout_for(model, **video).length
    res = SectionResult(title, columns=COLUMNS)
    for row in compare_with_masked_stock(
            module, model, forward, stock_cls,
            lambda dense: _MaskedStock(stock_cls(), dense, shape),
            dict(pattern="meansim", meansim=TINY_MEANSIM, **video)):
        res.rows.append([row.backend, f"{n}", f"{1 - row.kept:.1%}", f"{row.err:.1e}",
                         f"{row.diff:.1e}", f"{row.ms:.1f}"])
    res.notes += notes + [
        f"meansim: {TINY_MEANSIM} (the patch's default is SpargeAttn's simthreshd1 0.6, "
        "cdfthreshd 0.98 on 128 x 64 tiles); tiles skipped: pairs dropped by the predicted "
        "tile maps, all layers.",
        "masked stock: the stock processor with the masks meansim predicted in the patched "
        "run, materialised as an additive float attention_mask (should agree to ~1e-5).",
    ]
    return res


def _no_diffusers(title: str, exc: Exception) -> SectionResult:
    return SectionResult(title, notes=[
        f"skipped: diffusers is not available ({exc}); pip install -e '.[hf]'"])


def flux_section(ctx: DemoContext) -> SectionResult:
    """A tiny random FluxTransformer2DModel (1 dual + 1 single block) with meansim."""
    title = "Flux: tiny random transformer, meansim patch vs stock"
    try:
        from diffusers import FluxTransformer2DModel
        from diffusers.models.transformers.transformer_flux import FluxAttnProcessor
    except ImportError as exc:
        return _no_diffusers(title, exc)
    from ..models import flux

    text, rows, cols = 8, 6, 8
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = FluxTransformer2DModel(
            patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
            attention_head_dim=16, num_attention_heads=2, joint_attention_dim=16,
            pooled_projection_dim=16, axes_dims_rope=(4, 6, 6)).eval()
    g = torch.Generator().manual_seed(1)
    ids = torch.zeros(rows, cols, 3)
    ids[..., 1], ids[..., 2] = torch.arange(rows)[:, None], torch.arange(cols)[None, :]
    inputs = dict(hidden_states=torch.randn(2, rows * cols, 16, generator=g),
                  encoder_hidden_states=torch.randn(2, text, 16, generator=g),
                  pooled_projections=torch.randn(2, 16, generator=g),
                  img_ids=ids.reshape(-1, 3), txt_ids=torch.zeros(text, 3),
                  timestep=torch.full((2,), 0.5))

    def forward():
        with torch.no_grad():
            return model(**inputs, return_dict=False)[0]

    return _compare(
        ctx, title, flux, model, forward, FluxAttnProcessor, lambda add: add,
        dict(height=16 * rows, width=16 * cols, text_tokens=text),
        [f"model: FluxTransformer2DModel, 1 dual- + 1 single-stream block, 2 heads x 16, "
         f"random weights; {text} text + {rows}x{cols} image tokens "
         f"({16 * rows}x{16 * cols} pixels), text first, batch 2, float32."])


def hunyuan_dit_section(ctx: DemoContext) -> SectionResult:
    """A tiny random HunyuanDiT2DModel (2 blocks) with meansim on ``attn1``."""
    title = "HunyuanDiT: tiny random transformer, meansim patch vs stock"
    try:
        from diffusers import HunyuanDiT2DModel
        from diffusers.models.attention_processor import HunyuanAttnProcessor2_0
        from diffusers.models.embeddings import get_2d_rotary_pos_embed
    except ImportError as exc:
        return _no_diffusers(title, exc)
    from ..models import hunyuan_dit

    rows, cols, heads = 6, 8, 2
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = HunyuanDiT2DModel(
            num_attention_heads=heads, attention_head_dim=8, in_channels=4, patch_size=2,
            sample_size=16, hidden_size=16, num_layers=2, cross_attention_dim=16,
            cross_attention_dim_t5=16, pooled_projection_dim=8, text_len=8,
            text_len_t5=8).eval()
    g = torch.Generator().manual_seed(1)
    inputs = dict(
        hidden_states=torch.randn(2, 4, 2 * rows, 2 * cols, generator=g),
        timestep=torch.full((2,), 500.0),
        encoder_hidden_states=torch.randn(2, 8, 16, generator=g),
        text_embedding_mask=torch.ones(2, 8, dtype=torch.long),
        encoder_hidden_states_t5=torch.randn(2, 8, 16, generator=g),
        text_embedding_mask_t5=torch.ones(2, 8, dtype=torch.long),
        image_meta_size=torch.tensor([[96.0, 128, 96, 128, 0, 0]] * 2),
        style=torch.zeros(2, dtype=torch.long),
        image_rotary_emb=get_2d_rotary_pos_embed(8, ((0, 0), (rows, cols)), (rows, cols)))

    def forward():
        with torch.no_grad():
            return model(**inputs, return_dict=False)[0]

    return _compare(
        ctx, title, hunyuan_dit, model, forward, HunyuanAttnProcessor2_0,
        lambda add: add.flatten(0, 1), dict(height=16 * rows, width=16 * cols),
        [f"model: HunyuanDiT2DModel, 2 blocks, {heads} heads x 8, random weights; "
         f"{rows}x{cols} image tokens ({16 * rows}x{16 * cols} pixels) in attn1 (the "
         "text cross-attention attn2 untouched), batch 2, float32."])


__all__ = ["flux_section", "hunyuan_dit_section"]
