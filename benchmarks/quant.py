"""Quantized block-sparse attention (backend "quant") vs cuDNN SDPA and FlexAttention.

    python benchmarks/quant.py [--quick] [--sweep]

CogVideoX-2b (B=2, H=30, N=17,776, D=64) and 5b (H=48) shapes, bf16: dense mode vs cuDNN
SDPA and FlexAttention; the radial block mask (if ``masks.radial`` exists) and banded
block masks of 50 / 25 / 12.5 % density vs FlexAttention bf16 on the same 128x128
BlockMask; accuracy (relative L2, cosine) vs an fp32 reference on random and on smooth,
video-like inputs. ``--sweep`` also times launch configurations of the kernel.
Writes ``$OUT/quant.json`` (and ``quant.md``) when ``OUT`` is set.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import device_name, header, save, table  # noqa: E402

import flexsparse as fs  # noqa: E402
from flexsparse.kernels import mask_tiles, quant_attention  # noqa: E402
from flexsparse.kernels.quant import TILE_N  # noqa: E402

SHAPES = {"cogvideox-2b": (2, 30, 17776, 64), "cogvideox-5b": (2, 48, 17776, 64)}
LAYOUT = dict(frames=13, tokens_per_frame=1350, text_tokens=226, text_position="start")


def bench_ms(fn) -> float:
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=50, rep=200, return_mode="median"))


def banded(n: int, density: float) -> fs.Mask:
    """Block-granular band |i - j| <= w tiles (128x128) with about ``density`` kept."""
    nb = -(-n // TILE_N)
    i = torch.arange(nb)
    dist = (i[:, None] - i[None, :]).abs()
    best = min(range(nb), key=lambda w: abs((dist <= w).float().mean().item() - density))
    return fs.Mask.from_tiles(dist <= best, TILE_N, name=f"band{density:.3g}")


def structured(b, h, n, d, device, gen) -> torch.Tensor:
    """Smooth, video-like tokens: low-frequency functions of (frame, y, x) plus noise,
    with a per-channel offset (as real activations have)."""
    t = torch.arange(n, device=device, dtype=torch.float32)
    f, y, x = t // 1350, (t % 1350) // 45, t % 45
    freq = torch.rand(3, d, generator=gen, device=device) * 0.3
    phase = torch.rand(d, generator=gen, device=device) * 6.28
    base = torch.sin(f[:, None] * freq[0] + y[:, None] * freq[1] + x[:, None] * freq[2] + phase)
    heads = torch.randn(b, h, 1, d, generator=gen, device=device)
    noise = 0.3 * torch.randn(b, h, n, d, generator=gen, device=device)
    return (2.0 * base + heads + noise).to(torch.bfloat16)


def accuracy(out, ref):
    o, r = out.double().flatten(), ref.double().flatten()
    return ((o - r).norm() / r.norm()).item(), torch.nn.functional.cosine_similarity(
        o, r, dim=0
    ).item()


def fp32_reference(q, k, v, mask):
    """fp32 SDPA with the materialised mask (math backend), zeros for empty rows."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    dense = None if mask is None else mask.to_dense(q.shape[2], k.shape[2], device=q.device)
    with sdpa_kernel(SDPBackend.MATH):
        out = torch.nn.functional.scaled_dot_product_attention(
            q.float(), k.float(), v.float(), attn_mask=dense
        )
    if dense is not None:
        out = torch.where(dense.any(-1, keepdim=True), out, 0.0)
    return out


