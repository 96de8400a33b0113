"""HunyuanDiT patch: a tiny random HunyuanDiT2DModel (saved and loaded back), through the
image adapter checks of tests/test_models_base.py (``IMAGE_CHECKS``).

Shapes: 6 x 8 image tokens (96 x 128 pixels: VAE 8x, patch 2) = 48 tokens in ``attn1``,
batch 2, 2 heads x 8, 2 blocks; the text (77 BERT + 256 mT5 positions, as the pipeline
pads them) only reaches the untouched cross-attention ``attn2``. fp32 within 1e-5.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers")

from diffusers import HunyuanDiT2DModel  # noqa: E402
from diffusers.models.attention_processor import HunyuanAttnProcessor2_0  # noqa: E402
from diffusers.models.embeddings import get_2d_rotary_pos_embed  # noqa: E402

import flexsparse as fs  # noqa: E402
from flexsparse.attention import reference  # noqa: E402
from flexsparse.models import flux, hunyuan_dit  # noqa: E402
from flexsparse.models._video import SparseProcessor, TokenGrid  # noqa: E402
from tests.test_models_base import (  # noqa: E402
    IMAGE_CHECKS,
    ImageCase,
    additive,
    check_fullgraph_compile_when_warm,
    check_tuned_file,
    loaded,
)

GRID, BLOCK = flux.ImageGrid(1, 6, 8), 8
PIXELS = dict(height=96, width=128)
BERT_LEN, T5_LEN, HEAD_DIM = 77, 256, 8  # the pipeline pads the prompts to 77 / 256


class MaskedStock:
    """The stock processor on ``attn1`` with a dense bool mask as an additive float
    mask (``[B, H, N, N]`` masks go in as they are, ``[N, N]`` broadcast over batch)."""

    def __init__(self, dense: torch.Tensor):
        self.dense, self.stock = dense, HunyuanAttnProcessor2_0()

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 temb=None, image_rotary_emb=None):
        add = additive(self.dense, hidden_states)
        if add.dim() == 2:  # prepare_attention_mask wants [B, N, N] (it repeats per head)
            add = add.expand(hidden_states.shape[0], *add.shape)
        else:
            add = add.expand(-1, attn.heads, -1, -1).flatten(0, 1)  # [B * H, N, N]
        return self.stock(attn, hidden_states, encoder_hidden_states, add, temb,
                          image_rotary_emb)


def _build():
    torch.manual_seed(0)
    return HunyuanDiT2DModel(num_attention_heads=2, attention_head_dim=HEAD_DIM,
                             in_channels=4, patch_size=2, sample_size=16, hidden_size=16,
                             num_layers=2, cross_attention_dim=16, cross_attention_dim_t5=16,
                             pooled_projection_dim=8, text_len=BERT_LEN, text_len_t5=T5_LEN)


def _inputs(grid: TokenGrid, batch: int = 2, seed: int = 1) -> dict:
    """Latents ``(B, C, H, W)``, BERT and mT5 embeddings with their masks, size / style
    conditions and the 2-D RoPE of the grid (as the pipeline builds it)."""
    g = torch.Generator().manual_seed(seed)
    size = (grid.height, grid.width)
    return dict(
        hidden_states=torch.randn(batch, 4, 2 * grid.height, 2 * grid.width, generator=g),
        encoder_hidden_states=torch.randn(batch, BERT_LEN, 16, generator=g),
        text_embedding_mask=torch.ones(batch, BERT_LEN, dtype=torch.long),
        encoder_hidden_states_t5=torch.randn(batch, T5_LEN, 16, generator=g),
        text_embedding_mask_t5=torch.ones(batch, T5_LEN, dtype=torch.long),
        image_meta_size=torch.tensor([[96.0, 128, 96, 128, 0, 0]] * batch),
        style=torch.zeros(batch, dtype=torch.long),
        image_rotary_emb=get_2d_rotary_pos_embed(HEAD_DIM, ((0, 0), size), size),
    )


def _tiny_pipeline(transformer):
    """A HunyuanDiTPipeline around ``transformer``: 1-layer BERT and T5 with tokenizers
    from in-memory vocabularies, a 4-level VAE (factor 8, which the pipeline's RoPE
    assumes), DDPM."""
    from diffusers import AutoencoderKL, DDPMScheduler, HunyuanDiTPipeline
    from transformers import (
        BertConfig,
        BertModel,
        BertTokenizer,
        T5Config,
        T5EncoderModel,
        T5Tokenizer,
    )

    torch.manual_seed(0)
    words = "a cat dog runs on the beach at night red car fast".split()
    bert_vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", *words])}
    tokenizer = BertTokenizer(vocab=bert_vocab, model_max_length=BERT_LEN)
    bert = BertModel(BertConfig(vocab_size=len(bert_vocab), hidden_size=16,
                                num_hidden_layers=1, num_attention_heads=2,
                                intermediate_size=32, max_position_embeddings=BERT_LEN))
    t5_vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [(f"▁{w}", -1.0)
                                                                   for w in words]
    tokenizer_2 = T5Tokenizer(vocab=t5_vocab, extra_ids=0)
    t5 = T5EncoderModel(T5Config(vocab_size=len(t5_vocab), d_model=16, d_kv=8, d_ff=32,
                                 num_layers=1, num_heads=2))
    vae = AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(8,) * 4,
                        down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4,
                        layers_per_block=1, norm_num_groups=2)
    return HunyuanDiTPipeline(vae=vae, text_encoder=bert, tokenizer=tokenizer,
                              transformer=transformer, scheduler=DDPMScheduler(),
                              safety_checker=None, feature_extractor=None,
                              requires_safety_checker=False, text_encoder_2=t5,
                              tokenizer_2=tokenizer_2)


CASE = ImageCase(
    module=hunyuan_dit, build=_build, inputs=_inputs, grid=GRID, video=dict(PIXELS),
    stock=HunyuanAttnProcessor2_0, masked_stock=MaskedStock, block_size=BLOCK, atol=1e-5,
    pipeline=_tiny_pipeline,
    # the pipeline's RoPE assumes the 8x VAE: 128 x 128 pixels -> 16 x 16 latents -> 8 x 8
    pipeline_call=dict(prompt="a cat", height=128, width=128, num_inference_steps=3,
                       output_type="latent", use_resolution_binning=False,
                       generator=torch.Generator().manual_seed(0)),
    pipeline_video=dict(height=128, width=128),
    timestep=lambda batch, t: torch.full((batch,), float(t)),  # the pipeline's float t
)


@pytest.fixture
def transformer(tmp_path_factory):
    return loaded(CASE, tmp_path_factory)


@pytest.mark.parametrize("check", IMAGE_CHECKS, ids=lambda c: c.__name__)
def test_adapter_contract(transformer, check):
    check(CASE, transformer)


def test_fullgraph_compile_of_a_warm_patched_transformer(transformer):
    check_fullgraph_compile_when_warm(CASE, transformer)


def test_tuned_file(transformer, tmp_path):
    check_tuned_file(CASE, transformer, tmp_path)


# -- HunyuanDiT's own ---------------------------------------------------------------------------
def test_layout_image_tokens_only(transformer):
    layout = hunyuan_dit.layout_for(transformer, 1024, 1024)
    assert (layout.text_tokens, layout.tokens_per_frame, layout.length) == (0, 4096, 4096)
    assert hunyuan_dit.layout_for(transformer) == hunyuan_dit.layout_for(transformer, 128, 128)
    with pytest.raises(ValueError, match="text_tokens must be 0"):
        hunyuan_dit.layout_for(transformer, 1024, 1024, text_tokens=77)
    with pytest.raises(ValueError, match="height must be a multiple of 16"):
        hunyuan_dit.layout_for(transformer, 1000, 1024)


def test_only_self_attention_is_patched(transformer):
    handle = hunyuan_dit.patch(transformer, pattern="meansim",
                               meansim=dict(block_q=BLOCK, block_kv=BLOCK), **PIXELS)
    assert all(isinstance(b.attn1.processor, SparseProcessor) for b in transformer.blocks)
    assert all(type(b.attn2.processor) is HunyuanAttnProcessor2_0 for b in transformer.blocks)
    seen = []
    with handle.observing(lambda i, q, k, v: seen.append((i, tuple(q.shape)))):
        CASE.run(transformer, _inputs(GRID))
    assert seen == [(0, (2, 2, 48, HEAD_DIM)), (1, (2, 2, 48, HEAD_DIM))]
    hunyuan_dit.unpatch(transformer)


def test_head_dim_88_meansim_runs():
    """HunyuanDiT's real head dim (88, not a power of two) through meansim and both
    backends, against the float64 reference of the predicted mask."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 256, 88, generator=g) for _ in range(3))
    dyn = fs.masks.meansim(simthreshd1=-1.0, cdfthreshd=0.5, block_q=32, block_kv=32)
    ref = reference(q, k, v, dyn.bind(q, k))
    for backend in ("flex", "sdpa"):
        out = fs.attention(q, k, v, dyn, backend=backend)
        torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=0)
