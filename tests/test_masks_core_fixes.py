"""Core defects of issue 15: oversized tile maps, racing caches, mask_mods that are valid
for torch but do not broadcast."""

import copy
import threading

import pytest
import torch
from torch.nn.attention.flex_attention import BlockMask, create_mask, flex_attention, noop_mask

import flexsparse as fs
from flexsparse import masks
from flexsparse import tiles as T


# -- Mask.from_tiles with a map that does not tile the sequence ------------------------------
def test_from_tiles_larger_than_the_sequence_raises():
    big = fs.Mask.from_tiles(torch.tensor([[False, True]]), 128)
    with pytest.raises(ValueError, match=r"kept: the tile map has 1 x 2 tiles of 128 x 128.*"
                       r"q_len=1, kv_len=1 need exactly ceil\(1/128\) x ceil\(1/128\) = 1 x 1"):
        big.density(1)
    for call in (lambda: big.to_dense(1), lambda: big.block_map(1, 1),
                 lambda: big.block_mask(1), lambda: (big & masks.causal()).to_dense(1),
                 lambda: (~big).density(1)):
        with pytest.raises(ValueError, match="kept: the tile map has 1 x 2 tiles"):
            call()
    with pytest.raises(ValueError, match="kept: the tile map has 1 x 2 tiles"):
        fs.Mask.from_tiles(torch.tensor([[False, True]]), 128, length=100)
    # a map that fits serves the lengths it tiles, decode rows included
    fits = fs.Mask.from_tiles(torch.tensor([[True, False], [True, True]]), 128)
    assert fits.density(200) == pytest.approx((128 * 128 + 72 * 200) / 200**2)
    assert fits.to_dense(1, 129).tolist() == [[True] * 129]
    with pytest.raises(ValueError, match="need exactly .* = 1 x 1 tiles"):
        fits.density(100)


# -- thread-safe caches ----------------------------------------------------------------------
def test_block_mask_cache_is_thread_safe():
    mask = masks.causal() & masks.sliding_window(16)
    lengths = list(range(8, 48))  # 40 lengths, more than the 16-entry caches hold
    errors: list[BaseException] = []
    results: dict[tuple[int, int], object] = {}
    start = threading.Barrier(8)

    def work(worker):
        start.wait()
        try:
            for _ in range(2):
                for n in lengths[worker % 5:] + lengths[: worker % 5]:
                    bm = mask.block_mask(n, block_size=8)
                    results[(worker, n)] = bm.to_dense().sum().item()
                    mask.tile_states(n, n, 8)
        except BaseException as exc:  # noqa: BLE001 - the test reports any failure
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    for n in lengths:
        want = mask.block_mask(n, block_size=8).to_dense().sum().item()
        assert {results[(w, n)] for w in range(8)} == {want}


def test_masks_copy_without_their_lock():
    mask = fs.Mask.from_tiles(torch.eye(3, dtype=torch.bool), 4, length=12)
    mask.block_mask(12, block_size=4)
    for clone in (copy.deepcopy(mask), copy.copy(mask)):
        assert torch.equal(clone.to_dense(), mask.to_dense())
        clone.block_mask(12, block_size=4)
    state = mask.__getstate__()
    assert "_cache_lock" not in state and "_block_mask_cache" not in state


# -- mask_mods that are valid for torch but do not broadcast ---------------------------------
def vision_cross_attention(intervals, image_tokens):
    """attention-gym's Flamingo vision cross-attention rule (written here from its
    description): query ``q`` sees image ``i`` iff ``start_i <= q < end_i``. ``interval[0]``
    is right for a scalar ``kv_idx`` but indexes the wrong axis on an index grid."""
    image_of_key = torch.repeat_interleave(torch.arange(intervals.shape[0]), image_tokens)

    def mask_mod(b, h, q_idx, kv_idx):
        interval = intervals[image_of_key[kv_idx]]
        return (q_idx >= interval[0]) & (q_idx < interval[1])

    return mask_mod


