"""GPU tests of the quantized kernel: Triton kernel vs ``quant_reference`` (same arithmetic)
and vs the fp32/float64 dense reference, on random sizes including odd lengths."""

import pytest
import torch

import flexsparse as fs
from flexsparse.kernels import mask_tiles, quant_attention, quant_reference

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]

FP8 = torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)
PVS = ["fp16", "fp8"] if FP8 else ["fp16"]


def rel_l2(a, b):
    a, b = a.double().flatten(), b.double().flatten()
    return ((a - b).norm() / b.norm()).item()


def cosine(a, b):
    return torch.nn.functional.cosine_similarity(a.double().flatten(), b.double().flatten(),
                                                 dim=0).item()


def qkv(b, hq, hkv, nq, nk, d, dtype, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(b, hq, nq, d, device="cuda", dtype=dtype, generator=g)
    k = torch.randn(b, hkv, nk, d, device="cuda", dtype=dtype, generator=g) + 0.3
    v = torch.randn(b, hkv, nk, d, device="cuda", dtype=dtype, generator=g)
    return q, k, v


CASES = [  # b, hq, hkv, nq, nk, d, causal
    (1, 2, 2, 128, 128, 64, False),
    (2, 3, 3, 1000, 1000, 64, False),
    (1, 4, 2, 777, 777, 128, True),
    (2, 6, 2, 301, 1333, 64, True),
    (1, 2, 1, 1, 515, 128, True),
    (1, 4, 4, 2049, 2049, 64, True),
    (1, 8, 1, 130, 4000, 128, False),
]


@pytest.mark.parametrize("pv", PVS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", CASES)
def test_kernel_matches_reference(case, dtype, pv):
    b, hq, hkv, nq, nk, d, causal = case
    q, k, v = qkv(b, hq, hkv, nq, nk, d, dtype, seed=hash(case) % 1000)
    out = quant_attention(q, k, v, causal=causal, pv_dtype=pv)
    assert out.shape == q.shape and out.dtype == dtype
    assert torch.isfinite(out).all()
    ref = quant_reference(q, k, v, causal=causal, pv_dtype=pv)
    # Same quantization; differences are ex2.approx, accumulation order and rare flips of
    # P's rounding: far below the quantization error itself.
    assert rel_l2(out, ref) < 5e-3
    mask = fs.masks.causal() if causal else None
    exact = fs.reference(q, k, v, mask)
    tol = 3e-2 if pv == "fp16" else 5e-2  # fp8 P: ~3.7 % on flat random attention
    assert rel_l2(out.cpu(), exact) < tol
    assert cosine(out.cpu(), exact) > (0.999 if pv == "fp16" else 0.998)


@pytest.mark.parametrize("pv", PVS)
@pytest.mark.parametrize("seed", range(4))
def test_tile_lists_random(seed, pv):
    g = torch.Generator().manual_seed(seed)
    n = int(torch.randint(200, 1500, (1,), generator=g))
    nq = n if seed % 2 == 0 else int(torch.randint(1, n, (1,), generator=g))
    hq, hkv = (4, 2) if seed % 2 else (3, 3)
    d = 64 if seed < 2 else 128
    q, k, v = qkv(1, hq, hkv, nq, n, d, torch.bfloat16, seed)
    qb, kb = -(-nq // 128), -(-n // 128)
    kept = torch.rand(hq, qb, kb, generator=g) < 0.4
    kept[:, -1, -1] = True  # never all empty
    if qb > 1:
        kept[:, 0] = False  # a query tile with no kept key: zeros
    out = quant_attention(q, k, v, kept=kept[None], pv_dtype=pv)
    ref = quant_reference(q, k, v, kept=kept[None].cuda(), pv_dtype=pv)
    assert rel_l2(out, ref) < 5e-3
    if qb > 1:
        assert (out[:, :, :128] == 0).all()
    if nq == n:  # tiles of the q tensor are the mask's tiles: compare with dense float64
        exact = fs.reference(q, k, v, fs.Mask.from_tiles(kept, 128))
        assert rel_l2(out.cpu(), exact) < (3e-2 if pv == "fp16" else 5e-2)


@pytest.mark.parametrize("branch", [True, False])
@pytest.mark.parametrize("pv", PVS)
def test_pvthreshd_matches_reference(pv, branch):
    q, k, v = qkv(2, 4, 2, 1000, 1500, 64, torch.float16, 7)
    # make some key blocks irrelevant: their scores sit far below the others
    k[:, :, 640:1024] -= 4.0 * q.mean((1, 2))[:, None, None, :]
    thr = torch.tensor([0.0, 6.0, 12.0, 1e9])
    out = quant_attention(q, k, v, pvthreshd=thr, pv_dtype=pv, pvt_branch=branch)
    ref = quant_reference(q, k, v, pvthreshd=thr, pv_dtype=pv)
    assert rel_l2(out, ref) < 5e-3
    off = quant_attention(q, k, v, pv_dtype=pv)
    # threshold 1e9 never skips (the branch form accumulates in another order)
    assert rel_l2(out[:, 3], off[:, 3]) < 1e-3


@pytest.mark.parametrize("hint", ["dense", "causal", "tiles"])
def test_backend_dispatch(hint):
    q, k, v = qkv(1, 4, 4, 700, 700, 64, torch.bfloat16, 3)
    if hint == "dense":
        mask = fs.masks.full()
    elif hint == "causal":
        mask = fs.masks.causal()
    else:
        kept = torch.rand(6, 6, generator=torch.Generator().manual_seed(0)) < 0.5
        kept[:, 0] = True
        mask = fs.Mask.from_tiles(kept, 128)
    out = fs.attention(q, k, v, mask, backend="quant")
    assert rel_l2(out.cpu(), fs.reference(q, k, v, mask)) < 3e-2
    if hint == "tiles":
        assert fs.explain(q, k, v, mask).backend == "quant"
        assert mask_tiles(mask, 700, 700, q.device)[0] == 0


def test_partial_tiles_fall_back():
    q, k, v = qkv(1, 2, 2, 600, 600, 64, torch.bfloat16, 4)
    mask = fs.masks.sliding_window(100)
    choice = fs.explain(q, k, v, mask)
    assert choice.backend == "flex"
    with pytest.raises(ValueError, match="partial"):
        fs.attention(q, k, v, mask, backend="quant")
