"""meansim on CogVideoX-2b shapes: predictor cost and meansim + FlexAttention vs dense.

    python benchmarks/meansim.py [--quick] [--params PATH]

Shapes: B=2, H=30, N=17,776 (13 frames x 1350 patches + 226 text tokens), D=64, bf16.
Inputs are structured, video-like: per head, q and k are smooth low-frequency fields over
(frame, row, column) plus noise; text tokens are random. Per layer the SpargeAttn
parameters of CogVideoX-2b (``--params``, default the file shipped in ``flexsparse/data``)
give the tile map.

Rows (median of timed runs after warm-up, same GPU, same run):
- dense SDPA (cuDNN; flash if cuDNN is unavailable): the peer.
- predictor: ``MeansimMask.predict`` alone: the Triton kernels (opt-in,
  ``FLEXSPARSE_MEANSIM_TRITON=1``), the PyTorch path eager and torch.compile'd, as a
  fraction of dense (goal < 5 %); the number of tiles where the Triton and PyTorch maps differ.
- meansim + flex: predict + bind + BlockMask build + compiled FlexAttention, at the
  native (128, 64) tiles and at 128 x 128 tiles (converted map), averaged over layers,
  with the achieved sparsity (skipped fraction of tiles) averaged over layers.
- SpargeAttn's own kernel (``spas_sage_attn``) when installed, else skipped with a note.

Prints a markdown table and writes the rows to ``$OUT/meansim.json`` when OUT is set.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import time_ms  # noqa: E402

HERE = Path(__file__).resolve().parent
PARAMS_NAME = "spargeattn_cogvideox-2b_l1-0.06_pv-0.07.pt"
B, H, D = 2, 30, 64
FRAMES, ROWS, COLS, TEXT = 13, 30, 45, 226
SHARPNESS = 3.0


def bench(fn, reps: int) -> float:
    """Median milliseconds of ``fn`` (``common.time_ms``, CUDA events) after warm-up."""
    return time_ms(fn, warmup=5, reps=max(10, reps // 5))


def video_like(seed: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v ``[B, H, N, D]`` bf16: smooth fields over (t, y, x) + noise; text random."""
    g = torch.Generator(device=device).manual_seed(seed)
    t = torch.linspace(0, 1, FRAMES, device=device)
    y = torch.linspace(0, 1, ROWS, device=device)
    x = torch.linspace(0, 1, COLS, device=device)
    grid = torch.stack(torch.meshgrid(t, y, x, indexing="ij"), -1).reshape(-1, 3)  # [V, 3]

    modes = 6
    freq = torch.randint(0, 4, (H, modes, 3), generator=g, device=device).float() * math.pi
    phase = torch.rand(H, modes, 1, generator=g, device=device) * 2 * math.pi
    amp = torch.randn(H, modes, D, generator=g, device=device)
    waves = torch.cos(torch.einsum("vc,hmc->hmv", grid, freq) + phase)  # [H, M, V]
    # One smooth field per head shared by q and k (tokens with similar content attend to
    # each other), scaled so that logits span about +-10 like a trained model's.
    video = (torch.einsum("hmv,hmd->hvd", waves, amp) * (SHARPNESS / math.sqrt(modes)))[None]

    def noisy(noise: float) -> torch.Tensor:
        x = video.expand(B, -1, -1, -1)
        x = x + noise * torch.randn(x.shape, generator=g, device=device)
        text = torch.randn(B, H, TEXT, D, generator=g, device=device)
        return torch.cat([text, x], dim=2).to(torch.bfloat16)

    q, k = noisy(0.5), noisy(0.5)
    v = torch.randn(B, H, q.shape[2], D, generator=g, device=device, dtype=torch.bfloat16)
    return q, k, v


