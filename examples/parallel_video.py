"""Sequence-parallel radial attention for a HunyuanVideo-shaped video, on N processes.

    torchrun --nproc-per-node 2 examples/parallel_video.py            # NCCL, 117x768x1280
    torchrun --nproc-per-node 2 examples/parallel_video.py --quick    # small video
    torchrun --nproc-per-node 3 examples/parallel_video.py --quick --backend gloo   # CPU

Every rank holds a contiguous shard of the tokens (text + video, all heads), as a
sequence-parallel video transformer does; ``flexsparse.distributed.ulysses_attention``
exchanges heads for tokens with an all-to-all, runs the radial mask for the rank's heads
and exchanges back. With ``--check`` (default for ``--quick``) rank 0 also runs the whole
attention on one device and prints the largest difference.
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import torch.distributed as dist

import flexsparse as fs
from flexsparse.distributed import gather, shard, shard_sizes, ulysses_attention
from flexsparse.masks.radial import radial


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small video (17 x 128 x 192)")
    p.add_argument("--backend", choices=("nccl", "gloo"), default=None,
                   help="process-group backend (default: nccl with CUDA, else gloo)")
    p.add_argument("--frames", type=int, default=117, help="pixel frames (1 + 4k)")
    p.add_argument("--height", type=int, default=768)
    p.add_argument("--width", type=int, default=1280)
    p.add_argument("--heads", type=int, default=24)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--decay", type=float, default=1.0, help="radial decay factor")
    p.add_argument("--check", action=argparse.BooleanOptionalAction, default=None,
                   help="compare with single-device attention on rank 0 (default: --quick)")
    p.add_argument("--iters", type=int, default=3, help="timed calls")
    args = p.parse_args(argv)
    if args.quick:
        args.frames, args.height, args.width = 17, 128, 192
    if args.check is None:
        args.check = args.quick
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    backend = args.backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if "RANK" not in os.environ:  # plain `python examples/parallel_video.py`: one process
        os.environ.update(RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT="29511", LOCAL_RANK="0")
    if backend == "nccl":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
        dtype = torch.bfloat16
    else:
        device, dtype = torch.device("cpu"), torch.float32
    dist.init_process_group(backend, device_id=device if backend == "nccl" else None)
    try:
        return run(args, device, dtype)
    finally:
        dist.destroy_process_group()


def run(args, device: torch.device, dtype: torch.dtype) -> int:
    rank, world = dist.get_rank(), dist.get_world_size()
    layout = fs.VideoLayout.from_video(args.frames, args.height, args.width, "hunyuan")
    n = layout.length
    mask = radial(layout, decay_factor=args.decay, model="hunyuan")
    if rank == 0:
        print(f"{world} ranks ({device.type}, {dtype}), {layout.frames} frames x "
              f"{layout.tokens_per_frame} + {layout.text_tokens} text = {n} tokens, "
              f"{args.heads} heads x {args.head_dim}; shards {shard_sizes(n, world)}; "
              f"{mask.name} density {mask.density(n):.3f}", flush=True)

    # The same seed on every rank: each takes its shard of the same full tensors, which
    # rank 0 can then compare with a single-device run.
    g = torch.Generator(device=device).manual_seed(0)
    shape = (1, args.heads, n, args.head_dim)
    q, k, v = (torch.randn(shape, generator=g, device=device, dtype=dtype) for _ in range(3))
    q_l, k_l, v_l = (shard(t).contiguous() for t in (q, k, v))
    if not args.check:
        del q, k, v  # keep only the shards, as a real sequence-parallel model would

    out_l = ulysses_attention(q_l, k_l, v_l, mask, seq_len=n)  # warm-up (BlockMask, compile)
    times = []
    for _ in range(args.iters):
        _sync(device)
        dist.barrier()
        t0 = time.perf_counter()
        out_l = ulysses_attention(q_l, k_l, v_l, mask, seq_len=n)
        _sync(device)
        times.append(time.perf_counter() - t0)
    times.sort()
    if rank == 0:
        print(f"ulysses_attention: median {times[len(times) // 2] * 1e3:.1f} ms per call",
              flush=True)

    ok = True
    if args.check:
        out = gather(out_l, seq_len=n)
        if rank == 0:
            single = fs.attention(q, k, v, mask)
            err = (out.float() - single.float()).abs().max().item()
            tol = 1e-4 if dtype == torch.float32 else 2e-2
            ok = err <= tol
            print(f"check vs single-device attention: max |diff| = {err:.2e} "
                  f"(tolerance {tol:g}) -> {'OK' if ok else 'MISMATCH'}", flush=True)
        flag = torch.tensor([int(ok)], device=device)
        dist.broadcast(flag, src=0)
        ok = bool(flag.item())
    return 0 if ok else 1


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


if __name__ == "__main__":
    raise SystemExit(main())
