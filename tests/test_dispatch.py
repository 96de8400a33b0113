"""One way down: validation once, the backend priority list, explain, the dense fallback
for predicted maps, bounded-memory SDPA on the CPU, input errors and aliased inputs."""

import importlib
import math

import pytest
import torch

import flexsparse as fs
from flexsparse import backends, masks
from flexsparse.call import AttentionCall
from flexsparse.mask import DynamicMask

# the module, not the function ``flexsparse.attention`` that the package exports
fa = importlib.import_module("flexsparse.attention")


def rand(*shape, dtype=torch.float32):
    return torch.randn(*shape, dtype=dtype)


def qkv(b=1, h=2, n=96, d=16, hkv=None, q_len=None):
    hkv = h if hkv is None else hkv
    return rand(b, h, q_len or n, d), rand(b, hkv, n, d), rand(b, hkv, n, d)


def dense_reference(q, k, v, dense=None, scale=None):
    """Float64 softmax attention written out (independent of flexsparse's SDPA path):
    ``dense`` bool ``[..., Q, KV]`` or None; rows with no kept key are zeros."""
    q, k, v = (t.double() for t in (q, k, v))
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    scores = q @ k.transpose(-1, -2) * (scale or q.shape[-1] ** -0.5)
    if dense is not None:
        scores = scores.masked_fill(~dense, -math.inf)
    p = torch.softmax(scores, -1).nan_to_num(0.0)
    return p @ v


class FixedTiles(DynamicMask):
    """A 'predictor' that returns a given tile map (the bound mask of a DynamicMask)."""

    approximates_dense = True  # as meansim: the map stands in for dense attention

    def __init__(self, kept, block=(32, 16), causal=False):
        self.kept, self.block, self.causal = kept, block, causal
        self.name = "fixed"

    def bind(self, q, k):
        m = fs.Mask.from_tiles(self.kept, self.block, name="fixed", length=k.shape[2])
        m.native_block_size = self.block
        return m


def tile_map(n, block, kept_fraction, seed=0):
    qb, kb = -(-n // block[0]), -(-n // block[1])
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(qb * kb, generator=g)
    kept = torch.zeros(qb * kb, dtype=torch.bool)
    kept[order[: round(kept_fraction * qb * kb)]] = True
    return kept.view(qb, kb)


# -- priority list and explain ------------------------------------------------------------


def test_priority_list_is_static_and_ordered():
    assert [b.name for b in fa.PRIORITY] == ["sdpa", "quant", "flex"]
    for b in fa.PRIORITY:
        assert callable(b.not_supported_reasons) and callable(b.run)
    assert not hasattr(fa, "register_backend") and not hasattr(fa, "_EXTRA")


def test_explain_lists_every_backends_reasons():
    q, k, v = qkv(n=300)
    choice = fs.explain(q, k, v, masks.sliding_window(40))
    assert choice.backend == "sdpa" and choice.sdpa_mode == "mask"
    names = [name for name, _ in choice.reasons]
    assert names == ["sdpa", "quant", "flex"]
    why = dict(choice.reasons)
    assert why["sdpa"] == ()
    assert any("CUDA" in r for r in why["quant"]), why["quant"]
    assert any("eager FlexAttention" in r for r in why["flex"]), why["flex"]
    text = str(choice)
    assert text.startswith("sdpa: ") and "quant: not picked" in text and "flex: not picked" in text


def test_auto_walks_priority_and_runs_first_without_reasons(monkeypatch):
    calls = []

    class Fake:
        def __init__(self, name, reasons, value):
            self.name, self.reasons, self.value = name, reasons, value

        def not_supported_reasons(self, call):
            calls.append(self.name)
            assert isinstance(call, AttentionCall)
            return list(self.reasons)

        def run(self, call):
            return torch.full_like(call.q, self.value)

    order = (Fake("sdpa", ["no"], 1.0), Fake("quant", [], 2.0), Fake("flex", [], 3.0))
    monkeypatch.setattr(fa, "PRIORITY", order)
    monkeypatch.setattr(fa, "_BY_NAME", {b.name: b for b in order})
    q, k, v = qkv()
    out = fs.attention(q, k, v, masks.causal())
    assert torch.all(out == 2.0)
    assert calls == ["sdpa", "quant"]  # attention stops at the first that can run the call
    choice = fs.explain(q, k, v, masks.causal())
    assert choice.backend == "quant" and dict(choice.reasons)["sdpa"] == ("no",)
    with pytest.raises(ValueError, match="backend='sdpa' cannot run this call: no"):
        fs.attention(q, k, v, masks.causal(), backend="sdpa")
    assert torch.all(fs.attention(q, k, v, masks.causal(), backend="flex") == 3.0)


def test_call_is_validated_once_with_resolved_scale(monkeypatch):
    seen = []
    monkeypatch.setattr(backends.SdpaBackend, "run", lambda self, call: seen.append(call) or call.q)
    q, k, v = qkv(h=4, hkv=2)
    fs.attention(q, k, v, masks.causal())
    (call,) = seen
    assert call.scale == pytest.approx(16**-0.5) and call.gqa and call.mask.sdpa_hint == "causal"


# -- dense kernel when the map keeps (nearly) everything -------------------------------------


def test_static_map_keeping_every_tile_runs_dense_kernel(monkeypatch):
    q, k, v = qkv(n=100)
    mask = fs.Mask.from_tiles(torch.ones(4, 4, dtype=torch.bool), 32, length=100)
    choice = fs.explain(q, k, v, mask)
    assert choice.backend == "sdpa" and choice.sdpa_mode == "none"
    seen = []
    real = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        lambda *a, **kw: seen.append(kw.get("attn_mask")) or real(*a, **kw))
    out = fs.attention(q, k, v, mask)
    assert seen == [None]
    torch.testing.assert_close(out.double(), dense_reference(q, k, v), atol=1e-5, rtol=0)
    # one empty tile: exact semantics, no dense kernel
    kept = torch.ones(4, 4, dtype=torch.bool)
    kept[0, 3] = False
    assert fs.explain(q, k, v, fs.Mask.from_tiles(kept, 32, length=100)).sdpa_mode == "mask"


