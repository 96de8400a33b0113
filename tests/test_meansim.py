"""masks.meansim: the SpargeAttn-style predictor, its bound masks and attention with them.

Values are checked against hand-built expectations, a direct transcription of the four
steps (explicit Gram matrices, Python loops) and the dense float64 reference.
Tolerances: float32 flex / SDPA vs float64 reference, atol 1e-5.
"""

import math

import pytest
import torch

import flexsparse as fs
from flexsparse import masks
from flexsparse.masks.meansim import MeansimMask

BQ, BK, D = 32, 16, 32


pytestmark = pytest.mark.usefixtures("one_thread")


def tiered(n_q_blocks=4, heads=1, batch=1, strong=6.0, medium=5.9, noise=0.0, seed=0):
    """Identical tokens per block, orthogonal block directions: q block i scores
    ``strong`` against key block 2i, ``medium`` against 2i+1 and 0 against the rest
    (pooled logits, after the D**-0.5 scale)."""
    g = torch.Generator().manual_seed(seed)
    basis = torch.linalg.qr(torch.randn(D, D, generator=g))[0].T
    root = D**0.25
    qdir = basis[:n_q_blocks] * root
    kdir = torch.zeros(2 * n_q_blocks, D)
    kdir[0::2] = basis[:n_q_blocks] * strong * root
    kdir[1::2] = basis[:n_q_blocks] * medium * root
    n = n_q_blocks * BQ
    q = qdir.repeat_interleave(BQ, 0).expand(batch, heads, n, D).clone()
    k = kdir.repeat_interleave(BK, 0).expand(batch, heads, n, D).clone()
    if noise:
        q += noise * torch.randn(q.shape, generator=g)
        k += noise * torch.randn(k.shape, generator=g)
    v = torch.randn(batch, heads, n, D, generator=g)
    return q, k, v


def pairs(rows, cols, keep):
    kept = torch.zeros(rows, cols, dtype=torch.bool)
    for i in range(rows):
        for j in keep(i):
            kept[i, j] = True
    return kept


def naive_predict(q, k, sim1, cdf=None, topk=None, bq=BQ, bk=BK, causal=False, sink=False):
    """The issue's four steps, written out with loops and explicit Gram matrices."""
    b_, h_, n, d = q.shape
    nk = k.shape[2]
    qb, kb = math.ceil(n / bq), math.ceil(nk / bk)
    out = torch.zeros(b_, h_, qb, kb, dtype=torch.bool)

    def blocks(x, size, count):
        res = []
        for i in range(count):
            blk = x[i * size:(i + 1) * size].double()
            unit = blk / blk.norm(dim=-1, keepdim=True)
            ss = (unit @ unit.T).mean().item() if blk.shape[0] == size else -math.inf
            res.append((blk.mean(0), ss))
        return res

    for b in range(b_):
        for h in range(h_):
            qs, ks = blocks(q[b, h], bq, qb), blocks(k[b, h], bk, kb)
            t1 = float(sim1[h])
            for i in range(qb):
                score = torch.tensor([
                    (qs[i][0] @ ks[j][0]).item() * d**-0.5 if ks[j][1] > t1 else -math.inf
                    for j in range(kb)
                ])
                if causal:
                    for j in range(kb):
                        if j >= (i + 1) * bq / bk:
                            score[j] = -math.inf
                prob = torch.nan_to_num(score.softmax(-1), nan=0.0)
                vals, idx = torch.sort(prob, descending=True, stable=True)
                if cdf is not None:
                    num = int((vals.cumsum(0) <= float(cdf[h])).sum())
                else:
                    num = int(float(topk[h]) * kb)
                for j in idx[: max(num, 1)]:
                    out[b, h, i, j] = True
                for j in range(kb):
                    if ks[j][1] <= t1 or qs[i][1] <= t1:
                        out[b, h, i, j] = True
                    if causal and j >= (i + 1) * bq / bk:
                        out[b, h, i, j] = False
                if sink:
                    out[b, h, i, 0] = True
    return out


