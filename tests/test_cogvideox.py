"""CogVideoX patch: a tiny random CogVideoXTransformer3DModel (saved and loaded back).

The adapter contract (tests/test_models_base.py ``CHECKS``: keep-all = stock, unpatch bit
for bit, radial = the stock processor with the mask as an additive float mask on flex and
sdpa, dense layers / steps, a pipeline's step trace, layout mismatches, deep copies, fused
QKV) runs on ``CASE``; CogVideoX's own cases follow.

Shapes: 25 pixel frames at 64 x 64 -> 7 latent frames x 4 x 4 tokens + 8 text = 120
tokens, batch 2 (CFG), 2 heads x 16. Tolerances: fp32 outputs agree within 1e-5 absolute
(different summation orders of the same softmax), bf16 within 0.05 of fp32.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")

from diffusers import CogVideoXTransformer3DModel  # noqa: E402
from diffusers.models.attention_processor import CogVideoXAttnProcessor2_0  # noqa: E402
from diffusers.models.embeddings import get_3d_rotary_pos_embed  # noqa: E402

import flexsparse as fs  # noqa: E402
from flexsparse.masks.radial import radial  # noqa: E402
from flexsparse.models import cogvideox as cvx  # noqa: E402
from flexsparse.models._video import TokenGrid  # noqa: E402
from tests.test_models_base import (  # noqa: E402
    CHECKS,
    AdapterCase,
    check_fullgraph_compile_when_warm,
    loaded,
)

FRAMES, HW, BLOCK = 25, 64, 16  # -> 7 latent frames of 4 x 4 patches, 8 text tokens
GRID = TokenGrid(7, 4, 4)
LAYOUT = fs.VideoLayout(frames=7, tokens_per_frame=16, text_tokens=8)
ATOL = 1e-5
BOUNDARIES = [0, 3, 5]
ADJACENCY = [[1, 1, 0], [1, 1, 0], [0, 0, 1]]


def _config(**over):
    cfg = dict(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
        time_embed_dim=8, text_embed_dim=16, num_layers=2, sample_width=8, sample_height=8,
        sample_frames=FRAMES, patch_size=2, max_text_seq_length=8,
        use_rotary_positional_embeddings=True,
    )
    cfg.update(over)
    return cfg


def _build():
    torch.manual_seed(0)
    return CogVideoXTransformer3DModel(**_config())


def _grid_inputs(grid: TokenGrid, batch=2, dtype=torch.float32, seed=1) -> dict:
    """Latents ``(B, F, C, H, W)``, text and RoPE for a token grid (patch 2)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, grid.frames, 4, 2 * grid.height, 2 * grid.width, generator=g)
    text = torch.randn(batch, 8, 16, generator=g)
    size = (grid.height, grid.width)
    rope = get_3d_rotary_pos_embed(16, ((0, 0), size), size, grid.frames)
    return dict(hidden_states=x.to(dtype), encoder_hidden_states=text.to(dtype),
                image_rotary_emb=rope)


def _inputs(frames=7, dtype=torch.float32):
    return _grid_inputs(TokenGrid(frames, 4, 4), dtype=dtype)


def _forward(model, inputs, t=500):
    timestep = torch.full((inputs["hidden_states"].shape[0],), t)
    with torch.no_grad():
        return model(**inputs, timestep=timestep, return_dict=False)[0]


class MaskedStock:
    """The stock processor with a dense bool mask passed as an additive float mask."""

    def __init__(self, dense: torch.Tensor):
        self.dense = dense
        self.stock = CogVideoXAttnProcessor2_0()

    def __call__(self, attn, hidden_states, encoder_hidden_states, attention_mask=None,
                 image_rotary_emb=None):
        b = hidden_states.shape[0]
        add = torch.zeros(self.dense.shape, dtype=hidden_states.dtype,
                          device=self.dense.device)
        add = add.masked_fill(~self.dense, torch.finfo(hidden_states.dtype).min)
        add = add.expand(b, *self.dense.shape[-2:])
        return self.stock(attn, hidden_states, encoder_hidden_states, add, image_rotary_emb)


def _reference(model, inputs, layer_masks, t=500):
    """Stock processors with the materialised masks (None = stock dense); the model must be
    unpatched."""
    for block, mask in zip(model.transformer_blocks, layer_masks):
        proc = CogVideoXAttnProcessor2_0() if mask is None else MaskedStock(mask.to_dense())
        block.attn1.set_processor(proc)
    out = _forward(model, inputs, t)
    for block in model.transformer_blocks:
        block.attn1.set_processor(CogVideoXAttnProcessor2_0())
    return out