def find_params(path: str | None) -> Path | None:
    if path:
        return Path(path)
    from flexsparse.tune import spargeattn_example_path

    return spargeattn_example_path()  # SpargeAttn's published CogVideoX-2b file, shipped


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="5 layers, fewer repetitions")
    parser.add_argument("--params", help=f"SpargeAttn parameter file ({PARAMS_NAME})")
    parser.add_argument("--predictor-only", action="store_true",
                        help="dense and the predictor rows only (no meansim + flex layers)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("meansim benchmark: CUDA is required", file=sys.stderr)
        return 1
    from torch.nn.attention import SDPBackend, sdpa_kernel

    import flexsparse as fs
    from flexsparse import tune

    device = torch.device("cuda")
    reps = 100 if args.quick else 300
    rows: list[dict] = []
    notes: list[str] = []
    q, k, v = video_like(0, device)
    n = q.shape[2]
    flops = 4 * B * H * n * n * D

    def sdpa():
        return torch.nn.functional.scaled_dot_product_attention(q, k, v)

    peer = "cuDNN"
    try:
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            dense_ms = bench(sdpa, reps)
    except RuntimeError as exc:
        notes.append(f"cuDNN SDPA unavailable ({str(exc).splitlines()[0][:80]}); flash used")
        peer = "flash"
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            dense_ms = bench(sdpa, reps)
    rows.append(dict(row=f"dense SDPA ({peer})", ms=dense_ms, vs_dense=1.0, sparsity=0.0,
                     tflops=flops / dense_ms / 1e9))

    path = find_params(args.params)
    if path is None or not path.is_file():
        notes.append(f"no parameter file at {path}: meansim rows use simthreshd1=0.6, "
                     "cdfthreshd=0.98")
        params = None
        layers = [0]
    else:
        params = tune.load_params(path)
        layers = list(range(params.layers))[: 5 if args.quick else None]

    def layer_mask(layer):
        if params is None:
            return fs.masks.meansim(0.6, cdfthreshd=0.98, attention_sink=True, smooth_k=True)
        return params.layer_mask(layer)

    probe = layer_mask(layers[0]) or fs.masks.meansim(0.6, cdfthreshd=0.98)
    # The predictor alone: Triton kernels (opt-in), PyTorch eager, compiled.
    os.environ["FLEXSPARSE_MEANSIM_TRITON"] = "1"
    pred_ms = bench(lambda: probe.predict(q, k), reps)
    rows.append(dict(row="predictor (Triton kernels)", ms=pred_ms, vs_dense=pred_ms / dense_ms))
    fast_map = probe.predict(q, k)
    from flexsparse.kernels import meansim_fast

    meansim_fast.SORT_IN_TRITON = False
    try:
        ts_ms = bench(lambda: probe.predict(q, k), reps)
        assert torch.equal(probe.predict(q, k), fast_map)
    finally:
        meansim_fast.SORT_IN_TRITON = True
    rows.append(dict(row="predictor (Triton stats + select, torch.sort)", ms=ts_ms,
                     vs_dense=ts_ms / dense_ms))
    probe_plain = fs.masks.meansim(0.6, cdfthreshd=0.98)
    plain_ms = bench(lambda: probe_plain.predict(q, k), reps)
    rows.append(dict(row="predictor (Triton kernels, smooth_k=False)", ms=plain_ms,
                     vs_dense=plain_ms / dense_ms))
    os.environ["FLEXSPARSE_MEANSIM_TRITON"] = "0"
    os.environ["FLEXSPARSE_COMPILE"] = "0"
    try:
        eager_ms = bench(lambda: probe.predict(q, k), reps)
        torch_map = probe.predict(q, k)
    finally:
        del os.environ["FLEXSPARSE_COMPILE"], os.environ["FLEXSPARSE_MEANSIM_TRITON"]
    rows.append(dict(row="predictor (PyTorch eager)", ms=eager_ms, vs_dense=eager_ms / dense_ms))
    notes.append(f"Triton vs PyTorch-eager tile maps: {(fast_map != torch_map).sum().item()} of "
                 f"{fast_map.numel()} tiles differ")
    try:
        compiled = torch.compile(probe.predict)
        compiled(q, k)
        cms = bench(lambda: compiled(q, k), reps)
        rows.append(dict(row="predictor (PyTorch, torch.compile)", ms=cms,
                         vs_dense=cms / dense_ms))
    except Exception as exc:  # compile failures must not end the run
        notes.append(f"compiled predictor skipped: {type(exc).__name__}: {str(exc)[:80]}")

    # meansim + flex per layer, at native (128, 64) and at 128 x 128 tiles.
    for label, block in (() if args.predictor_only else
                         (("128x64 native", None), ("128x128 converted", 128))):
        times, sparsities = [], []
        t0 = time.time()
        for layer in layers:
            mask = layer_mask(layer)
            if mask is None:
                times.append(dense_ms)
                sparsities.append(0.0)
                continue
            kept = mask.predict(q, k)
            sparsities.append(1.0 - kept.float().mean().item())

            def call(mask=mask, block=block):
                return fs.attention(q, k, v, mask=mask, backend="flex", block_size=block)

            try:
                times.append(bench(call, max(50, reps // 3)))
            except Exception as exc:
                notes.append(f"meansim+flex {label} failed: {type(exc).__name__}: "
                             f"{str(exc).splitlines()[0][:100]}")
                times = []
                break
        if times:
            ms = statistics.mean(times)
            rows.append(dict(row=f"meansim+flex ({label}), mean of {len(times)} layers", ms=ms,
                             vs_dense=ms / dense_ms, sparsity=statistics.mean(sparsities),
                             seconds=round(time.time() - t0, 1)))

    # Accuracy check of one layer against dense (relative L1 of the output).
    mask = layer_mask(layers[0])
    if mask is not None and not args.predictor_only:
        out = fs.attention(q, k, v, mask=mask, backend="flex").float()
        ref = sdpa().float()
        rel = ((out - ref).abs().sum() / ref.abs().sum()).item()
        notes.append(f"layer {layers[0]} meansim+flex relative L1 vs dense: {rel:.4f}")

    try:
        from spas_sage_attn import spas_sage2_attn_meansim_cuda

        if params is not None:
            lm = params.layer_mask(layers[0])
            sim1, cdf = lm.simthreshd1.to(device), lm.cdfthreshd.to(device)
            sms = bench(lambda: spas_sage2_attn_meansim_cuda(
                q, k, v, simthreshd1=sim1.clamp(max=1.0), cdfthreshd=cdf,
                pvthreshd=params.pvthreshd[layers[0]].to(device), attention_sink=True), reps)
            rows.append(dict(row=f"SpargeAttn kernel (layer {layers[0]})", ms=sms,
                             vs_dense=sms / dense_ms))
    except ImportError:
        notes.append("SpargeAttn (spas_sage_attn) not installed: its row is skipped")
    except Exception as exc:
        notes.append(f"SpargeAttn row failed: {type(exc).__name__}: {str(exc)[:80]}")

    meta = dict(
        command="python benchmarks/meansim.py" + (" --quick" if args.quick else ""),
        device=torch.cuda.get_device_name(), torch=torch.__version__,
        date=datetime.datetime.now().isoformat(timespec="seconds"),
        shape=f"B={B} H={H} N={n} D={D} bf16", params=str(path) if path else None,
    )
    print(f"\n### meansim ({meta['shape']})\n")
    print(f"`{meta['command']}` on {meta['device']}, torch {meta['torch']}, {meta['date']}\n")
    print("| row | ms | vs dense | skipped tiles |")
    print("|---|---:|---:|---:|")
    for r in rows:
        sp = "" if r.get("sparsity") is None else f"{r['sparsity']:.3f}"
        print(f"| {r['row']} | {r['ms']:.3f} | {r['vs_dense']:.3f} | {sp} |")
    for note in notes:
        print(f"\n- {note}")
    out_dir = os.environ.get("OUT")
    if out_dir:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        with open(Path(out_dir) / "meansim.json", "w") as f:
            json.dump(dict(meta=meta, rows=rows, notes=notes), f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
