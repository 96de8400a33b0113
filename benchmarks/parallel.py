"""Sequence-parallel (Ulysses) radial attention: 1 GPU vs P GPUs, and the all-to-all's share.

    torchrun --nproc-per-node 2 benchmarks/parallel.py [--quick]    # P = 2 (NCCL)
    python benchmarks/parallel.py [--quick]                          # 1-GPU baseline only

HunyuanVideo 768x1280, 117 frames: 30 x 3840 + 256 text = 115,456 tokens, 24 heads,
head_dim 128, bf16, ``masks.radial(model="hunyuan")`` (``--quick``: 61 frames, 61,696
tokens). In the same run, rank 0 times ``flexsparse.attention`` on the whole sequence (the
1-GPU peer); every rank times ``ulysses_attention`` on its shard, and separately the
forward all-to-all (q, k, v in one collective), the rank's local attention and the inverse
all-to-all, each with CUDA events (median over trials; the slowest rank counts).

Scaling efficiency = t(1 GPU) / (P * t(P GPUs)); the goal is >= 85 %.
Prints a markdown table and writes ``$OUT/parallel.json`` when ``OUT`` is set.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys

import torch
import torch.distributed as dist

import flexsparse as fs
from flexsparse import distributed as sp
from flexsparse.attention import BACKENDS

sys.path.insert(0, os.path.dirname(__file__))
from common import time_ms  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="61 frames and fewer trials")
    p.add_argument("--backend", default="auto", choices=BACKENDS,
                   help="flexsparse.attention backend on each rank")
    p.add_argument("--trials", type=int, default=None)
    p.add_argument("--cpu-dry-run", action="store_true",
                   help="tiny video on the CPU with gloo: checks the script, times mean nothing")
    return p.parse_args(argv)


def _median_ms(fn, trials: int, reps: int, device) -> float:
    """Median ms per call over ``trials`` of ``reps`` back-to-back calls (the one timer of
    ``common``: CUDA events on a GPU, the wall clock on the CPU for dry runs)."""
    def batch():
        for _ in range(reps):
            fn()

    clock = "events" if device.type == "cuda" else "wall"
    return time_ms(batch, warmup=0, reps=trials, clock=clock) / reps


def _timer(fn, trials: int, reps: int, device) -> float:
    """``_median_ms`` of a collective step, the maximum over ranks (the slowest rank sets
    the pace); ranks start each trial together."""
    samples = []
    for _ in range(trials):
        dist.barrier()
        samples.append(_median_ms(fn, 1, reps, device))
    ms = torch.tensor([statistics.median(samples)], device=device)
    dist.all_reduce(ms, op=dist.ReduceOp.MAX)
    return float(ms.item())


def main(argv=None) -> int:
    args = parse_args(argv)
    command = "python " + " ".join(sys.argv) if "RANK" not in os.environ else (
        f"torchrun --nproc-per-node {os.environ.get('WORLD_SIZE')} " + " ".join(sys.argv))
    if not (torch.cuda.is_available() or args.cpu_dry_run):
        print("benchmarks/parallel.py needs CUDA (NCCL); skipped on this machine "
              "(--cpu-dry-run checks the script on the CPU).")
        return 0
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT="29512")
    if args.cpu_dry_run:
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    else:
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    try:
        rows = run(args, device)
        if dist.get_rank() == 0:
            report(rows, command, device)
    finally:
        dist.destroy_process_group()
    return 0


def run(args, device) -> list[dict]:
    from flexsparse.masks.radial import radial

    rank, world = dist.get_rank(), dist.get_world_size()
    frames = 61 if args.quick else 117
    trials = args.trials or (3 if args.quick else 5)
    size = (17, 128, 192) if args.cpu_dry_run else (frames, 768, 1280)
    layout = fs.VideoLayout.from_video(*size, "hunyuan")
    n, heads, d = layout.length, 24, 128
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    mask = radial(layout, model="hunyuan")
    density = mask.density(n)
    g = torch.Generator(device=device).manual_seed(0)
    shape = (1, heads, n, d)
    full = [torch.randn(shape, generator=g, device=device, dtype=dtype) for _ in range(3)]
    base = dict(tokens=n, heads=heads, head_dim=d, dtype=str(dtype).removeprefix("torch."),
                mask=mask.name, density=round(density, 4), backend=args.backend)
    rows = []

    # The 1-GPU peer: whole sequence, all heads, on rank 0 (others wait at the barrier).
    def single():
        fs.attention(*full, mask, backend=args.backend)

    if rank == 0:
        single()  # warm-up: BlockMask, compile
        t1 = _median_ms(single, trials, 2, device)
    else:
        t1 = 0.0
    t1_tensor = torch.tensor([t1], device=device)
    dist.broadcast(t1_tensor, src=0)
    t1 = float(t1_tensor.item())
    rows.append(dict(base, gpus=1, what="flexsparse.attention", ms=t1))
    if world == 1:
        return rows

    q_l, k_l, v_l = (sp.shard(t).contiguous() for t in full)
    full.clear()  # keep only the shards, as a sequence-parallel model does
    if device.type == "cuda":
        torch.cuda.empty_cache()

    def parallel():
        sp.ulysses_attention(q_l, k_l, v_l, mask, seq_len=n, backend=args.backend)

    # Pieces of the same call, timed alone: forward all-to-all, local attention, inverse.
    qh, kh, vh = sp._seq_to_heads([q_l, k_l, v_l], None, n, world)
    h0 = rank * heads // world
    local_mask = sp.slice_heads(mask, h0, h0 + heads // world)
    out_h = fs.attention(qh, kh, vh, local_mask, backend=args.backend)

    def a2a_in():
        sp._seq_to_heads([q_l, k_l, v_l], None, n, world)

    def local():
        fs.attention(qh, kh, vh, local_mask, backend=args.backend)

    def a2a_out():
        sp._heads_to_seq(out_h, None, n, world)

    parallel()  # warm-up
    tp = _timer(parallel, trials, 2, device)
    t_in = _timer(a2a_in, trials, 5, device)
    t_loc = _timer(local, trials, 2, device)
    t_out = _timer(a2a_out, trials, 5, device)
    rows.append(dict(
        base, gpus=world, what="ulysses_attention", ms=tp, speedup=t1 / tp,
        efficiency=t1 / (world * tp), a2a_in_ms=t_in, a2a_out_ms=t_out, local_attention_ms=t_loc,
        a2a_share=(t_in + t_out) / tp,
    ))
    return rows


def report(rows: list[dict], command: str, device) -> None:
    cuda = device.type == "cuda"
    meta = dict(command=command, torch=torch.__version__,
                device=torch.cuda.get_device_name(device) if cuda else "CPU (dry run)",
                nccl=".".join(map(str, torch.cuda.nccl.version())) if cuda else "- (gloo)",
                date=datetime.datetime.now().isoformat(timespec="seconds"))
    r0 = rows[0]
    print(f"\n### Sequence-parallel radial attention ({r0['tokens']} tokens, {r0['heads']} "
          f"heads x {r0['head_dim']}, {r0['dtype']}, density {r0['density']}, "
          f"backend {r0['backend']})")
    print(f"`{meta['command']}` · {meta['device']} · torch {meta['torch']} · "
          f"NCCL {meta['nccl']} · {meta['date']}\n")
    print("| GPUs | call | ms / call | speedup | scaling eff. | all-to-all in + out (ms) "
          "| all-to-all share | local attention (ms) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        if r["gpus"] == 1:
            print(f"| 1 | {r['what']} | {r['ms']:.1f} | 1.00x | - | - | - | {r['ms']:.1f} |")
        else:
            print(f"| {r['gpus']} | {r['what']} | {r['ms']:.1f} | {r['speedup']:.2f}x | "
                  f"{100 * r['efficiency']:.0f} % | {r['a2a_in_ms']:.1f} + "
                  f"{r['a2a_out_ms']:.1f} | {100 * r['a2a_share']:.0f} % | "
                  f"{r['local_attention_ms']:.1f} |")
    if len(rows) == 1:
        print("\n(one process: the 1-GPU baseline only; run under torchrun "
              "--nproc-per-node P for the parallel row)")
    out = os.environ.get("OUT")
    if out:
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "parallel.json"), "w") as f:
            json.dump(dict(meta, rows=rows), f, indent=2)


if __name__ == "__main__":
    raise SystemExit(main())