def _tiny_pipeline(transformer):
    """A CogVideoXPipeline around ``transformer``: 1-layer T5, 4-level VAE, DDIM."""
    from diffusers import AutoencoderKLCogVideoX, CogVideoXDDIMScheduler, CogVideoXPipeline
    from transformers import T5Config, T5EncoderModel, T5Tokenizer

    torch.manual_seed(0)
    words = "a cat dog runs on the beach at night red car fast".split()
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [(f"▁{w}", -1.0) for w in words]
    tokenizer = T5Tokenizer(vocab=vocab, extra_ids=0)
    text_encoder = T5EncoderModel(T5Config(
        vocab_size=len(vocab), d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2,
    ))
    vae = AutoencoderKLCogVideoX(
        in_channels=3, out_channels=3, down_block_types=("CogVideoXDownBlock3D",) * 4,
        up_block_types=("CogVideoXUpBlock3D",) * 4, block_out_channels=(8, 8, 8, 8),
        latent_channels=4, layers_per_block=1, norm_num_groups=2, temporal_compression_ratio=4,
    )
    return CogVideoXPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae,
                             transformer=transformer, scheduler=CogVideoXDDIMScheduler())


CASE = AdapterCase(
    module=cvx, build=_build, inputs=_grid_inputs, grid=GRID,
    video=dict(num_frames=FRAMES, height=HW, width=HW), stock=CogVideoXAttnProcessor2_0,
    masked_stock=MaskedStock, block_size=BLOCK, atol=ATOL, pipeline=_tiny_pipeline,
    pipeline_call=dict(prompt="a cat", num_frames=FRAMES, height=HW, width=HW,
                       num_inference_steps=3, max_sequence_length=8, output_type="latent",
                       generator=torch.Generator().manual_seed(0)),
)


@pytest.fixture
def transformer(tmp_path_factory):
    return loaded(CASE, tmp_path_factory)


@pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.__name__)
def test_adapter_contract(transformer, check):
    check(CASE, transformer)


def test_fullgraph_compile_of_a_warm_patched_transformer(transformer):
    check_fullgraph_compile_when_warm(CASE, transformer)


def _scenes_available() -> bool:
    try:
        from flexsparse.masks.scenes import scenes  # noqa: F401
    except ImportError:
        return False
    return True


# -- layout ----------------------------------------------------------------------------------
def test_layout_from_config(transformer):
    assert cvx.layout_for(transformer, FRAMES, HW, HW) == LAYOUT
    assert cvx.layout_for(transformer, 49, 480, 720).length == 8 + 13 * 1350
    with pytest.raises(ValueError, match="height"):
        cvx.layout_for(transformer, FRAMES, 60, HW)
    # the pipeline's rule (latent frames = (n - 1) // 4 + 1): 8 and 24 frames are valid
    assert cvx.layout_for(transformer, 24, HW, HW).frames == 6
    assert cvx.layout_for(transformer, 8, HW, HW).frames == 2
    assert cvx.layout_for(transformer) == cvx.layout_for(transformer, 25, 64, 64)  # config
    with pytest.raises(ValueError, match="num_frames"):
        cvx.layout_for(transformer, 0, HW, HW)


def test_layout_patch_size_t():
    class Cfg:
        max_text_seq_length, patch_size, patch_size_t, temporal_compression_ratio = 8, 2, 2, 4

    class T15:
        config = Cfg()
        transformer_blocks = []

    # 25 frames -> 7 latent frames, padded to 8 -> 4 temporal patches
    lay = cvx.layout_for(T15(), FRAMES, HW, HW)
    assert (lay.frames, lay.tokens_per_frame, lay.text_tokens) == (4, 16, 8)


# -- outputs -----------------------------------------------------------------------------------
def test_dense_pattern_is_stock_exactly(transformer):
    """Through ``flexsparse.models.patch`` (dispatch on the class) and a pipeline."""
    from flexsparse import models

    inputs = _inputs()
    stock = _forward(transformer, inputs)
    assert models.adapter_for(transformer) is cvx
    handle = models.patch(transformer, pattern="dense", num_frames=FRAMES, height=HW, width=HW)
    assert handle.mask_for_layer(1) is None and handle.kind == "cogvideox"
    assert torch.equal(_forward(transformer, inputs), stock)
    models.unpatch(transformer)
    assert not hasattr(transformer, "_flexsparse_patch")


