"""flexsparse.tune: calibration meets its bound on held-out inputs, parameter files
(ours and SpargeAttn's), the tuner on a patched tiny LLaMA and the ``tune`` command."""

import math

import pytest
import torch

import flexsparse as fs
from flexsparse import masks, tune
from flexsparse.cli import main

# SpargeAttn's published CogVideoX-2b parameters, shipped in flexsparse/data
SPARGE = tune.spargeattn_example_path()
BQ, BK, D = 32, 16, 32
GRID = (-0.5, 0.0, 0.5, 0.9)


pytestmark = pytest.mark.usefixtures("one_thread")


def tiers(seed, **kw):
    """Block-smooth q/k at the tests' tiles (``tune.block_structured_qkv``): head 0 fits
    2 of 16 key blocks per query block, head 1 fits no sparse setting."""
    return tune.block_structured_qkv(seed, block_q=BQ, block_kv=BK, head_dim=D, **kw)


def rel_l1(out, ref):
    return ((out.double() - ref).abs().sum((0, 2, 3)) / ref.abs().sum((0, 2, 3)))


def mask_of(result, **kw):
    return masks.meansim(torch.where(result.is_sparse, result.simthreshd1, math.inf),
                         cdfthreshd=result.cdfthreshd, block_q=BQ, block_kv=BK, **kw)


# -- calibration -----------------------------------------------------------------------------
def test_tuned_heads_meet_the_bound_on_held_out_inputs():
    result = tune.tune_heads([tiers(s) for s in range(2)], l1=0.06, block_q=BQ, block_kv=BK,
                             simthreshd1_grid=GRID)
    assert result.is_sparse.tolist() == [True, False]
    assert 0.6 < result.sparsity[0] <= 0.875  # keeps >= 2 of 16 key blocks per row
    assert result.error[0] < 0.06
    m = mask_of(result)
    for seed in (100, 101):
        q, k, v = tiers(seed)
        err = rel_l1(fs.attention(q, k, v, mask=m, backend="flex"), fs.reference(q, k, v))
        assert (err < 0.06).all(), err
        kept = m.predict(q, k)
        skipped = 1 - kept.float().mean((0, 2, 3))
        assert skipped[0] > 0.6 and skipped[1] == 0


def test_unreachable_bound_leaves_every_head_dense():
    result = tune.tune_heads([tiers(0)], l1=1e-9, block_q=BQ, block_kv=BK, simthreshd1_grid=GRID)
    assert not result.is_sparse.any()
    assert torch.equal(result.simthreshd1, torch.ones(2))
    assert torch.equal(result.cdfthreshd, torch.ones(2))
    assert torch.equal(result.sparsity, torch.zeros(2))


@pytest.mark.parametrize("metric,bound", [("cosine", 0.995), ("rmse", 0.02)])
def test_other_metrics(metric, bound):
    result = tune.tune_heads([tiers(0)], metric=metric, bound=bound, block_q=BQ, block_kv=BK,
                             simthreshd1_grid=GRID)
    assert result.is_sparse[0] and result.sparsity[0] > 0.6
    q, k, v = tiers(50)
    out = fs.attention(q, k, v, mask=mask_of(result), backend="flex").double()[:, 0]
    ref = fs.reference(q, k, v)[:, 0]
    if metric == "cosine":
        value = (out * ref).sum() / (out.norm() * ref.norm())
        assert value > bound
    else:
        assert (out - ref).square().mean().sqrt() < bound


def test_causal_calibration_with_a_base_mask():
    causal = masks.causal()
    result = tune.tune_heads([tiers(s) for s in range(2)], l1=0.06, block_q=BQ, block_kv=BK,
                             causal=True, base_mask=causal, simthreshd1_grid=GRID)
    assert result.is_sparse[0]
    m = mask_of(result, causal=True) & causal
    q, k, v = tiers(100)
    err = rel_l1(fs.attention(q, k, v, mask=m, backend="flex"), fs.reference(q, k, v, mask=causal))
    assert (err < 0.06).all(), err


def test_tune_heads_rejects_bad_samples():
    with pytest.raises(ValueError, match="samples is empty"):
        tune.tune_heads([])
    with pytest.raises(TypeError, match=r"samples\[0\]"):
        tune.tune_heads([torch.zeros(1)])
    q = torch.randn(1, 2, 64, 8)
    with pytest.raises(ValueError, match="metric must be one of"):
        tune.tune_heads([(q, q, q)], metric="l2")