def test_predicted_map_above_crossover_runs_dense(monkeypatch):
    n, block = 128, (32, 16)
    q, k, v = qkv(n=n)
    kept = tile_map(n, block, 0.9)
    dyn = FixedTiles(kept, block)
    # on the CPU the rows path keeps a predicted map unless it keeps every tile
    assert fs.explain(q, k, v, dyn).notes == ()
    monkeypatch.setitem(fa.DENSE_CROSSOVER, "sdpa", 0.85)
    choice = fs.explain(q, k, v, dyn)
    assert choice.sdpa_mode == "none" and "prediction dropped" in choice.notes[0]
    assert f"{kept.float().mean():.1%}" in choice.notes[0] and "prediction dropped" in str(choice)
    out = fs.attention(q, k, v, dyn)
    torch.testing.assert_close(out.double(), dense_reference(q, k, v), atol=1e-5, rtol=0)
    # composed with a static mask: only the prediction is dropped
    out = fs.attention(q, k, v, dyn & masks.sliding_window(20))
    dense = masks.sliding_window(20).to_dense(n)
    torch.testing.assert_close(out.double(), dense_reference(q, k, v, dense), atol=1e-5,
                               rtol=0)
    # a causal predictor stands for causal attention
    out = fs.attention(q, k, v, FixedTiles(tile_map(n, block, 0.9), block, causal=True))
    torch.testing.assert_close(out.double(), dense_reference(q, k, v, masks.causal().to_dense(n)),
                               atol=1e-5, rtol=0)


def test_predicted_map_below_crossover_is_kept(monkeypatch):
    n, block = 128, (32, 16)
    q, k, v = qkv(n=n)
    monkeypatch.setitem(fa.DENSE_CROSSOVER, "sdpa", 0.85)
    kept = tile_map(n, block, 0.5)
    dyn = FixedTiles(kept, block)
    assert fs.explain(q, k, v, dyn).notes == ()
    out = fs.attention(q, k, v, dyn)
    dense = kept.repeat_interleave(32, 0).repeat_interleave(16, 1)[:n, :n]
    torch.testing.assert_close(out.double(), dense_reference(q, k, v, dense), atol=1e-5, rtol=0)
    # a requested backend never drops the prediction
    dyn_all = FixedTiles(tile_map(n, block, 0.95), block)
    assert fs.explain(q, k, v, dyn_all, backend="sdpa").notes == ()


