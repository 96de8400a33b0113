"""Wan patch: tiny random WanTransformer3DModel (saved and loaded back).

The adapter contract (tests/test_models_base.py ``CHECKS``) runs on ``CASE`` (Wan 2.1 T2V
shapes); Wan's own cases follow: I2V (image cross-attention untouched), the layout
presets (2.1 and the 2.2 5B 16x VAE), the pipelines' frame rounding, Wan 2.2 TI2V per-token
timesteps, and a Wan 2.2 A14B pipeline with ``transformer`` and ``transformer_2``.

Shapes: 17 pixel frames at 64 x 64 -> 5 latent frames x 4 x 4 tokens = 80 video tokens
(no text in self-attention), batch 2, 2 heads x 16, 2 blocks. Tolerance: fp32 outputs
agree within 1e-5 absolute.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers")

from diffusers import WanTransformer3DModel  # noqa: E402
from diffusers.models.transformers.transformer_wan import WanAttnProcessor  # noqa: E402

import flexsparse as fs  # noqa: E402
from flexsparse import models  # noqa: E402
from flexsparse.models import wan  # noqa: E402
from flexsparse.models._patch import ATTR  # noqa: E402
from flexsparse.models._video import SparseProcessor, TokenGrid  # noqa: E402
from tests.test_models_base import (  # noqa: E402
    CHECKS,
    AdapterCase,
    check_fullgraph_compile_when_warm,
    forward,
    loaded,
    reference,
)

FRAMES, HW, BLOCK = 17, 64, 16
GRID = TokenGrid(5, 4, 4)
VIDEO = dict(num_frames=FRAMES, height=HW, width=HW)
ATOL = 1e-5


def _build(**over):
    torch.manual_seed(0)
    cfg = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16,
               in_channels=16, out_channels=16, text_dim=16, freq_dim=16, ffn_dim=32,
               num_layers=2, rope_max_seq_len=32)
    cfg.update(over)
    return WanTransformer3DModel(**cfg)


def _inputs(grid: TokenGrid, seed=1, channels=16, text=8) -> dict:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, channels, grid.frames, 2 * grid.height, 2 * grid.width, generator=g)
    return dict(hidden_states=x, encoder_hidden_states=torch.randn(2, text, 16, generator=g))


class MaskedStock:
    """The stock processor with a dense bool mask passed as an additive float mask."""

    def __init__(self, dense: torch.Tensor):
        self.dense, self.stock = dense, WanAttnProcessor()

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 rotary_emb=None):
        add = torch.zeros(self.dense.shape, dtype=hidden_states.dtype)
        add = add.masked_fill(~self.dense, torch.finfo(hidden_states.dtype).min)
        return self.stock(attn, hidden_states, encoder_hidden_states, add, rotary_emb)


def _tiny_pipeline(transformer, transformer_2=None, boundary_ratio=None):
    """A WanPipeline around ``transformer`` (and ``transformer_2``): 1-layer UMT5, a
    2-level Wan VAE, flow-matching Euler."""
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline
    from transformers import T5Tokenizer, UMT5Config, UMT5EncoderModel

    torch.manual_seed(0)
    words = "a cat dog runs on the beach at night red car fast".split()
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [(f"▁{w}", -1.0) for w in words]
    tokenizer = T5Tokenizer(vocab=vocab, extra_ids=0)
    text_encoder = UMT5EncoderModel(UMT5Config(
        vocab_size=len(vocab), d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2))
    vae = AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True])
    return WanPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae,
                       transformer=transformer, transformer_2=transformer_2,
                       boundary_ratio=boundary_ratio,
                       scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0))


CALL = dict(prompt="a cat", negative_prompt="a dog", num_frames=FRAMES, height=HW, width=HW,
            num_inference_steps=3, max_sequence_length=8, output_type="latent")
CASE = AdapterCase(
    module=wan, build=_build, inputs=_inputs, grid=GRID, video=VIDEO, stock=WanAttnProcessor,
    masked_stock=MaskedStock, block_size=BLOCK, atol=ATOL, pipeline=_tiny_pipeline,
    pipeline_call=dict(CALL, generator=torch.Generator().manual_seed(0)),
)


def _saved(model, path) -> WanTransformer3DModel:
    """``model`` saved with ``save_pretrained`` and loaded back with ``from_pretrained``."""
    model.save_pretrained(path)
    return WanTransformer3DModel.from_pretrained(path).eval()


@pytest.fixture
def transformer(tmp_path_factory):
    return loaded(CASE, tmp_path_factory)


@pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.__name__)
def test_adapter_contract(transformer, check):
    check(CASE, transformer)


# -- Wan's own ---------------------------------------------------------------------------------
def test_layout_presets_and_frame_rounding(transformer):
    assert wan.layout_for(transformer, **VIDEO) == fs.VideoLayout(
        frames=5, tokens_per_frame=16, text_position="end")
    real = wan.layout_for(transformer, 81, 720, 1280)
    assert real == fs.VideoLayout.from_video(81, 720, 1280, model="wan2.1")
    assert real.length == 75_600
    # the pipelines round to num_frames // 4 * 4 + 1: 80 -> 81 (21 latent frames, where the
    # floor rule of the other pipelines would give 20), 78 -> 77, 83 -> 81
    assert [wan.pipeline_frames(n, 4) for n in (80, 78, 83, 81, 1)] == [81, 77, 81, 81, 1]
    assert wan.layout_for(transformer, 80, 720, 1280).frames == 21
    assert wan.layout_for(transformer, 83, 720, 1280).frames == 21
    # Wan 2.2 TI2V 5B: 48 latent channels, 16x spatial VAE
    five_b = _build(in_channels=48, out_channels=48, num_layers=1)
    layout = wan.layout_for(five_b, 121, 704, 1280)
    assert layout == fs.VideoLayout.from_video(121, 704, 1280, model="wan2.2-5b")
    assert (layout.frames, layout.tokens_per_frame) == (31, 880)
    with pytest.raises(ValueError, match="height must be a multiple of 32"):
        wan.layout_for(five_b, 121, 720, 1280)
    with pytest.raises(ValueError, match="text_tokens must be 0"):
        wan.patch(transformer, layout=fs.VideoLayout(frames=5, tokens_per_frame=16,
                                                     text_tokens=4))


def test_i2v_cross_attention_untouched(tmp_path):
    """Wan 2.1 I2V: image tokens in ``attn2`` (stock), radial ``attn1`` = masked stock."""
    model = _saved(_build(in_channels=36, image_dim=8, added_kv_proj_dim=32), tmp_path)
    g = torch.Generator().manual_seed(3)
    inputs = dict(_inputs(GRID, channels=36, text=512),
                  encoder_hidden_states_image=torch.randn(2, 4, 8, generator=g))
    mask = CASE.radial(model)
    ref = reference(CASE, model, inputs, [mask, mask])
    handle = wan.patch(model, backend="flex", block_size=BLOCK, **VIDEO)
    assert all(not isinstance(b.attn2.processor, SparseProcessor) for b in model.blocks)
    torch.testing.assert_close(forward(model, inputs), ref, atol=ATOL, rtol=0)
    assert handle.layers == [0, 1]
    wan.unpatch(model)


def test_ti2v_tokenwise_timesteps_count_steps(transformer):
    """Wan 2.2 TI2V passes ``[B, tokens]`` timesteps, 0 on the conditioning frame: the
    step count follows the largest one."""
    inputs = _inputs(GRID)
    wan.patch(transformer, dense_timesteps=1, block_size=BLOCK, **VIDEO)
    first = torch.arange(GRID.tokens) < GRID.height * GRID.width

    def call(t):
        ts = torch.where(first, 0, t).expand(2, -1)
        with torch.no_grad():
            transformer(**inputs, timestep=ts, return_dict=False)

    with wan.recording(transformer) as trace:
        for t in (999, 999, 700, 400):
            call(t)
    assert [s for s, i, _ in trace if i == 0] == [0, 0, 1, 2]
    assert [p for s, _, p in trace] == ["dense"] * 4 + ["sparse"] * 4
    wan.unpatch(transformer)


def test_a14b_two_transformers_share_the_step_count(transformer, tmp_path):
    """Wan 2.2 A14B: ``transformer`` (high noise) and ``transformer_2`` (low noise) both
    patched; steps are counted over the whole generation; unpatch restores both."""
    second = _saved(_build(), tmp_path)
    pipe = _tiny_pipeline(transformer, second, boundary_ratio=0.5)
    stock = [[m.processor for m in wan.ADAPTER.attention_modules(t)] for t in (transformer,
                                                                              second)]
    handle = models.patch(pipe, dense_timesteps=1, block_size=BLOCK, **VIDEO)
    assert handle is getattr(transformer, ATTR) and hasattr(second, ATTR)
    with wan.recording(pipe) as trace:
        pipe(**CALL, generator=torch.Generator().manual_seed(0))
    # 3 steps, CFG: 2 calls per step of 2 layers; step 2 falls to transformer_2
    assert [s for s, _, _ in trace] == [0] * 4 + [1] * 4 + [2] * 4
    assert [p for s, _, p in trace] == ["dense"] * 4 + ["sparse"] * 8
    models.unpatch(pipe)
    assert not hasattr(transformer, ATTR) and not hasattr(second, ATTR)
    assert [[m.processor for m in wan.ADAPTER.attention_modules(t)]
            for t in (transformer, second)] == stock


def test_dispatch(transformer):
    assert models.adapter_for(transformer) is wan
    handle = models.patch(transformer, block_size=BLOCK, **VIDEO)
    assert handle.kind == "wan" and len(handle.layers) == 2
    models.unpatch(transformer)
    with pytest.raises(TypeError, match="WanTransformer3DModel"):
        wan.patch(torch.nn.Linear(2, 2), **VIDEO)


def test_cli_video_end_to_end_on_a_saved_wan_pipeline(tmp_path, capsys):
    """``flexsparse video --model DIR`` on a Wan pipeline folder: the pipeline class comes
    from model_index.json, the transformer is patched radial, the trace shows the steps."""
    from flexsparse.cli import main

    torch.manual_seed(0)
    model = tmp_path / "tiny-wan"
    _tiny_pipeline(_build()).save_pretrained(model)
    out = tmp_path / "out.mp4"
    rc = main(["video", "--model", str(model), "--prompt", "a cat runs on the beach",
               "--frames", str(FRAMES), "--height", str(HW), "--width", str(HW),
               "--steps", "2", "--dense-timesteps", "1", "--block-size", str(BLOCK),
               "--seed", "0", "-o", str(out), "--trace"])
    assert rc == 0, capsys.readouterr().err
    text = capsys.readouterr().out
    tokens = GRID.frames * GRID.height * GRID.width
    assert f"{FRAMES} frames at {HW}x{HW} -> {tokens} tokens" in text
    assert "step 0: dense dense" in text and "step 1: sparse sparse" in text
    assert any(p.name.startswith("out") for p in tmp_path.iterdir())


def test_fullgraph_compile_of_a_warm_patched_transformer(transformer):
    check_fullgraph_compile_when_warm(CASE, transformer)


def test_torch_compile_of_a_patched_transformer_equals_eager(transformer):
    """``torch.compile(transformer)`` (default ``fullgraph=False``: Dynamo breaks the graph
    around the mask lookups) runs the patched processors and gives the eager answer."""
    wan.patch(transformer, **VIDEO, block_size=BLOCK, backend="sdpa")
    inputs = _inputs(GRID)
    eager = forward(transformer, inputs)
    torch._dynamo.reset()
    compiled = torch.compile(transformer, backend="aot_eager")
    torch.testing.assert_close(forward(compiled, inputs), eager, atol=1e-6, rtol=0)
    wan.unpatch(transformer)
    assert eager.ne(forward(transformer, inputs)).any()  # the sparse answer, not the stock one
    # Dense and sparse steps (the step counter runs outside the graph): no step may reuse
    # the other's compiled mask.
    wan.patch(transformer, **VIDEO, block_size=BLOCK, backend="sdpa", dense_layers=1,
              dense_timesteps=2)
    schedule = [999, 800, 600, 999, 700]
    eager = [forward(transformer, inputs, t) for t in schedule]
    wan.reset_steps(transformer)
    torch._dynamo.reset()
    compiled = torch.compile(transformer, backend="eager")
    for t, want in zip(schedule, eager):
        torch.testing.assert_close(forward(compiled, inputs, t), want, atol=1e-6, rtol=0)
    assert eager[0].ne(eager[2]).any()  # step 0 dense, step 2 sparse
    torch._dynamo.reset()