def test_tuner_collects_calls_and_fills_unobserved_layers_dense():
    tuner = tune.MeansimTuner(l1=0.06, block_q=BQ, block_kv=BK, simthreshd1_grid=GRID,
                              max_samples=2)
    for s in range(3):  # 3 calls, reservoir of 2
        tuner.observe(1, *tiers(s))
    assert tuner.calls == {1: 3} and len(tuner.samples[1]) == 2
    params = tuner.tune(model_name="synthetic", num_layers=3, progress=False)
    assert (params.layers, params.heads) == (3, 2)
    assert params.is_sparse.tolist() == [[False, False], [True, False], [False, False]]
    assert params.layer_mask(0) is None and params.layer_mask(2) is None
    assert params.l1 == 0.06 and params.pv_l1 == 0.07 and params.model == "synthetic"
    with pytest.raises(ValueError, match="pv_l1"):
        tune.MeansimTuner(l1=0.1, pv_l1=0.05)
    with pytest.raises(ValueError, match="no attention calls"):
        tune.MeansimTuner().tune()


# -- parameter files -------------------------------------------------------------------------
def test_spargeattn_file_loads_with_the_right_values():
    raw = torch.load(SPARGE, map_location="cpu", weights_only=True)
    params = tune.load_spargeattn(SPARGE)
    assert (params.layers, params.heads) == (30, 30)
    assert params.source == "spargeattn" and params.l1 == 0.06 and params.pv_l1 == 0.07
    for layer in (0, 7, 29):
        pre = f"transformer_blocks.{layer}.attn1.inner_attention."
        for name in ("simthreshd1", "cdfthreshd", "pvthreshd"):
            assert torch.equal(getattr(params, name)[layer], raw[pre + name].float())
        assert torch.equal(params.is_sparse[layer], raw[pre + "is_sparse"])
    assert torch.isnan(params.sparsity[params.is_sparse]).all()
    assert (params.sparsity[~params.is_sparse] == 0).all()
    # load_params detects the format
    assert torch.equal(tune.load_params(SPARGE).cdfthreshd, params.cdfthreshd)


def test_spargeattn_layer_mask_keeps_dense_heads_dense():
    params = tune.load_spargeattn(SPARGE)
    m = params.layer_mask(0)
    assert (m.block_q, m.block_kv, m.smooth_k, m.attention_sink) == (128, 64, True, True)
    dense_heads = ~params.is_sparse[0]
    assert torch.isinf(m.simthreshd1[dense_heads]).all()
    assert torch.equal(m.simthreshd1[~dense_heads], params.simthreshd1[0][~dense_heads])
    g = torch.Generator().manual_seed(0)
    base = torch.randn(1, 30, 1, 64, generator=g)
    q = base + 0.3 * torch.randn(1, 30, 512, 64, generator=g)
    k = base + 0.3 * torch.randn(1, 30, 512, 64, generator=g)
    kept = m.predict(q, k)
    assert kept[:, dense_heads].all()
    assert not kept[:, ~dense_heads].all()


def test_save_load_round_trip(tmp_path):
    params = tune.load_spargeattn(SPARGE)
    params.sparsity = torch.rand(30, 30)
    path = params.save(tmp_path / "p.safetensors")
    back = tune.load_params(path)
    for name in ("simthreshd1", "cdfthreshd", "pvthreshd", "is_sparse", "sparsity"):
        assert torch.equal(getattr(back, name), getattr(params, name)), name
    assert back.header() == params.header()
    assert isinstance(back, tune.TunedParams)


def test_every_saved_file_loads_back(tmp_path):
    # the header length's low byte takes every value as the model name grows, 0x80 and
    # b"P" included, which a first-byte sniff read as a pickle or a zip
    small = dict(simthreshd1=[[0.5]], cdfthreshd=[[0.9]], pvthreshd=[[50.0]],
                 is_sparse=[[True]], sparsity=[[0.25]])
    low_bytes = set()
    for n in range(401):
        params = tune.TunedParams(**small, model="m" * n)
        path = params.save(tmp_path / f"p{n}.safetensors")
        low_bytes.add(path.read_bytes()[0])
        assert tune.file_format(path) == "safetensors"
        back = tune.load_params(path)
        assert back.model == "m" * n and back.header() == params.header()
        assert torch.equal(back.cdfthreshd, params.cdfthreshd)
    assert {0x80, ord("P")} <= low_bytes
    assert tune.file_format(SPARGE) == "zip"
    legacy = tmp_path / "legacy.pt"
    torch.save({"a": torch.zeros(1)}, legacy, _use_new_zipfile_serialization=False)
    assert tune.file_format(legacy) == "pickle"


