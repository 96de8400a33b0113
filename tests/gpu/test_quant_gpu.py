"""GPU tests of the quantized kernels, Triton's and the Hopper one (``sm90``), vs
``quant_reference`` (same arithmetic) and vs the float64 dense reference, on random sizes
including odd lengths, both tile shapes and masks with partial tiles (the token rule from
packed bits)."""

import math

import pytest
import torch

import flexsparse as fs
from flexsparse import masks
from flexsparse.call import AttentionCall
from flexsparse.kernels import QuantBackend, quant_attention, quant_reference, sm90, tile_lists
from flexsparse.kernels.quant import ROW_IMBALANCE, sm90_reasons

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]

FP8 = torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)
PVS = ["fp16", "bf16", "fp8"] if FP8 else ["fp16", "bf16"]
TILES = [(128, 128), (128, 64)]
SM90 = (torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)
        and sm90.build_error() is None)
KERNELS = ["triton", "sm90"] if SM90 else ["triton"]


def sm90_declines(kernel, *args, **kwargs) -> bool:
    """For ``kernel="sm90"`` on a call it does not run: it raises, naming why."""
    q, k, v = args
    if kernel != "sm90" or not sm90_reasons(q, v, **kwargs):
        return False
    with pytest.raises(ValueError, match="kernel='sm90' cannot run"):
        quant_attention(q, k, v, causal=kwargs.get("causal", False), kernel="sm90",
                        pv_dtype=kwargs.get("pv_dtype", "auto"))
    return True


def block_n(kernel, tile_n=128):
    """K rows per scale of the kernel (the reference must quantize K alike)."""
    return tile_n if kernel == "sm90" else None


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


def exact_tol(pv):
    # fp8 P and V: ~3.6 % on flat random attention (3-bit mantissas).
    return (3e-2, 0.999) if pv != "fp8" else (5e-2, 0.998)