@pytest.mark.parametrize("n, intervals, image_tokens", [
    (12, [[0, 5], [3, 9], [8, 12]], 4),
    (14, [[0, 7], [6, 14]], 7),  # Q == KV and two images: the wrong broadcast has shape
    (2, [[0, 1], [1, 2]], 1),    # [KV, 2] ... and at KV = 2 even the right shape
])
def test_non_broadcast_mask_mod_matches_torch(n, intervals, image_tokens):
    mod = vision_cross_attention(torch.tensor(intervals), image_tokens)
    want = create_mask(mod, None, None, n, n, device="cpu")[0, 0]
    mask = fs.Mask(mod, name="vision cross-attention")
    assert torch.equal(mask.to_dense(n, n), want)
    # the row-wise tile classification (no tile rule) and exact density agree too
    for block in (2, 4):
        assert torch.equal(mask.tile_states(n, n, block), T.states_from_dense(want, block, block))
    assert mask.density(n) == pytest.approx(want.double().mean().item())
    # flex attention evaluates the rule as torch does: same result as torch's matrix
    q, k, v = (torch.randn(1, 2, n, 8, dtype=torch.float64) for _ in range(3))
    ref = fs.reference(q, k, v, fs.Mask.from_tiles(want, 1))
    torch.testing.assert_close(fs.attention(q, k, v, mask=mask, backend="flex"), ref,
                               atol=1e-10, rtol=0)


def test_non_broadcast_mask_mod_default_backend():
    n = 12
    mod = vision_cross_attention(torch.tensor([[0, 5], [3, 9], [8, 12]]), 4)
    mask = fs.Mask(mod, name="vision cross-attention")
    q, k, v = (torch.randn(1, 2, n, 8, dtype=torch.float64) for _ in range(3))
    ref = fs.reference(q, k, v, fs.Mask.from_tiles(create_mask(mod, None, None, n, n)[0, 0], 1))
    torch.testing.assert_close(fs.attention(q, k, v, mask=mask), ref, atol=1e-10, rtol=0)


def test_broadcast_safe_mask_mods_keep_broadcasting():
    calls = []

    def mod(b, h, q_idx, kv_idx):
        calls.append(q_idx.shape)
        return q_idx >= kv_idx

    dense = fs.Mask(mod).to_dense(6)
    assert torch.equal(dense, torch.ones(6, 6, dtype=torch.bool).tril())
    assert calls[0] == (6, 1)  # evaluated once on the grid, then only probed


# -- block-granular maps run without a per-element rule --------------------------------------
def _q_side_like_torch(bm):
    """torch's own transposition of the BlockMask's kv side."""
    return BlockMask.from_kv_blocks(
        bm.kv_num_blocks, bm.kv_indices, bm.full_kv_num_blocks, bm.full_kv_indices,
        BLOCK_SIZE=bm.BLOCK_SIZE, mask_mod=bm.mask_mod, seq_lengths=bm.seq_lengths)


def test_block_granular_maps_carry_noop_mask():
    layout = fs.VideoLayout(5, 40, 13, "start")
    n = layout.length
    q, k, v = (torch.randn(1, 2, n, 8, dtype=torch.float64) for _ in range(3))
    for mask, block, binary in [
        (masks.radial(layout, 1.0, "cogvideox", 16), 16, True),
        (masks.radial(layout, 1.0, "wan", 16) & masks.frame_window(layout, 100), 16, True),
        (masks.full(), 16, True),
        (masks.radial(layout, 1.0, "cogvideox", 16), 32, False),  # tiles of 32: partial
        (masks.radial(layout, 1.0, "cogvideox", 16, "token"), 16, False),
        (masks.causal(), 16, False),
    ]:
        fast = mask.block_mask(n, block_size=block, noop=True)
        eager = mask.block_mask(n, block_size=block)  # default: the rule is kept
        assert (fast.mask_mod is noop_mask) == binary, (mask.name, block)
        assert eager.mask_mod is not noop_mask
        assert mask.block_mask(n, block_size=block, noop=False) is eager
        for name in ("kv_num_blocks", "full_kv_num_blocks", "full_kv_indices"):
            assert torch.equal(getattr(fast, name), getattr(eager, name)), name
        if not binary:
            assert fast.mask_mod is not noop_mask and fast.kv_num_blocks.sum() > 0
        # eager FlexAttention applies only mask_mod: right with the rule kept
        out = fs.attention(q, k, v, mask, backend="flex", block_size=block)
        torch.testing.assert_close(out, fs.reference(q, k, v, mask), atol=1e-10, rtol=0)
        # the query-side indices (backward) are what torch derives from the kv side
        for bm in (fast, eager):
            ref = _q_side_like_torch(bm)
            for name in ("q_num_blocks", "q_indices", "full_q_num_blocks", "full_q_indices"):
                if name.startswith("q_") and bm.mask_mod is noop_mask:
                    assert not bm.q_num_blocks.any()
                    continue
                assert torch.equal(getattr(bm, name), getattr(ref, name)), (mask.name, name)