def assert_attention_matches(q, k, v, mask, atol=1e-5, **kw):
    ref = fs.reference(q, k, v, mask=mask)
    out = fs.attention(q, k, v, mask=mask, backend="flex", **kw)
    assert out.shape == ref.shape
    assert torch.allclose(out.double(), ref, atol=atol), (out.double() - ref).abs().max()


# -- hand-made inputs with known tiles -----------------------------------------------------
def test_identical_tokens_orthogonal_blocks():
    q, k, _ = tiered()
    # per row: p = e^6/Z = 0.5209, e^5.9/Z = 0.4713, six others 1/Z = 0.0013 each, so the
    # sorted cumulative sums are 0.5209, 0.99225, 0.99354, ...
    only_strong = pairs(4, 8, lambda i: [2 * i])
    both = pairs(4, 8, lambda i: [2 * i, 2 * i + 1])
    for cdf, expected in ((0.5, only_strong), (0.99, only_strong), (0.993, both)):
        got = masks.meansim(0.5, cdfthreshd=cdf, block_q=BQ, block_kv=BK).predict(q, k)
        assert got.shape == (1, 1, 4, 8)
        assert torch.equal(got[0, 0], expected), cdf


def test_blocks_that_are_not_self_similar_are_always_kept():
    q, k, _ = tiered()
    g = torch.Generator().manual_seed(1)
    q[:, :, BQ:2 * BQ] = torch.randn(BQ, D, generator=g)  # q block 1: random tokens
    k[:, :, 5 * BK:6 * BK] = torch.randn(BK, D, generator=g)  # key block 5: random tokens
    m = masks.meansim(0.5, cdfthreshd=0.5, block_q=BQ, block_kv=BK)
    pooled_q, selfsim_q, pooled_k, selfsim_k, _ = m.stats(q, k)
    assert torch.allclose(selfsim_q[0, 0], torch.tensor([1.0, 0.05, 1.0, 1.0]), atol=0.03)
    assert selfsim_k[0, 0, 5] < 0.2 and (selfsim_k[0, 0, :5] > 0.999).all()
    got = m.predict(q, k)[0, 0]
    expected = pairs(4, 8, lambda i: [2 * i, 5])  # strongest block + the random key block
    expected[1] = True  # the random query block sees everything
    assert torch.equal(got, expected)


def test_trailing_partial_blocks_are_never_self_similar():
    q, k, _ = tiered()
    n = q.shape[2] + 10  # 10 more identical tokens: a perfect but partial block each
    q = torch.cat([q, q[:, :, -10:]], dim=2)
    k = torch.cat([k, k[:, :, -10:]], dim=2)
    got = masks.meansim(-1.0, cdfthreshd=0.99, block_q=BQ, block_kv=BK).predict(q, k)[0, 0]
    assert got.shape == (math.ceil(n / BQ), math.ceil(n / BK))
    assert got[-1].all() and got[:, -1].all()
    assert torch.equal(got[:4, :8], pairs(4, 8, lambda i: [2 * i]))


def test_per_head_parameters():
    q, k, _ = tiered(heads=3)
    sim1 = torch.tensor([0.5, 2.0, 0.5])  # head 1: no block can be self-similar -> dense
    cdf = torch.tensor([0.99, 0.99, 0.993])
    got = masks.meansim(sim1, cdfthreshd=cdf, block_q=BQ, block_kv=BK).predict(q, k)[0]
    assert torch.equal(got[0], pairs(4, 8, lambda i: [2 * i]))
    assert got[1].all()
    assert torch.equal(got[2], pairs(4, 8, lambda i: [2 * i, 2 * i + 1]))
    with pytest.raises(ValueError, match="per-head values"):
        masks.meansim(torch.tensor([0.5, 0.5]), cdfthreshd=0.9).predict(q, k)