def test_exact_dynamic_mask_is_never_dropped(monkeypatch):
    """A DynamicMask that does not declare ``approximates_dense`` is part of the pattern:
    ``auto`` applies it however many tiles it keeps (it once ran with no mask at all)."""
    n, block = 128, (32, 16)
    q, k, v = qkv(n=n)
    monkeypatch.setitem(fa.DENSE_CROSSOVER, "sdpa", 0.0)
    kept = tile_map(n, block, 0.95)

    class Exact(FixedTiles):
        approximates_dense = False

    static = masks.sliding_window(40)
    for mask in (Exact(kept, block), Exact(kept, block) & static):
        out = fs.attention(q, k, v, mask)
        dense = kept.repeat_interleave(32, 0).repeat_interleave(16, 1)[:n, :n]
        if mask is not None and not isinstance(mask, Exact):
            dense = dense & static.to_dense(n)
        assert fs.explain(q, k, v, mask).notes == ()
        torch.testing.assert_close(out.double(), dense_reference(q, k, v, dense), atol=1e-5,
                                   rtol=0)


# -- bounded memory on the CPU ---------------------------------------------------------------


def test_cpu_auto_never_picks_eager_flex_at_readme_size():
    layout = fs.VideoLayout.from_video(49, 480, 720, model="cogvideox")
    n = layout.length
    m = masks.radial(layout, decay_factor=1.0, model="cogvideox")
    q = torch.empty(2, 30, n, 64, dtype=torch.bfloat16)  # never computed on
    choice = fs.explain(q, q, q, m)
    assert choice.backend == "sdpa" and choice.sdpa_mode == "mask"
    assert backends.SDPA_CHUNK_ELEMENTS <= 1 << 26


@pytest.mark.parametrize("bound", [3000, 20000])
def test_cpu_sdpa_chunks_stay_bounded_and_exact(monkeypatch, bound):
    monkeypatch.setattr(backends, "SDPA_CHUNK_ELEMENTS", bound)
    seg = fs.SegmentLayout(prefix=20, segments=[40, 30, 50], suffix=15)
    n = seg.length
    mask = masks.segments(seg) & masks.sliding_window(60)
    q, k, v = qkv(b=2, h=4, hkv=2, n=n)
    sizes, real = [], torch.nn.functional.scaled_dot_product_attention

    def spy(qc, kc, vc, attn_mask=None, **kw):
        sizes.append(qc.shape[0] * qc.shape[1] * qc.shape[2] * kc.shape[2])
        assert attn_mask is not None and attn_mask.numel() <= bound
        return real(qc, kc, vc, attn_mask=attn_mask, **kw)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    out = fs.attention(q, k, v, mask)
    assert len(sizes) > 1 and max(sizes) <= bound
    # skipped key tiles: fewer pairs than the full rows would have cost
    assert sum(sizes) < 2 * 4 * n * n
    ref = dense_reference(q, k, v, mask.to_dense(n))
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=0)


def test_chunked_rows_of_bf16_decode_and_empty_rows(monkeypatch):
    monkeypatch.setattr(backends, "SDPA_CHUNK_ELEMENTS", 2000)
    n = 150
    mask = fs.Mask(lambda b, h, q, kv: (q >= 40) & (kv <= q) & (kv >= q - 50), name="late")
    q, k, v = (t.to(torch.bfloat16) for t in qkv(n=n))
    out = fs.attention(q, k, v, mask)
    assert out.dtype == torch.bfloat16 and not out.isnan().any()
    assert torch.all(out[:, :, :40] == 0)
    ref = dense_reference(q, k, v, mask.to_dense(n))
    assert (out.double() - ref).abs().max() < 2e-2
    step = fs.attention(q[:, :, -3:], k, v, mask)  # a decode step: the last rows
    torch.testing.assert_close(step.double(), ref[:, :, -3:], atol=2e-2, rtol=0)


# -- input errors (issue 15) -----------------------------------------------------------------


@pytest.mark.parametrize("backend", ["flex", "sdpa", "auto"])
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool, torch.complex64])
def test_non_floating_inputs_raise_type_error(backend, dtype):
    q = torch.ones(1, 2, 32, 16, dtype=dtype)
    with pytest.raises(TypeError, match=rf"floating point \(float16, .*float64\), got {dtype}"):
        fs.attention(q, q, q, masks.causal(), backend=backend)


