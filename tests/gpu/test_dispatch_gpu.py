"""Dispatch on CUDA: what ``auto`` picks, the dense kernel for maps that keep (nearly)
everything, chunked SDPA and aliased inputs through compiled FlexAttention."""

import importlib

import pytest
import torch

import flexsparse as fs
from flexsparse import backends, masks
from flexsparse.kernels import quant_attention

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
fa = importlib.import_module("flexsparse.attention")


def rel_l2(out, ref):
    out = out.detach().to("cpu", torch.float64)
    return float((out - ref).norm() / ref.norm())


def qkv(n, h=4, d=64, dtype=torch.bfloat16):
    return tuple(torch.randn(1, h, n, d, device="cuda", dtype=dtype) for _ in range(3))


def test_auto_choices_on_cuda():
    q, k, v = qkv(700)
    assert fs.explain(q, k, v, None).sdpa_mode == "none"
    assert fs.explain(q, k, v, masks.causal()).sdpa_mode == "causal"
    kept_all = fs.Mask.from_tiles(torch.ones(6, 6, dtype=torch.bool), 128)
    assert fs.explain(q, k, v, kept_all).sdpa_mode == "none"
    choice = fs.explain(q, k, v, masks.sliding_window(100))
    assert choice.backend in ("flex", "quant")
    assert dict(choice.reasons)["sdpa"], "sdpa must say why it is not picked"
    step = fs.explain(q[:, :, -4:], k, v, masks.sliding_window(100))
    assert step.backend == "sdpa" and "query rows" in step.reason


def test_predicted_map_keeping_everything_runs_dense():
    q, k, v = qkv(1024)
    dyn = masks.meansim(1.5, cdfthreshd=1.0)  # simthreshd1 >= 1: every tile kept
    choice = fs.explain(q, k, v, dyn)
    assert choice.sdpa_mode == "none" and "prediction dropped" in choice.notes[0]
    # the kernel that would have run the map, in its dense mode (faster than cuDNN)
    assert choice.backend == "quant" and "runs quantized, without its map" in choice.reason
    out = fs.attention(q, k, v, dyn)
    assert rel_l2(out, fs.reference(q, k, v)) < 3e-2
    assert torch.equal(out, quant_attention(q, k, v))


