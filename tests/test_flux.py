"""Flux patch: a tiny random FluxTransformer2DModel (saved and loaded back), through the
image adapter checks of tests/test_models_base.py (``ImageCase``, ``IMAGE_CHECKS``: a
timestep rule per model; a seeded sparse tile mask instead of radial; meansim against the
float64 reference of the masks it predicted). Stock processors with a mask get it as an
additive float ``attention_mask`` (``MaskedStock``).

Shapes: 8 text tokens + 6 x 8 image tokens (96 x 128 pixels at 16 pixels per token) = 56
tokens, batch 2, 2 heads x 16, 1 dual-stream + 1 single-stream block. fp32 outputs agree
within 1e-5 (summation order); float64 within 1e-9.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers")

from diffusers import FluxTransformer2DModel  # noqa: E402
from diffusers.models.transformers.transformer_flux import FluxAttnProcessor  # noqa: E402

import flexsparse as fs  # noqa: E402
from flexsparse.models import flux  # noqa: E402
from flexsparse.models._video import TokenGrid  # noqa: E402
from tests.test_models_base import (  # noqa: E402
    IMAGE_CHECKS,
    ImageCase,
    additive,
    check_tuned_file,
    loaded,
    reference,
    tile_mask,
)

TEXT, GRID, BLOCK = 8, flux.ImageGrid(1, 6, 8), 8
PIXELS = dict(height=96, width=128)


# -- the Flux case ------------------------------------------------------------------------------
class MaskedStock:
    """The stock ``FluxAttnProcessor`` with a dense bool mask as an additive float mask
    (and-ed with an ``attention_mask`` the call brings)."""

    def __init__(self, dense: torch.Tensor):
        self.dense, self.stock = dense, FluxAttnProcessor()

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 image_rotary_emb=None):
        add = additive(self.dense, hidden_states)
        if attention_mask is not None:
            add = add + attention_mask.to(add.dtype) if attention_mask.is_floating_point() \
                else add.masked_fill(~attention_mask, torch.finfo(add.dtype).min)
        if add.dim() == 2:
            add = add.expand(hidden_states.shape[0], 1, *add.shape)
        return self.stock(attn, hidden_states, encoder_hidden_states, add, image_rotary_emb)


def _config(**over):
    cfg = dict(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
               attention_head_dim=16, num_attention_heads=2, joint_attention_dim=16,
               pooled_projection_dim=16, axes_dims_rope=(4, 6, 6))
    cfg.update(over)
    return cfg


def _build():
    torch.manual_seed(0)
    return FluxTransformer2DModel(**_config())


def _inputs(grid: TokenGrid, batch: int = 2, seed: int = 1) -> dict:
    """Packed latents ``[B, h * w, C]``, T5 and pooled CLIP embeddings, position ids."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.zeros(grid.height, grid.width, 3)
    ids[..., 1] = torch.arange(grid.height)[:, None]
    ids[..., 2] = torch.arange(grid.width)[None, :]
    return dict(hidden_states=torch.randn(batch, grid.height * grid.width, 16, generator=g),
                encoder_hidden_states=torch.randn(batch, TEXT, 16, generator=g),
                pooled_projections=torch.randn(batch, 16, generator=g),
                img_ids=ids.reshape(-1, 3), txt_ids=torch.zeros(TEXT, 3))