@pytest.mark.parametrize("scale", [float("nan"), float("inf"), -float("inf"), 0.0, -0.5, 0])
def test_bad_scale_raises_value_error(scale):
    q, k, v = qkv()
    with pytest.raises(ValueError, match="scale"):
        fs.attention(q, k, v, masks.causal(), scale=scale, backend="flex")


@pytest.mark.parametrize("scale", ["0.1", [0.1], torch.tensor(0.1), True])
def test_non_number_scale_raises_type_error(scale):
    q, k, v = qkv()
    with pytest.raises(TypeError, match="scale must be a number"):
        fs.attention(q, k, v, scale=scale)


def test_scale_is_used():
    q, k, v = qkv()
    out = fs.attention(q, k, v, masks.causal(), scale=0.3, backend="flex")
    ref = dense_reference(q, k, v, masks.causal().to_dense(96), scale=0.3)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("flag", ["yes", 1, torch.tensor(True)])
def test_enable_gqa_must_be_bool_or_none(flag):
    q, k, v = qkv(h=4, hkv=2)
    with pytest.raises(TypeError, match=r"enable_gqa must be True, False or None, got"):
        fs.attention(q, k, v, enable_gqa=flag)


def test_other_argument_errors():
    q, k, v = qkv()
    with pytest.raises(TypeError, match="compile must be True, False or None"):
        fs.attention(q, k, v, compile="yes")
    with pytest.raises(TypeError, match="mask must be a flexsparse Mask"):
        fs.attention(q, k, v, mask=torch.ones(96, 96, dtype=torch.bool))
    with pytest.raises(ValueError, match="backend must be one of"):
        fs.attention(q, k, v, backend="cudnn")
    with pytest.raises(ValueError, match="block_size must be >= 1"):
        fs.attention(q, k, v, masks.causal(), block_size=0)


# -- aliased inputs (issue 15) ---------------------------------------------------------------


def test_aliased_inputs_after_other_masks_run_eager_flex():
    # The exact sequence of issue 15; Dynamo's caches are process-wide, so start clean.
    torch._dynamo.reset()
    q = k = v = torch.randn(1, 2, 64, 16)  # noqa: F841 - the README's own aliasing
    fs.attention(q * 2, q, q, mask=masks.causal(), backend="flex")
    seg = masks.segments(fs.SegmentLayout(prefix=12, segments=[20, 18, 22], suffix=6))
    x = torch.randn(1, 2, 78, 16)
    out78 = fs.attention(x * 2, x, x, mask=seg, backend="flex")
    out = fs.attention(q, q, q, mask=masks.causal(), backend="flex")
    ref = dense_reference(q, q, q, masks.causal().to_dense(64))
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=0)
    ref78 = dense_reference(x * 2, x, x, seg.to_dense(78))
    torch.testing.assert_close(out78.double(), ref78, atol=1e-5, rtol=0)


def test_distinct_makes_views_not_copies():
    q = torch.randn(1, 2, 8, 4)
    a, b, c = backends.distinct(q, q, q)
    assert a is q and b is not q and c is not q and c is not b
    assert b.data_ptr() == c.data_ptr() == q.data_ptr()


# -- a predicted map is counted once, before any BlockMask -----------------------------------


def count_block_masks(monkeypatch) -> list:
    built = []
    real = fs.Mask.block_mask

    def spy(self, *args, **kwargs):
        built.append(self.name)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(fs.Mask, "block_mask", spy)
    return built


@pytest.mark.parametrize("predictor", ["fixed", "meansim"])
def test_dropped_prediction_builds_no_block_mask(monkeypatch, predictor):
    n = 128
    q, k, v = qkv(n=n)
    if predictor == "fixed":  # no tile map handed over: its tile states are counted
        dyn = FixedTiles(tile_map(n, (32, 16), 0.9), (32, 16))
        kept = float(dyn.kept.float().mean())
        monkeypatch.setitem(fa.DENSE_CROSSOVER, "sdpa", 0.85)
    else:  # simthreshd1 >= 1: every tile kept, counted on the map itself
        dyn, kept = masks.meansim(1.5, cdfthreshd=1.0, block_q=32, block_kv=16), 1.0
    built = count_block_masks(monkeypatch)
    choice = fs.explain(q, k, v, dyn)
    out = fs.attention(q, k, v, dyn)
    assert built == []
    assert choice.sdpa_mode == "none" and f"keeps {kept:.1%}" in choice.notes[0]
    assert all(why == () for _, why in choice.reasons[:1])  # sdpa picked, nothing against it
    torch.testing.assert_close(out.double(), dense_reference(q, k, v), atol=1e-5, rtol=0)


