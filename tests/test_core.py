"""Core: Mask tile rules, BlockMask construction, composition, attention backends."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.nn.attention.flex_attention import create_block_mask, flex_attention, noop_mask

import flexsparse as fs
from flexsparse import backends, masks
from flexsparse import tiles as T

from .helpers import block_mask_tiles

ATOL = 1e-10  # float64 eager FlexAttention vs float64 SDPA


def basic_masks(n: int):
    """Every basic mask and a few compositions, for sequences of ``n`` tokens."""
    third = max(1, n // 3)
    doc = [third, n - third] if n - third > 0 else [n]
    return [
        masks.full(),
        masks.causal(),
        masks.sliding_window(max(1, n // 5)),
        masks.prefix_lm(third),
        masks.document(doc),
        masks.document(doc, causal=False),
        masks.causal() & masks.sliding_window(max(1, n // 4)),
        masks.sliding_window(max(1, n // 6)) | masks.kv_prefix(third),
        ~masks.causal(),
        ~(masks.causal() & masks.sliding_window(7)),
    ]


def qkv(b, hq, hkv, q_len, kv_len, d=8, dtype=torch.float64):
    q = torch.randn(b, hq, q_len, d, dtype=dtype)
    k = torch.randn(b, hkv, kv_len, d, dtype=dtype)
    v = torch.randn(b, hkv, kv_len, d, dtype=dtype)
    return q, k, v


def check_tiles_exact(mask, q_len, kv_len, block):
    """The fast tile states equal the ones read off the materialised mask."""
    states = mask.tile_states(q_len, kv_len, block)
    expected = T.states_from_dense(mask.to_dense(q_len, kv_len), *block)
    assert torch.equal(states, expected), mask.name


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 300), bq=st.sampled_from([16, 32, 64]), bk=st.sampled_from([16, 32]))
def test_tile_rules_are_exact(n, bq, bk):
    for mask in basic_masks(n):
        check_tiles_exact(mask, n, n, (bq, bk))


@settings(max_examples=15, deadline=None)
@given(kv_len=st.integers(2, 200), q_len=st.integers(1, 40), block=st.sampled_from([16, 32]))
def test_decode_rows_tile_rules(kv_len, q_len, block):
    q_len = min(q_len, kv_len)
    for mask in basic_masks(kv_len):
        check_tiles_exact(mask, q_len, kv_len, (block, block))


@settings(max_examples=12, deadline=None)
@given(n=st.integers(1, 260), block=st.sampled_from([32, 64, 128]))
def test_block_mask_matches_create_block_mask(n, block):
    for mask in basic_masks(n):
        fast = mask.block_mask(n, n, block_size=block)
        slow = create_block_mask(mask.mask_mod, None, None, n, n, device="cpu", BLOCK_SIZE=block)
        kept_fast, full_fast = block_mask_tiles(fast)
        kept_slow, _ = block_mask_tiles(slow)
        assert torch.equal(kept_fast, kept_slow), mask.name
        # a tile marked full really is all-true inside the sequence
        dense = mask.to_dense(n, n)
        truth = T.states_from_dense(dense, block, block) == T.FULL
        assert not (full_fast[0, 0] & ~truth).any(), mask.name


@settings(max_examples=10, deadline=None)
@given(
    n=st.integers(1, 150),
    heads=st.sampled_from([(2, 2), (4, 2), (3, 1)]),
    block=st.sampled_from([16, 32, 128]),
)
def test_flex_equals_dense_reference(n, heads, block):
    hq, hkv = heads
    q, k, v = qkv(2, hq, hkv, n, n)
    for mask in basic_masks(n):
        out = fs.attention(q, k, v, mask, backend="flex", block_size=block)
        ref = fs.reference(q, k, v, mask)
        torch.testing.assert_close(out, ref, atol=ATOL, rtol=0, msg=mask.name)
        assert not out.isnan().any()


@pytest.mark.parametrize("backend", ["flex", "sdpa", "auto"])
def test_decode_step_uses_last_rows(backend):
    kv_len, q_len = 97, 3
    q, k, v = qkv(1, 2, 2, q_len, kv_len)
    for mask in basic_masks(kv_len):
        out = fs.attention(q, k, v, mask, backend=backend, block_size=32)
        # the same rows of a full-length call
        q_full = torch.cat([torch.randn(1, 2, kv_len - q_len, 8, dtype=q.dtype), q], dim=2)
        full = fs.reference(q_full, k, v, mask)[:, :, -q_len:]
        torch.testing.assert_close(out, full, atol=ATOL, rtol=0, msg=mask.name)


@pytest.mark.parametrize("backend", ["flex", "sdpa"])
def test_fully_masked_rows_are_zero(backend):
    q, k, v = qkv(1, 2, 2, 70, 70)
    mask = ~masks.causal()  # strictly future keys: the last row keeps nothing
    dense = mask.to_dense(70, 70)
    assert not dense[-1].any() and dense[:-1].any(-1).all()
    out = fs.attention(q, k, v, mask, backend=backend, block_size=32)
    assert not out.isnan().any()
    assert torch.equal(out[:, :, -1], torch.zeros_like(out[:, :, -1]))
    assert (out[:, :, :-1].abs().sum(-1) > 0).all()
    torch.testing.assert_close(out, fs.reference(q, k, v, mask), atol=ATOL, rtol=0)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2),
                                       (torch.float16, 2e-3)])
def test_low_precision_backends(dtype, tol):
    q, k, v = qkv(1, 4, 2, 130, 130, d=16, dtype=dtype)
    mask = masks.causal() & masks.sliding_window(40)
    ref = fs.reference(q, k, v, mask)
    for backend in ("flex", "sdpa"):
        out = fs.attention(q, k, v, mask, backend=backend, block_size=64)
        assert out.dtype == dtype
        err = (out.double() - ref).abs().max().item()
        assert err < tol * 10, (backend, err)


def test_from_tiles_any_grid_and_heads():
    kept = torch.rand(3, 5, 4) > 0.5  # [H, Qb, KVb] at 32 x 48 tiles
    mask = fs.Mask.from_tiles(kept, (32, 48), name="random tiles")
    n_q, n_kv = 150, 150
    dense = mask.to_dense(n_kv, n_kv)
    assert dense.shape == (3, n_kv, n_kv)
    # element (i, j) of head h is kept iff its tile is
    i, j = 100, 60
    assert dense[1, i, j] == kept[1, i // 32, j // 48]
    for block in [(32, 48), (16, 16), (64, 32), (128, 128)]:
        states = mask.tile_states(n_kv, n_kv, block)
        assert torch.equal(states, T.states_from_dense(dense, *block))
        states = mask.tile_states(n_q - 100, n_kv, block)  # decode-style offset rows
        assert torch.equal(states, T.states_from_dense(dense[:, -(n_q - 100):], *block))
    with pytest.raises(ValueError, match=r"kept: the tile map has 5 x 4 tiles of 32 x 48"):
        mask.tile_states(170, 170, 32)
    q, k, v = qkv(2, 3, 3, n_kv, n_kv)
    out = fs.attention(q, k, v, mask, backend="flex", block_size=(32, 48))
    torch.testing.assert_close(out, fs.reference(q, k, v, mask), atol=ATOL, rtol=0)


@pytest.mark.parametrize("n, q_len", [(1000, 1000), (1000, 616), (777, 777), (1301, 1045)])
@pytest.mark.parametrize("block", [(128, 64), (64, 64), (32, 48)])
def test_block_map_at_its_own_tiles_is_known_partial_free(n, q_len, block, monkeypatch):
    """A block-granular map at its native tiles with query rows on a tile boundary is
    built without looking for partial tiles (no host read): it must truly have none, also
    at ragged lengths and composed. Every BlockMask is flagged partial-free exactly when
    it lists no partial tile."""
    told = []
    build = T.to_block_mask

    def spy(*args, **kwargs):
        told.append(kwargs.get("has_partial"))
        return build(*args, **kwargs)

    monkeypatch.setattr(T, "to_block_mask", spy)
    g = torch.Generator().manual_seed(n + block[1])
    qb, kb = -(-n // block[0]), -(-n // block[1])
    a = fs.Mask.from_tiles(torch.rand(2, qb, kb, generator=g) < 0.5, block, length=n)
    b = fs.Mask.from_tiles(torch.rand(qb, kb, generator=g) < 0.7, block)
    a.native_block_size = b.native_block_size = block
    aligned = (n - q_len) % block[0] == 0
    for mask, size in ((a, block), (a & b, block), (a | b, block), (~a, block),
                       (a, (block[0], 2 * block[1])), (a, (block[0] // 2, block[1]))):
        told.clear()
        bm = mask.block_mask(q_len, n, block_size=size, heads=mask.heads, noop=True)
        has_partial = bool((mask.tile_states(q_len, n, size) == T.PARTIAL).any())
        assert T.partial_free(bm) == (not has_partial)
        known = aligned and size == block and mask.native_block_size == block
        assert told == [False if known else None]
        if not has_partial:
            assert int(bm.kv_num_blocks.sum()) == 0


def test_head_dependent_mask_composes_with_static():
    kept = torch.zeros(2, 4, 4, dtype=torch.bool)
    kept[0] = True
    kept[1, :, 0] = True
    mask = fs.Mask.from_tiles(kept, 32) & masks.causal()
    assert mask.heads == 2
    dense = mask.to_dense(128, 128)
    assert dense.shape == (2, 128, 128)
    assert torch.equal(dense[0], masks.causal().to_dense(128, 128))
    assert not dense[1, :, 32:].any()
    q, k, v = qkv(1, 2, 1, 128, 128)
    out = fs.attention(q, k, v, mask, backend="flex", block_size=32)
    torch.testing.assert_close(out, fs.reference(q, k, v, mask), atol=ATOL, rtol=0)


def test_composition_refines_ambiguous_tiles():
    # causal & anti-causal-by-one leaves only the diagonal: tiles off it are empty even
    # though both operands call them partial.
    mask = masks.causal() & ~masks.causal() | masks.sliding_window(1)
    check_tiles_exact(mask, 256, 256, (64, 64))
    states = mask.tile_states(256, 256, 64)
    assert (states.diagonal() == T.PARTIAL).all()
    assert (states.triu(1) == T.EMPTY).all() and (states.tril(-1) == T.EMPTY).all()


def test_density_is_exact_without_dense_matrix():
    for n in (1, 77, 300):
        for mask in basic_masks(n):
            assert mask.density(n) == pytest.approx(mask.to_dense(n, n).double().mean().item())
    # a 100k-token causal mask has density (n + 1) / (2 n) exactly
    n = 100_000
    assert masks.causal().density(n) == pytest.approx((n + 1) / (2 * n), rel=1e-12)


def test_block_mask_is_cached():
    mask = masks.causal() & masks.sliding_window(64)
    a = mask.block_mask(300, 300, block_size=64)
    assert mask.block_mask(300, 300, block_size=64) is a
    assert mask.block_mask(300, 300, block_size=32) is not a


def test_mask_mod_under_vmap():
    n = 40
    for mask in basic_masks(n):
        mod = mask.mask_mod
        idx = torch.arange(n)
        zero = torch.tensor(0)
        rows = torch.vmap(torch.vmap(mod, in_dims=(None, None, None, 0)),
                          in_dims=(None, None, 0, None))(zero, zero, idx, idx)
        assert torch.equal(rows, mask.to_dense(n, n)), mask.name


def test_mask_mod_compiles_without_graph_breaks():
    mask = masks.document([30, 50]) & masks.sliding_window(9)
    mod = mask.mask_mod

    def grid(q, kv):
        return mod(torch.tensor(0), torch.tensor(0), q[:, None], kv[None, :])

    compiled = torch.compile(grid, fullgraph=True, backend="eager")
    idx = torch.arange(80)
    assert torch.equal(compiled(idx, idx), mask.to_dense(80, 80))


@pytest.mark.slow
def test_compiled_flex_on_cpu():
    n = 256
    q, k, v = qkv(1, 2, 2, n, n, d=16, dtype=torch.float32)
    mask = masks.causal() & masks.sliding_window(100)
    out = fs.attention(q, k, v, mask, backend="flex", compile=True)
    ref = fs.reference(q, k, v, mask)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=0)


def _tile_map_mask() -> fs.Mask:
    """A map of whole 128 x 128 tiles (no partial tile: a ``noop_mask`` candidate)."""
    kept = torch.rand(4, 4, generator=torch.Generator().manual_seed(0)) < 0.5
    kept[:, 0] = True
    return fs.Mask.from_tiles(kept, 128)


def test_flex_traced_by_an_outer_compile_keeps_the_mask():
    """Inside a caller's ``torch.compile`` our compiled FlexAttention is traced into their
    graph; with ``backend="eager"`` it runs the eager path, which applies ``mask_mod`` only.
    A map of whole tiles must then keep its rule, not ``noop_mask`` (which gave the
    unmasked answer, max error 0.44, with no error raised)."""
    mask = _tile_map_mask()
    q, k, v = qkv(1, 2, 2, 512, 512, d=32, dtype=torch.float32)
    ref = fs.reference(q, k, v, mask)
    fs.attention(q, k, v, mask, backend="flex")  # warm: a BlockMask is not built in a trace
    torch._dynamo.reset()
    traced = torch.compile(lambda q, k, v: fs.attention(q, k, v, mask, backend="flex",
                                                        compile=True),
                           fullgraph=True, backend="eager")
    torch.testing.assert_close(traced(q, k, v).double(), ref, atol=1e-5, rtol=0)
    torch._dynamo.reset()


def test_flex_traced_by_an_outer_compile_asks_for_the_compiled_kernel_options(monkeypatch):
    """A compiled call traced into a caller's ``torch.compile`` still asks for the kernel
    options of compiled FlexAttention. Under Dynamo ``compiled_flex()`` comes back as
    ``flex_attention`` itself, and the backend used to infer "compiled" from that, so the
    traced kernel ran with torch's defaults (on CUDA: 12.0 vs 6.9 ms on the CogVideoX-2b
    radial map, H100)."""
    asked = []
    real = backends.kernel_options

    def spy(block_size, q, compiled):
        asked.append(compiled)
        return real(block_size, q, compiled)

    monkeypatch.setattr(backends, "kernel_options", spy)
    mask = _tile_map_mask()
    q, k, v = qkv(1, 2, 2, 512, 512, d=32, dtype=torch.float32)
    fs.attention(q, k, v, mask, backend="flex")  # warm: a BlockMask is not built in a trace
    torch._dynamo.reset()
    asked.clear()
    traced = torch.compile(lambda q, k, v: fs.attention(q, k, v, mask, backend="flex",
                                                        compile=True),
                           fullgraph=True, backend="eager")
    torch.testing.assert_close(traced(q, k, v).double(), fs.reference(q, k, v, mask),
                               atol=1e-5, rtol=0)
    torch._dynamo.reset()
    assert asked == [True]


def _check_rule_lookup_in_a_trace(mask, q, k, v):
    """FlexAttention on ``mask.block_mask(noop=False)`` looked up inside
    ``torch.compile(fullgraph=True, backend="eager")`` (a build would fail the trace) gives
    the float64 reference."""
    n = q.shape[2]

    def attend(q, k, v):
        bm = mask.block_mask(n, n, block_size=128, noop=False, backward=False)
        return flex_attention(q, k, v, block_mask=bm)

    torch._dynamo.reset()
    out = torch.compile(attend, fullgraph=True, backend="eager")(q, k, v)
    torch._dynamo.reset()
    torch.testing.assert_close(out.double(), fs.reference(q, k, v, mask), atol=1e-5, rtol=0)


def test_the_rule_put_back_on_a_cached_noop_map_inside_a_trace():
    """On CUDA an untraced call caches a map's BlockMask with ``noop_mask``; a call traced by
    a caller's ``torch.compile`` asks for the same map with its rule (eager FlexAttention
    may run it). That one is the cached lists with the rule put back: no build (which a
    trace cannot do), the mask applied."""
    mask = _tile_map_mask()
    q, k, v = qkv(1, 2, 2, 512, 512, d=32, dtype=torch.float32)
    noop = mask.block_mask(512, 512, block_size=128, noop=True, backward=False)
    assert noop.mask_mod is noop_mask
    _check_rule_lookup_in_a_trace(mask, q, k, v)
    ruled = mask.block_mask(512, 512, block_size=128, noop=False, backward=False)
    assert ruled.mask_mod is not noop_mask and ruled.full_kv_indices is noop.full_kv_indices


def test_a_map_with_partial_tiles_cached_for_compiled_calls_serves_a_trace():
    """An untraced compiled call (CUDA) caches its map under ``noop=True``; a map with
    partial tiles keeps its rule there, so it is also the BlockMask a traced call asks for
    (``noop=False``). Before, the traced call missed the cache and tried to build in the
    trace, which Dynamo refuses (a fullgraph compile of a warm model failed)."""
    mask = masks.sliding_window(100) & masks.causal()
    q, k, v = qkv(1, 2, 2, 300, 300, d=32, dtype=torch.float32)
    cached = mask.block_mask(300, 300, block_size=128, noop=True, backward=False)
    assert cached.mask_mod is not noop_mask  # partial tiles: the rule stays
    _check_rule_lookup_in_a_trace(mask, q, k, v)
    assert mask.block_mask(300, 300, block_size=128, noop=False, backward=False) is cached


@pytest.mark.slow
def test_compiled_flex_on_cpu_on_a_map_of_whole_tiles():
    """torch 2.13's compiled FlexAttention on the CPU does not build with ``noop_mask`` and
    no partial tile (a C++ compile error): such maps keep their rule there."""
    mask = _tile_map_mask()
    q, k, v = qkv(1, 2, 2, 512, 512, d=16, dtype=torch.float32)
    out = fs.attention(q, k, v, mask, backend="flex", compile=True)
    torch.testing.assert_close(out.double(), fs.reference(q, k, v, mask), atol=1e-5, rtol=0)


def test_explain_choices():
    q, k, v = qkv(1, 2, 2, 64, 64)
    assert fs.explain(q, k, v, None).backend == "sdpa"
    assert fs.explain(q, k, v, masks.causal()).sdpa_mode == "causal"
    assert fs.attention.explain(q, k, v, masks.sliding_window(3)).backend == "sdpa"
    assert fs.explain(q, k, v, masks.sliding_window(3), backend="flex").backend == "flex"
    dec = fs.explain(q[:, :, :1], k, v, masks.causal())
    assert dec.backend == "sdpa" and "query rows" in dec.reason


def test_causal_fast_path_equals_reference():
    q, k, v = qkv(2, 4, 2, 90, 90)
    out = fs.attention(q, k, v, masks.causal())
    torch.testing.assert_close(out, fs.reference(q, k, v, masks.causal()), atol=ATOL, rtol=0)
    out = fs.attention(q, k, v, None)
    torch.testing.assert_close(out, fs.reference(q, k, v, masks.full()), atol=ATOL, rtol=0)


# -- errors --------------------------------------------------------------------------------
def test_bad_inputs_raise_clear_errors():
    q, k, v = qkv(1, 4, 2, 16, 16)
    with pytest.raises(ValueError, match=r"q must be \[B, H, N, D\]"):
        fs.attention(q[0], k, v)
    with pytest.raises(ValueError, match="batch sizes differ"):
        fs.attention(q, k.expand(2, -1, -1, -1), v)
    with pytest.raises(ValueError, match="head_dim"):
        fs.attention(q, k[..., :4], v)
    with pytest.raises(ValueError, match="heads"):
        fs.attention(q[:, :3], k, v)
    with pytest.raises(ValueError, match="enable_gqa"):
        fs.attention(q, k, v, enable_gqa=False)
    with pytest.raises(ValueError, match="q_len"):
        fs.attention(torch.randn(1, 4, 20, 8, dtype=q.dtype), k, v, masks.causal())
    with pytest.raises(ValueError, match="backend"):
        fs.attention(q, k, v, backend="fast")
    with pytest.raises(TypeError, match="mask"):
        fs.attention(q, k, v, mask="causal")
    with pytest.raises(TypeError, match="dtype"):
        fs.attention(q.float(), k, v)
    with pytest.raises(ValueError, match="built for sequences of 12"):
        fs.attention(q, k, v, masks.document([5, 7]))
    with pytest.raises(ValueError, match="window must be >= 1"):
        masks.sliding_window(0)
    with pytest.raises(TypeError, match="window must be an int"):
        masks.sliding_window(2.5)
    with pytest.raises(ValueError, match=r"lengths\[1\] must be >= 1"):
        masks.document([3, -1])
    with pytest.raises(ValueError, match="heads=3"):
        fs.Mask.from_tiles(torch.ones(2, 1, 1, dtype=torch.bool), 16).block_mask(16, heads=3)
    with pytest.raises(ValueError, match="cannot compose"):
        fs.Mask.from_tiles(torch.ones(2, 1, 1, dtype=torch.bool), 16) & fs.Mask.from_tiles(
            torch.ones(3, 1, 1, dtype=torch.bool), 16
        )
    with pytest.raises(ValueError, match="block_size must be >= 1"):
        masks.causal().block_map(10, 10, block_size=0)


@pytest.mark.parametrize("position", ["start", "end"])
@pytest.mark.parametrize("text", ["global", "none"])
def test_frame_window_tile_rule_exact(position, text):
    for tpf, radius, block in [(5, 0, 8), (13, 1, 16), (40, 2, 32), (9, 3, 64)]:
        lay = fs.VideoLayout(frames=6, tokens_per_frame=tpf, text_tokens=7, text_position=position)
        mask = masks.frame_window(lay, radius, text=text)
        check_tiles_exact(mask, lay.length, lay.length, (block, block))
    q, k, v = qkv(1, 2, 2, lay.length, lay.length)
    out = fs.attention(q, k, v, mask, backend="flex", block_size=32)
    torch.testing.assert_close(out, fs.reference(q, k, v, mask), atol=ATOL, rtol=0)


@pytest.mark.parametrize("n", [77, 256])
def test_query_side_lists_only_for_backward(n):
    """``backward=False`` drops the query-side lists (backward's) and nothing else; a call
    asks for them exactly when it needs a gradient (FlexAttention's backward runs on CUDA
    only: the gradient is checked in tests/gpu/test_core_gpu.py)."""
    for mask in basic_masks(n):
        with_q = mask.block_mask(n, n, block_size=32)
        without = mask.block_mask(n, n, block_size=32, backward=False)
        assert without is not with_q, mask.name
        assert without.q_num_blocks is None and without.full_q_num_blocks is None, mask.name
        for name in ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices"):
            assert torch.equal(getattr(without, name), getattr(with_q, name)), (mask.name, name)
        assert with_q.q_num_blocks is not None and with_q.full_q_indices is not None
    from flexsparse.call import AttentionCall

    q, k, v = qkv(1, 2, 2, n, n)
    call = AttentionCall(q, k, v, masks.causal(), q.shape[-1] ** -0.5, False)
    assert not call.needs_backward
    q.requires_grad_(True)
    assert call.needs_backward
    with torch.no_grad():
        assert not call.needs_backward
