"""meansim on CUDA: no host sync in the predictor, (128, 64) BlockMasks with compiled
FlexAttention (kernel tile options), values against the float64 reference."""

import pytest
import torch

import flexsparse as fs
from flexsparse import masks

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


def inputs(n=1000, heads=4, d=64, dtype=torch.bfloat16, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    base = torch.randn(1, heads, 1, d, generator=g, device="cuda")
    q = base + 0.7 * torch.randn(2, heads, n, d, generator=g, device="cuda")
    k = base + 0.7 * torch.randn(2, heads, n, d, generator=g, device="cuda")
    v = torch.randn(2, heads, n, d, generator=g, device="cuda")
    return q.to(dtype), k.to(dtype), v.to(dtype)


def test_predict_and_bind_do_not_sync():
    q, k, _ = inputs()
    m = masks.meansim(torch.tensor([0.1, 0.2, 0.3, 0.4]), cdfthreshd=0.7, attention_sink=True,
                      causal=True)
    m.predict(q, k)  # warm-up (lazy CUDA initialisation may sync)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        kept = m.predict(q, k)
        m.bind(q, k)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert kept.shape == (2, 4, 8, 16)


@pytest.mark.parametrize("d", [64, 128])
def test_compiled_flex_at_128x64_matches_reference(d):
    q, k, v = inputs(d=d)
    m = masks.meansim(0.2, cdfthreshd=0.8) & masks.sliding_window(600)
    out = fs.attention(q, k, v, mask=m, backend="flex", compile=True)  # native (128, 64)
    ref = fs.reference(q, k, v, mask=m)
    assert m.bind(q, k).native_block_size == (128, 64)
    err = (out.double().cpu() - ref).abs().max()
    assert err < 2e-2, err
