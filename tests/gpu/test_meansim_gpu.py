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


# -- the Triton predictor (kernels/meansim_fast.py) against the PyTorch path ---------------
mod = __import__("flexsparse.masks.meansim", fromlist=["x"])


@pytest.fixture(autouse=True)
def triton_predictor(monkeypatch):
    """The Triton predictor is opt-in; these tests switch it on (``torch_path`` off)."""
    monkeypatch.setenv("FLEXSPARSE_MEANSIM_TRITON", "1")


def torch_path(monkeypatch, fn):
    """``fn()`` with the Triton kernels switched off: the eager PyTorch path, which the CPU
    tests pin to SpargeAttn's transcription."""
    monkeypatch.setenv("FLEXSPARSE_MEANSIM_TRITON", "0")
    monkeypatch.setenv("FLEXSPARSE_COMPILE", "0")  # eager: no compile per shape
    try:
        return fn()
    finally:
        monkeypatch.setenv("FLEXSPARSE_MEANSIM_TRITON", "1")
        monkeypatch.delenv("FLEXSPARSE_COMPILE")


@pytest.mark.parametrize("n, block, lead, smooth, d", [
    (1000, 128, 0, False, 64), (1000, 64, 0, True, 64), (777, 128, 93, False, 64),
    (200, 64, 17, True, 64), (4096, 128, 0, True, 128), (100, 128, 0, False, 64),
    (500, 48, 7, True, 80), (30, 32, 5, False, 64),
])
def test_triton_block_stats_match_torch(monkeypatch, n, block, lead, smooth, d):
    from flexsparse.kernels import meansim_fast

    q, _, _ = inputs(n=n, d=d)
    q[:, :, 5] = 0.0  # a zero token is a zero vector
    q = q.transpose(1, 2).contiguous().transpose(1, 2)  # [B, N, H, D] memory, as diffusers
    assert meansim_fast.stats_ready(q)
    got = mod.block_stats(q, block, lead, smooth)
    want = torch_path(monkeypatch, lambda: mod.block_stats(q, block, lead, smooth))
    assert torch.equal(got[2], want[2])
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)
    # -inf where the block is incomplete, in both
    torch.testing.assert_close(got[1], want[1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("mode", ["cdf", "topk", "ties"])
def test_triton_select_equals_torch(monkeypatch, seed, mode):
    g = torch.Generator(device="cuda").manual_seed(seed)
    b, h, qb, kb, d = 2, 4, [9, 40, 139][seed], [17, 300, 278][seed], 64
    pq = torch.randn(b, h, qb, d, device="cuda", generator=g)
    pk = torch.randn(b, h, kb, d, device="cuda", generator=g)
    if mode == "ties":  # identical key blocks: exactly tied probabilities
        pk = pk[:, :, :3].repeat(1, 1, -(-kb // 3), 1)[:, :, :kb].contiguous()
    sq = torch.rand(b, h, qb, device="cuda", generator=g)
    sk = torch.rand(b, h, kb, device="cuda", generator=g)
    sim1 = torch.tensor([-1.0, 0.1, 0.2, 0.3], device="cuda")
    cdf = None if mode == "topk" else torch.tensor([0.3, 0.6, 0.9, 1.0], device="cuda")
    top = torch.tensor([0.0, 0.2, 0.5, 1.0], device="cuda") if mode == "topk" else None
    for causal, sink, off in ((False, False, 0), (True, False, 0), (True, True, 3),
                              (False, True, 0)):
        def run(causal=causal, sink=sink, off=off):
            return mod.select_tiles(pq, sq, pk, sk, sim1, cdfthreshd=cdf, topk=top,
                                    block_q=128, block_kv=64, causal=causal,
                                    attention_sink=sink, q_block_offset=off)
        got = run()
        want = torch_path(monkeypatch, run)
        assert torch.equal(got, want), (causal, sink, off, (got != want).sum().item())
        if not causal:
            assert 0.02 < want.float().mean() < 0.98  # not a trivial case


@pytest.mark.parametrize("n_q, n_kv, heads, kv_heads", [(1000, 1000, 4, 4), (300, 1333, 4, 2),
                                                        (2176, 2176, 2, 2)])
def test_triton_predict_equals_torch(monkeypatch, n_q, n_kv, heads, kv_heads):
    q, k, _ = inputs(n=n_kv, heads=kv_heads)
    q = q[:, :, -n_q:].repeat_interleave(heads // kv_heads, dim=1).contiguous()
    for kw in (dict(cdfthreshd=0.7), dict(topk=0.3, causal=True, attention_sink=True),
               dict(cdfthreshd=0.9, smooth_k=True)):
        m = masks.meansim(torch.linspace(0.05, 0.3, heads), **kw)
        got = m.predict(q, k)
        want = torch_path(monkeypatch, lambda m=m: m.predict(q, k))
        assert torch.equal(got, want), (kw, (got != want).sum().item())


# -- the default CUDA predictor: Triton statistics + steps 2-4 replayed from a CUDA graph ---


def default_path(monkeypatch):
    """The default predictor, with fresh shape budgets (at most 8 captured shapes)."""
    monkeypatch.delenv("FLEXSPARSE_MEANSIM_TRITON", raising=False)
    monkeypatch.delenv("FLEXSPARSE_COMPILE", raising=False)
    monkeypatch.delenv("FLEXSPARSE_MEANSIM_GRAPH", raising=False)
    monkeypatch.setattr(mod, "_seen", __import__("collections").OrderedDict())
    monkeypatch.setattr(mod, "_compiled_keys", set())
    monkeypatch.setattr(mod, "_graphs", __import__("collections").OrderedDict())


@pytest.mark.parametrize("n_q, n_kv, heads, kv_heads", [(1000, 1000, 4, 4), (300, 1333, 4, 2),
                                                        (2176, 2176, 2, 2)])
def test_graph_predict_equals_eager(monkeypatch, n_q, n_kv, heads, kv_heads):
    default_path(monkeypatch)
    q, k, _ = inputs(n=n_kv, heads=kv_heads)
    q = q[:, :, -n_q:].repeat_interleave(heads // kv_heads, dim=1).contiguous()
    for kw in (dict(cdfthreshd=0.7), dict(topk=0.3, causal=True, attention_sink=True),
               dict(cdfthreshd=0.9, smooth_k=True)):
        m = masks.meansim(torch.linspace(0.05, 0.3, heads), **kw)
        m.predict(q, k)
        got = m.predict(q, k)  # decode shapes are captured when seen twice
        assert mod._graph_key(q, k, m) in mod._graphs
        want = torch_path(monkeypatch, lambda m=m: m.predict(q, k))
        monkeypatch.delenv("FLEXSPARSE_MEANSIM_TRITON")
        assert torch.equal(got, want), (kw, (got != want).sum().item())
        if "smooth_k" not in kw:  # (smooth_k keeps every tile on some of these inputs)
            assert 0.02 < want.float().mean() < 0.98  # not a trivial case


def test_graph_replays_eager_select_bit_for_bit(monkeypatch):
    """Given the same statistics, the replayed steps 2-4 are the eager ops' result exactly
    (per-head tensors, floats and masks sharing one captured shape)."""
    default_path(monkeypatch)
    q, k, _ = inputs(n=1500, heads=4)
    for m in (masks.meansim(torch.tensor([0.0, 0.1, 0.2, 0.3]), cdfthreshd=0.8),
              masks.meansim(0.15, cdfthreshd=torch.tensor([0.5, 0.7, 0.9, 1.0])),
              masks.meansim(0.1, cdfthreshd=0.6)):
        got = m.predict(q, k)
        entry = mod._graphs[mod._graph_key(q, k, m)]
        x = entry.inputs
        for triton in (False, True):  # PyTorch's steps 3-4 and the Triton kernels
            want = mod.select_tiles(x["pq"], x["sq"], x["pk"], x["sk"], x["sim1"],
                                    cdfthreshd=x["cdf"], topk=x["top"], block_q=128,
                                    block_kv=64, triton=triton)
            assert torch.equal(got, want), triton
        sim1 = mod._per_head("s", m._on(m.simthreshd1, q.device), 4, q.device)
        assert torch.equal(x["sim1"], sim1)


def test_graph_predict_does_not_sync(monkeypatch):
    default_path(monkeypatch)
    q, k, _ = inputs()
    m = masks.meansim(torch.tensor([0.1, 0.2, 0.3, 0.4]), cdfthreshd=0.7, smooth_k=True)
    other = masks.meansim(0.2, cdfthreshd=0.9)
    m.predict(q, k)  # capture (synchronises once per shape)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        first = m.predict(q, k)
        second = other.predict(q, k)  # same shape, other hyperparameters
        m.bind_tiles(q, k)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    want = torch_path(monkeypatch, lambda: (m.predict(q, k), other.predict(q, k)))
    assert torch.equal(first, want[0]) and torch.equal(second, want[1])