@pytest.mark.parametrize("q_len, n", [(96, 96), (64, 96), (40, 96), (70, 100)])
def test_census_of_a_predicted_map_equals_its_block_masks(q_len, n):
    """The census ``attention`` counts on the predicted map (or its tile states, for query
    rows off a tile boundary) is the BlockMask's census at the same tile size."""
    from flexsparse.call import _count_tiles

    torch.manual_seed(3)
    base = torch.randn(1, 2, 1, 16)
    k = base + torch.randn(2, 2, n, 16)
    q = (base + torch.randn(2, 2, n, 16))[:, :, -q_len:]
    dyn = masks.meansim(torch.tensor([-0.2, 0.1]), cdfthreshd=0.4, block_q=32, block_kv=16)
    bound, (size, counts) = fa._bind_counted(dyn, q, k, k)
    assert size == (32, 16)
    bm = bound.block_mask(q_len, n, heads=bound.heads, batch=bound.batch, block_size=size)
    assert counts == _count_tiles(bm)
    assert 0 < counts.full < counts.total
    if (n - q_len) % 32 == 0:
        assert counts.partial == 0


def test_kept_prediction_runs_the_counted_call(monkeypatch):
    n = 128
    q, k, v = qkv(n=n)
    monkeypatch.setitem(fa.DENSE_CROSSOVER, "sdpa", 0.85)
    dyn = masks.meansim(0.0, cdfthreshd=0.5, block_q=32, block_kv=16)
    bound, (_, counts) = fa._bind_counted(dyn, q, k, k)
    assert counts.kept_fraction < 0.85
    built = count_block_masks(monkeypatch)
    choice = fs.explain(q, k, v, dyn)
    assert choice.notes == () and built == []  # the CPU rows path needs no BlockMask
    out = fs.attention(q, k, v, dyn)
    dense = bound.to_dense(n)[None] if bound.to_dense(n).dim() == 2 else bound.to_dense(n)
    torch.testing.assert_close(out.double(), dense_reference(q, k, v, dense), atol=1e-5,
                               rtol=0)


def test_attention_words_its_choice_only_when_read(monkeypatch):
    """The reason string (the backends' ``describe``) is for ``explain`` and the DEBUG log:
    a call that reads neither does not build it."""
    A = importlib.import_module("flexsparse.attention")
    worded = []
    real = A._describe
    monkeypatch.setattr(A, "_describe", lambda b, c: worded.append(b.name) or real(b, c))
    q, k, v = (torch.randn(1, 2, 40, 16) for _ in range(3))
    mask = masks.sliding_window(8)
    out = fs.attention(q, k, v, mask=mask)
    assert worded == []
    choice = fs.explain(q, k, v, mask=mask)
    assert worded == [choice.backend] and choice.reason
    ref = torch.softmax((q @ k.transpose(-1, -2) / 4).masked_fill(
        ~mask.to_dense(40, 40), float("-inf")), -1) @ v
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_a_dropped_prediction_is_worded_as_the_quant_kernels_dense_mode(monkeypatch):
    """Where the quant kernel can run (CUDA; here its support check is stubbed on the
    CPU), a prediction that keeps every tile is dropped to the kernel's dense mode, and the
    Choice says so when read."""
    A = importlib.import_module("flexsparse.attention")
    monkeypatch.setattr(A.QUANT, "not_supported_reasons", lambda call: [])
    monkeypatch.setattr(A.QUANT, "describe", lambda call: "quant kernel, dense", raising=False)
    q, k, v = (torch.randn(1, 2, 256, 64) for _ in range(3))
    choice = fs.explain(q, k, v, masks.meansim(1.5, cdfthreshd=1.0))  # keeps every tile
    assert choice.backend == "quant" and "prediction dropped" in choice.notes[0]
    assert choice.reason == "a dropped prediction runs quantized, without its map; quant " \
        "kernel, dense"