def test_causal_softmax_and_final_drop():
    # Causal softmax over fewer blocks raises the cumulative sums: at 0.993 rows 0-2 keep
    # only their strongest block (without causal they keep strong and medium, see
    # test_identical_tokens_orthogonal_blocks); row 3 allows everything and keeps both.
    q, k, _ = tiered()
    m = masks.meansim(0.5, cdfthreshd=0.993, block_q=BQ, block_kv=BK, causal=True)
    assert torch.equal(m.predict(q, k)[0, 0], pairs(4, 8, lambda i: [2 * i] if i < 3 else [6, 7]))
    # Key block 7 made random is never self-similar: kept by every row without causal,
    # dropped at the end where causal forbids it (block j allowed in row i iff j < 2i + 2).
    k[:, :, 7 * BK:] = torch.randn(BK, D, generator=torch.Generator().manual_seed(2))
    flat = masks.meansim(0.5, cdfthreshd=0.5, block_q=BQ, block_kv=BK).predict(q, k)[0, 0]
    assert torch.equal(flat, pairs(4, 8, lambda i: [2 * i, 7]))
    m = masks.meansim(0.5, cdfthreshd=0.5, block_q=BQ, block_kv=BK, causal=True)
    assert torch.equal(m.predict(q, k)[0, 0], pairs(4, 8, lambda i: [2 * i] + [7] * (i == 3)))


def test_topk_keeps_a_fraction_of_key_blocks():
    q, k, _ = tiered()
    got = masks.meansim(0.5, topk=0.25, block_q=BQ, block_kv=BK).predict(q, k)[0, 0]
    assert torch.equal(got.sum(-1), torch.full((4,), 2))  # int(0.25 * 8) = 2
    assert torch.equal(got, pairs(4, 8, lambda i: [2 * i, 2 * i + 1]))
    tiny = masks.meansim(0.5, topk=0.01, block_q=BQ, block_kv=BK).predict(q, k)[0, 0]
    assert torch.equal(tiny, pairs(4, 8, lambda i: [2 * i]))  # at least one


def test_attention_sink_keeps_key_block_zero():
    q, k, _ = tiered()
    got = masks.meansim(0.5, cdfthreshd=0.99, block_q=BQ, block_kv=BK,
                        attention_sink=True).predict(q, k)[0, 0]
    assert torch.equal(got, pairs(4, 8, lambda i: sorted({0, 2 * i})))


@pytest.mark.parametrize("causal,sink,topk", [(False, False, None), (True, True, None),
                                              (False, True, 0.3), (True, False, 0.5)])
def test_predict_matches_direct_transcription(causal, sink, topk):
    g = torch.Generator().manual_seed(3)
    base = torch.randn(2, 3, 1, D, generator=g)  # shared direction: mixed self-similarity
    q = base + 0.9 * torch.randn(2, 3, 150, D, generator=g)
    k = base + 0.9 * torch.randn(2, 3, 150, D, generator=g)
    sim1 = torch.tensor([-0.1, 0.3, 0.45])
    cdf = None if topk else torch.tensor([0.5, 0.8, 0.95])
    top = None if topk is None else torch.full((3,), topk)
    m = masks.meansim(sim1, cdfthreshd=cdf, topk=top, block_q=BQ, block_kv=BK, causal=causal,
                      attention_sink=sink)
    expected = naive_predict(q, k, sim1, cdf=cdf, topk=top, causal=causal, sink=sink)
    got = m.predict(q, k)
    assert 0.05 < expected.float().mean() < 0.95  # the case is not trivial
    assert torch.equal(got, expected)