def test_cogvideox15_token_grid_pads_frames():
    """CogVideoX 1.5 (``patch_size_t=2``): the pipeline pads 7 latent frames to 8, so the
    transformer sees 4 temporal patches; the layout and the pre-hook agree."""
    class Cfg:
        patch_size, patch_size_t = 2, 2

    class T15:
        config = Cfg()

    latents = torch.zeros(1, 8, 4, 8, 8)
    assert cvx.ADAPTER.token_grid(T15(), {"hidden_states": latents}) == TokenGrid(4, 4, 4)


def test_scenes_and_radial_equal_masked_stock(transformer):
    assert _scenes_available(), "flexsparse.masks.scenes has not landed"
    import networkx as nx

    from flexsparse.masks.scenes import scenes

    inputs = _inputs()
    scene = scenes(LAYOUT, BOUNDARIES, ADJACENCY)
    both = radial(LAYOUT, 1.0, block_size=BLOCK) & scene
    for pattern, mask in (("scenes", scene), ("radial", both)):
        ref = _reference(transformer, inputs, [mask, mask])
        cvx.patch(transformer, pattern=pattern, num_frames=FRAMES, height=HW, width=HW,
                  scenes=(BOUNDARIES, ADJACENCY), backend="flex", block_size=BLOCK)
        torch.testing.assert_close(_forward(transformer, inputs), ref, atol=ATOL, rtol=0)
    graph = nx.Graph([(0, 1)])
    graph.add_node(2)
    handle = cvx.patch(transformer, pattern="scenes", num_frames=FRAMES, height=HW, width=HW,
                       scenes={"boundaries": BOUNDARIES, "adjacency": graph})
    assert torch.equal(handle.mask_for_layer(0).to_dense(), scene.to_dense())


def test_observer_sees_rope_applied_qkv(transformer):
    inputs = _inputs()
    handle = cvx.patch(transformer, num_frames=FRAMES, height=HW, width=HW, block_size=BLOCK)
    seen = []
    with handle.observing(lambda i, q, k, v: seen.append((i, tuple(q.shape), tuple(v.shape)))):
        _forward(transformer, inputs)
    assert seen == [(0, (2, 2, 120, 16), (2, 2, 120, 16)), (1, (2, 2, 120, 16), (2, 2, 120, 16))]
    assert handle.kind == "cogvideox" and handle.layers == [0, 1]


