"""meansim on CogVideoX-2b shapes: predictor cost and meansim + FlexAttention vs dense.

    python benchmarks/meansim.py [--quick] [--params PATH]
    python benchmarks/meansim.py --profile     # where the predictor and auto spend time
    python benchmarks/meansim.py --auto        # auto / flex / quant vs cuDNN per threshold

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
from unittest import mock

import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import time_ms, write_table  # noqa: E402

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
    parser.add_argument("--profile", action="store_true",
                        help="torch.profiler + host time per stage of the predictor and auto")
    parser.add_argument("--auto", action="store_true",
                        help="cuDNN / predictor / auto / flex / quant per meansim threshold")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("meansim benchmark: CUDA is required", file=sys.stderr)
        return 1
    if args.profile:
        return profile_main()
    if args.auto:
        return auto_main(args.quick)
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

    with mock.patch.object(meansim_fast, "SORT_IN_TRITON", False):
        ts_ms = bench(lambda: probe.predict(q, k), reps)
        assert torch.equal(probe.predict(q, k), fast_map)
    rows.append(dict(row="predictor (Triton stats + select, torch.sort)", ms=ts_ms,
                     vs_dense=ts_ms / dense_ms))
    probe_plain = fs.masks.meansim(0.6, cdfthreshd=0.98)
    plain_ms = bench(lambda: probe_plain.predict(q, k), reps)
    rows.append(dict(row="predictor (Triton kernels, smooth_k=False)", ms=plain_ms,
                     vs_dense=plain_ms / dense_ms))
    with mock.patch.dict(os.environ, {"FLEXSPARSE_MEANSIM_TRITON": "0",
                                      "FLEXSPARSE_COMPILE": "0"}):
        eager_ms = bench(lambda: probe.predict(q, k), reps)
        torch_map = probe.predict(q, k)
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


# -- --profile and --auto ---------------------------------------------------------------------

CASES = ((0.6, 0.98), (0.3, 0.9))
#: cdfthreshd values (simthreshd1 0.3) of the profile's sweep
CDF_GRID = (0.9, 0.93, 0.95, 0.96, 0.97, 0.98, 0.985, 0.99, 0.995)
#: (simthreshd1, cdfthreshd) searched for the map that skips about 35 % of tiles (at 0.3
#: every cdfthreshd above skips 44-49 % on these inputs, H100 profile run)
SKIP_GRID = tuple((s, c) for s in (0.35, 0.4, 0.45, 0.5, 0.55) for c in (0.9, 0.95, 0.98))


def _cudnn(q, k, v):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel([SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION]):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v)


def _rel_l1(out, q, k, v, rows=256) -> float:
    """Relative L1 of ``out`` against dense fp32 attention on ``rows`` query rows of batch 0
    (what a meansim map approximates)."""
    idx = torch.linspace(0, q.shape[2] - 1, rows, device=q.device).long()
    ref = torch.nn.functional.scaled_dot_product_attention(
        q[:1, :, idx].float(), k[:1].float(), v[:1].float())
    diff = out[:1, :, idx].float() - ref
    return float(diff.abs().sum() / ref.abs().sum())


def _host_stages(q, k, v, mask) -> dict:
    """Host wall time (GPU synchronised around each) of the stages of one auto call."""
    fa = __import__("importlib").import_module("flexsparse.attention")

    def wall(fn):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = fn()
        torch.cuda.synchronize()
        return out, (time.perf_counter() - t0) * 1e3

    out = {}
    if hasattr(fa, "_bind_counted"):  # this version: the map counted, then one walk
        (bound, census), out["bind + count"] = wall(lambda: fa._bind_counted(mask, q, k, v))
        gqa, scale = False, q.shape[-1] ** -0.5
        call = fa.AttentionCall(q, k, v, bound, scale, gqa, None, None, (), census)
        (chosen, _), out["walk (census known)"] = wall(lambda: fa._walk(call))
    else:  # before: bind, walk on the sparse call, tile states + sync, walk again
        bound, out["bind"] = wall(lambda: fa._check_mask(mask, q, k))
        call = fa.AttentionCall(q, k, v, bound, q.shape[-1] ** -0.5, False)
        (chosen, _), out["walk (sparse call)"] = wall(lambda: fa._walk(call))
        _, out["_kept_fraction"] = wall(
            lambda: fa._kept_fraction(bound, q.shape[2], k.shape[2], q.device))
    _, out["whole auto call"] = wall(lambda: fs_attention(q, k, v, mask))
    return out


def fs_attention(q, k, v, mask, backend="auto"):
    import flexsparse as fs

    return fs.attention(q, k, v, mask=mask, backend=backend)


def _profile_table(fn, label: str, out_dir: str | None, rows: int = 12) -> str:
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            fn()
        torch.cuda.synchronize()
    events = prof.key_averages()
    key = "self_device_time_total"
    if not hasattr(events[0], key):  # older torch
        key = "self_cuda_time_total"
    cuda = sorted((e for e in events if getattr(e, key) > 0), key=lambda e: -getattr(e, key))
    total = sum(getattr(e, key) for e in cuda) / 5
    lines = [f"#### {label}: GPU time per call {total:.1f} us (sum of kernels, 5 calls)",
             "| kernel | us per call | calls per call |", "|---|---:|---:|"]
    for e in cuda[:rows]:
        lines.append(f"| {e.key[:70]} | {getattr(e, key) / 5:.1f} | {e.count / 5:g} |")
    text = "\n".join(lines)
    if out_dir:
        slug = "".join(c if c.isalnum() else "_" for c in label)[:50]
        with open(Path(out_dir) / f"prof_{slug}.txt", "a") as f:
            f.write(text + "\n\n" + events.table(sort_by=key, row_limit=40) + "\n")
    return text


def profile_main() -> int:
    """Before / after profile: run once with the tree's package and once with another
    (PYTHONPATH) to compare."""
    import flexsparse as fs

    device = torch.device("cuda")
    out_dir = os.environ.get("OUT")
    q, k, v = video_like(0, device)
    print(f"flexsparse from {os.path.dirname(fs.__file__)}; {torch.cuda.get_device_name()}")
    dense_ms = time_ms(lambda: _cudnn(q, k, v), warmup=3, reps=20)
    print(f"cuDNN dense {dense_ms:.3f} ms")
    for sim, cdf in CASES:
        mask = fs.masks.meansim(sim, cdfthreshd=cdf)
        for _ in range(3):
            fs_attention(q, k, v, mask)
        pred = time_ms(lambda m=mask: m.predict(q, k), warmup=3, reps=30)
        bind = time_ms(lambda m=mask: m.bind(q, k), warmup=3, reps=30)
        auto = time_ms(lambda m=mask: fs_attention(q, k, v, m), warmup=3, reps=20)
        choice = fs.explain(q, k, v, mask)
        skipped = 1 - mask.predict(q, k).float().mean().item()
        print(f"\n### meansim {sim}/{cdf}: skipped {skipped:.3f}, predict {pred:.3f} ms, "
              f"bind {bind:.3f} ms, auto {auto:.3f} ms = {dense_ms / auto:.3f}x cuDNN "
              f"(picked {choice.backend}{'; dropped' if choice.notes else ''})")
        stages = {s: round(t, 3) for s, t in _host_stages(q, k, v, mask).items()}
        print(f"host ms per stage (GPU synchronised around each): {stages}")
        print(_profile_table(lambda m=mask: m.predict(q, k), f"predict {sim}/{cdf}", out_dir, 8))
        print(_profile_table(lambda m=mask: fs_attention(q, k, v, m), f"auto {sim}/{cdf}",
                             out_dir, 8))
    if not hasattr(__import__("importlib").import_module("flexsparse.attention"),
                   "_bind_counted"):
        return 0  # a version before this one: its default predictor was timed above
    # predictor variants, their maps against eager PyTorch, and the ~35 % threshold
    variants = {"default": {}, "compiled (GRAPH=0)": {"FLEXSPARSE_MEANSIM_GRAPH": "0"},
                "Triton opt-in": {"FLEXSPARSE_MEANSIM_TRITON": "1"},
                "eager": {"FLEXSPARSE_COMPILE": "0"}}
    params = find_params(None)
    probes = {"0.6/0.98": fs.masks.meansim(0.6, cdfthreshd=0.98)}
    if params is not None and params.is_file():
        from flexsparse import tune

        lm = tune.load_params(params).layer_mask(0)
        if lm is not None:
            probes["params layer 0"] = lm
    for name, probe in probes.items():
        maps = {}
        for label, env in variants.items():
            with mock.patch.dict(os.environ, env):
                ms = time_ms(lambda p=probe: p.predict(q, k), warmup=3, reps=30)
                maps[label] = probe.predict(q, k)
            print(f"predictor {name} [{label}]: {ms:.3f} ms = {ms / dense_ms:.1%} of cuDNN")
        for label, m in maps.items():
            print(f"  {label} vs eager: {(m != maps['eager']).sum().item()} of {m.numel()} "
                  "tiles differ")
    for cdf in CDF_GRID:
        skipped = 1 - fs.masks.meansim(0.3, cdfthreshd=cdf).predict(q, k).float().mean()
        print(f"meansim 0.3/{cdf}: skipped {skipped.item():.3f}")
    return 0


def _stats_sweep(q, k) -> None:
    """The statistics kernel on q (128-token blocks) and k (64) per tokens per program and
    pipeline depth (``meansim_fast.STATS_ROWS`` / ``STATS_STAGES``)."""
    from flexsparse.kernels import meansim_fast as mf

    b, h, n, d = q.shape
    bufs = {blk: (torch.empty(b, h, -(-n // blk), d, device=q.device),
                  torch.empty(b, h, -(-n // blk), device=q.device)) for blk in (128, 64)}
    for rows, stages in ((64, 1), (256, 1), (256, 2), (512, 2), (512, 3)):
        with mock.patch.multiple(mf, STATS_ROWS=rows, STATS_STAGES=stages):
            ms = time_ms(lambda: (mf.block_stats_into(q, 128, 0, *bufs[128]),
                                  mf.block_stats_into(k, 64, 0, *bufs[64])), warmup=3, reps=30)
        gbs = 2 * q.numel() * q.element_size() / ms / 1e6
        print(f"stats kernel, {rows} tokens/program, {stages} stages: q+k {ms * 1e3:.1f} us "
              f"({gbs:.0f} GB/s)", flush=True)


def auto_main(quick: bool) -> int:
    """cuDNN dense, the predictor alone, auto, flex and quant per meansim threshold (the
    pair of ``SKIP_GRID`` nearest 35 % skipped added), one table; the default predictor's
    maps against the eager PyTorch path's."""
    import flexsparse as fs

    device = torch.device("cuda")
    reps = 20 if quick else 40
    q, k, v = video_like(0, device)
    _stats_sweep(q, k)
    dense_ms = time_ms(lambda: _cudnn(q, k, v), warmup=3, reps=reps)
    dense_out = _cudnn(q, k, v)
    skips = {sc: 1 - fs.masks.meansim(sc[0], cdfthreshd=sc[1]).predict(q, k).float().mean()
             .item() for sc in SKIP_GRID}
    near = min(skips, key=lambda sc: abs(skips[sc] - 0.35))
    cases = [*CASES, near]
    rows = []
    for sim, cdf in cases:
        mask = fs.masks.meansim(sim, cdfthreshd=cdf)
        name = f"meansim {sim}/{cdf}"
        skipped = 1 - mask.predict(q, k).float().mean().item()

        def add(kernel, ms, out, note="", name=name, skipped=skipped):
            rows.append({"case": name, "kernel": kernel, "ms": ms, "x cuDNN": dense_ms / ms,
                         "tiles skipped": skipped if kernel != "cuDNN dense" else 0.0,
                         "rel L1 vs dense": None if out is None else _rel_l1(out, q, k, v),
                         "note": note})
            print(rows[-1], flush=True)

        add("cuDNN dense", time_ms(lambda: _cudnn(q, k, v), warmup=3, reps=reps), dense_out,
            "peer, same run")
        add("predictor (bind)", time_ms(lambda m=mask: m.bind(q, k), warmup=3, reps=reps),
            None, "predict + bound mask, alone")
        choice = fs.explain(q, k, v, mask)
        note = f"picked {choice.backend}" + ("; prediction dropped" if choice.notes else "")
        for backend in ("auto", "flex", "quant"):
            try:
                if backend != "auto":
                    fs.explain(q, k, v, mask, backend=backend)
                ms = time_ms(lambda b=backend, m=mask: fs_attention(q, k, v, m, b), warmup=3,
                             reps=reps)
                add(backend, ms, fs_attention(q, k, v, mask, backend),
                    note if backend == "auto" else "predictor included")
            except Exception as exc:  # report and go on
                rows.append({"case": name, "kernel": backend,
                             "note": f"n/a: {type(exc).__name__}: {str(exc)[:80]}"})
    diffs = []
    for sim, cdf in cases:
        mask = fs.masks.meansim(sim, cdfthreshd=cdf)
        got = mask.predict(q, k)
        with mock.patch.dict(os.environ, {"FLEXSPARSE_COMPILE": "0"}):
            want = mask.predict(q, k)
        diffs.append(f"{sim}/{cdf}: {(got != want).sum().item()} of {got.numel()}")
    notes = [
        "default predictor vs eager PyTorch path, tiles that differ: " + ", ".join(diffs),
        f"q/k/v: benchmarks/meansim.py video_like(0), B={B} H={H} N={q.shape[2]} D={D} bf16",
        "every row but cuDNN includes the predictor (auto, flex, quant: predict + bind + "
        "BlockMask + kernel); time = median of CUDA-event-timed calls after warm-up",
        "rel L1: 256 sampled query rows of batch 0, all heads, vs dense fp32 attention",
        "tiles skipped per (simthreshd1, cdfthreshd): "
        + ", ".join(f"{a}/{c}: {s:.3f}" for (a, c), s in skips.items()),
    ]
    write_table(None, rows, ["case", "kernel", "ms", "x cuDNN", "tiles skipped",
                             "rel L1 vs dense", "note"], "meansim auto vs cuDNN", notes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