def _tiny_pipeline(transformer):
    """A FluxPipeline around ``transformer``: 1-layer CLIP and T5 with tokenizers from
    in-memory vocabularies, a 2-level VAE (factor 2), flow-matching Euler."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline
    from transformers import (
        CLIPTextConfig,
        CLIPTextModel,
        CLIPTokenizer,
        T5Config,
        T5EncoderModel,
        T5Tokenizer,
    )

    torch.manual_seed(0)
    words = "a cat dog runs on the beach at night red car fast".split()
    clip_vocab = {w: i for i, w in enumerate(
        ["<|startoftext|>", "<|endoftext|>", *[f"{w}</w>" for w in words],
         *sorted(set("".join(words))), *[f"{c}</w>" for c in sorted(set("".join(words)))]])}
    tokenizer = CLIPTokenizer(vocab=clip_vocab, merges=[], model_max_length=77)
    clip = CLIPTextModel(CLIPTextConfig(vocab_size=len(clip_vocab), hidden_size=16,
                                        intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, max_position_embeddings=77,
                                        projection_dim=16))
    t5_vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [(f"▁{w}", -1.0)
                                                                   for w in words]
    tokenizer_2 = T5Tokenizer(vocab=t5_vocab, extra_ids=0)
    t5 = T5EncoderModel(T5Config(vocab_size=len(t5_vocab), d_model=16, d_kv=8, d_ff=32,
                                 num_layers=1, num_heads=2))
    vae = AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(8, 8),
                        down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4,
                        layers_per_block=1, norm_num_groups=2)
    return FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae,
                        text_encoder=clip, tokenizer=tokenizer, text_encoder_2=t5,
                        tokenizer_2=tokenizer_2, transformer=transformer)


CASE = ImageCase(
    module=flux, build=_build, inputs=_inputs, grid=GRID,
    video=dict(text_tokens=TEXT, **PIXELS), stock=FluxAttnProcessor, masked_stock=MaskedStock,
    block_size=BLOCK, atol=1e-5, pipeline=_tiny_pipeline,
    # VAE factor 2 in the tiny pipeline: 24 x 32 pixels -> 12 x 16 latents -> 6 x 8 tokens
    pipeline_call=dict(prompt="a cat", height=24, width=32, num_inference_steps=3,
                       max_sequence_length=TEXT, output_type="latent",
                       generator=torch.Generator().manual_seed(0)),
    pipeline_video=dict(text_tokens=TEXT, height=24, width=32),
    timestep=lambda batch, t: torch.full((batch,), t / 1000),  # the pipeline's sigma
)


@pytest.fixture
def transformer(tmp_path_factory):
    return loaded(CASE, tmp_path_factory)


@pytest.mark.parametrize("check", IMAGE_CHECKS, ids=lambda c: c.__name__)
def test_adapter_contract(transformer, check):
    check(CASE, transformer)


def test_tuned_file(transformer, tmp_path):
    check_tuned_file(CASE, transformer, tmp_path)


# -- Flux's own ---------------------------------------------------------------------------------
def test_layout_and_token_order(transformer):
    layout = flux.layout_for(transformer, 1024, 1024)
    assert (layout.text_tokens, layout.tokens_per_frame, layout.frames) == (512, 4096, 1)
    assert layout.text_position == "start" and layout.length == 4608
    assert flux.layout_for(transformer) == layout  # FluxPipeline's default 1024 x 1024
    assert flux.layout_for(transformer, 768, 1360, text_tokens=256).length == 256 + 48 * 85
    with pytest.raises(ValueError, match="width must be a multiple of 16"):
        flux.layout_for(transformer, 1024, 1000)
    assert str(flux.ADAPTER.token_grid(transformer, _inputs(GRID))) == "6x8 image tokens"


def test_default_is_sparge_meansim(transformer):
    handle = flux.patch(transformer, **CASE.video)
    dyn = handle.mask_for_layer(0)
    assert (float(dyn.simthreshd1), float(dyn.cdfthreshd)) == (0.6, 0.98)
    assert (dyn.block_q, dyn.block_kv, dyn.smooth_k, dyn.attention_sink) == (128, 64, True,
                                                                              False)
    assert handle.layers == [0, 1] and handle.kind == "flux"
    flux.unpatch(transformer)


def test_text_length_mismatch_names_both(transformer):
    flux.patch(transformer, pattern="dense", text_tokens=TEXT + 2, **PIXELS)
    with pytest.raises(ValueError, match=r"10 text \+ 6x8 image tokens = 58 tokens.*got 8 text"):
        CASE.run(transformer, _inputs(GRID))
    flux.unpatch(transformer)


@pytest.mark.parametrize("kind", ["bool", "float"])
def test_joint_attention_mask_is_composed(transformer, kind):
    """Padded text (the last 3 T5 tokens of row 1 masked out) given as
    ``joint_attention_kwargs={"attention_mask": ...}``: with a sparse tile mask the patch
    equals the stock processor with both masks; with keep-all it equals stock."""
    inputs = _inputs(GRID)
    n = TEXT + GRID.tokens
    keep = torch.ones(2, 1, 1, n, dtype=torch.bool)
    keep[1, ..., TEXT - 3:TEXT] = False
    pad = keep if kind == "bool" else additive(keep, inputs["hidden_states"])
    kwargs = dict(joint_attention_kwargs={"attention_mask": pad})
    stock = CASE.run(transformer, inputs, **kwargs)
    assert (stock - CASE.run(transformer, inputs)).abs().max() > 1e-4  # it matters
    mask = tile_mask(CASE, transformer)
    ref = reference(CASE, transformer, inputs, [mask] * 2, **kwargs)
    for m, want in ((fs.masks.full(), stock), (mask, ref)):
        for backend in ("flex", "sdpa"):
            flux.patch(transformer, m, backend=backend, block_size=BLOCK, **CASE.video)
            out = CASE.run(transformer, inputs, **kwargs)
            torch.testing.assert_close(out, want, atol=1e-5, rtol=0)
    flux.unpatch(transformer)


def test_attention_mask_bias_is_refused():
    with pytest.raises(ValueError, match="bias"):
        flux.dense_attention_mask(torch.full((1, 1, 4, 4), -2.0), 4)
    with pytest.raises(ValueError, match="does not broadcast"):
        flux.dense_attention_mask(torch.ones(1, 1, 3, 3, dtype=torch.bool), 4)
    with pytest.raises(TypeError, match="bool or floating"):
        flux.dense_attention_mask(torch.ones(4, 4, dtype=torch.long), 4)
    keep = torch.rand(2, 1, 12, 12, generator=torch.Generator().manual_seed(0)) < 0.5
    mask = flux.mask_from_dense(keep)
    assert torch.equal(mask.to_dense(), keep)
    # its tiles: empty where no pair is kept, full where all are
    states = mask.tile_states(12, 12, block_size=4)
    blocks = keep.reshape(2, 1, 3, 4, 3, 4).sum((-3, -1))
    assert torch.equal(states == 0, blocks == 0) and torch.equal(states == 2, blocks == 16)


def test_spargeattn_flux_file_numbers_single_blocks_after_dual(tmp_path):
    """SpargeAttn numbers ``transformer_blocks`` and ``single_transformer_blocks`` from 0
    each; the patch's layer of single block N is ``dual + N``."""
    state = {}
    for prefix, blocks, base in (("transformer_blocks", 2, 0.1),
                                 ("single_transformer_blocks", 3, 0.5)):
        for i in range(blocks):
            key = f"{prefix}.{i}.attn.inner_attention"
            state[f"{key}.simthreshd1"] = torch.full((2,), base + i / 100)
            state[f"{key}.cdfthreshd"] = torch.full((2,), 0.9)
            state[f"{key}.is_sparse"] = torch.ones(2, dtype=torch.bool)
    path = tmp_path / "flux_l1-0.06_pv-0.065.pt"
    torch.save(state, path)
    params = flux.ADAPTER.load_tuned(path)
    assert (params.layers, params.heads, params.l1) == (5, 2, 0.06)
    torch.testing.assert_close(params.simthreshd1[:, 0],
                               torch.tensor([0.1, 0.11, 0.5, 0.51, 0.52]))