def test_bf16_close_to_fp32(transformer):
    inputs = _inputs()
    mask = radial(LAYOUT, 1.0, block_size=BLOCK)
    ref = _reference(transformer, inputs, [mask, mask])
    transformer.to(torch.bfloat16)
    cvx.patch(transformer, num_frames=FRAMES, height=HW, width=HW, backend="flex",
              block_size=BLOCK)
    out = _forward(transformer, _inputs(dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, atol=0.05, rtol=0.05)


def test_tuned_dynamic_mask_composes(transformer, monkeypatch):
    """``tuned=path``: the per-layer dynamic mask of ``load_params(path)`` is and-ed with the
    pattern (load_params stubbed: its parameter files are another module's)."""
    import flexsparse.tune as tune

    keep = torch.rand(LAYOUT.length // 8 + 1, LAYOUT.length // 8 + 1) < 0.7
    keep |= torch.eye(keep.shape[0], dtype=torch.bool)
    tiles = fs.Mask.from_tiles(keep[:15, :15], 8, length=LAYOUT.length, name="tuned")

    class Dyn(fs.DynamicMask):
        name = "tuned"

        def bind(self, q, k):
            return tiles

    class Params:
        def layer_mask(self, i):
            return Dyn() if i == 1 else None

    calls = []
    monkeypatch.setattr(tune, "load_params", lambda p: calls.append(p) or Params(),
                        raising=False)
    inputs = _inputs()
    mask = radial(LAYOUT, 1.0, block_size=BLOCK)
    ref = _reference(transformer, inputs, [mask, mask & tiles])
    cvx.patch(transformer, num_frames=FRAMES, height=HW, width=HW, block_size=BLOCK,
              tuned="params.json")
    assert calls == []  # loaded lazily
    torch.testing.assert_close(_forward(transformer, inputs), ref, atol=ATOL, rtol=0)
    assert calls == ["params.json"]


# -- errors -------------------------------------------------------------------------------------
def test_bad_arguments(transformer):
    kw = dict(num_frames=FRAMES, height=HW, width=HW)
    with pytest.raises(ValueError, match="pattern"):
        cvx.patch(transformer, pattern="spiral", **kw)
    with pytest.raises(ValueError, match="backend"):
        cvx.patch(transformer, backend="cuda", **kw)
    with pytest.raises(ValueError, match="dense_layers"):
        cvx.patch(transformer, dense_layers=-1, **kw)
    with pytest.raises(ValueError, match="scenes"):
        cvx.patch(transformer, pattern="scenes", **kw)
    with pytest.raises(TypeError, match="scenes must be"):
        cvx.patch(transformer, scenes="0,3,5", **kw)
    with pytest.raises(TypeError, match="pipe_or_transformer"):
        cvx.patch(torch.nn.Linear(2, 2), **kw)
    with pytest.raises(TypeError, match="mask must be"):
        cvx.patch(transformer, torch.ones(3, 3, dtype=torch.bool), **kw)
    assert not hasattr(transformer, "_flexsparse_patch")


# -- the full pipeline through the CLI --------------------------------------------------------
def _tiny_pipeline_dir(root):
    torch.manual_seed(0)
    transformer = CogVideoXTransformer3DModel(**_config(sample_width=4, sample_height=4,
                                                         sample_frames=9))
    _tiny_pipeline(transformer).save_pretrained(root)
    return root


def test_cli_video_end_to_end(tmp_path, capsys):
    from flexsparse.cli import main

    model = _tiny_pipeline_dir(tmp_path / "tiny-cogvideox")
    out = tmp_path / "out.mp4"
    # 9 frames at 32 x 32 -> 3 latent frames x 4 tokens + 8 text tokens
    rc = main(["video", "--model", str(model), "--prompt", "a cat runs on the beach",
               "--pattern", "radial", "--frames", "9", "--height", "32", "--width", "32",
               "--steps", "2", "--dense-layers", "1", "--dense-timesteps", "1",
               "--block-size", "4", "--seed", "0", "-o", str(out), "--trace", "--save-mask"])
    assert rc == 0, capsys.readouterr().err
    text = capsys.readouterr().out
    written = [p for p in tmp_path.iterdir() if p.name.startswith("out")]
    assert written, f"no output next to {out}: {list(tmp_path.iterdir())}"
    if out.exists():
        assert out.stat().st_size > 0
    else:  # no video writer installed: frames saved as .npy instead, and said so
        frames = np.load(tmp_path / "out.npy")
        assert frames.shape == (9, 32, 32, 3) and np.isfinite(frames).all()
        assert "out.npy" in text
    assert (tmp_path / "out_mask.png").stat().st_size > 0
    # 2 steps x 2 blocks: step 0 dense, step 1 dense in block 0 only
    assert "step 0: dense dense" in text and "step 1: dense sparse" in text


def test_cli_scene_flags(tmp_path):
    import argparse

    from flexsparse.commands import video

    adj = tmp_path / "adj.json"
    adj.write_text("[[1, 0], [0, 1]]")
    args = argparse.Namespace(boundaries="0, 3", adjacency=str(adj), pattern="radial",
                              frame_units="pixel")
    assert video.scenes_arg(args) == dict(boundaries=[0, 3], adjacency=[[1, 0], [0, 1]],
                                          frame_units="pixel")
    assert video.C.parse_adjacency("1,1,0;1,1,1;0,1,1") == [[1, 1, 0], [1, 1, 1], [0, 1, 1]]
    with pytest.raises(video.UsageError, match="--adjacency"):
        video.C.parse_adjacency("1,1;1")
    with pytest.raises(video.UsageError, match="boundaries"):
        video.parse_boundaries("0,a")
    with pytest.raises(video.UsageError, match="together"):
        video.scenes_arg(argparse.Namespace(boundaries="0,3", adjacency=None, pattern="radial",
                                            frame_units="latent"))
    assert video.format_trace([(0, 0, "dense"), (0, 1, "dense"), (1, 0, "dense"),
                               (1, 1, "sparse")]) == ["step 0: dense dense",
                                                      "step 1: dense sparse"]


def test_cli_usage_errors(tmp_path, capsys):
    from flexsparse.cli import main

    rc = main(["video", "--model", str(tmp_path / "missing"), "--prompt", "x", "-o",
               str(tmp_path / "o.mp4")])
    assert rc == 2 and "missing" in capsys.readouterr().err
    rc = main(["video", "--model", str(tmp_path), "--prompt", "x", "--pattern", "scenes",
               "-o", str(tmp_path / "o.mp4")])
    assert rc == 2 and "--boundaries" in capsys.readouterr().err
    # flags are checked before the model folder is even looked at (it has no index here)
    for flags, needle in ((["--decay", "inf"], "--decay"), (["--frames", "0"], "--frames"),
                          (["--height", "60"], "--height"),
                          (["--tuned", str(tmp_path / "none.pt")], "--tuned")):
        rc = main(["video", "--model", str(tmp_path), "--prompt", "x", *flags, "-o",
                   str(tmp_path / "o.mp4")])
        err = capsys.readouterr().err
        assert rc == 2 and needle in err and "Traceback" not in err, err
    (tmp_path / "model_index.json").write_text('{"_class_name": "NoSuchPipeline"}')
    rc = main(["video", "--model", str(tmp_path), "--prompt", "x", "-o",
               str(tmp_path / "o.mp4")])
    assert rc == 2 and "NoSuchPipeline" in capsys.readouterr().err


# -- CUDA (run by the lead on the GPU machine) ------------------------------------------------
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@cuda
@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["flex", "quant"])
def test_cuda_bf16_radial_matches_masked_stock(tmp_path, backend):
    """49 frames at 256 x 256 (13 x 256 + 8 = 3,336 tokens), block 128, bf16 on CUDA (flex
    compiled) against the fp32 stock processor with the dense mask: within 0.05 (flex), 0.1
    (quant: quantized q k^T adds its own error)."""
    torch.manual_seed(0)
    model = CogVideoXTransformer3DModel(**_config(attention_head_dim=64, sample_width=32,
                                                  sample_height=32, sample_frames=49))
    model.save_pretrained(tmp_path)
    model = CogVideoXTransformer3DModel.from_pretrained(tmp_path).eval().cuda()
    layout = cvx.layout_for(model, 49, 256, 256)
    mask = radial(layout, 1.0, block_size=128)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 13, 4, 32, 32, generator=g).cuda()
    text = torch.randn(2, 8, 16, generator=g).cuda()
    rope = tuple(t.cuda() for t in get_3d_rotary_pos_embed(64, ((0, 0), (16, 16)), (16, 16), 13))
    ts = torch.full((2,), 500, device="cuda")
    for block in model.transformer_blocks:
        block.attn1.set_processor(MaskedStock(mask.to_dense().cuda()))
    with torch.no_grad():
        ref = model(x, text, ts, image_rotary_emb=rope, return_dict=False)[0]
    for block in model.transformer_blocks:
        block.attn1.set_processor(CogVideoXAttnProcessor2_0())
    model.to(torch.bfloat16)
    try:
        cvx.patch(model, num_frames=49, height=256, width=256, backend=backend)
        with torch.no_grad():
            out = model(x.bfloat16(), text.bfloat16(), ts, image_rotary_emb=rope,
                        return_dict=False)[0]
    except ValueError as exc:
        if backend == "quant" and "quant" in str(exc):
            pytest.skip(f"quant backend unavailable: {exc}")
        raise
    assert out.dtype == torch.bfloat16
    tol = 0.05 if backend == "flex" else 0.1
    torch.testing.assert_close(out.float(), ref, atol=tol, rtol=tol)


@cuda
@pytest.mark.gpu
def test_cuda_pipeline_with_cpu_offload(tmp_path):
    """The tiny pipeline on CUDA in fp16 with enable_model_cpu_offload and CFG: the patch
    keeps working under accelerate's hooks and the step trace is as asked."""
    pytest.importorskip("accelerate")
    from diffusers import CogVideoXPipeline

    path = _tiny_pipeline_dir(tmp_path / "tiny")
    pipe = CogVideoXPipeline.from_pretrained(path, torch_dtype=torch.float16)
    pipe.enable_model_cpu_offload()
    cvx.patch(pipe, num_frames=9, height=32, width=32, block_size=4, dense_timesteps=1,
              backend="sdpa")
    with cvx.recording(pipe) as trace:
        frames = pipe("a cat", num_frames=9, height=32, width=32, num_inference_steps=2,
                      max_sequence_length=8, output_type="np").frames[0]
    assert np.isfinite(frames).all() and frames.shape == (9, 32, 32, 3)
    assert [p for _, _, p in trace] == ["dense", "dense", "sparse", "sparse"]