def test_bad_parameter_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        tune.load_params(tmp_path / "missing.safetensors")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all")
    with pytest.raises(ValueError, match="not a parameter file: neither safetensors"):
        tune.load_params(junk)
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(b"\xff\x00\x00\x00\x00\x00\x00\x00{")
    with pytest.raises(ValueError, match="not a parameter file"):
        tune.load_params(cut)
    other = tmp_path / "other.pt"
    torch.save({"weight": torch.zeros(3)}, other)
    with pytest.raises(ValueError, match="no SpargeAttn keys"):
        tune.load_params(other)
    params = tune.load_spargeattn(SPARGE)
    with pytest.raises(ValueError, match=r"layer_idx must be in \[0, 30\)"):
        params.layer_mask(30)


def test_plot_params_writes_a_picture(tmp_path):
    params = tune.load_spargeattn(SPARGE)
    params.sparsity = torch.where(params.is_sparse, torch.tensor(0.5), torch.tensor(0.0))
    out = tmp_path / "heads.png"
    fig = tune.plot_params(params, out)
    assert out.stat().st_size > 1000
    assert fig is not None


# -- tiny LLaMA end to end -------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    from flexsparse.models.tiny import save_tiny

    return save_tiny(tmp_path_factory.mktemp("tiny") / "llama", "llama")


def test_tuner_on_a_patched_llama_and_patch_with_the_result(tiny_llama, tmp_path):
    from transformers import AutoModelForCausalLM

    from flexsparse.models import llama

    model = AutoModelForCausalLM.from_pretrained(str(tiny_llama)).eval()
    ids = torch.randint(0, model.config.vocab_size, (1, 160), generator=torch.Generator())
    with torch.no_grad():
        dense = model(ids).logits
    llama.patch(model, masks.causal())
    tuner = tune.MeansimTuner(block_q=BQ, block_kv=BK, simthreshd1_grid=GRID)
    with tuner.attach(model), torch.no_grad():
        model(ids)
    llama.unpatch(model)
    assert sorted(tuner.samples) == list(range(model.config.num_hidden_layers))
    q, k, _ = tuner.samples[0][0]
    assert q.shape[1] == model.config.num_attention_heads and k.shape[2] == 160
    params = tuner.tune(model_name="tiny", progress=False)
    assert params.causal  # inferred from the llama handle
    assert params.layers == model.config.num_hidden_layers
    # A file with every head sparse and an aggressive setting, applied through patch():
    params.is_sparse[:] = True
    params.simthreshd1[:] = -1.0
    params.cdfthreshd[:] = 0.3
    path = params.save(tmp_path / "tiny.safetensors")
    llama.patch(model, masks.causal(), tuned=str(path))
    with torch.no_grad():
        sparse = model(ids).logits
    llama.unpatch(model)
    assert torch.isfinite(sparse).all()
    assert not torch.allclose(sparse, dense, atol=1e-4)  # the tuned masks took effect


def test_tune_command_end_to_end(tiny_llama, tmp_path, capsys):
    data = tmp_path / "cal.jsonl"
    data.write_text('{"text": "' + "the quick brown fox jumps over the lazy dog " * 12 + '"}\n'
                    '{"input_ids": [' + ", ".join(str(i % 50 + 3) for i in range(150)) + "]}\n")
    out = tmp_path / "params.safetensors"
    rc = main(["tune", "--model", str(tiny_llama), "--data", str(data), "--out", str(out),
               "--block-q", "32", "--block-kv", "16", "--max-tokens", "160", "--device", "cpu"])
    assert rc == 0
    params = tune.load_params(out)
    assert params.layers == 2 and params.block_q == 32 and params.causal
    assert params.extra["calls"] == {"0": 2, "1": 2}
    assert "wrote" in capsys.readouterr().out


def test_tune_command_user_errors(tiny_llama, tmp_path, capsys):
    out = str(tmp_path / "p.safetensors")
    assert main(["tune", "--model", str(tmp_path / "nope"), "--data", "x", "--out", out]) == 2
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    assert main(["tune", "--model", str(tiny_llama), "--data", str(empty), "--out", out]) == 2
    assert "no samples" in capsys.readouterr().err
    assert main(["tune", "--model", str(tiny_llama), "--data", str(empty), "--out", out,
                 "--block-q", "0"]) == 2
