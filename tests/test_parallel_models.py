"""Sequence-parallel model hooks (``patch(..., parallel=group)``) over gloo equal the same
patched model run without ``parallel`` in the same process.

One group of 2 processes is spawned (start-up costs seconds) and runs every case; a
failing assertion in a worker fails the test with the worker's traceback. Token counts
are odd, so the shards are uneven. fp32 on the CPU, atol 1e-5 (same arithmetic per head,
only the data movement differs).

- CogVideoX: every rank runs the whole transformer on the same inputs; only attention is
  split (``cogvideox._sequence_parallel``), so each rank's output is the full output.
- LLaMA prefill: each rank feeds its contiguous shard of the prompt (with its global
  ``position_ids``) and gets that shard's logits.
"""

from __future__ import annotations

import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from flexsparse import distributed, masks  # noqa: E402
from flexsparse.distributed import gather, shard, shard_offsets  # noqa: E402
from flexsparse.models import cogvideox as cvx  # noqa: E402
from flexsparse.models import llama, tiny  # noqa: E402

WORLD = 2
ATOL = 1e-5
FRAMES, HW, TEXT = 25, 64, 7  # 7 latent frames x 16 tokens + 7 text = 119 tokens (odd)
LLAMA_LEN = 23


# -- CogVideoX -------------------------------------------------------------------------------
def _cogvideox():
    from diffusers import CogVideoXTransformer3DModel

    torch.manual_seed(0)  # same weights on every rank
    return CogVideoXTransformer3DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
        time_embed_dim=8, text_embed_dim=16, num_layers=2, sample_width=8, sample_height=8,
        sample_frames=FRAMES, patch_size=2, max_text_seq_length=TEXT,
        use_rotary_positional_embeddings=True,
    ).eval()


def _cogvideox_forward(model):
    from diffusers.models.embeddings import get_3d_rotary_pos_embed

    g = torch.Generator().manual_seed(1)  # same inputs on every rank
    x = torch.randn(2, 7, 4, 8, 8, generator=g)
    text = torch.randn(2, TEXT, 16, generator=g)
    rope = get_3d_rotary_pos_embed(16, ((0, 0), (4, 4)), (4, 4), 7)
    with torch.no_grad():
        return model(x, text, torch.full((2,), 500), image_rotary_emb=rope,
                     return_dict=False)[0]


def _check_cogvideox(group) -> None:
    model = _cogvideox()
    for backend in ("auto", "flex"):
        kw = dict(pattern="radial", num_frames=FRAMES, height=HW, width=HW, block_size=16,
                  backend=backend)
        handle = cvx.patch(model, **kw)
        assert handle.state.settings.layout.length % WORLD  # uneven shards
        single = _cogvideox_forward(model)
        cvx.patch(model, parallel=group, **kw)  # replaces the earlier patch
        out = _cogvideox_forward(model)
        cvx.unpatch(model)
        err = (out - single).abs().max().item()
        assert err < ATOL, f"cogvideox {backend}: |parallel - single| = {err}"


# -- LLaMA prefill ---------------------------------------------------------------------------
def _check_llama(group, rank: int) -> None:
    config = tiny.build_config("llama", heads=4, kv_heads=2)
    model = tiny.build_model(config, seed=0)
    mask = masks.causal() & masks.sliding_window(5)
    ids = torch.randint(4, config.vocab_size, (1, LLAMA_LEN),
                        generator=torch.Generator().manual_seed(2))
    for backend in ("auto", "flex"):
        llama.patch(model, mask, backend=backend)
        with torch.no_grad():
            single = model(ids, use_cache=False).logits
        llama.patch(model, mask, backend=backend, parallel=group)
        start = shard_offsets(LLAMA_LEN, WORLD)[rank]
        ids_local = shard(ids, group, dim=1)
        pos = torch.arange(start, start + ids_local.shape[1])[None]
        with torch.no_grad():
            local = model(ids_local, position_ids=pos, use_cache=False).logits
        llama.unpatch(model)
        err = (local - shard(single, group, dim=1)).abs().max().item()
        assert err < ATOL, f"llama {backend} rank {rank}: |parallel - single| = {err}"
        full = gather(local, group, seq_len=LLAMA_LEN, dim=1)
        err = (full - single).abs().max().item()
        assert err < ATOL, f"llama {backend} gathered: |parallel - single| = {err}"


def _worker(rank: int, init_file: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=WORLD)
    calls = []
    ulysses = distributed.ulysses_attention

    def counting(*args, **kwargs):  # the hooks really take the sequence-parallel path
        calls.append(kwargs["seq_len"])
        return ulysses(*args, **kwargs)

    distributed.ulysses_attention = counting
    try:
        group = dist.new_group(list(range(WORLD)))  # an explicit group, not only WORLD
        _check_cogvideox(group)
        assert calls == [7 * 16 + TEXT] * 4, calls  # 2 backends x 2 blocks
        calls.clear()
        _check_llama(group, rank)
        assert calls == [LLAMA_LEN] * 4, calls  # 2 backends x 2 layers
    finally:
        distributed.ulysses_attention = ulysses
        dist.destroy_process_group()


def test_parallel_hooks_match_single_process():
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(os.path.join(tmp, "init"),), nprocs=WORLD, join=True)
