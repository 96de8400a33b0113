"""HunyuanVideo patch: a tiny random HunyuanVideoTransformer3DModel (saved and loaded back).

The adapter contract (tests/test_models_base.py ``CHECKS``) runs on ``CASE``; the stock
reference is ``HunyuanVideoAttnProcessor2_0`` given the pattern *and* the text padding
mask the transformer builds from ``encoder_attention_mask`` as one additive float mask.
HunyuanVideo's own cases follow (token order, padding, refiner untouched, layout).

Shapes: 17 pixel frames at 64 x 64 -> 5 latent frames x 4 x 4 tokens + 8 text tokens (text
last) = 88 tokens, batch 2 with 8 and 5 valid text tokens, 2 heads x 16, 1 dual-stream +
1 single-stream block. Tolerance: fp32 outputs agree within 1e-5 absolute.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers")

from diffusers import HunyuanVideoTransformer3DModel  # noqa: E402
from diffusers.models.transformers.transformer_hunyuan_video import (  # noqa: E402
    HunyuanVideoAttnProcessor2_0,
)

import flexsparse as fs  # noqa: E402
from flexsparse import models  # noqa: E402
from flexsparse.models import hunyuan_video as hv  # noqa: E402
from flexsparse.models._video import SparseProcessor, TokenGrid  # noqa: E402
from tests.test_models_base import CHECKS, AdapterCase, forward, loaded  # noqa: E402

FRAMES, HW, BLOCK, TEXT = 17, 64, 16, 8
GRID = TokenGrid(5, 4, 4)
VALID = (8, 5)  # valid text tokens of the two batch rows (row 1 is padded)
ATOL = 1e-5


def _build():
    torch.manual_seed(0)
    return HunyuanVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16,
        num_layers=1, num_single_layers=1, num_refiner_layers=1, patch_size=2, patch_size_t=1,
        text_embed_dim=16, pooled_projection_dim=8, rope_axes_dim=(4, 6, 6),
        guidance_embeds=False,
    )


def _inputs(grid: TokenGrid, valid=VALID, seed=1) -> dict:
    """Latents ``(B, C, F, H, W)``, text with its padding mask, pooled text."""
    g = torch.Generator().manual_seed(seed)
    batch = len(valid)
    x = torch.randn(batch, 4, grid.frames, 2 * grid.height, 2 * grid.width, generator=g)
    mask = torch.stack([torch.arange(TEXT) < n for n in valid]).long()
    return dict(hidden_states=x, encoder_hidden_states=torch.randn(batch, TEXT, 16, generator=g),
                encoder_attention_mask=mask,
                pooled_projections=torch.randn(batch, 8, generator=g))


class MaskedStock:
    """The stock processor with a dense bool mask and-ed with the block's key mask, passed
    as one additive float mask."""

    def __init__(self, dense: torch.Tensor):
        self.dense, self.stock = dense, HunyuanVideoAttnProcessor2_0()

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 image_rotary_emb=None):
        keep = self.dense if attention_mask is None else self.dense & attention_mask.bool()
        add = torch.zeros(keep.shape, dtype=hidden_states.dtype)
        add = add.masked_fill(~keep, torch.finfo(hidden_states.dtype).min)
        return self.stock(attn, hidden_states, encoder_hidden_states, add, image_rotary_emb)


def _tiny_pipeline(transformer):
    """A HunyuanVideoPipeline around ``transformer``: 2-layer LLaMA and 1-layer CLIP text
    encoders with tokenizers built in memory, a 2-level VAE, flow-matching Euler."""
    from diffusers import (
        AutoencoderKLHunyuanVideo,
        FlowMatchEulerDiscreteScheduler,
        HunyuanVideoPipeline,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, LlamaConfig, LlamaModel

    from flexsparse.models.tiny import build_tokenizer

    torch.manual_seed(0)
    tokenizer = build_tokenizer(vocab_size=300)
    tokenizer.padding_side = "right"  # HunyuanVideo counts valid text tokens from the left
    clip_tokenizer = build_tokenizer(vocab_size=300)
    text_encoder = LlamaModel(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, pad_token_id=0))
    text_encoder_2 = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(clip_tokenizer), hidden_size=8, intermediate_size=16,
        num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=77,
        projection_dim=8, eos_token_id=2))
    vae = AutoencoderKLHunyuanVideo(
        in_channels=3, out_channels=3, latent_channels=4,
        down_block_types=("HunyuanVideoDownBlock3D",) * 4,
        up_block_types=("HunyuanVideoUpBlock3D",) * 4, block_out_channels=(8, 8, 8, 8),
        layers_per_block=1, norm_num_groups=4, mid_block_add_attention=False)
    return HunyuanVideoPipeline(
        text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer, vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0), text_encoder_2=text_encoder_2,
        tokenizer_2=clip_tokenizer)


VIDEO = dict(num_frames=FRAMES, height=HW, width=HW, max_sequence_length=TEXT)
CASE = AdapterCase(
    module=hv, build=_build, inputs=_inputs, grid=GRID, video=VIDEO,
    stock=HunyuanVideoAttnProcessor2_0, masked_stock=MaskedStock, block_size=BLOCK, atol=ATOL,
    pipeline=_tiny_pipeline,
    pipeline_call=dict(prompt="a cat", num_frames=FRAMES, height=HW, width=HW,
                       num_inference_steps=3, max_sequence_length=TEXT,
                       prompt_template={"template": "{}", "crop_start": 0},
                       output_type="latent", generator=torch.Generator().manual_seed(0)),
)


@pytest.fixture
def transformer(tmp_path_factory):
    return loaded(CASE, tmp_path_factory)


# diffusers 0.42's ``fuse_qkv_projections`` skips HunyuanVideo's ``Attention`` modules (not
# an ``AttentionModuleMixin``): the shared fuse check cannot see them fused; the fused
# projections are tested on the modules themselves below.
CONTRACT = [c for c in CHECKS if c.__name__ != "check_fuse_keeps_patch"]


@pytest.mark.parametrize("check", CONTRACT, ids=lambda c: c.__name__)
def test_adapter_contract(transformer, check):
    check(CASE, transformer)


def test_fused_projections_keep_the_output(transformer):
    """The model's ``fuse_qkv_projections`` keeps the patch; modules fused one by one
    (``to_qkv`` and, in dual-stream blocks, ``to_added_qkv``) give the same output."""
    inputs = _inputs(GRID)
    hv.patch(transformer, backend="sdpa", block_size=BLOCK, **VIDEO)
    unfused = forward(transformer, inputs)
    transformer.fuse_qkv_projections()
    modules = hv.ADAPTER.attention_modules(transformer)
    assert all(isinstance(m.processor, SparseProcessor) for m in modules)
    for m in modules:
        m.fuse_projections()
    assert hasattr(modules[0], "to_added_qkv") and all(m.fused_projections for m in modules)
    with torch.no_grad():  # fused weights must differ from the separate ones to be seen
        modules[0].to_q.weight.zero_()
        modules[0].add_q_proj.weight.zero_()
    torch.testing.assert_close(forward(transformer, inputs), unfused, atol=ATOL, rtol=0)
    hv.unpatch(transformer)


# -- HunyuanVideo's own ------------------------------------------------------------------------
def test_layout_and_preset(transformer):
    layout = hv.layout_for(transformer, **VIDEO)
    assert layout == fs.VideoLayout(frames=5, tokens_per_frame=16, text_tokens=TEXT,
                                    text_position="end")
    # the real default: 117 x 768 x 1280 with 256 text tokens = the layout preset
    real = hv.layout_for(transformer, 117, 768, 1280)
    assert real == fs.VideoLayout.from_video(117, 768, 1280, model="hunyuan_video")
    assert real.length == 115_456
    with pytest.raises(ValueError, match="max_sequence_length"):
        hv.layout_for(transformer, 117, 768, 1280, max_sequence_length=0)


def test_padding_on_uniform_batch_and_no_padding(transformer):
    """Both rows padded alike (one batch-independent key mask) and no padding (no extra
    mask) equal the masked stock processor; the padded keys matter."""
    mask = CASE.radial(transformer)
    n = len(CASE.adapter.attention_modules(transformer))
    outs = {}
    for valid in ((5, 5), (8, 8)):
        inputs = _inputs(GRID, valid=valid)
        ref = _reference(transformer, inputs, mask, n)
        hv.patch(transformer, backend="flex", block_size=BLOCK, **VIDEO)
        outs[valid] = forward(transformer, inputs)
        hv.unpatch(transformer)
        torch.testing.assert_close(outs[valid], ref, atol=ATOL, rtol=0)
    assert (outs[(5, 5)] - outs[(8, 8)]).abs().max() > 1e-3


def _reference(model, inputs, mask, n):
    from tests.test_models_base import reference

    return reference(CASE, model, inputs, [mask] * n)


def test_text_padding_mask_matches_the_key_mask():
    keep = torch.tensor([[True] * 6 + [False] * 2, [True] * 4 + [False] * 4])[:, None, None]
    mask = hv.text_padding_mask(keep, 8)
    assert mask.batch == 2
    dense = mask.to_dense()
    assert torch.equal(dense, keep.expand(2, 1, 8, 8))
    # tile states agree with the dense matrix at an odd tile size
    states = mask.tile_states(8, 8, block_size=3)
    assert states.shape == (2, 1, 3, 3)
    assert torch.equal(states[1, 0, 0], torch.tensor([2, 1, 0], dtype=torch.int8))
    assert hv.text_padding_mask(torch.ones(2, 1, 1, 8, dtype=torch.bool), 8) is None
    uniform = hv.text_padding_mask(torch.tensor([[True] * 5 + [False] * 3] * 2)[:, None, None], 8)
    assert uniform.batch is None and uniform.to_dense().sum() == 8 * 5
    with pytest.raises(ValueError, match="attention_mask must be a key mask"):
        hv.text_padding_mask(torch.ones(2, 1, 1, 7, dtype=torch.bool), 8)
    with pytest.raises(TypeError, match="valid must be a bool tensor"):
        hv.key_mask(torch.ones(3))


def test_refiner_untouched_and_order(transformer):
    handle = hv.patch(transformer, block_size=BLOCK, **VIDEO)
    modules = hv.ADAPTER.attention_modules(transformer)
    assert modules[0] is transformer.transformer_blocks[0].attn
    assert modules[1] is transformer.single_transformer_blocks[0].attn
    assert handle.layers == [0, 1] and handle.kind == "hunyuan_video"
    refiner = [m for name, m in transformer.named_modules()
               if name.startswith("context_embedder") and hasattr(m, "processor")]
    assert refiner and not any(isinstance(m.processor, SparseProcessor) for m in refiner)
    hv.unpatch(transformer)


def test_observer_sees_video_then_text(transformer):
    """The q, k the attention gets: video first (RoPE applied), then the text."""
    inputs = _inputs(GRID)
    seen = {}
    handle = hv.patch(transformer, fs.masks.full(), backend="sdpa", **VIDEO)
    with handle.observing(lambda i, q, k, v: seen.setdefault(i, (q, k))):
        forward(transformer, inputs)
    hv.unpatch(transformer)
    q, k = seen[1]
    assert q.shape == (2, 2, GRID.tokens + TEXT, 16)
    # single-stream block: text keys are projected without RoPE, video keys with it
    attn = transformer.single_transformer_blocks[0].attn
    assert attn.add_q_proj is None and q.shape == k.shape


def test_dispatch_and_text_length_mismatch(transformer):
    assert models.adapter_for(transformer) is hv
    handle = models.patch(transformer, block_size=BLOCK, **VIDEO)
    assert handle.kind == "hunyuan_video"
    models.unpatch(transformer)
    hv.patch(transformer, block_size=BLOCK, num_frames=FRAMES, height=HW, width=HW)  # 256 text
    with pytest.raises(ValueError, match="256 tokens"):
        forward(transformer, _inputs(GRID))
    hv.unpatch(transformer)
    with pytest.raises(TypeError, match="HunyuanVideoTransformer3DModel"):
        hv.patch(torch.nn.Linear(2, 2), **VIDEO)