# -- bound masks and attention ---------------------------------------------------------------
def test_bind_gives_a_block_granular_mask_at_the_native_size():
    q, k, v = tiered(batch=2, heads=2, noise=0.05)
    m = masks.meansim(0.5, cdfthreshd=0.99, block_q=BQ, block_kv=BK)
    bound = m.bind(q, k)
    assert bound.native_block_size == (BQ, BK)
    assert (bound.batch, bound.heads, bound.length) == (2, 2, q.shape[2])
    kept = m.predict(q, k)
    dense = bound.to_dense(q.shape[2], k.shape[2])
    expanded = kept.repeat_interleave(BQ, -2).repeat_interleave(BK, -1)
    assert torch.equal(dense, expanded)
    assert_attention_matches(q, k, v, m)


def test_default_128x64_tiles_with_flex_match_reference():
    g = torch.Generator().manual_seed(5)
    base = torch.randn(1, 2, 1, 16, generator=g)
    q = base + 0.7 * torch.randn(1, 2, 300, 16, generator=g)  # 3 q blocks (last partial)
    k = base + 0.7 * torch.randn(1, 2, 300, 16, generator=g)  # 5 key blocks (last partial)
    v = torch.randn(1, 2, 300, 16, generator=g)
    m = masks.meansim(0.3, cdfthreshd=0.6)
    kept = m.predict(q, k)
    assert kept.shape == (1, 2, 3, 5) and not kept.all()
    bm = m.bind(q, k).block_mask(300, 300, heads=2, batch=1, block_size=(128, 64))
    assert bm.BLOCK_SIZE == (128, 64)
    assert_attention_matches(q, k, v, m)
    assert_attention_matches(q, k, v, m, block_size=128)  # converted tiles, same values


def test_and_with_a_static_mask():
    q, k, v = tiered(heads=2, noise=0.05)
    n = q.shape[2]
    dyn = masks.meansim(0.5, cdfthreshd=0.993, block_q=BQ, block_kv=BK)
    static = masks.sliding_window(40)
    both = dyn & static
    assert isinstance(both, fs.DynamicMask)
    bound = both.bind(q, k)
    assert bound.native_block_size == (BQ, BK)
    expected = dyn.bind(q, k).to_dense(n, n) & static.to_dense(n, n)
    assert torch.equal(bound.to_dense(n, n), expected)
    assert_attention_matches(q, k, v, both)
    assert_attention_matches(q, k, v, static & dyn)  # either order


def test_causal_meansim_and_causal_mask_in_attention():
    q, k, v = tiered(heads=2, noise=0.05)
    mask = masks.meansim(0.5, cdfthreshd=0.99, block_q=BQ, block_kv=BK, causal=True)
    mask = mask & masks.causal()
    n = q.shape[2]
    dense = mask.bind(q, k).to_dense(n, n)
    assert not torch.triu(dense, diagonal=1).any()
    assert_attention_matches(q, k, v, mask)


def test_gqa_and_decode_rows():
    g = torch.Generator().manual_seed(7)
    q = torch.randn(1, 4, 200, D, generator=g) + 1.0
    k = torch.randn(1, 2, 200, D, generator=g) + 1.0
    v = torch.randn(1, 2, 200, D, generator=g)
    m = masks.meansim(0.2, cdfthreshd=0.7, block_q=BQ, block_kv=BK)
    kept = m.predict(q, k)
    assert kept.shape == (1, 4, 7, 13)
    # heads 0, 1 share kv head 0: same key-block statistics, own query statistics
    assert_attention_matches(q, k, v, m)
    # decode-like call: the last 40 query rows; blocks aligned to absolute positions
    qd = q[:, :, -50:]
    kept_d = m.predict(qd, k)
    assert kept_d.shape == (1, 4, 3, 13)  # rows 150..199 -> absolute blocks 4, 5 and 6
    # blocks 4 and 6 hold only 10 and 8 of qd's rows: never self-similar, all kept
    assert kept_d[:, :, 0].all() and kept_d[:, :, 2].all() and not kept_d[:, :, 1].all()
    assert_attention_matches(qd, k, v, m & masks.causal())


