"""Sequence-parallel (Ulysses) attention over gloo equals single-process attention.

Each process group is spawned once (start-up costs seconds) and runs every case inside;
a failing assertion in a worker fails the test with the worker's traceback. Outputs are
float32 on the CPU, compared with ``flexsparse.attention`` on the full tensors in one
process (atol 1e-5: same arithmetic per head, only the data movement differs) and with
the float64 dense reference (atol 2e-5).
"""

from __future__ import annotations

import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import flexsparse as fs
from flexsparse import masks
from flexsparse.distributed import (
    gather,
    gather_heads,
    scatter_heads,
    shard,
    shard_sizes,
    slice_heads,
    ulysses_attention,
)
from flexsparse.mask import DynamicMask

ATOL_SAME = 1e-5
ATOL_REF = 2e-5


# -- a toy data-dependent mask with per-head parameters ------------------------------------
class TopKNoSlice(DynamicMask):
    """Per head, each query block keeps its ``keep[h]`` kv blocks of highest mean-pooled
    ``q . k`` (plus the diagonal block). ``keep`` is a per-head parameter."""

    def __init__(self, keep: list[int], block: int = 16):
        self.keep = list(keep)
        self.heads = len(self.keep)
        self.block = block
        self.name = f"topk{self.keep}"

    def bind(self, q, k):
        n, bs = k.shape[2], self.block
        nb = -(-n // bs)
        pad = nb * bs - n
        qp = torch.nn.functional.pad(q, (0, 0, 0, pad)).unflatten(2, (nb, bs)).mean(3)
        group = q.shape[1] // k.shape[1]
        kp = torch.nn.functional.pad(k, (0, 0, 0, pad)).unflatten(2, (nb, bs)).mean(3)
        kp = kp.repeat_interleave(group, dim=1)
        score = qp @ kp.transpose(-1, -2)  # [B, H, Qb, KVb]
        rank = score.argsort(-1, descending=True).argsort(-1)
        keep = torch.tensor(self.keep, device=q.device)[None, :, None, None]
        kept = (rank < keep) | torch.eye(nb, dtype=torch.bool, device=q.device)
        return fs.Mask.from_tiles(kept.cpu(), bs, name=self.name, length=n)


class TopKBlocks(TopKNoSlice):
    """``TopKNoSlice`` that can be restricted to a range of heads."""

    def heads_slice(self, start: int, stop: int) -> TopKBlocks:
        return TopKBlocks(self.keep[start:stop], self.block)


def _per_head_tiles(heads: int, n: int, block: int, seed: int) -> fs.Mask:
    g = torch.Generator().manual_seed(seed)
    nb = -(-n // block)
    kept = torch.rand(heads, nb, nb, generator=g) < 0.5
    kept |= torch.eye(nb, dtype=torch.bool)  # every row keeps a tile: no all-masked rows
    return fs.Mask.from_tiles(kept, block, name="per_head_tiles", length=n)


def _optional_masks() -> list[tuple[str, object, int | None, str]]:
    """The structured and data-dependent patterns: ``(name, mask, length or None, backend)``."""
    # 145 tokens: divisible by neither 2 nor 3; text at the end (HunyuanVideo).
    layout = fs.VideoLayout(frames=4, tokens_per_frame=34, text_tokens=9, text_position="end")
    token_radial = masks.radial(layout, model="hunyuan", block_size=16, granularity="token")
    scenes = masks.scenes(layout, boundaries=[0, 2], adjacency=[[1, 0], [1, 1]])
    ms = masks.meansim
    tuned = ms(torch.tensor([-0.5, 0.0, 0.02, -1.0, 0.01, 0.0]),
               cdfthreshd=torch.tensor([0.3, 0.5, 0.7, 0.9, 0.4, 0.6]),
               block_q=16, block_kv=16)
    return [
        ("radial-block", masks.radial(layout, model="hunyuan", block_size=16), layout.length,
         "flex"),
        ("radial-token", token_radial, layout.length, "sdpa"),
        ("scenes", scenes, layout.length, "flex"),
        ("radial&scenes", scenes & token_radial, layout.length, "sdpa"),  # refined tiles
        ("meansim", ms(0.0, cdfthreshd=0.6, block_q=16, block_kv=16), None, "flex"),
        ("meansim&causal", ms(0.0, cdfthreshd=0.6, block_q=32, block_kv=16, causal=True)
         & masks.causal(), None, "sdpa"),
        ("meansim-per-head", tuned, None, "sdpa"),
    ]


def _cases(world: int):
    """(name, mask factory, n, Hq, Hkv, backend) run in every process group. Lengths are
    divisible by neither 2 nor 3 (uneven shards); ``big`` spans two 128-token tiles so the
    "flex" cases run a BlockMask with skipped / partial / full tiles (eager flex on the CPU
    is slow: few such cases)."""
    n = 7 * world + 5
    big = 149 if world == 2 else 151
    cases = [
        ("causal", lambda: masks.causal(), n, 6, 6, "sdpa"),
        ("document-gqa", lambda: masks.document([n // 3, n - n // 3]), n, 6, 2, "sdpa"),
        ("mqa-window", lambda: masks.causal() & masks.sliding_window(9), n, 6, 1, "auto"),
        ("per-head-tiles", lambda: _per_head_tiles(6, big, 128, 1) & masks.causal(),
         big, 6, 6, "flex"),
        ("per-head-tiles-16", lambda: _per_head_tiles(6, big, 16, 2), big, 6, 3, "sdpa"),
        ("dynamic", lambda: TopKBlocks([1, 2, 3, 1, 2, 3]), big, 6, 2, "flex"),
        ("dynamic&causal", lambda: TopKBlocks([2, 1, 3, 2, 1, 1]) & masks.causal(),
         big, 6, 3, "sdpa"),
        ("no-mask", lambda: None, n, 6, 2, "auto"),
    ]
    for name, mask, length, backend in _optional_masks():
        length = length or big
        cases.append((name, (lambda m=mask: m), length, 6, 6, backend))
        cases.append((name + "-gqa", (lambda m=mask: m), length, 6, 2, "sdpa"))
    return cases


def _worker(rank: int, world: int, init_file: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    try:
        _check_primitives(world, rank)
        for i, (name, make_mask, n, hq, hkv, backend) in enumerate(_cases(world)):
            g = torch.Generator().manual_seed(i)  # same data on every rank
            q = torch.randn(1, hq, n, 16, generator=g)
            k = torch.randn(1, hkv, n, 16, generator=g)
            v = torch.randn(1, hkv, n, 16, generator=g)
            mask = make_mask()
            out_local = ulysses_attention(shard(q), shard(k), shard(v), mask, seq_len=n,
                                          backend=backend)
            assert out_local.shape == (1, hq, shard_sizes(n, world)[rank], 16), name
            out = gather(out_local, seq_len=n)
            if rank:  # every rank holds the gathered output: rank 0 checks it
                continue
            single = fs.attention(q, k, v, mask, backend=backend)
            ref = fs.reference(q, k, v, mask)
            err = (out - single).abs().max().item()
            assert err < ATOL_SAME, f"{name}: |ulysses - single| = {err}"
            err = (out.double() - ref).abs().max().item()
            assert err < ATOL_REF, f"{name}: |ulysses - reference| = {err}"
        _check_grad(world, rank)
    finally:
        dist.destroy_process_group()


def _check_primitives(world: int, rank: int) -> None:
    n = 3 * world + 1
    x = torch.arange(4 * world * n * 3, dtype=torch.float32).reshape(2, 2 * world, n, 3)
    local = shard(x)
    assert local.shape[2] == shard_sizes(n, world)[rank]
    assert torch.equal(gather(local, seq_len=n), x)
    assert torch.equal(gather(local), x)  # seq_len learnt from the ranks
    heads = scatter_heads(local, seq_len=n)
    assert torch.equal(heads, x[:, 2 * rank:2 * rank + 2])
    assert torch.equal(gather_heads(heads, seq_len=n), local)
    # models hold [B, N, H, D]: a transposed (non-contiguous) shard works as well
    bnhd = local.transpose(1, 2).contiguous().transpose(1, 2)
    assert torch.equal(scatter_heads(bnhd, seq_len=n), heads)
    # shard / gather along another dim
    y = torch.randn(n, 4, generator=torch.Generator().manual_seed(0))
    assert torch.equal(gather(shard(y, dim=0), seq_len=n, dim=0), y)


def _check_grad(world: int, rank: int) -> None:
    """Gradients flow through both all-to-alls (differentiable collectives)."""
    n, g = 5 * world + 1, torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(1, 2 * world, n, 8, generator=g, dtype=torch.float64)
               for _ in range(3))
    mask = masks.causal()
    ql, kl, vl = (shard(t).detach().requires_grad_() for t in (q, k, v))
    w = torch.randn(1, 2 * world, n, 8, generator=g, dtype=torch.float64)
    (ulysses_attention(ql, kl, vl, mask, seq_len=n, backend="sdpa") * shard(w)).sum().backward()
    qf, kf, vf = (t.clone().requires_grad_() for t in (q, k, v))
    (fs.attention(qf, kf, vf, mask, backend="sdpa") * w).sum().backward()
    for local, full in ((ql, qf), (kl, kf), (vl, vf)):
        assert torch.allclose(local.grad, shard(full.grad), atol=1e-10)


@pytest.mark.parametrize("world", [2, 3])
def test_ulysses_matches_single_process(world):
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(world, os.path.join(tmp, "init")), nprocs=world, join=True)


# -- single-process checks (no process group needed) ---------------------------------------
def test_shard_sizes():
    assert shard_sizes(10, 3) == [4, 3, 3]
    assert shard_sizes(9, 3) == [3, 3, 3]
    assert sum(shard_sizes(115456, 7)) == 115456
    with pytest.raises(ValueError, match="seq_len"):
        shard_sizes(2, 3)
    with pytest.raises(TypeError, match="world_size"):
        shard_sizes(10, 2.0)


def test_without_process_group_is_plain_attention():
    q, k, v = (torch.randn(1, 4, 20, 8) for _ in range(3))
    m = masks.causal()
    assert torch.equal(shard(q), q) and torch.equal(gather(q, seq_len=20), q)
    out = ulysses_attention(q, k, v, m, seq_len=20)
    assert torch.allclose(out.double(), fs.reference(q, k, v, m), atol=ATOL_REF)
    with pytest.raises(ValueError, match="q_local holds 19 tokens"):
        ulysses_attention(q[:, :, :19], k, v, m, seq_len=20)
    with pytest.raises(ValueError, match="enable_gqa"):
        ulysses_attention(q, k[:, :2], v[:, :2], m, seq_len=20, enable_gqa=False)
    with pytest.raises(RuntimeError, match="not initialised"):
        shard(q, group=object())


def test_slice_heads_static_mask():
    m = _per_head_tiles(6, 96, 16, 3) & masks.causal()
    sub = slice_heads(m, 2, 5)
    assert sub.heads == 3 and slice_heads(m, 2, 5) is sub  # cached
    assert torch.equal(sub.to_dense(96), m.to_dense(96)[2:5])
    assert torch.equal(sub.tile_states(96, 96, 32), m.tile_states(96, 96, 32)[2:5])
    assert slice_heads(masks.causal(), 0, 2).heads is None  # head independent: unchanged
    with pytest.raises(ValueError, match="out of range"):
        slice_heads(m, 4, 7)


def test_slice_heads_dynamic_mask():
    dyn = TopKBlocks([1, 2, 3, 4])
    sub = slice_heads(dyn & masks.causal(), 1, 3)
    assert sub.dyn.keep == [2, 3]
    bare = TopKNoSlice([1, 2])
    with pytest.raises(ValueError, match="heads_slice"):
        slice_heads(bare, 0, 1)
    assert slice_heads(bare, 0, 2) is bare


def test_slice_heads_meansim_per_head():
    """Tuned meansim (per-head thresholds) is sliced by its heads_slice, so a rank never
    binds another rank's thresholds."""
    tuned = masks.meansim(torch.tensor([-0.5, 0.0, 0.02, -1.0]),
                            cdfthreshd=torch.tensor([0.3, 0.5, 0.7, 0.9]), block_q=16,
                            block_kv=16)
    q, k = torch.randn(1, 4, 64, 8), torch.randn(1, 4, 64, 8)
    sub = slice_heads(tuned, 2, 4)
    assert torch.equal(sub.predict(q[:, 2:], k[:, 2:]), tuned.predict(q, k)[:, 2:])
    assert slice_heads(masks.meansim(0.0, cdfthreshd=0.5), 0, 1) is not None
