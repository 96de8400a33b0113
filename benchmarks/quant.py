"""Quantized attention (backend "quant") vs cuDNN SDPA, FlexAttention on the same BlockMask
and the legacy kernel (``flexsparse.kernels._legacy``, the kernel of 2026-11-24).

    python benchmarks/quant.py --part dense    # TOPS at D=64 / 128, launch-config sweep
    python benchmarks/quant.py --part sparse   # radial (block and token), meansim, accuracy
    python benchmarks/quant.py --part partial  # partial-tile bits: old vs new, crossover
    python benchmarks/quant.py --part kernel   # configs, V in place, radial tile shapes
    python benchmarks/quant.py --part order    # query tiles by decreasing work vs index order
    python benchmarks/quant.py --part lists    # where a tile-list call's time goes (2b, D=64)
    python benchmarks/quant.py --part host     # host profile of fs.attention calls
    python benchmarks/quant.py --part d128     # launch variants on the Wan radial map
    python benchmarks/quant.py --part stages   # pipeline depth of the tile-list loop
    python benchmarks/quant.py --part hopper   # partial tiles: Hopper kernel vs Triton's
    python benchmarks/quant.py --part bound    # Hopper kernel with and without the norm bound

Effective TOPS = 4 * B * H * Nq * Nk * D * density / time. Writes ``$OUT/quant_<part>.json``
and ``.md`` when ``OUT`` is set.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
from unittest import mock

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import cuda_ms, cudnn, device_name, header, queued_ms, save, table  # noqa: E402
from legacy_quant import legacy_quant_attention  # noqa: E402

import flexsparse as fs  # noqa: E402
from flexsparse import masks  # noqa: E402
from flexsparse.kernels import quant_attention, tile_lists  # noqa: E402

DENSE = {"D64 (2b: 2x30x17776)": (2, 30, 17776, 64), "D128 (2x24x17776)": (2, 24, 17776, 128)}
SWEEP = [(64, 4, 3), (64, 8, 3), (64, 8, 4), (64, 4, 4), (128, 4, 3), (128, 8, 3),
         (128, 8, 2), (128, 4, 2)]
RADIAL = {  # name: model, frames, height, width, decay, batch, heads, head_dim
    "cogvideox-2b 49f": ("cogvideox", 49, 480, 720, 1.0, 2, 30, 64),
    "wan 69f": ("wan", 69, 768, 1280, 0.2, 1, 12, 128),
    "hunyuan 117f": ("hunyuan", 117, 768, 1280, 0.95, 1, 8, 128),
}


def radial_inputs(gen, name: str) -> tuple:
    """``(layout, tokens, q, k, v)`` of the radial case ``name`` (``RADIAL``): random bf16."""
    model, f, hgt, wid, _, b, h, d = RADIAL[name]
    lay = fs.VideoLayout.from_video(f, hgt, wid, model)
    n = lay.frames * lay.tokens_per_frame + lay.text_tokens
    q, k, v = (torch.randn(b, h, n, d, device="cuda", generator=gen, dtype=torch.bfloat16)
               for _ in range(3))
    return lay, n, q, k, v


def ms_of(fn) -> float:
    return cuda_ms(fn, warmup=3, reps=10)


def rel(out, ref) -> tuple[float, float]:
    o, r = out.double().flatten(), ref.double().flatten()
    return ((o - r).norm() / r.norm()).item(), torch.nn.functional.cosine_similarity(
        o, r, dim=0).item()


def structured(b, h, n, d, gen, tpf=1350, row=45):
    """Smooth, video-like tokens: low-frequency functions of (frame, y, x) plus noise and a
    per-channel offset."""
    dev = torch.device("cuda")
    t = torch.arange(n, device=dev, dtype=torch.float32)
    f, y, x = t // tpf, (t % tpf) // row, t % row
    freq = torch.rand(3, d, generator=gen, device=dev) * 0.3
    phase = torch.rand(d, generator=gen, device=dev) * 6.28
    base = torch.sin(f[:, None] * freq[0] + y[:, None] * freq[1] + x[:, None] * freq[2] + phase)
    off = torch.randn(b, h, 1, d, generator=gen, device=dev)
    noise = 0.3 * torch.randn(b, h, n, d, generator=gen, device=dev)
    return (2.0 * base + off + noise).to(torch.bfloat16)


def fp32_ref(q, k, v, dense_mask):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.MATH):
        out = torch.nn.functional.scaled_dot_product_attention(
            q.float(), k.float(), v.float(), attn_mask=dense_mask)
    if dense_mask is not None:
        out = torch.where(dense_mask.any(-1, keepdim=True), out, 0.0)
    return out


def dense_peers(gen, name, shape, legacy_pvs) -> tuple:
    """Random bf16 ``q, k, v`` of ``shape`` and the rows of its peers, cuDNN and the legacy
    kernel (one row per P·V dtype): ``(q, k, v, ops, cudnn_ms, rows)``."""
    b, h, n, d = shape
    q, k, v = (torch.randn(b, h, n, d, device="cuda", generator=gen, dtype=torch.bfloat16)
               for _ in range(3))
    ops = 4.0 * b * h * n * n * d
    base = ms_of(functools.partial(cudnn, q, k, v))
    rows = [dict(table="dense", shape=name, impl="cudnn bf16", ms=base, tops=ops / base / 1e9,
                 vs_cudnn=1.0)]
    for pv in legacy_pvs:
        ms = ms_of(functools.partial(legacy_quant_attention, q, k, v, pv_dtype=pv))
        rows.append(dict(table="dense", shape=name, impl=f"legacy {pv}", ms=ms,
                         tops=ops / ms / 1e9, vs_cudnn=base / ms))
    return q, k, v, ops, base, rows


def dense_part(gen, pvs) -> list[dict]:
    rows = []
    for name, shape in DENSE.items():
        q, k, v, ops, base, peers = dense_peers(gen, name, shape, pvs)
        rows += peers
        for pv in pvs:
            for bn, nw, ns in SWEEP:
                fn = functools.partial(quant_attention, q, k, v, pv_dtype=pv, block_n=bn,
                                       num_warps=nw, num_stages=ns)
                try:
                    ms = ms_of(fn)
                except Exception as exc:  # noqa: BLE001 - a config may not fit
                    print(f"{name} {pv} bn{bn} w{nw} s{ns}: {str(exc)[:160]}")
                    continue
                rows.append(dict(table="dense", shape=name, impl=f"new {pv} bn{bn} w{nw} s{ns}",
                                 ms=ms, tops=ops / ms / 1e9, vs_cudnn=base / ms))
        del q, k, v
        torch.cuda.empty_cache()
    return rows


#: block_n, num_warps, num_stages, maxnreg (a register cap lets 3 programs share an SM)
KERNEL_SWEEP = [(128, 4, 3, None), (64, 4, 3, None), (128, 8, 3, None), (64, 8, 3, None),
                (64, 4, 3, 168), (64, 8, 3, 128)]


def kernel_part(gen) -> list[dict]:
    """This kernel's launch configurations with V read in place (``bf16``, the inputs'
    dtype, the default) and converted (``fp16``), against cuDNN and the legacy kernel on
    dense shapes; accuracy on random and structured inputs; radial maps at both tile
    shapes."""
    rows = []
    for name, shape in DENSE.items():
        q, k, v, ops, base, peers = dense_peers(gen, name, shape, ["fp16"])
        rows += peers
        variants = [("bf16", c) for c in KERNEL_SWEEP] + [("fp16", (None,) * 4)]
        for pv, (bn, nw, ns, reg) in variants:
            fn = functools.partial(quant_attention, q, k, v, pv_dtype=pv, block_n=bn,
                                   num_warps=nw, num_stages=ns, maxnreg=reg)
            try:
                ms = ms_of(fn)
            except Exception as exc:  # noqa: BLE001 - a config may not fit
                print(f"{name} {pv} bn{bn} w{nw} s{ns}: {str(exc)[:160]}")
                continue
            cfg = "default" if bn is None else f"bn{bn} w{nw} s{ns}" + (f" r{reg}" if reg else "")
            rows.append(dict(table="dense", shape=name, impl=f"new {pv} {cfg}", ms=ms,
                             tops=ops / ms / 1e9, vs_cudnn=base / ms))
            print(rows[-1], flush=True)
        del q, k, v
        torch.cuda.empty_cache()
    for kind in ("random", "structured"):
        for d in (64, 128):
            for dt in (torch.bfloat16, torch.float16):
                if kind == "random":
                    q, k, v = (torch.randn(1, 2, 17776, d, device="cuda", generator=gen,
                                           dtype=dt) for _ in range(3))
                else:
                    q, k, v = (structured(1, 2, 17776, d, gen).to(dt) for _ in range(3))
                err, cos = rel(quant_attention(q, k, v), fp32_ref(q, k, v, None))
                rows.append(dict(table="accuracy", case=f"{kind} D{d} {dt}", impl="auto",
                                 rel_l2=err, cosine=cos, ok=err <= 3e-2 and cos >= 0.999))
    for name in RADIAL:
        model, decay = RADIAL[name][0], RADIAL[name][4]
        lay, n, q, k, v = radial_inputs(gen, name)
        base = ms_of(functools.partial(cudnn, q, k, v))
        rows.append(dict(table="radial", case=name, impl="cudnn bf16 dense", ms=base,
                         vs_cudnn=1.0))
        mask = masks.radial(lay, decay, model)
        for tile in ((128, 128), (128, 64)):
            bm = mask.block_mask(n, n, device="cuda", block_size=tile, noop=True)
            tile_lists(bm)
            ms = ms_of(functools.partial(quant_attention, q, k, v, block_mask=bm))
            rows.append(dict(table="radial", case=name, impl=f"new auto {tile[0]}x{tile[1]}",
                             ms=ms, vs_cudnn=base / ms))
        del q, k, v
        torch.cuda.empty_cache()
    return rows


def order_part(gen) -> list[dict]:
    """Query tiles in decreasing-work order (``quant.ROW_ORDER``) against index order, in
    alternating rounds on one machine: radial maps and a meansim map (128 x 64 tiles)."""
    from meansim import video_like

    import flexsparse.kernels.quant as Q

    cases = {}
    for name in ("cogvideox-2b 49f", "wan 69f", "hunyuan 117f"):
        model, decay = RADIAL[name][0], RADIAL[name][4]
        lay, n, *qkv = radial_inputs(gen, name)
        cases[name] = (qkv, masks.radial(lay, decay, model).block_mask(
            n, n, device="cuda", block_size=128, noop=True))
    q, k, v = video_like(0, "cuda")
    bound = masks.meansim(simthreshd1=0.35, cdfthreshd=0.98).bind(q, k)
    n = q.shape[2]
    cases["meansim 0.35/0.98"] = ([q, k, v], bound.block_mask(
        n, n, device="cuda", block_size=(128, 64), noop=True, heads=bound.heads,
        batch=bound.batch))
    rows = []
    for name, ((q, k, v), bm) in cases.items():
        tile_lists(bm)
        fn = functools.partial(quant_attention, q, k, v, block_mask=bm)
        times = {True: [], False: []}
        keep = Q.ROW_IMBALANCE
        for _ in range(3):
            for flag in (True, False):
                # decreasing work on every map (threshold 0) against index order
                Q.ROW_ORDER, Q.ROW_IMBALANCE = flag, 0.0
                Q._LISTS.pop(bm, None)
                times[flag].append(ms_of(fn))
        Q.ROW_ORDER, Q.ROW_IMBALANCE = True, keep
        Q._LISTS.pop(bm, None)
        for flag, label in ((True, "decreasing work"), (False, "index order")):
            rows.append(dict(table="order", case=name, impl=label,
                             ms=sorted(times[flag])[1], rounds=" / ".join(
                                 f"{t:.2f}" for t in times[flag])))
            print(rows[-1], flush=True)
    return rows


#: Launch variants of ``--part lists``: query rows per program (block_m), key rows per step,
#: warps, pipeline stages, register cap. None: the default (``quant.CONFIGS``).
LIST_VARIANTS = {
    "default": {},
    "no register cap": dict(maxnreg=0),
    "bn128 w4 s3 (D=64 default before the cap)": dict(block_n=128, num_warps=4,
                                                      num_stages=3),
}


def timed_row(rows, case, impl, fn, base, ops=None, kept=1.0) -> None:
    """Time ``fn`` (``ms_of``) into a row of table "lists" (effective TOPS when ``ops``
    is given); a launch that does not fit (shared memory, registers) is printed and
    skipped."""
    try:
        ms = ms_of(fn)
    except Exception as exc:  # noqa: BLE001 - a variant may not fit
        print(f"{case} {impl}: {str(exc)[:160]}", flush=True)
        return
    row = dict(table="lists", case=case, impl=impl, ms=ms, vs_cudnn=base / ms)
    if ops is not None:
        row.update(kept=kept, tops=ops * kept / ms / 1e9)
    rows.append(row)
    print(row, flush=True)


def launch_variants(rows, case, variants, q, k, v, base, tile_n=128, ops=None, kept=1.0,
                    **kw) -> None:
    """``timed_row`` of ``quant_attention(q, k, v, **kw)`` per launch variant (a dict of
    launch overrides by label); variants whose key blocks exceed ``tile_n`` are skipped."""
    for label, var in variants.items():
        if var.get("block_n", 0) > tile_n:
            continue
        timed_row(rows, case, f"kernel {label}",
                  functools.partial(quant_attention, q, k, v, **kw, **var), base, ops, kept)


def lists_part(gen) -> list[dict]:
    """Where the time of a tile-list call goes, per launch variant (``LIST_VARIANTS``): the
    kernel alone on a pre-built BlockMask (dense, all tiles kept, meansim and radial maps)
    in effective TOPS over the kept tiles, against the whole ``fs.attention`` call
    (predict, lower, launch) and cuDNN. CogVideoX-2b shape (D=64, meansim's video-like
    inputs), then Wan and HunyuanVideo radial maps (D=128, random inputs)."""
    from meansim import video_like

    rows = []

    def variants(case, kept, q, k, v, ops, base, tile_n=128, **kw):
        launch_variants(rows, case, LIST_VARIANTS, q, k, v, base, tile_n, ops, kept, **kw)

    def kept_of(bm, tile, n):
        lists = tile_lists(bm)
        return ((lists.full_num.sum() + lists.part_num.sum()).item()
                / (lists.full_num.numel() * -(-n // tile[1])))

    q, k, v = video_like(0, "cuda")
    b, h, n, d = q.shape
    ops = 4.0 * b * h * n * n * d
    base = ms_of(functools.partial(cudnn, q, k, v))
    rows.append(dict(table="lists", case="2b dense", impl="cudnn", kept=1.0, ms=base,
                     tops=ops / base / 1e9, vs_cudnn=1.0))
    variants("2b dense", 1.0, q, k, v, ops, base)
    lay = fs.VideoLayout.from_video(49, 480, 720, "cogvideox")
    radial = masks.radial(lay, 1.0, "cogvideox")
    cases = {}
    for tile in ((128, 64), (128, 128)):
        ones = torch.ones(-(-n // tile[0]), -(-n // tile[1]), dtype=torch.bool)
        cases[f"2b all kept {tile[0]}x{tile[1]}"] = (
            fs.Mask.from_tiles(ones, tile, length=n), tile, None)
        cases[f"2b radial {tile[0]}x{tile[1]}"] = (radial, tile, radial)
    for sim, cdf in ((0.6, 0.98), (0.35, 0.98)):
        dyn = masks.meansim(simthreshd1=sim, cdfthreshd=cdf)
        cases[f"2b meansim {sim}/{cdf}"] = (dyn.bind(q, k), (128, 64), dyn)
    for name, (mask, tile, whole) in cases.items():
        bm = mask.block_mask(n, n, device="cuda", block_size=tile, noop=True,
                             heads=mask.heads, batch=mask.batch)
        kept = kept_of(bm, tile, n)
        variants(name, kept, q, k, v, ops, base, tile_n=tile[1], block_mask=bm)
        if whole is not None:
            for backend in ("quant", "auto"):
                timed_row(rows, name, f"fs.attention {backend}", functools.partial(
                    fs.attention, q, k, v, mask=whole, backend=backend), base, ops, kept)
    del q, k, v
    for name in ("wan 69f", "hunyuan 117f"):
        model, decay = RADIAL[name][0], RADIAL[name][4]
        lay, n, q, k, v = radial_inputs(gen, name)
        b, h, _, d = q.shape
        ops = 4.0 * b * h * n * n * d
        base = ms_of(functools.partial(cudnn, q, k, v))
        rows.append(dict(table="lists", case=f"{name} dense", impl="cudnn", kept=1.0,
                         ms=base, tops=ops / base / 1e9, vs_cudnn=1.0))
        if name.startswith("wan"):
            variants(f"{name} dense", 1.0, q, k, v, ops, base)
        mask = masks.radial(lay, decay, model)
        for tile in ((128, 128), (128, 64)):
            bm = mask.block_mask(n, n, device="cuda", block_size=tile, noop=True)
            variants(f"{name} radial {tile[0]}x{tile[1]}", kept_of(bm, tile, n), q, k, v,
                     ops, base, tile_n=tile[1], block_mask=bm)
        timed_row(rows, f"{name} radial", "fs.attention auto", functools.partial(
            fs.attention, q, k, v, mask=mask, backend="auto"), base, ops, kept_of(bm, tile, n))
        del q, k, v
        torch.cuda.empty_cache()
    return rows


#: Launch variants of ``--part d128`` (see ``LIST_VARIANTS``).
D128_VARIANTS = {
    "default": {},
    "bn64 w4 s2": dict(block_n=64, num_warps=4, num_stages=2),
    "bn64 w4 s4": dict(block_n=64, num_warps=4, num_stages=4),
    "bn32 w4 s3": dict(block_n=32, num_warps=4, num_stages=3),
    "bn64 w8 s3 r128": dict(block_n=64, num_warps=8, num_stages=3, maxnreg=128),
    "bn128 w8 s2": dict(block_n=128, num_warps=8, num_stages=2),
}


def d128_part(gen) -> list[dict]:
    """Launch variants (``D128_VARIANTS``) on the Wan 69 f radial map at both tile shapes,
    kernel alone on a pre-built BlockMask, against cuDNN dense."""
    name = "wan 69f"
    model, decay = RADIAL[name][0], RADIAL[name][4]
    lay, n, q, k, v = radial_inputs(gen, name)
    base = ms_of(functools.partial(cudnn, q, k, v))
    rows = [dict(table="lists", case=f"{name} dense", impl="cudnn", ms=base, vs_cudnn=1.0)]
    mask = masks.radial(lay, decay, model)
    for tile in ((128, 128), (128, 64)):
        bm = mask.block_mask(n, n, device="cuda", block_size=tile, noop=True)
        tile_lists(bm)
        launch_variants(rows, f"{name} radial {tile[0]}x{tile[1]}", D128_VARIANTS, q, k, v,
                        base, tile[1], block_mask=bm)
    return rows


def stages_part(gen) -> list[dict]:
    """Pipeline depth of the tile-list loop: the kernel alone on pre-built BlockMasks at
    ``num_stages`` 3 / 4 / 5 (default launch otherwise), D=64 (2b dense, every tile kept,
    radial, meansim) and D=128 (Wan, HunyuanVideo radial), against cuDNN."""
    from meansim import video_like

    rows = []

    depths = {f"s{ns}": dict(num_stages=ns) for ns in (3, 4, 5)}

    def sweep(case, q, k, v, base, **kw):
        launch_variants(rows, case, depths, q, k, v, base, **kw)

    q, k, v = video_like(0, "cuda")
    n = q.shape[2]
    base = ms_of(functools.partial(cudnn, q, k, v))
    sweep("2b dense", q, k, v, base)
    lay = fs.VideoLayout.from_video(49, 480, 720, "cogvideox")
    ones = torch.ones(-(-n // 128), -(-n // 64), dtype=torch.bool)
    maps = {"2b all kept 128x64": (fs.Mask.from_tiles(ones, (128, 64), length=n), (128, 64)),
            "2b radial 128x128": (masks.radial(lay, 1.0, "cogvideox"), (128, 128))}
    bound = masks.meansim(0.35, cdfthreshd=0.98).bind(q, k)
    maps["2b meansim 0.35/0.98"] = (bound, (128, 64))
    for name, (mask, tile) in maps.items():
        bm = mask.block_mask(n, n, device="cuda", block_size=tile, noop=True,
                             heads=mask.heads, batch=mask.batch)
        sweep(name, q, k, v, base, block_mask=bm)
    del q, k, v
    for name in ("wan 69f", "hunyuan 117f"):
        model, decay = RADIAL[name][0], RADIAL[name][4]
        lay, n, q, k, v = radial_inputs(gen, name)
        base = ms_of(functools.partial(cudnn, q, k, v))
        bm = masks.radial(lay, decay, model).block_mask(n, n, device="cuda", noop=True)
        sweep(f"{name} radial 128x128", q, k, v, base, block_mask=bm)
        del q, k, v
        torch.cuda.empty_cache()
    return rows


def host_part(gen) -> list[dict]:
    """Host time of whole ``fs.attention`` calls (meansim and radial maps): wall time per
    call with the GPU synchronised, the kernel's own time, and the functions where the
    host spends it (cProfile, printed)."""
    import cProfile
    import pstats

    from common import wall_ms
    from meansim import video_like

    q, k, v = video_like(0, "cuda")
    n = q.shape[2]
    lay = fs.VideoLayout.from_video(49, 480, 720, "cogvideox")
    cases = {"meansim 0.35/0.98 quant": (masks.meansim(0.35, cdfthreshd=0.98), "quant"),
             "meansim 0.6/0.98 auto": (masks.meansim(0.6, cdfthreshd=0.98), "auto"),
             "radial 2b auto": (masks.radial(lay, 1.0, "cogvideox"), "auto")}
    rows = []
    for name, (mask, backend) in cases.items():
        def call(mask=mask, backend=backend):
            return fs.attention(q, k, v, mask=mask, backend=backend)

        for _ in range(3):
            call()
        wall = wall_ms(call, reps=10)
        gpu = ms_of(call)
        prof = cProfile.Profile()
        torch.cuda.synchronize()
        prof.enable()
        for _ in range(10):
            call()
        torch.cuda.synchronize()
        prof.disable()
        print(f"\n#### {name}: wall {wall:.2f} ms per call (synchronised), events {gpu:.2f} ms")
        stats = pstats.Stats(prof)
        stats.sort_stats("tottime").print_stats(18)
        stats.sort_stats("cumulative").print_stats(30)
        rows.append(dict(table="host", case=name, wall_ms=wall, events_ms=gpu, n=n))
    return rows


def sparse_part(gen, pvs, flex) -> list[dict]:
    rows = []
    for name, (model, _, _, _, decay, b, h, d) in RADIAL.items():
        lay, n, q, k, v = radial_inputs(gen, name)
        ops = 4.0 * b * h * n * n * d
        base = ms_of(functools.partial(cudnn, q, k, v))
        rows.append(dict(table="radial", case=name, impl="cudnn bf16 dense", ms=base,
                         density=1.0, tops=ops / base / 1e9, vs_cudnn=1.0))
        for gran in ("block", "token"):
            mask = masks.radial(lay, decay, model, granularity=gran)
            dens = mask.density(n)
            bm128 = mask.block_mask(n, n, device="cuda", block_size=128)
            if gran == "block":
                ms = ms_of(functools.partial(flex, q, k, v, block_mask=bm128))
                rows.append(dict(table="radial", case=name, impl="flex bf16 block", ms=ms,
                                 density=dens, tops=dens * ops / ms / 1e9, vs_cudnn=base / ms))
                lists = tile_lists(bm128)
                if lists.n_partial == 0:  # the legacy kernel takes whole tiles only
                    fn = functools.partial(legacy_quant_attention, q, k, v,
                                           tile_list=(lists.full_num, lists.full_idx))
                    ms = ms_of(fn)
                    rows.append(dict(table="radial", case=name, impl="legacy fp16 block",
                                     ms=ms, density=dens, tops=dens * ops / ms / 1e9,
                                     vs_cudnn=base / ms))
            for tile in ((128, 128), (128, 64)):
                bm = mask.block_mask(n, n, device="cuda", block_size=tile)
                lists = tile_lists(bm)
                bits_mib = lists.bits.numel() * 4 / 2**20
                for pv in pvs:
                    fn = functools.partial(quant_attention, q, k, v, block_mask=bm, pv_dtype=pv)
                    ms = ms_of(fn)
                    rows.append(dict(table="radial", case=name,
                                     impl=f"new {pv} {gran} {tile[0]}x{tile[1]}", ms=ms,
                                     density=dens, tops=dens * ops / ms / 1e9,
                                     vs_cudnn=base / ms, partial=lists.n_partial,
                                     bits_mib=round(bits_mib, 2)))
        del q, k, v
        torch.cuda.empty_cache()

    # accuracy: random and structured, dense / radial-token on a slice of heads (fp32 ref)
    lay = fs.VideoLayout.from_video(49, 480, 720, "cogvideox")
    n = 17776
    rad = masks.radial(lay, 1.0, "cogvideox", granularity="token")
    dense_rad = rad.to_dense(n, n, device="cuda")
    bm = rad.block_mask(n, n, device="cuda", block_size=(128, 64))
    for kind in ("random", "structured"):
        for d in (64, 128):
            if kind == "random":
                q, k, v = (torch.randn(1, 2, n, d, device="cuda", generator=gen,
                                       dtype=torch.bfloat16) for _ in range(3))
            else:
                q, k, v = (structured(1, 2, n, d, gen) for _ in range(3))
            for mname, dm, kw in (("dense", None, {}), ("radial-token", dense_rad,
                                                       {"block_mask": bm})):
                ref = fp32_ref(q, k, v, dm)
                for pv in pvs:
                    err, cos = rel(quant_attention(q, k, v, pv_dtype=pv, **kw), ref)
                    rows.append(dict(table="accuracy", case=f"{kind} D{d} {mname}",
                                     impl=f"new {pv}", rel_l2=err, cosine=cos,
                                     ok=err <= 3e-2 and cos >= 0.999))
            del q, k, v
    return rows


def meansim_part(gen, pvs) -> list[dict]:
    """meansim on CogVideoX-2b shapes with structured q/k: predictor + kernel vs cuDNN."""
    rows = []
    b, h, n, d = 2, 30, 17776, 64
    q, k, v = (structured(b, h, n, d, gen) for _ in range(3))
    base = ms_of(functools.partial(cudnn, q, k, v))
    ref = None
    for sim, cdf in ((0.6, 0.98), (0.3, 0.9), (0.1, 0.8)):
        dyn = masks.meansim(simthreshd1=sim, cdfthreshd=cdf, block_q=128, block_kv=64)
        pred = ms_of(functools.partial(dyn.predict, q, k))
        bound = dyn.bind(q, k)
        kept = dyn.predict(q, k)
        skipped = 1.0 - kept.float().mean().item()
        bm = bound.block_mask(n, n, device="cuda", heads=h, batch=b, block_size=(128, 64))
        if ref is None:
            ref = cudnn(q, k, v).float()
        for pv in pvs:
            fn = functools.partial(quant_attention, q, k, v, block_mask=bm, pv_dtype=pv)
            out = fn()
            ms = ms_of(fn)

            def both(dyn=dyn, pv=pv):
                bm = dyn.bind(q, k).block_mask(n, n, device="cuda", heads=h, batch=b,
                                               block_size=(128, 64))
                return quant_attention(q, k, v, block_mask=bm, pv_dtype=pv)

            ms_all = ms_of(both)
            l1 = ((out.float() - ref).abs().sum() / ref.abs().sum()).item()
            rows.append(dict(table="meansim", case=f"sim{sim} cdf{cdf}", impl=f"new {pv}",
                             skipped=skipped, predict_ms=pred, kernel_ms=ms,
                             total_ms=ms_all, cudnn_ms=base, pred_pct=100 * pred / base,
                             vs_cudnn=base / ms_all, rel_l1=l1))
    return rows


def partial_part(gen, flex) -> list[dict]:
    """Partial tiles: per-element word loads (``BITS_GATHER=True``, the first version) vs
    each row's words loaded once, against the block map (no partial tiles), FlexAttention
    on the same token BlockMask and cuDNN dense; then a sliding-window sweep on the 2b shape
    for the crossover (density / partial fraction) where quant beats flex and cuDNN."""
    from flexsparse.kernels import quant as Q

    rows = []

    def quant(q, k, v, bm, gather):
        with mock.patch.object(Q, "BITS_GATHER", gather):
            return ms_of(functools.partial(quant_attention, q, k, v, block_mask=bm))

    def kept_tiles(bm) -> tuple[float, float]:
        lists = tile_lists(bm)
        part = lists.part_num.sum().item()
        full = lists.full_num.sum().item()
        total = lists.full_num.shape[-1] * -(-bm.seq_lengths[1] // bm.BLOCK_SIZE[1])
        return (part + full) / total, part / max(1, part + full)

    for name in ("cogvideox-2b 49f", "wan 69f"):
        model, decay = RADIAL[name][0], RADIAL[name][4]
        lay, n, q, k, v = radial_inputs(gen, name)
        base = ms_of(functools.partial(cudnn, q, k, v))
        rows.append(dict(table="partial", case=name, impl="cudnn bf16 dense", ms=base,
                         vs_cudnn=1.0))
        for gran in ("block", "token"):
            mask = masks.radial(lay, decay, model, granularity=gran)
            for tile in ((128, 128), (128, 64)):
                bm = mask.block_mask(n, n, device="cuda", block_size=tile)
                tiles, pfrac = kept_tiles(bm)
                common = dict(table="partial", case=name, density=mask.density(n),
                              tiles_kept=tiles, partial_frac=pfrac)
                if tile == (128, 128):
                    ms = ms_of(functools.partial(flex, q, k, v, block_mask=bm))
                    rows.append(dict(common, impl=f"flex {gran} 128x128", ms=ms,
                                     vs_cudnn=base / ms))
                variants = (False, True) if gran == "token" else (False,)
                for gather in variants:
                    ms = quant(q, k, v, bm, gather)
                    how = " word/elem" if gather else (" row words" if gran == "token" else "")
                    rows.append(dict(common, impl=f"quant {gran} {tile[0]}x{tile[1]}{how}",
                                     ms=ms, vs_cudnn=base / ms))
        del q, k, v
        torch.cuda.empty_cache()

    # crossover sweep: symmetric sliding windows (token rule, partial tiles on the band edge)
    b, h, n, d = 2, 30, 17776, 64
    q, k, v = (torch.randn(b, h, n, d, device="cuda", generator=gen, dtype=torch.bfloat16)
               for _ in range(3))
    base = ms_of(functools.partial(cudnn, q, k, v))
    # each window is a new mask_mod closure: one flex compile each
    torch._dynamo.config.recompile_limit = 64
    for w in (1500, 4000, 8000):
        mask = masks.sliding_window(w)
        for tile in ((128, 128), (128, 64)):
            bm = mask.block_mask(n, n, device="cuda", block_size=tile)
            tiles, pfrac = kept_tiles(bm)
            ms_q = quant(q, k, v, bm, False)
            ms_f = ms_of(functools.partial(flex, q, k, v, block_mask=bm)) if tile == (
                128, 128) else float("nan")
            rows.append(dict(table="crossover", case=f"window {w} {tile[0]}x{tile[1]}",
                             density=mask.density(n), tiles_kept=tiles, partial_frac=pfrac,
                             quant_ms=ms_q, flex_ms=ms_f, cudnn_ms=base,
                             quant_vs_cudnn=base / ms_q, quant_vs_flex=ms_f / ms_q))
    # accuracy of the new partial path: token radial on a slice of heads, fp32 reference
    lay = fs.VideoLayout.from_video(49, 480, 720, "cogvideox")
    rad = masks.radial(lay, 1.0, "cogvideox", granularity="token")
    dense_rad = rad.to_dense(n, n, device="cuda")
    for kind in ("random", "structured"):
        for tile in ((128, 128), (128, 64)):
            bm = rad.block_mask(n, n, device="cuda", block_size=tile)
            if kind == "random":
                q, k, v = (torch.randn(1, 2, n, 64, device="cuda", generator=gen,
                                       dtype=torch.bfloat16) for _ in range(3))
            else:
                q, k, v = (structured(1, 2, n, 64, gen) for _ in range(3))
            err, cos = rel(quant_attention(q, k, v, block_mask=bm), fp32_ref(q, k, v, dense_rad))
            rows.append(dict(table="accuracy", case=f"{kind} D64 radial-token {tile}",
                             impl="quant fp16 row words", rel_l2=err, cosine=cos,
                             ok=err <= 3e-2 and cos >= 0.999))
    return rows


def hopper_part(gen, flex) -> list[dict]:
    """Maps with partial tiles on the Hopper kernel (``kernel="sm90"``, the token rule from
    per-thread bits) against the Triton kernel on the same BlockMask, FlexAttention on it
    and cuDNN (dense, or causal for the causal rows); both clocks (sync: CUDA events, the
    GPU synchronised after each call; queued: no synchronisation between calls). Causal
    rows: the Triton kernel's in-kernel rule against the Hopper kernel on the causal
    BlockMask (what the backend sends it). Then the accuracy of the Hopper kernel's
    partial path against the fp32 reference, on random and structured inputs."""
    rows = []

    def both(fn) -> tuple[float, float]:
        return cuda_ms(fn), queued_ms(fn)

    def add(case, impl, fn, base, ops, **extra):
        sync, queued = both(fn)
        rows.append(dict(table="hopper", case=case, impl=impl, sync_ms=sync, queued_ms=queued,
                         vs_cudnn=base[0] / sync, vs_cudnn_q=base[1] / queued,
                         tops=ops / queued / 1e9, **extra))

    cases = [(f"{name} radial token", name) for name in ("cogvideox-2b 49f", "wan 69f")]
    cases += [("causal 2x32x8192 D128", (2, 32, 8192, 128)),
              ("causal 2x30x17776 D64", (2, 30, 17776, 64))]
    for case, spec in cases:
        if isinstance(spec, str):
            model, decay = RADIAL[spec][0], RADIAL[spec][4]
            lay, n, q, k, v = radial_inputs(gen, spec)
            mask = masks.radial(lay, decay, model, granularity="token")
            base = both(functools.partial(cudnn, q, k, v))
            rows.append(dict(table="hopper", case=case, impl="cudnn bf16 dense",
                             sync_ms=base[0], queued_ms=base[1], vs_cudnn=1.0, vs_cudnn_q=1.0))
        else:
            b, h, n, d = spec
            q, k, v = (torch.randn(b, h, n, d, device="cuda", generator=gen,
                                   dtype=torch.bfloat16) for _ in range(3))
            mask = masks.causal()
            base = both(functools.partial(cudnn, q, k, v, causal=True))
            rows.append(dict(table="hopper", case=case, impl="cudnn bf16 causal",
                             sync_ms=base[0], queued_ms=base[1], vs_cudnn=1.0, vs_cudnn_q=1.0))
        density = mask.density(n)
        ops = 4 * q.shape[0] * q.shape[1] * n * n * q.shape[-1] * density
        bm = mask.block_mask(n, n, device="cuda", block_size=(128, 128))
        lists = tile_lists(bm)
        part, full = lists.part_num.sum().item(), lists.full_num.sum().item()
        extra = dict(density=density, partial_frac=part / max(1, part + full))
        add(case, "flex (same BlockMask)", functools.partial(flex, q, k, v, block_mask=bm),
            base, ops, **extra)
        if mask.sdpa_hint == "causal":
            add(case, "quant triton, in-kernel causal rule",
                functools.partial(quant_attention, q, k, v, causal=True, kernel="triton"),
                base, ops, **extra)
        else:
            add(case, "quant triton", functools.partial(
                quant_attention, q, k, v, block_mask=bm, kernel="triton"), base, ops, **extra)
        add(case, "quant sm90", functools.partial(
            quant_attention, q, k, v, block_mask=bm, kernel="sm90"), base, ops, **extra)
        add(case, "fs.attention backend=quant", functools.partial(
            fs.attention, q, k, v, mask, backend="quant"), base, ops, **extra)
        del q, k, v
        torch.cuda.empty_cache()

    # accuracy of the Hopper kernel's partial path: token radial and causal, 2 heads, fp32
    lay = fs.VideoLayout.from_video(49, 480, 720, "cogvideox")
    n = lay.frames * lay.tokens_per_frame + lay.text_tokens
    for name, mask in (("radial-token", masks.radial(lay, 1.0, "cogvideox", granularity="token")),
                       ("causal", masks.causal())):
        dense = mask.to_dense(n, n, device="cuda")
        bm = mask.block_mask(n, n, device="cuda", block_size=(128, 128))
        for kind in ("random", "structured"):
            if kind == "random":
                q, k, v = (torch.randn(1, 2, n, 64, device="cuda", generator=gen,
                                       dtype=torch.bfloat16) for _ in range(3))
            else:
                q, k, v = (structured(1, 2, n, 64, gen) for _ in range(3))
            err, cos = rel(quant_attention(q, k, v, block_mask=bm, kernel="sm90"),
                           fp32_ref(q, k, v, dense))
            rows.append(dict(table="accuracy", case=f"{kind} D64 {name}", impl="quant sm90",
                             rel_l2=err, cosine=cos, ok=err <= 3e-2 and cos >= 0.999))
        del dense
    return rows


def bound_part(gen) -> list[dict]:
    """The norm bound of the Hopper kernel (a block's row maxima skipped where ``|q| |k|``
    keeps its scores within the rescale slack): the kernel with the norms and without them
    (``_quantize_qk`` patched to return none), same inputs, same bits; random inputs (flat
    attention) and structured ones (smooth video-like tokens, ``structured``), dense at
    D=64 and D=128 and on the radial CogVideoX-2b map; cuDNN dense in the same run."""
    from flexsparse.kernels import quant

    quantize = quant._quantize_qk
    rows = []
    lay = fs.VideoLayout.from_video(49, 480, 720, "cogvideox")
    radial = masks.radial(lay, 1.0, "cogvideox")
    for kind in ("random", "structured"):
        for case, (b, h, n, d), mask in (
            ("dense D64 2x30x17776", (2, 30, 17776, 64), None),
            ("radial 2b D64", (2, 30, 17776, 64), radial),
            ("dense D128 2x24x17776", (2, 24, 17776, 128), None),
        ):
            if kind == "random":
                q, k, v = (torch.randn(b, h, n, d, device="cuda", generator=gen,
                                       dtype=torch.bfloat16) for _ in range(3))
            else:
                q, k, v = (structured(b, h, n, d, gen) for _ in range(3))
            bm = None if mask is None else mask.block_mask(n, n, device="cuda",
                                                           block_size=(128, 128))
            ops = 4.0 * b * h * n * n * d * (1.0 if mask is None else mask.density(n))
            base = queued_ms(functools.partial(cudnn, q, k, v))
            call = functools.partial(quant_attention, q, k, v, block_mask=bm, kernel="sm90")
            out = call()
            with_norms = queued_ms(call)
            with mock.patch.object(quant, "_quantize_qk", lambda *a: quantize(*a[:6])):
                same = torch.equal(call(), out)
                without = queued_ms(call)
            rows.append(dict(table="bound", case=f"{kind} {case}", cudnn_ms=base,
                             without_ms=without, with_ms=with_norms, speedup=without / with_norms,
                             tops=ops / with_norms / 1e9, vs_cudnn=base / with_norms,
                             same_bits=same))
            del q, k, v
            torch.cuda.empty_cache()
    return rows


def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


#: ``--part`` name -> ``fn(gen, pvs) -> rows``.
PARTS = {
    "dense": dense_part,
    "sparse": lambda gen, pvs: sparse_part(gen, pvs, _compiled_flex()),
    "meansim": meansim_part,
    "partial": lambda gen, pvs: partial_part(gen, _compiled_flex()),
    "kernel": lambda gen, pvs: kernel_part(gen),
    "order": lambda gen, pvs: order_part(gen),
    "lists": lambda gen, pvs: lists_part(gen),
    "host": lambda gen, pvs: host_part(gen),
    "d128": lambda gen, pvs: d128_part(gen),
    "stages": lambda gen, pvs: stages_part(gen),
    "hopper": lambda gen, pvs: hopper_part(gen, _compiled_flex()),
    "bound": lambda gen, pvs: bound_part(gen),
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", choices=sorted(PARTS), default="dense")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("needs CUDA")
        return 1
    gen = torch.Generator(device="cuda").manual_seed(0)
    pvs = ["fp16"] + (["fp8"] if torch.cuda.get_device_capability() >= (8, 9) else [])
    rows = PARTS[args.part](gen, pvs)
    cols = ["shape", "impl", "ms", "tops", "vs_cudnn"] if args.part in ("dense", "kernel") else None
    text = header(f"Quantized attention, part {args.part}") + "\n"
    for name, c in (
        ("dense", cols),
        ("radial", ["case", "impl", "density", "ms", "tops", "vs_cudnn", "partial",
                    "bits_mib"] if args.part != "kernel" else ["case", "impl", "ms", "vs_cudnn"]),
        ("partial", ["case", "impl", "density", "tiles_kept", "partial_frac", "ms",
                     "vs_cudnn"]),
        ("crossover", ["case", "density", "tiles_kept", "partial_frac", "quant_ms", "flex_ms",
                       "cudnn_ms", "quant_vs_cudnn", "quant_vs_flex"]),
        ("hopper", ["case", "impl", "density", "partial_frac", "sync_ms", "queued_ms", "tops",
                    "vs_cudnn", "vs_cudnn_q"]),
        ("accuracy", ["case", "impl", "rel_l2", "cosine", "ok"]),
        ("order", ["case", "impl", "ms", "rounds"]),
        ("lists", ["case", "impl", "kept", "ms", "tops", "vs_cudnn"]
         if args.part == "lists" else ["case", "impl", "ms", "vs_cudnn"]),
        ("host", ["case", "wall_ms", "events_ms"]),
        ("bound", ["case", "cudnn_ms", "without_ms", "with_ms", "speedup", "tops", "vs_cudnn",
                   "same_bits"]),
        ("meansim", ["case", "impl", "skipped", "predict_ms", "pred_pct", "kernel_ms",
                     "total_ms", "cudnn_ms", "vs_cudnn", "rel_l1"]),
    ):
        sel = [r for r in rows if r["table"] == name]
        if sel:
            text += f"\n{name}\n\n" + table(sel, c) + "\n"
    print(text)
    save(f"quant_{args.part}", rows, text)
    print(f"device: {device_name()}; rows: {len(rows)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