def test_all_tiles_dropped_rows_are_zero_not_nan():
    q, k, v = tiered(noise=0.05)
    n = q.shape[2]
    m = masks.meansim(0.5, cdfthreshd=0.99, block_q=BQ, block_kv=BK) & ~masks.full()
    out = fs.attention(q, k, v, mask=m, backend="flex")
    assert torch.equal(out, torch.zeros_like(out))
    assert m.bind(q, k).to_dense(n, n).sum() == 0


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(simthreshd1=0.5), ValueError, "exactly one of cdfthreshd"),
        (dict(simthreshd1=0.5, cdfthreshd=0.9, topk=0.2), ValueError, "exactly one"),
        (dict(simthreshd1=0.5, cdfthreshd=1.5), ValueError, "cdfthreshd must be <= 1"),
        (dict(simthreshd1=0.5, topk=-0.1), ValueError, "topk must be >= 0"),
        (dict(simthreshd1="high", cdfthreshd=0.9), TypeError, "simthreshd1"),
        (dict(simthreshd1=torch.zeros(2, 2), cdfthreshd=0.9), ValueError, "1-d per-head"),
        (dict(simthreshd1=0.5, cdfthreshd=0.9, block_q=0), ValueError, "block_q"),
        (dict(simthreshd1=0.5, cdfthreshd=0.9, causal=1), TypeError, "causal"),
    ],
)
def test_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        masks.meansim(**kwargs)


def test_bad_inputs_to_predict():
    m = masks.meansim(0.5, cdfthreshd=0.9)
    with pytest.raises(ValueError, match=r"q must be \[B, H, N, D\]"):
        m.predict(torch.randn(4, 10, 8), torch.randn(1, 4, 10, 8))
    with pytest.raises(ValueError, match="multiple of k heads"):
        m.predict(torch.randn(1, 3, 10, 8), torch.randn(1, 2, 10, 8))
    with pytest.raises(ValueError, match="q_len"):
        m.predict(torch.randn(1, 2, 20, 8), torch.randn(1, 2, 10, 8))


def test_meansim_is_exported():
    assert isinstance(masks.meansim(0.1, cdfthreshd=0.9), MeansimMask)
    assert "meansim" in masks.__all__