def test_tile_orderings_match_a_stable_sort():
    g = torch.Generator().manual_seed(3)
    for shape in [(1, 1), (3, 5), (2, 4, 7, 9), (1, 1, 64, 1)]:
        selected = torch.rand(shape, generator=g) < 0.4
        num, idx = T._ordered(selected)
        want = torch.argsort(selected.to(torch.int8), dim=-1, descending=True, stable=True)
        assert torch.equal(num, selected.sum(-1, dtype=torch.int32))
        assert torch.equal(idx, want.to(torch.int32)) and idx.dtype == torch.int32


def test_block_mask_index_tensors_are_contiguous():
    # the kernels index them as contiguous: a transposed ordering must not keep strides
    layout = fs.VideoLayout(5, 40, 13, "start")
    for noop in (True, False):
        bm = masks.radial(layout, 1.0, "cogvideox", 16).block_mask(layout.length,
                                                                    block_size=16, noop=noop)
        for name in ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices",
                     "q_num_blocks", "q_indices", "full_q_num_blocks", "full_q_indices"):
            assert getattr(bm, name).is_contiguous(), (noop, name)
    num, idx = T._ordered((torch.rand(1, 1, 6, 9) < 0.5).transpose(-2, -1))
    assert num.is_contiguous() and idx.is_contiguous()


# -- arguments that were accepted and silently misread -----------------------------------
def test_unchecked_arguments_now_raise():
    with pytest.raises(TypeError, match="causal must be True or False, got 'no'"):
        masks.document([3, 4], causal="no")
    layout = fs.VideoLayout(3, 27)
    for bad in (float("inf"), float("nan")):
        with pytest.raises(ValueError, match="decay_factor"):
            masks.radial(layout, decay_factor=bad)
    with pytest.raises(ValueError, match="sdpa_hint must be one of 'causal', 'full'"):
        fs.Mask(lambda b, h, q, k: q >= k, sdpa_hint="diagonal")
    with pytest.raises(TypeError, match="kept must be a bool tensor, got list"):
        fs.Mask.from_tiles([[True]], 16)


def test_radial_takes_preset_names():
    layout = fs.VideoLayout(4, 50, 7, "end")
    n = layout.length
    for preset, rule in [("wan2.1", "wan"), ("wan2.2-5b", "wan"), ("hunyuan_video", "hunyuan"),
                         ("cogvideox1.5", "cogvideox")]:
        got = masks.radial(layout, 0.5, preset, 16).block_map(n, n, 16)
        assert torch.equal(got, masks.radial(layout, 0.5, rule, 16).block_map(n, n, 16))
    with pytest.raises(ValueError, match="model must be one of"):
        masks.radial(layout, model="wan3")


def test_public_block_mask_keeps_the_rule_unless_asked():
    """``Mask.block_mask`` defaults to the pattern's ``mask_mod`` on every device (eager
    FlexAttention, which users may call with it, applies only ``mask_mod``)."""
    layout = fs.VideoLayout(5, 40, 13, "start")
    n = layout.length
    mask = masks.radial(layout, 1.0, "cogvideox", 16)
    assert mask.block_mask(n, block_size=16).mask_mod is not noop_mask
    q, k, v = (torch.randn(1, 2, n, 8, dtype=torch.float64) for _ in range(3))
    out = flex_attention(q, k, v, block_mask=mask.block_mask(n, block_size=16))
    torch.testing.assert_close(out, fs.reference(q, k, v, mask), atol=1e-9, rtol=0)