def speed_rows(sname, shape, quick, sweep, flex, gen, pvs) -> list[dict]:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    rows: list[dict] = []
    b, h, n, d = shape
    dev = torch.device("cuda")
    q, k, v = (torch.randn(b, h, n, d, device=dev, generator=gen, dtype=torch.bfloat16)
               for _ in range(3))
    flops = 4.0 * b * h * n * n * d
    sdpa = functools.partial(torch.nn.functional.scaled_dot_product_attention, q, k, v)
    cudnn = None
    try:
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            cudnn = bench_ms(sdpa)
        rows.append(dict(table="speed", shape=sname, mask="dense", density=1.0,
                         impl="sdpa-cudnn", ms=cudnn, tflops=flops / cudnn / 1e9))
    except RuntimeError as exc:
        print(f"cuDNN SDPA unavailable: {str(exc)[:200]}")
    masks = {"dense": None}
    if hasattr(fs.masks, "radial"):
        try:
            masks["radial"] = fs.masks.radial(fs.VideoLayout(**LAYOUT), 1.0, "cogvideox",
                                              block_size=TILE_N)
        except Exception as exc:  # noqa: BLE001 - report and go on
            print(f"radial mask skipped: {exc}")
    else:
        print("radial mask skipped: flexsparse.masks.radial not present")
    for dens in (0.25,) if quick else (0.5, 0.25, 0.125):
        masks[f"band{dens * 100:g}%"] = banded(n, dens)
    for mname, mask in masks.items():
        bm = (mask or fs.masks.full()).block_mask(n, n, device=dev, block_size=TILE_N)
        kw = {}
        density = 1.0
        if mask is not None:
            _, kept, num, idx = mask_tiles(mask, n, n, dev)
            kw = {"tile_list": (num, idx)}
            density = float(kept.float().mean())
        ms_flex = bench_ms(functools.partial(flex, q, k, v, block_mask=bm))
        rows.append(dict(table="speed", shape=sname, mask=mname, density=density,
                         impl="flex-bf16", ms=ms_flex, tflops=density * flops / ms_flex / 1e9))
        for pv in pvs:
            ms = bench_ms(functools.partial(quant_attention, q, k, v, pv_dtype=pv, **kw))
            row = dict(table="speed", shape=sname, mask=mname, density=density,
                       impl=f"quant-{pv}", ms=ms, tflops=density * flops / ms / 1e9,
                       vs_flex=ms_flex / ms)
            if mask is None and cudnn:
                row["vs_cudnn"] = cudnn / ms
            rows.append(row)
    if sweep:
        for pv in pvs:
            for bn, nw, ns, fold in ((64, 4, 3, True), (64, 4, 4, True), (64, 8, 3, True),
                                     (64, 8, 4, True), (128, 4, 2, True), (128, 4, 3, True),
                                     (128, 8, 3, True), (64, 8, 3, False), (128, 4, 2, False)):
                fn = functools.partial(quant_attention, q, k, v, pv_dtype=pv, block_n=bn,
                                       num_warps=nw, num_stages=ns, fold=fold)
                try:
                    ms = bench_ms(fn)
                except Exception as exc:  # noqa: BLE001 - a config may not fit
                    print(f"config {pv} {bn} {nw} {ns} {fold} failed: {str(exc)[:200]}")
                    continue
                rows.append(dict(table="sweep", shape=sname, impl=f"quant-{pv}",
                                 config=f"bn{bn} w{nw} s{ns} fold={fold}", ms=ms,
                                 tflops=flops / ms / 1e9))
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="2b shape only, fewer masks")
    ap.add_argument("--sweep", action="store_true", help="also time launch configurations")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("needs CUDA")
        return 1
    from torch.nn.attention.flex_attention import flex_attention

    dev = torch.device("cuda")
    fp8_ok = torch.cuda.get_device_capability() >= (8, 9)
    pvs = ["fp16"] + (["fp8"] if fp8_ok else [])
    flex = torch.compile(flex_attention, dynamic=False)
    gen = torch.Generator(device=dev).manual_seed(0)
    rows: list[dict] = []
    shapes = dict(list(SHAPES.items())[:1]) if args.quick else SHAPES

    # -- accuracy (a 2-head slice of the full length keeps the fp32 reference cheap) --------
    b, h, n, d = 1, 2, 17776, 64
    acc_masks = {"dense": None, "band25": banded(n, 0.25)}
    for kind in ("random", "structured"):
        if kind == "random":
            q, k, v = (torch.randn(b, h, n, d, device=dev, generator=gen,
                                   dtype=torch.bfloat16) for _ in range(3))
        else:
            q, k, v = (structured(b, h, n, d, dev, gen) for _ in range(3))
        for mname, mask in acc_masks.items():
            ref = fp32_reference(q, k, v, mask)
            kw = {} if mask is None else {"tile_list": mask_tiles(mask, n, n, dev)[2:]}
            for pv in pvs:
                err, cos = accuracy(quant_attention(q, k, v, pv_dtype=pv, **kw), ref)
                ok = err <= 3e-2 and cos >= 0.999
                rows.append(dict(table="accuracy", case=f"{kind}/{mname}", impl=f"quant-{pv}",
                                 rel_l2=err, cosine=cos, ok=ok))
            bm = (mask or fs.masks.full()).block_mask(n, n, device=dev, block_size=TILE_N)
            err, cos = accuracy(flex(q, k, v, block_mask=bm), ref)
            rows.append(dict(table="accuracy", case=f"{kind}/{mname}", impl="flex-bf16",
                             rel_l2=err, cosine=cos, ok=err <= 3e-2 and cos >= 0.999))

    # -- pvthreshd on smooth inputs (2b shape): time saved and error added --------------------
    b, h, n, d = SHAPES["cogvideox-2b"]
    q, k, v = (structured(b, h, n, d, dev, gen) for _ in range(3))
    base = quant_attention(q, k, v)
    ms0 = bench_ms(functools.partial(quant_attention, q, k, v))
    for thr, branch in ((6.0, False), (6.0, True), (10.0, True)):
        fn = functools.partial(quant_attention, q, k, v, pvthreshd=thr, pvt_branch=branch)
        out = fn()
        ms = bench_ms(fn)
        rows.append(dict(table="pvthreshd", case=f"structured/dense thr={thr:g}",
                         impl=f"quant-fp16 {'branch' if branch else 'zero-P'}", ms=ms,
                         vs_off=ms0 / ms, rel_l2_vs_off=accuracy(out, base)[0]))
    del q, k, v, base

    # -- speed ------------------------------------------------------------------------------
    for sname, shape in shapes.items():
        rows += speed_rows(sname, shape, args.quick, args.sweep, flex, gen, pvs)
        args.sweep = False  # one shape is enough for the sweep
        torch.cuda.empty_cache()

    text = header("Quantized attention (backend quant)") + "\n"
    for name, cols in (
        ("accuracy", ["case", "impl", "rel_l2", "cosine", "ok"]),
        ("speed", ["shape", "mask", "density", "impl", "ms", "tflops", "vs_flex", "vs_cudnn"]),
        ("sweep", ["shape", "impl", "config", "ms", "tflops"]),
        ("pvthreshd", ["case", "impl", "ms", "vs_off", "rel_l2_vs_off"]),
    ):
        sel = [r for r in rows if r["table"] == name]
        if sel:
            text += f"\n{name}\n\n" + table(sel, cols) + "\n"
    print(text)
    save("quant", rows, text)
    print(f"device: {device_name()}; rows: {len(rows)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