# -- the optimised predictor against the previous straightforward implementation ----------
def reference_block_stats(x, block, lead=0, smooth=False):
    """The four steps' statistics as first written: float32 copy, zero padding."""
    b, h, n, d = x.shape
    xf = x.to(torch.float32)
    if smooth:
        xf = xf - xf.mean(dim=-2, keepdim=True)
    total = lead + n
    nb = -(-total // block)
    tail = nb * block - total
    if lead or tail:
        xf = torch.nn.functional.pad(xf, (0, 0, lead, tail))
    pos = torch.arange(nb * block)
    valid = ((pos >= lead) & (pos < total)).view(nb, block)
    count = valid.sum(-1).to(torch.float32)
    xb = xf.view(b, h, nb, block, d)
    pooled = xb.sum(-2) / count.clamp(min=1.0)[:, None]
    inv = torch.linalg.vector_norm(xb, dim=-1, keepdim=True).clamp(min=1e-12).reciprocal()
    selfsim = (xb * inv).sum(-2).square().sum(-1) / count.clamp(min=1.0).square()
    complete = count == block
    selfsim = torch.where(complete, selfsim, torch.full_like(selfsim, -math.inf))
    return pooled, selfsim, complete


def reference_select_tiles(pq, sq, pk, sk, sim1, cdf, top, bq, bk, causal, sink, q_off):
    """Steps 2-4 as first written: full stable sort, cumsum, searchsorted, scatter."""
    heads, d = pq.shape[1], pq.shape[-1]
    qb, kb = pq.shape[-2], pk.shape[-2]
    thr = sim1.view(1, heads, 1)
    sim_q, sim_k = sq > thr, sk > thr
    score = pq @ pk.transpose(-1, -2) * d**-0.5
    score = torch.where(sim_k[..., None, :], score, torch.tensor(-math.inf))
    allowed = None
    if causal:
        qi = torch.arange(qb)[:, None] + q_off
        allowed = torch.arange(kb)[None, :] * bk < (qi + 1) * bq
        score = torch.where(allowed, score, torch.tensor(-math.inf))
    prob = torch.nan_to_num(score.softmax(-1), nan=0.0)
    order = torch.sort(prob, dim=-1, descending=True, stable=True)
    if cdf is not None:
        c = order.values.cumsum(-1)
        target = cdf.view(1, heads, 1, 1).expand(*c.shape[:-1], 1).contiguous()
        num = torch.searchsorted(c.contiguous(), target, right=True)
    else:
        num = (top * kb).to(torch.int64).view(1, heads, 1, 1)
    chosen = (torch.arange(kb) < num.clamp(min=1)).expand_as(order.indices)
    kept = torch.zeros_like(chosen).scatter(-1, order.indices, chosen)
    kept = kept | ~sim_k[..., None, :] | ~sim_q[..., :, None]
    if allowed is not None:
        kept = kept & allowed
    if sink:
        kept = kept | (torch.arange(kb) == 0)
    return kept


def reference_predict(q, k, sim1, cdf, top, bq, bk, causal, sink, smooth):
    offset = k.shape[2] - q.shape[2]
    pq, sq, _ = reference_block_stats(q, bq, lead=offset % bq)
    pk, sk, _ = reference_block_stats(k, bk, smooth=smooth)
    rep = q.shape[1] // k.shape[1]
    pk, sk = pk.repeat_interleave(rep, dim=1), sk.repeat_interleave(rep, dim=1)
    return reference_select_tiles(pq, sq, pk, sk, sim1, cdf, top, bq, bk, causal, sink,
                                  offset // bq)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("mode", ["cdf", "topk", "ties"])
def test_optimised_predict_equals_reference_implementation(seed, mode):
    g = torch.Generator().manual_seed(seed)
    heads, kv_heads = 4, (4 if seed % 2 else 2)
    n_kv = [150, 160, 257, 96][seed]
    n_q = [150, 131, 200, 96][seed]  # q_len < kv_len: leading partial query block
    bq, bk = [(BQ, BK), (BQ, BK), (64, 32), (16, 16)][seed]
    base = torch.randn(2, kv_heads, 1, D, generator=g)
    k = base + 0.9 * torch.randn(2, kv_heads, n_kv, D, generator=g)
    q = (base + 0.9 * torch.randn(2, kv_heads, n_kv, D, generator=g))[:, :, -n_q:]
    q = q.repeat_interleave(heads // kv_heads, dim=1)
    q = q + 0.3 * torch.randn(q.shape, generator=g)
    if mode == "ties":
        # identical key blocks: exactly tied probabilities across key blocks
        k = k[:, :, :bk].repeat(1, 1, -(-n_kv // bk), 1)[:, :, :n_kv].contiguous()
    if seed == 3:
        q, k = q.to(torch.bfloat16), k.to(torch.bfloat16)
    sim1 = torch.tensor([-0.1, 0.2, 0.35, 0.5])
    cdf = None if mode == "topk" else torch.tensor([0.3, 0.6, 0.9, 1.0])
    top = torch.tensor([0.0, 0.2, 0.5, 1.0]) if mode == "topk" else None
    for causal in (False, True):
        for sink in (False, True):
            smooth = bool(seed % 2) and sink
            m = masks.meansim(sim1, cdfthreshd=cdf, topk=top, block_q=bq, block_kv=bk,
                              causal=causal, attention_sink=sink, smooth_k=smooth)
            got = m.predict(q, k)
            want = reference_predict(q, k, sim1, cdf, top, bq, bk, causal, sink, smooth)
            assert got.shape == want.shape
            assert torch.equal(got, want), (causal, sink)
            assert torch.equal(m.decide(m.stats(q, k)), want)
            if not causal:
                assert 0.02 < want.float().mean() < 0.98  # not a trivial case


def test_block_stats_equal_reference_with_partial_blocks():
    mod = __import__("sys").modules["flexsparse.masks.meansim"]
    g = torch.Generator().manual_seed(11)
    for n, block, lead in [(100, 32, 0), (100, 32, 5), (20, 32, 7), (25, 32, 7), (64, 32, 0),
                           (64, 32, 31), (1, 16, 15)]:
        x = torch.randn(2, 3, n, D, generator=g)
        x[:, :, min(3, n - 1)] = 0.0  # a zero token counts as a zero vector
        for got, want in zip(mod.block_stats(x, block, lead), reference_block_stats(x, block,
                                                                                   lead)):
            assert torch.equal(got, want), (n, block, lead)


def test_compile_policy(monkeypatch):
    mod = __import__("sys").modules["flexsparse.masks.meansim"]
    monkeypatch.setattr(mod, "_seen", __import__("collections").OrderedDict())
    monkeypatch.setattr(mod, "_compiled_keys", set())
    q, k = torch.zeros(1, 1, 8, 4), torch.zeros(1, 1, 16, 4)
    monkeypatch.delenv("FLEXSPARSE_COMPILE", raising=False)
    assert not mod._want_compile(q, k, "a")  # CPU: eager unless FLEXSPARSE_COMPILE=1
    monkeypatch.setenv("FLEXSPARSE_COMPILE", "1")
    assert not mod._want_compile(q, k, "b")  # q_len < kv_len: compiled once it repeats
    assert mod._want_compile(q, k, "b")
    assert mod._want_compile(k, k, "c")  # q_len == kv_len: compiled at once
    monkeypatch.setenv("FLEXSPARSE_COMPILE", "0")
    assert not mod._want_compile(k, k, "c")


def test_seen_shapes_are_bounded(monkeypatch):
    """A decode loop brings a new shape every step: the memory of shapes stays bounded and
    a shape that repeats still compiles."""
    mod = __import__("sys").modules["flexsparse.masks.meansim"]
    monkeypatch.setattr(mod, "_seen", __import__("collections").OrderedDict())
    monkeypatch.setattr(mod, "_compiled_keys", set())
    monkeypatch.setattr(mod, "_COMPILE_BUDGET", 1)
    monkeypatch.setenv("FLEXSPARSE_COMPILE", "1")
    q, k = torch.zeros(1, 1, 8, 4), torch.zeros(1, 1, 16, 4)
    for step in range(mod._SEEN_LIMIT * 3):
        assert not mod._want_compile(q, k, ("decode", step))
    assert len(mod._seen) == mod._SEEN_LIMIT
    assert ("decode", 0) not in mod._seen and ("decode", 3 * mod._SEEN_LIMIT - 1) in mod._seen
    assert mod._want_compile(q, k, ("decode", 3 * mod._SEEN_LIMIT - 1))  # seen twice


@pytest.mark.parametrize("q_len", [96, 40])
def test_bind_tiles_is_bind_and_predict_from_one_prediction(q_len):
    q, k, _ = tiered(n_q_blocks=3, heads=2, batch=2, noise=0.3)
    q = q[:, :, -q_len:]
    m = masks.meansim(torch.tensor([0.1, 0.3]), cdfthreshd=0.5, block_q=BQ, block_kv=BK)
    bound, tiles = m.bind_tiles(q, k)
    assert torch.equal(tiles, m.predict(q, k))
    lead = (96 - q_len) % BQ  # query blocks are aligned to absolute positions
    assert tiles.shape == (2, 2, -(-(lead + q_len) // BQ), 6)
    assert torch.equal(bound.to_dense(q_len, 96), m.bind(q, k).to_dense(q_len, 96))
    rows = tiles.repeat_interleave(BQ, -2).repeat_interleave(BK, -1)
    assert torch.equal(bound.to_dense(q_len, 96), rows[..., lead:lead + q_len, :96])