CASES = [  # b, hq, hkv, nq, nk, d, causal
    (1, 2, 2, 128, 128, 64, False),
    (2, 3, 3, 1000, 1000, 64, False),
    (1, 4, 2, 777, 777, 128, True),
    (2, 6, 2, 301, 1333, 64, True),
    (1, 2, 1, 1, 515, 128, True),
    (1, 4, 4, 2049, 2049, 64, True),
    (1, 8, 1, 130, 4000, 128, False),
]


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("pv", PVS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", CASES)
def test_kernel_matches_reference(case, dtype, pv, kernel):
    b, hq, hkv, nq, nk, d, causal = case
    q, k, v = qkv(b, hq, hkv, nq, nk, d, dtype, seed=nq * 7 + nk)
    if sm90_declines(kernel, q, k, v, causal=causal, pv_dtype=pv):
        return
    out = quant_attention(q, k, v, causal=causal, pv_dtype=pv, kernel=kernel)
    assert out.shape == q.shape and out.dtype == dtype
    assert torch.isfinite(out).all()
    ref = quant_reference(q, k, v, causal=causal, pv_dtype=pv, block_n=block_n(kernel))
    # Same quantization; differences are ex2.approx, accumulation order and rare flips of
    # P's rounding: far below the quantization error itself.
    assert rel_l2(out, ref) < 5e-3
    exact = fs.reference(q, k, v, fs.masks.causal() if causal else None)
    tol, cos = exact_tol(pv)
    assert rel_l2(out.cpu(), exact) < tol and cosine(out.cpu(), exact) > cos


def pattern(name: str, n: int) -> fs.Mask:
    """Masks whose BlockMasks have partial tiles at both tile shapes."""
    if name == "radial_token":
        lay = fs.VideoLayout(frames=n // 300, tokens_per_frame=300, text_tokens=n % 300,
                             text_position="start")
        return masks.radial(lay, decay_factor=1.0, model="cogvideox", granularity="token")
    if name == "segments":
        seg = n // 5
        return masks.segments(fs.SegmentLayout(prefix=seg - 3, segments=[seg, seg + 7, seg],
                                               suffix=n - 4 * seg - 4))
    if name == "causal_document":
        third = n // 3
        return masks.document([third - 11, third + 5, n - 2 * third + 6])
    if name == "composed":
        return masks.causal() & masks.sliding_window(300) | masks.kv_prefix(70)
    raise AssertionError(name)


PATTERNS = ["radial_token", "segments", "causal_document", "composed"]


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("pv", PVS)
@pytest.mark.parametrize("tile", TILES)
@pytest.mark.parametrize("name", PATTERNS)
def test_partial_tiles_match_reference(name, tile, pv, kernel):
    g = torch.Generator().manual_seed(sum(map(ord, f"{name}{tile}{pv}")) % 1000)
    n = int(torch.randint(900, 2200, (1,), generator=g))
    d = 64 if tile[1] == 64 else 128
    mask = pattern(name, n)
    nq = n if name != "composed" else n - 333  # q_len != kv_len: the last rows
    q, k, v = qkv(1, 4, 2, nq, n, d, torch.bfloat16, seed=n)
    bm = mask.block_mask(nq, n, device="cuda", block_size=tile)
    lists = tile_lists(bm)
    assert lists.n_partial > 0  # the case exercises the bits
    if sm90_declines(kernel, q, k, v, pv_dtype=pv):
        return
    out = quant_attention(q, k, v, block_mask=bm, pv_dtype=pv, kernel=kernel)
    dense = mask.to_dense(nq, n).cuda()
    ref = quant_reference(q, k, v, mask=dense, tile_n=tile[1], pv_dtype=pv,
                          block_n=block_n(kernel, tile[1]))
    # The Triton kernel walks full tiles before partial ones, the reference in key order: P
    # is rounded against another running max, which e4m3's 3-bit mantissa shows.
    assert rel_l2(out, ref) < (5e-3 if pv != "fp8" else 3e-2)
    exact = fs.reference(q, k, v, mask)
    tol, cos = exact_tol(pv)
    assert rel_l2(out.cpu(), exact) < tol and cosine(out.cpu(), exact) > cos
    # rows with no kept key are zeros, never NaN
    empty = ~dense.any(-1)
    assert torch.isfinite(out).all() and (out[:, :, empty] == 0).all()


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("pv", PVS)
@pytest.mark.parametrize("seed", range(4))
def test_tile_maps_random(seed, pv, kernel):
    g = torch.Generator().manual_seed(seed)
    tile_n = TILES[seed % 2][1]
    n = int(torch.randint(200, 1500, (1,), generator=g))
    nq = n if seed < 2 else int(torch.randint(1, n, (1,), generator=g))
    hq, hkv = (4, 2) if seed % 2 else (3, 3)
    d = 64 if seed in (0, 3) else 128
    q, k, v = qkv(1, hq, hkv, nq, n, d, torch.bfloat16, seed)
    qb, kb = -(-nq // 128), -(-n // tile_n)
    kept = torch.rand(hq, qb, kb, generator=g) < 0.4
    kept[:, -1, -1] = True  # never all empty
    if qb > 1:
        kept[:, 0] = False  # a query tile with no kept key: zeros
    if sm90_declines(kernel, q, k, v, pv_dtype=pv):
        return
    out = quant_attention(q, k, v, kept=kept[None], tile_n=tile_n, pv_dtype=pv, kernel=kernel)
    ref = quant_reference(q, k, v, kept=kept[None].cuda(), tile_n=tile_n, pv_dtype=pv,
                          block_n=block_n(kernel, tile_n))
    assert rel_l2(out, ref) < 5e-3
    if qb > 1:
        assert (out[:, :, :128] == 0).all()


@pytest.mark.parametrize("pv", PVS)
def test_pvthreshd_matches_reference(pv):
    q, k, v = qkv(2, 4, 2, 1000, 1500, 64, torch.float16, 7)
    # make some key blocks irrelevant: their scores sit far below the others
    k[:, :, 640:1024] -= 4.0 * q.mean((1, 2))[:, None, None, :]
    thr = torch.tensor([0.0, 6.0, 12.0, 1e9])
    out = quant_attention(q, k, v, pvthreshd=thr, pv_dtype=pv)
    ref = quant_reference(q, k, v, pvthreshd=thr, pv_dtype=pv)
    assert rel_l2(out, ref) < 5e-3
    off = quant_attention(q, k, v, pv_dtype=pv, kernel="triton")  # same K blocks
    assert rel_l2(out[:, 3], off[:, 3]) < 1e-6  # threshold 1e9 never skips


@pytest.mark.parametrize("hint", ["dense", "causal", "tiles", "meansim"])
def test_backend_runs_calls(hint):
    q, k, v = qkv(1, 4, 4, 700, 700, 64, torch.bfloat16, 3)
    if hint == "dense":
        mask = masks.full()
    elif hint == "causal":
        mask = masks.causal()
    elif hint == "tiles":
        kept = torch.rand(6, 6, generator=torch.Generator().manual_seed(0)) < 0.5
        kept[:, 0] = True
        mask = fs.Mask.from_tiles(kept, 128)
    else:
        mask = masks.meansim(simthreshd1=0.0, cdfthreshd=0.5, block_q=128, block_kv=64)
        mask = mask.bind(q, k)
    call = AttentionCall(q, k, v, mask, 64**-0.5, False)
    backend = QuantBackend()
    assert backend.not_supported_reasons(call) == []
    out = backend.run(call)
    assert rel_l2(out.cpu(), fs.reference(q, k, v, mask)) < 3e-2
    if hint == "meansim":  # SpargeAttn's 128x64 tiles, read natively
        assert tile_lists(call.block_mask((128, 64))).tile == (128, 64)


def test_backend_declines_bad_calls():
    q, k, v = qkv(1, 2, 2, 256, 256, 32, torch.bfloat16, 4)
    reasons = QuantBackend().not_supported_reasons(AttentionCall(q, k, v, None, 0.1, False))
    assert any("head_dim" in r for r in reasons)
    q, k, v = qkv(1, 2, 2, 256, 256, 64, torch.bfloat16, 4)
    call = AttentionCall(q, k, v, masks.causal(), 0.1, False, block_size=(64, 64))
    assert any("block_size" in r for r in QuantBackend().not_supported_reasons(call))


@pytest.mark.parametrize("d", [64, 128])
def test_strided_inputs_read_in_place(d):
    """Q quantized and V read where they lie, through their strides (e.g. diffusers'
    ``[B, N, H, D]`` projections transposed), at a ragged length."""
    b, h, n = 2, 3, 1000
    g = torch.Generator(device="cuda").manual_seed(d)
    packed = torch.randn(b, n, 3, h, d, device="cuda", dtype=torch.bfloat16, generator=g)
    q, k, v = (packed[:, :, i].transpose(1, 2) for i in range(3))
    k = k.contiguous()  # K's mean is a torch reduction whose order may follow the strides
    assert q.stride(2) == 3 * h * d and not v.is_contiguous()
    kept = torch.rand(h, 8, -(-n // 128), generator=torch.Generator().manual_seed(d)) < 0.6
    kept[:, :, -1] = True  # the ragged last tile: V read with the column rule
    calls = [dict(kernel=kn, **kw) for kn in KERNELS for kw in (dict(), dict(kept=kept[None]))]
    for kw in calls + [dict(causal=True)]:
        out = quant_attention(q, k, v, **kw)
        ref = quant_reference(q, k, v, causal=kw.get("causal", False),
                              kept=None if "kept" not in kw else kept[None].cuda(),
                              block_n=block_n(kw.get("kernel", "triton")))
        assert rel_l2(out, ref) < 5e-3
        contiguous = quant_attention(q.contiguous(), k, v.contiguous(), **kw)
        assert torch.equal(out, contiguous)


def test_auto_pv_dtype_is_the_inputs_own():
    from flexsparse.kernels.quant import default_pv_dtype

    assert default_pv_dtype(torch.bfloat16) == "bf16"
    assert default_pv_dtype(torch.float16) == "fp16"
    q, k, v = qkv(1, 2, 2, 300, 300, 64, torch.bfloat16, 5)
    assert torch.equal(quant_attention(q, k, v), quant_attention(q, k, v, pv_dtype="bf16"))


needs_sm90 = pytest.mark.skipif(not SM90, reason="needs an sm_90 GPU and nvcc")


# (seed, consumer warpgroups, ping-pong): three warpgroups exist at head_dim 64 (even seeds)
LAYOUTS = [(seed, nc, pp) for seed in range(6)
           for nc, pp in ((2, False), (2, True)) + (((3, False),) if seed % 2 == 0 else ())]


@needs_sm90
@pytest.mark.parametrize("seed, consumers, pingpong", LAYOUTS)
def test_sm90_random_sizes(seed, consumers, pingpong, monkeypatch):
    """The Hopper kernel on random shapes, tile widths, GQA, q_len != kv_len, odd lengths
    and query tiles that keep nothing, in each layout of its consumer warpgroups."""
    g = torch.Generator().manual_seed(100 + seed)
    d = (64, 128)[seed % 2]
    monkeypatch.setitem(sm90.PINGPONG, d, pingpong)
    monkeypatch.setitem(sm90.CONSUMERS, d, consumers)
    dtype = (torch.bfloat16, torch.float16)[(seed // 2) % 2]
    tile_n = (64, 128, None)[seed % 3]
    nk = int(torch.randint(65, 2500, (1,), generator=g))  # these seeds draw 130-2083
    nq = nk if seed % 2 else int(torch.randint(1, nk + 1, (1,), generator=g))
    hkv = int(torch.randint(1, 4, (1,), generator=g))
    hq = hkv * int(torch.randint(1, 4, (1,), generator=g))
    b = 1 + seed % 2
    q, k, v = qkv(b, hq, hkv, nq, nk, d, dtype, 300 + seed)
    kept = None
    if tile_n is not None:
        qb, kb = -(-nq // 128), -(-nk // tile_n)
        kept = torch.rand(b, hq, qb, kb, generator=g) < 0.5
        kept[..., -1, -1] = True  # the ragged last key tile
        kept[..., 0, :] = qb == 1  # the first query tile keeps nothing: zeros
    out = quant_attention(q, k, v, kept=kept, tile_n=tile_n, kernel="sm90")
    ref = quant_reference(q, k, v, kept=None if kept is None else kept.cuda(),
                          tile_n=tile_n or 128, block_n=tile_n or 128)
    assert torch.isfinite(out).all()
    assert rel_l2(out, ref) < 5e-3
    allowed = None
    if kept is not None:
        allowed = kept.repeat_interleave(128, -2).repeat_interleave(tile_n, -1)[..., :nq, :nk]
        if kept.shape[2] > 1:
            assert (out[:, :, :128] == 0).all()
    exact = masked_attention(q, k, v, allowed)
    assert rel_l2(out.cpu(), exact) < 3e-2 and cosine(out.cpu(), exact) > 0.999
    monkeypatch.setattr(sm90, "MAX_CTAS", 2)  # each CTA runs many work items
    again = quant_attention(q, k, v, kept=kept, tile_n=tile_n, kernel="sm90")
    torch.testing.assert_close(again, out, rtol=0, atol=0)


@needs_sm90
@pytest.mark.parametrize("d, consumers, pingpong", [(64, 3, False), (64, 2, False),
                                                    (128, 2, True), (128, 2, False)])
@pytest.mark.parametrize("tiles", [None, 128, 64])
def test_sm90_persistent_grid(d, consumers, pingpong, tiles, monkeypatch):
    """The persistent grid: more work items than multiprocessors (CTAs run several items,
    their K / V ring and Q slots running on from item to item), and the same call on 1, 3
    and 7 CTAs (dozens of items each, with items of different lengths and, on an
    imbalanced map, taken in ``row_order``) must give the same bits."""
    monkeypatch.setitem(sm90.CONSUMERS, d, consumers)
    monkeypatch.setitem(sm90.PINGPONG, d, pingpong)
    b, hq, hkv, nq, nk = 2, 8, 4, 1931, 1500
    q, k, v = qkv(b, hq, hkv, nq, nk, d, torch.bfloat16, d + consumers + int(pingpong))
    sms = torch.cuda.get_device_properties(q.device).multi_processor_count
    assert b * hq * -(-nq // (64 * consumers)) > sms
    kept = None
    if tiles is not None:
        g = torch.Generator().manual_seed(d + (tiles or 0))
        kept = torch.rand(b, hq, -(-nq // 128), -(-nk // tiles), generator=g) < 0.2
        kept[:, :, :2] = True  # two long rows: row_order takes them first
        kept[1, 3, 5] = False  # an item (or half of one) that keeps nothing
        work = kept.sum(dim=(0, 1, 3)).float()
        assert work.max() >= ROW_IMBALANCE * work.mean()  # so row_order reorders the tiles
    out = quant_attention(q, k, v, kept=kept, tile_n=tiles, kernel="sm90")
    ref = quant_reference(q, k, v, kept=None if kept is None else kept.cuda(),
                          tile_n=tiles or 128, block_n=tiles or 128)
    assert rel_l2(out, ref) < 5e-3
    for ctas in (1, 3, 7):
        monkeypatch.setattr(sm90, "MAX_CTAS", ctas)
        again = quant_attention(q, k, v, kept=kept, tile_n=tiles, kernel="sm90")
        torch.testing.assert_close(again, out, rtol=0, atol=0, msg=f"{ctas} CTAs")


@needs_sm90
@pytest.mark.parametrize("nq", [1, 64, 127, 191, 192, 193, 320, 449, 1000])
@pytest.mark.parametrize("tiles", [None, 128, 64])
def test_sm90_three_warpgroups(nq, tiles, monkeypatch):
    """At head_dim 64 the Hopper kernel runs 192-row CTAs of three consumer warpgroups,
    whose 64-row slices straddle the 128-row Q scale blocks, the map's 128-row tiles (two
    per CTA, each slice computing its own tile's blocks of the union) and the padded end:
    query lengths around those edges, dense and with random tile maps, GQA, q_len != kv_len.
    The two-warpgroup layout must give the same bits."""
    monkeypatch.setitem(sm90.CONSUMERS, 64, 3)
    q, k, v = qkv(2, 6, 2, nq, 777, 64, torch.bfloat16, nq)
    kept = None
    if tiles is not None:
        g = torch.Generator().manual_seed(nq)
        kept = torch.rand(2, 6, -(-nq // 128), -(-777 // tiles), generator=g) < 0.4
        kept[0, 0, -1] = False  # a query tile that keeps nothing: zeros (or all, nq <= 128)
    out = quant_attention(q, k, v, kept=kept, tile_n=tiles, kernel="sm90")
    ref = quant_reference(q, k, v, kept=None if kept is None else kept.cuda(), tile_n=tiles or 128,
                          block_n=tiles or 128)  # the Hopper kernel's K scale blocks
    assert torch.isfinite(out).all()
    assert rel_l2(out, ref) < 5e-3
    allowed = None
    if kept is not None:
        allowed = kept.repeat_interleave(128, -2).repeat_interleave(tiles, -1)[..., :nq, :777]
    exact = masked_attention(q, k, v, allowed)
    assert rel_l2(out.cpu(), exact) < 3e-2 and cosine(out.cpu(), exact) > 0.999
    monkeypatch.setitem(sm90.CONSUMERS, 64, 2)
    again = quant_attention(q, k, v, kept=kept, tile_n=tiles, kernel="sm90")
    torch.testing.assert_close(again, out, rtol=0, atol=0)


@needs_sm90
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("jump", [0.0, 24.0])
def test_sm90_rising_maxima(d, dtype, jump, monkeypatch):
    """Scores that rise along the keys, by ~7 log2 units per 128-key block, so that each
    block's maximum lands within the kernel's rescale slack (P above 1, up to 2^14 in fp16,
    2^24 in bf16, with O not rescaled) and every few blocks past it (O rescaled); ``jump``
    adds a rise of ~35 log2 units halfway, past the slack. Dense and on a tile map, in
    each layout."""
    nq, nk = 300, 1100
    q, k, v = rising_qkv(nq, nk, d, dtype, jump)
    kept = torch.rand(1, 4, 3, 9, generator=torch.Generator().manual_seed(1)) < 0.7
    kept[..., -1] = True
    for nc, pp in ((2, True), (2, False)) + (((3, False),) if d == 64 else ()):
        monkeypatch.setitem(sm90.CONSUMERS, d, nc)
        monkeypatch.setitem(sm90.PINGPONG, d, pp)
        for tiles in (None, kept):
            out = quant_attention(q, k, v, kept=tiles, kernel="sm90")
            ref = quant_reference(q, k, v, kept=None if tiles is None else tiles.cuda(),
                                  block_n=128)
            assert torch.isfinite(out).all()
            assert rel_l2(out, ref) < 5e-3, (nc, pp, tiles is None)
            allowed = None if tiles is None else (
                tiles.repeat_interleave(128, -2).repeat_interleave(128, -1)[..., :nq, :nk])
            exact = masked_attention(q, k, v, allowed)
            assert rel_l2(out.cpu(), exact) < 3e-2 and cosine(out.cpu(), exact) > 0.999


def rising_qkv(nq, nk, d, dtype, jump=0.0, seed=7):
    """q ~ 1 per channel, k ~ rise / sqrt(d): scores that rise along the keys by ~7 log2
    units per 128-key block, plus ``jump`` halfway."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    rise = torch.linspace(0, 42 * nk / 1100, nk, device="cuda")
    rise[nk // 2:] += jump
    q = 1 + 0.1 * torch.randn(1, 4, nq, d, device="cuda", generator=g)
    k = rise[:, None] / d**0.5 + 0.3 * torch.randn(1, 2, nk, d, device="cuda", generator=g)
    v = torch.randn(1, 2, nk, d, device="cuda", generator=g)
    return tuple(t.to(dtype) for t in (q, k, v))


@needs_sm90
@pytest.mark.parametrize("d, consumers, pingpong, dtype", [
    (64, 3, False, torch.bfloat16), (64, 2, False, torch.float16), (64, 2, True, torch.bfloat16),
    (128, 2, True, torch.bfloat16), (128, 2, False, torch.bfloat16)])
def test_sm90_norm_bound_changes_no_bit(d, consumers, pingpong, dtype, monkeypatch):
    """The kernel skips a block's row maxima where ``|q| |k|`` (the norms of Q's row and
    of K's block) bounds every score within the rescale slack: the same bits as computing
    them, on flat attention (the bound holds on most blocks), on scores rising along the
    keys (it fails where a maximum moves), on rows of both kinds in one warp, dense, on a
    tile map and with partial tiles. A false bound (K norms of -inf) must change the result of
    scores that rise past what P can hold without a rescale: the skip is live. (fp16 P at
    head_dim 128 computes every maximum: ``sm90.uses_bound``.)"""
    from flexsparse.kernels import quant

    assert sm90.uses_bound(d, dtype)
    monkeypatch.setitem(sm90.CONSUMERS, d, consumers)
    monkeypatch.setitem(sm90.PINGPONG, d, pingpong)
    quantize = quant._quantize_qk

    def without_norms(*args):
        return quantize(*args[:6])

    def false_bound(*args):
        *same, qn, kn = quantize(*args)  # -inf: every block passes for bounded
        return (*same, qn, torch.full_like(kn, -math.inf))

    n = 1100
    flat = qkv(1, 4, 2, n, n, d, dtype, 40)
    rising = rising_qkv(n, n, d, dtype, jump=24.0)
    mixed = (rising[0].clone(), *rising[1:])
    mixed[0][:, :, ::2] *= 0.02  # every other row flat
    steep = rising_qkv(n, n, d, dtype, jump=150.0)  # past 2^128 without a rescale
    kept = torch.rand(1, 4, -(-n // 128), -(-n // 128),
                      generator=torch.Generator().manual_seed(d)) < 0.7
    kept[..., -1] = True
    partial = pattern("radial_token", n).block_mask(n, n, device="cuda", block_size=(128, 128))
    for name, (q, k, v) in (("flat", flat), ("rising", rising), ("mixed", mixed),
                            ("steep", steep)):
        for kw in (dict(), dict(kept=kept), dict(block_mask=partial)):
            out = quant_attention(q, k, v, kernel="sm90", **kw)
            assert torch.isfinite(out).all(), (name, list(kw))
            with monkeypatch.context() as m:
                m.setattr(quant, "_quantize_qk", without_norms)
                plain = quant_attention(q, k, v, kernel="sm90", **kw)
            assert torch.equal(out, plain), (name, list(kw))
            if name == "steep":
                with monkeypatch.context() as m:
                    m.setattr(quant, "_quantize_qk", false_bound)
                    wrong = quant_attention(q, k, v, kernel="sm90", **kw)
                assert not torch.isfinite(wrong).all(), list(kw)


def masked_attention(q, k, v, allowed=None):
    """float64 softmax attention on the CPU, keeping the ``allowed`` pairs (zeros for a
    row that keeps none)."""
    group = q.shape[1] // k.shape[1]
    q, k, v = (t.cpu().double() for t in (q, k, v))
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    s = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5
    if allowed is not None:
        s = s.masked_fill(~allowed, float("-inf"))
    return torch.softmax(s, -1).nan_to_num(0.0) @ v


@needs_sm90
@pytest.mark.parametrize("seed, consumers, pingpong", LAYOUTS)
def test_sm90_partial_tiles(seed, consumers, pingpong, monkeypatch):
    """Maps with partial tiles on the Hopper kernel (the token rule from packed bits, read
    per thread): the four patterns in turn, random lengths with q_len != kv_len, GQA, both
    tile widths, both dtypes, in each layout of the consumer warpgroups; against
    ``quant_reference`` and float64, rows that keep nothing give zeros, a grid of two CTAs
    gives the same bits, and at head_dim 64 three warpgroups give two's bits."""
    g = torch.Generator().manual_seed(500 + seed)
    d = (64, 128)[seed % 2]
    monkeypatch.setitem(sm90.PINGPONG, d, pingpong)
    monkeypatch.setitem(sm90.CONSUMERS, d, consumers)
    name = PATTERNS[seed % 4]
    tile = TILES[(seed // 2) % 2]
    dtype = (torch.bfloat16, torch.float16)[(seed // 3) % 2]
    n = int(torch.randint(700, 2300, (1,), generator=g))
    nq = n - int(torch.randint(0, n // 2, (1,), generator=g)) if name == "composed" else n
    hkv = 1 + seed % 2
    q, k, v = qkv(1 + seed % 2, hkv * (1 + seed % 3), hkv, nq, n, d, dtype, 600 + seed)
    mask = pattern(name, n)
    bm = mask.block_mask(nq, n, device="cuda", block_size=tile)
    assert tile_lists(bm).n_partial > 0
    out = quant_attention(q, k, v, block_mask=bm, kernel="sm90")
    dense = mask.to_dense(nq, n).cuda()
    ref = quant_reference(q, k, v, mask=dense, tile_n=tile[1], block_n=tile[1])
    assert torch.isfinite(out).all()
    assert rel_l2(out, ref) < 5e-3, (name, tile, n, nq)
    exact = fs.reference(q, k, v, mask)
    assert rel_l2(out.cpu(), exact) < 3e-2 and cosine(out.cpu(), exact) > 0.999
    empty = ~dense.any(-1)
    assert (out[:, :, empty] == 0).all()
    monkeypatch.setattr(sm90, "MAX_CTAS", 2)  # each CTA runs many work items
    again = quant_attention(q, k, v, block_mask=bm, kernel="sm90")
    torch.testing.assert_close(again, out, rtol=0, atol=0)
    if consumers == 3:
        monkeypatch.setitem(sm90.CONSUMERS, d, 2)
        two = quant_attention(q, k, v, block_mask=bm, kernel="sm90")
        torch.testing.assert_close(two, out, rtol=0, atol=0)


@needs_sm90
@pytest.mark.parametrize("d", [64, 128])
def test_sm90_runs_a_causal_mask_through_its_block_mask(d):
    """The backend sends a causal mask to the Hopper kernel as its BlockMask (diagonal
    tiles partial): the Triton kernel's in-kernel rule, to within the rounding."""
    q, k, v = qkv(1, 4, 2, 700, 900, d, torch.bfloat16, 21)
    mask = masks.causal()
    call = AttentionCall(q, k, v, mask, d**-0.5, False)
    backend = QuantBackend()
    assert "Hopper" in backend.describe(call)
    out = backend.run(call)
    ref = quant_reference(q, k, v, causal=True, block_n=128)
    assert rel_l2(out, ref) < 5e-3
    exact = fs.reference(q, k, v, mask)
    assert rel_l2(out.cpu(), exact) < 3e-2 and cosine(out.cpu(), exact) > 0.999
    # the Triton kernel with the same K scale blocks (128 rows), so the same quantization
    triton = quant_attention(q, k, v, causal=True, kernel="triton", block_n=128)
    assert rel_l2(out, triton) < 5e-3
    for rows in (1, 5):  # a decode step (every key: dense), a few rows (Triton's rule)
        short = q[:, :, -rows:]
        out = fs.attention(short, k, v, mask, backend="quant")
        exact = fs.reference(short, k, v, mask)
        assert rel_l2(out.cpu(), exact) < 3e-2 and cosine(out.cpu(), exact) > 0.999


@needs_sm90
def test_sm90_leaves_what_it_cannot_run_to_triton():
    q, k, v = qkv(1, 4, 2, 700, 900, 64, torch.bfloat16, 11)
    cases = [dict(causal=True), dict(pvthreshd=4.0),
             dict(pv_dtype="fp16")] + ([dict(pv_dtype="fp8")] if FP8 else [])
    for kw in cases:
        with pytest.raises(ValueError, match="kernel='sm90' cannot run"):
            quant_attention(q, k, v, kernel="sm90", **kw)
        auto = quant_attention(q, k, v, **kw)  # the Triton kernel runs it
        assert torch.equal(auto, quant_attention(q, k, v, kernel="triton", **kw))
    assert sm90_reasons(q, v) == []
    assert any("compute capability" in r or "CUDA" in r
               for r in sm90_reasons(q.cpu(), v.cpu()))


@needs_sm90
def test_sm90_declines_mixed_dtypes_and_short_v():
    """q and v of different dtypes (the kernel writes V's type) and V shorter than one
    128-key copy box stay on the Triton kernel."""
    q, k, v = qkv(1, 2, 2, 300, 300, 64, torch.bfloat16, 12)
    short = [t[:, :, :100] for t in (k, v)]
    for args, kw in (((q.half(), k, v), dict(pv_dtype="bf16")), ((q, *short), {})):
        with pytest.raises(ValueError, match="kernel='sm90' cannot run"):
            quant_attention(*args, kernel="sm90", **kw)
        auto = quant_attention(*args, **kw)
        assert auto.dtype == args[0].dtype
        assert torch.equal(auto, quant_attention(*args, kernel="triton", **kw))
