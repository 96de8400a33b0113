# ruff: noqa
"""Experiment of 2026-11-25 (night), issue 14; removed in the next commit (BENCHMARKS.md).
"""
import functools
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "benchmarks"))
import torch
from common import cuda_ms
from quant import RADIAL, cudnn, radial_inputs, rel

import flexsparse as fs
from flexsparse import masks
from flexsparse.kernels import quant as Q
from flexsparse.kernels import quant_attention

gen = torch.Generator("cuda").manual_seed(0)
ms = lambda f: cuda_ms(f, warmup=3, reps=10)
VARS = {64: [("base", False, {}), ("lmma", False, {"maxnreg": 0}), ("lmma", True, {"maxnreg": 0}), ("lmma cap168", True, {})],
        128: [("base", False, {}), ("lmma", True, {})]}
def run(flag, f):
    Q.L_MMA = flag
    try:
        return f()
    finally:
        Q.L_MMA = False
for d in (64, 128):
    for n in (1000, 777):
        q, k, v = (torch.randn(1, 3, n, d, device="cuda", dtype=torch.bfloat16, generator=gen) for _ in range(3))
        ref = torch.nn.functional.scaled_dot_product_attention(q.double(), k.double(), v.double())
        kept = torch.rand(1, 3, -(-n // 128), -(-n // 64), device="cuda", generator=gen) < 0.5
        kept[..., 0] = True
        for kw in ({}, {"causal": True}, {"kept": kept, "tile_n": 64}):
            a = quant_attention(q, k, v, **kw)
            b = run(True, functools.partial(quant_attention, q, k, v, **kw))
            r = Q.quant_reference(q, k, v, **kw) if kw.get("kept") is None else a
            print("check", d, n, list(kw), "lmma vs base", rel(b, a), "lmma vs ref", rel(b, r), "base vs ref", rel(a, r), "lmma vs fp64", rel(b, ref) if not kw else "", flush=True)
rows = []
def row(case, impl, t, ops, base):
    print(f"{case:24s} {impl:30s} {t:8.3f} ms {ops/t/1e9:6.0f} TOPS {base/t:5.2f}x", flush=True)
for name, (b, h, n, d) in {"D64 2x30x17776": (2, 30, 17776, 64), "D128 2x24x17776": (2, 24, 17776, 128)}.items():
    q, k, v = (torch.randn(b, h, n, d, device="cuda", dtype=torch.bfloat16, generator=gen) for _ in range(3))
    ops = 4.0 * b * h * n * n * d
    base = ms(functools.partial(cudnn, q, k, v))
    row(name, "cudnn", base, ops, base)
    for rnd in range(2):
        for label, flag, kw in VARS[d]:
            row(name, f"{label} {'L' if flag else ''} {kw} r{rnd}", run(flag, lambda: ms(functools.partial(quant_attention, q, k, v, **kw))), ops, base)
    del q, k, v
for name in RADIAL:
    model, decay = RADIAL[name][0], RADIAL[name][4]
    lay, n, q, k, v = radial_inputs(gen, name)
    b, h, _, d = q.shape
    ops = 4.0 * b * h * n * n * d
    base = ms(functools.partial(cudnn, q, k, v))
    row(name, "cudnn", base, ops, base)
    mask = masks.radial(lay, decay, model)
    for tile in ((128, 128), (128, 64)):
        bm = mask.block_mask(n, n, device="cuda", block_size=tile, noop=True)
        for rnd in range(2):
            for label, flag, kw in VARS[d]:
                row(name, f"{tile[1]} {label} {'L' if flag else ''} {kw} r{rnd}", run(flag, lambda: ms(functools.partial(quant_attention, q, k, v, block_mask=bm, **kw))), ops, base)
    for flag in (False, True):
        row(name, f"fs.attention auto L={flag}", run(flag, lambda: ms(functools.partial(fs.attention, q, k, v, mask=mask, backend="auto"))), ops, base)
    del q, k, v
    torch.cuda.empty_cache()