def test_predicted_sparse_map_is_kept():
    n = 1024
    q, k, v = qkv(n)
    kept = torch.rand(1, 4, n // 128, n // 64, device="cuda") < 0.3
    kept[..., 0] = True

    class Fixed(fs.DynamicMask):
        def bind(self, q, k):
            m = fs.Mask.from_tiles(kept, (128, 64), length=k.shape[2])
            m.native_block_size = (128, 64)
            return m

    dyn = Fixed()
    choice = fs.explain(q, k, v, dyn)
    assert choice.notes == () and choice.backend in ("flex", "quant")
    out = fs.attention(q, k, v, dyn)
    assert rel_l2(out, fs.reference(q, k, v, dyn.bind(q, k))) < 3e-2


def test_chunked_sdpa_on_cuda_matches_reference(monkeypatch):
    monkeypatch.setattr(backends, "SDPA_CHUNK_ELEMENTS", 1 << 16)
    layout = fs.VideoLayout(frames=4, tokens_per_frame=200, text_tokens=30)
    mask = masks.frame_window(layout, 1)
    q, k, v = qkv(layout.length)
    out = fs.attention(q, k, v, mask, backend="sdpa")
    assert rel_l2(out, fs.reference(q, k, v, mask)) < 1e-2


def test_aliased_inputs_compiled_flex():
    q = torch.randn(1, 2, 256, 64, device="cuda", dtype=torch.bfloat16)
    fs.attention(q * 2, q, q, masks.causal(), backend="flex")
    seg = masks.segments(fs.SegmentLayout(prefix=12, segments=[20, 18, 22], suffix=6))
    x = torch.randn(1, 2, 78, 64, device="cuda", dtype=torch.bfloat16)
    fs.attention(x, x, x, seg, backend="flex")
    out = fs.attention(q, q, q, masks.causal(), backend="flex")
    assert rel_l2(out, fs.reference(q, q, q, masks.causal())) < 1e-2


@pytest.mark.parametrize("backend", ["auto", "quant"])
def test_static_mask_call_does_not_sync_after_warmup(backend):
    """A static map's BlockMask, tile census, tile lists and tile-shape choice are cached:
    after the first call, a call only launches kernels (a host read would leave the GPU
    idle while Python walks the backends)."""
    layout = fs.VideoLayout(frames=6, tokens_per_frame=300, text_tokens=30)
    mask = masks.radial(layout, 1.0, "cogvideox")
    q, k, v = qkv(layout.length)
    out = fs.attention(q, k, v, mask, backend=backend)  # warm-up: lowering, compile
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        again = fs.attention(q, k, v, mask, backend=backend)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert torch.equal(out, again)


def test_dropped_meansim_prediction_runs_the_dense_kernel(monkeypatch):
    """auto decides from the predicted map itself. On CUDA the map's BlockMask is built
    once, while the count is read back (the GPU still predicting); a dropped prediction
    then runs the quant kernel's dense mode, never the tile lists."""
    q, k, v = qkv(2000)
    dyn = masks.meansim(1.5, cdfthreshd=1.0)  # every tile kept
    fs.attention(q, k, v, dyn)  # warm-up: the predictor's capture for this shape
    built = []
    real = fs.Mask.block_mask
    monkeypatch.setattr(fs.Mask, "block_mask",
                        lambda self, *a, **kw: built.append(kw.get("block_size"))
                        or real(self, *a, **kw))
    choice = fs.explain(q, k, v, dyn)
    out = fs.attention(q, k, v, dyn)
    assert built == [(128, 64), (128, 64)]  # one per call, the speculative one
    assert choice.backend == "quant" and choice.sdpa_mode == "none"
    assert "keeps 100.0%" in choice.notes[0]
    assert torch.equal(out, quant_attention(q, k, v))
    assert rel_l2(out, fs.reference(q, k, v)) < 3e-2


def test_kept_meansim_prediction_matches_reference():
    q, k, v = qkv(2000)
    base = torch.randn(1, 4, 1, 64, device="cuda", dtype=torch.bfloat16)
    q, k = q + 2 * base, k + 2 * base
    dyn = masks.meansim(0.0, cdfthreshd=0.6)
    bound, (_, counts) = fa._bind_counted(dyn, q, k, k)
    assert counts.partial == 0 and 0.05 < counts.kept_fraction < 0.8
    choice = fs.explain(q, k, v, dyn)
    assert choice.notes == () and choice.backend in ("flex", "quant")
    out = fs.attention(q, k, v, dyn)
    assert rel_l2(out, fs.reference(q, k, v, dyn.bind(q, k))) < 3e-2


def test_flex_traced_by_a_callers_compile_keeps_its_kernel_options(monkeypatch):
    """Traced into a caller's torch.compile (inductor), the flex backend's FlexAttention
    gets the tuned kernel options of the untraced call (they were dropped: the traced
    kernel ran at torch's defaults, 1.7x slower on the CogVideoX-2b radial map), and the
    same answer."""
    given = []
    real = backends.kernel_options

    def spy(block_size, q, compiled):
        given.append(real(block_size, q, compiled))
        return given[-1]

    monkeypatch.setattr(backends, "kernel_options", spy)
    q, k, v = qkv(700)
    mask = masks.sliding_window(128) & masks.causal()
    eager = fs.attention(q, k, v, mask, backend="flex")  # also warms the mask cache
    assert given[-1], "an untraced compiled call on CUDA has kernel options"
    untraced = given[-1]
    torch._dynamo.reset()
    traced = torch.compile(lambda q, k, v: fs.attention(q, k, v, mask, backend="flex"),
                           fullgraph=True)
    out = traced(q, k, v)
    torch._dynamo.reset()
    assert given[-1] == untraced
    ref = fs.reference(q, k, v, mask)
    assert rel_l2(out, ref) < 1e-2 and rel_l2(eager, ref) < 1e-2
