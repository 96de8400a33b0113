"""``fs.attention(backend="auto")`` against cuDNN dense and FlexAttention on the same mask.

    python benchmarks/attention.py [--quick] [--cases cogvideox,wan,hunyuan,meansim]
                                   [--no-crossover] [--results PATH]

Cases (bf16, one H100-filling shape each; heads chosen so that one call takes 5-100 ms):
- radial CogVideoX-2b 49 x 480 x 720 (17,776 tokens, decay 1.0): B=2 (CFG), H=30, D=64,
  the model's own shape.
- radial Wan 2.1 69 x 768 x 1280 (69,120 tokens, decay 0.2): B=1, H=12, D=128.
- radial HunyuanVideo 117 x 768 x 1280 (115,456 tokens, decay 0.95): B=1, H=8, D=128.
- meansim 0.6/0.98, 0.35/0.98 (~35 % skipped) and 0.3/0.9 on smooth, video-like
  CogVideoX-2b-shaped q/k
  (``benchmarks/meansim.py: video_like``), B=2, H=30, D=64: every row that uses the
  prediction includes the predictor's time (predict + bind + BlockMask).

Rows per case: cuDNN dense SDPA (the peer), ``auto`` (and what it picked), FlexAttention
compiled on the same BlockMask with flexsparse's tuned kernel options (``backend="flex"``)
and with torch's defaults, and ``backend="quant"`` where it can run the call. Accuracy on
256 sampled query rows of batch 0, all heads, against fp32: the masked reference for
radial, dense attention for meansim (what it approximates); relative L1 and L2.

The crossover table times FlexAttention (and quant where it runs) on random 128 x 64 tile
maps at CogVideoX-2b shapes against cuDNN: where a sparse map stops paying
(``flexsparse.attention.DENSE_CROSSOVER``).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, os.path.dirname(__file__))
from common import banded_tiles, queued_ms, time_ms, write_table  # noqa: E402,F401  (banded_tiles: old import path)

import flexsparse as fs  # noqa: E402
from flexsparse import backends, masks  # noqa: E402

RADIAL = {
    "cogvideox": dict(video=(49, 480, 720), model="cogvideox", decay=1.0, b=2, h=30, d=64),
    "wan": dict(video=(69, 768, 1280), model="wan", decay=0.2, b=1, h=12, d=128),
    "hunyuan": dict(video=(117, 768, 1280), model="hunyuan", decay=0.95, b=1, h=8, d=128),
}
MEANSIM = ((0.6, 0.98), (0.35, 0.98), (0.3, 0.9))
SAMPLE_ROWS = 256
COLUMNS = ["case", "kernel", "ms", "x cuDNN", "ms queued", "x cuDNN queued", "tiles skipped",
           "rel L1", "rel L2", "note"]


def cudnn(q, k, v):
    try:
        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
            return F.scaled_dot_product_attention(q, k, v)
    except RuntimeError:  # no cuDNN attention for this shape / build: flash
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            return F.scaled_dot_product_attention(q, k, v)


def sampled_error(out, q, k, v, mask) -> tuple[float, float]:
    """Relative L1 / L2 of ``out`` on ``SAMPLE_ROWS`` query rows of batch 0 against fp32
    attention with ``mask``'s rows (None: dense)."""
    n = q.shape[2]
    rows = torch.linspace(0, n - 1, min(SAMPLE_ROWS, n), device=q.device).long()
    qs, ks, vs = q[:1, :, rows].float(), k[:1].float(), v[:1].float()
    attn_mask = None
    if mask is not None:
        b, h = mask._batch_head_index(q.device, extra_dims=2)
        kv = torch.arange(n, device=q.device)[None, :]
        attn_mask = mask.mask_mod_for(q.device)(b, h, rows[:, None], kv).bool()
        attn_mask = attn_mask.expand(*mask._lead_shape(), rows.numel(), n)
        if mask.batch is not None:
            attn_mask = attn_mask[0]
    ref = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=attn_mask)
    if attn_mask is not None:
        ref = torch.where(attn_mask.any(-1, keepdim=True), ref, 0.0)
    diff = out[:1, :, rows].float() - ref
    return float(diff.abs().sum() / ref.abs().sum()), float(diff.norm() / ref.norm())


def skipped(bm) -> float:
    kept = int(bm.kv_num_blocks.sum()) + (
        0 if bm.full_kv_num_blocks is None else int(bm.full_kv_num_blocks.sum()))
    total = bm.kv_num_blocks.numel() * -(-bm.seq_lengths[1] // bm.BLOCK_SIZE[1])
    return 1 - kept / total


def run_case(name, q, k, v, mask, reps, rows, error_mask="same"):
    """Time every kernel on one case and append the rows."""
    dense_ms = time_ms(lambda: cudnn(q, k, v), warmup=2, reps=reps)
    dense_queued = queued_ms(lambda: cudnn(q, k, v), warmup=2, reps=reps)
    out = cudnn(q, k, v)
    ref_mask = None if error_mask == "dense" else mask
    dynamic = isinstance(mask, fs.DynamicMask)

    def add(kernel, ms, out, tiles=float("nan"), note="", fn=None):
        l1, l2 = sampled_error(out, q, k, v, ref_mask) if out is not None else (None, None)
        queued = queued_ms(fn, warmup=2, reps=reps) if fn is not None else None
        rows.append({"case": name, "kernel": kernel, "ms": ms, "x cuDNN": dense_ms / ms,
                     "ms queued": queued,
                     "x cuDNN queued": None if queued is None else dense_queued / queued,
                     "tiles skipped": tiles, "rel L1": l1, "rel L2": l2, "note": note})
        print(rows[-1], flush=True)

    # cuDNN is exact only for a mask that keeps everything: its error row measures the mask
    add("cuDNN dense", dense_ms, out, 0.0, "peer", lambda: cudnn(q, k, v))
    bound = mask.bind(q, k) if dynamic else mask
    bm = bound.block_mask(q.shape[2], device=q.device, heads=bound.heads, batch=bound.batch,
                          block_size=bound.native_block_size or 128)
    tiles = skipped(bm)
    if dynamic:
        pred_ms = time_ms(lambda: mask.bind(q, k), warmup=2, reps=reps)
        add("meansim predictor", pred_ms, None, tiles, "predict + bind alone")
    choice = fs.explain(q, k, v, mask)
    note = f"picked {choice.backend}" + ("; prediction dropped" if choice.notes else "")
    add("auto", time_ms(lambda: fs.attention(q, k, v, mask), warmup=2, reps=reps),
        fs.attention(q, k, v, mask), tiles, note, lambda: fs.attention(q, k, v, mask))
    add("flex (tuned)", time_ms(lambda: fs.attention(q, k, v, mask, backend="flex"),
                                warmup=2, reps=reps),
        fs.attention(q, k, v, mask, backend="flex"), tiles,
        fn=lambda: fs.attention(q, k, v, mask, backend="flex"))
    compiled = backends.compiled_flex()

    def flex_default(predict: bool):
        m = mask.bind(q, k) if dynamic and predict else bound  # a prediction counts
        b = m.block_mask(q.shape[2], device=q.device, heads=m.heads, batch=m.batch,
                         block_size=m.native_block_size or 128)
        # torch's default tiles must divide the map's: only BLOCK_N is narrowed for 128x64
        opts = {"BLOCK_N": b.BLOCK_SIZE[1]} if b.BLOCK_SIZE[1] < 128 else None
        return compiled(q, k, v, block_mask=b, kernel_options=opts)

    try:
        add("flex (torch defaults)", time_ms(lambda: flex_default(True), warmup=2, reps=reps),
            flex_default(False), tiles)
    except Exception as exc:  # noqa: BLE001 - report and go on
        add("flex (torch defaults)", float("nan"), None, tiles, type(exc).__name__)
    try:
        fs.explain(q, k, v, mask, backend="quant")
    except ValueError as exc:
        rows.append({"case": name, "kernel": "quant", "note": f"n/a: {str(exc)[:80]}"})
        return
    add("quant", time_ms(lambda: fs.attention(q, k, v, mask, backend="quant"), warmup=2,
                         reps=reps),
        fs.attention(q, k, v, mask, backend="quant"), tiles,
        fn=lambda: fs.attention(q, k, v, mask, backend="quant"))


def crossover(reps: int) -> list[dict]:
    """FlexAttention (and quant) on random 128 x 64 tile maps vs cuDNN at CogVideoX-2b."""
    b, h, n, d = 2, 30, 17776, 64
    g = torch.Generator(device="cuda").manual_seed(1)
    q, k, v = (torch.randn(b, h, n, d, device="cuda", dtype=torch.bfloat16, generator=g)
               for _ in range(3))
    dense_ms = time_ms(lambda: cudnn(q, k, v), warmup=2, reps=reps)
    qb, kb = -(-n // 128), -(-n // 64)
    out = []
    for frac in (0.3, 0.45, 0.6, 0.75, 0.9, 1.0):
        kept = torch.rand(b, h, qb, kb, device="cuda", generator=g) < frac
        mask = fs.Mask.from_tiles(kept, (128, 64), length=n)
        mask.native_block_size = (128, 64)
        row = {"kept": float(kept.float().mean()), "cuDNN ms": dense_ms}
        row["flex ms"] = time_ms(lambda m=mask: fs.attention(q, k, v, m, backend="flex"),
                                 warmup=2, reps=reps)
        row["flex x cuDNN"] = dense_ms / row["flex ms"]
        try:
            fs.explain(q, k, v, mask, backend="quant")
            row["quant ms"] = time_ms(
                lambda m=mask: fs.attention(q, k, v, m, backend="quant"), warmup=2, reps=reps)
            row["quant x cuDNN"] = dense_ms / row["quant ms"]
        except ValueError:
            pass
        out.append(row)
        print(row, flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="fewer repetitions")
    ap.add_argument("--cases", default="cogvideox,wan,hunyuan,meansim")
    ap.add_argument("--no-crossover", action="store_true")
    ap.add_argument("--results", default=None, help="append the markdown tables here")
    args = ap.parse_args()
    reps = 5 if args.quick else 10
    t0 = time.perf_counter()
    rows: list[dict] = []
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    for case in cases:
        if case in RADIAL:
            c = RADIAL[case]
            layout = fs.VideoLayout.from_video(*c["video"], model=c["model"])
            mask = masks.radial(layout, decay_factor=c["decay"], model=c["model"])
            g = torch.Generator(device="cuda").manual_seed(0)
            q, k, v = (torch.randn(c["b"], c["h"], layout.length, c["d"], device="cuda",
                                   dtype=torch.bfloat16, generator=g) for _ in range(3))
            name = (f"radial {case} {c['video'][0]}f, {layout.length:,} tok, "
                    f"B={c['b']} H={c['h']} D={c['d']}")
            run_case(name, q, k, v, mask, reps, rows)
            del q, k, v
        elif case == "meansim":
            from meansim import video_like

            q, k, v = video_like(0, torch.device("cuda"))
            for sim, cdf in MEANSIM:
                mask = masks.meansim(sim, cdfthreshd=cdf)
                name = f"meansim {sim}/{cdf}, {q.shape[2]:,} tok, B=2 H=30 D=64"
                run_case(name, q, k, v, mask, reps, rows, error_mask="dense")
        else:
            raise SystemExit(f"--cases: unknown case {case!r}; allowed: "
                             f"{', '.join([*RADIAL, 'meansim'])}")
        torch.cuda.empty_cache()
    notes = [
        "ms: median of CUDA-event timings after 2 warm-up calls, the GPU synchronised after "
        "each call (host time before the first launch counts); x cuDNN: cuDNN dense ms / ms.",
        "ms queued: the same calls queued back to back, no synchronisation between them "
        "(triton.testing.do_bench's method; host time overlaps the GPU work before it, as "
        "in a model's forward pass); x cuDNN queued: against cuDNN timed the same way.",
        "meansim rows (auto, flex, torch defaults, quant) include the predictor "
        "(predict + bind + BlockMask); the 'meansim predictor' row is that part alone.",
        f"rel L1 / L2: {SAMPLE_ROWS} query rows of batch 0, all heads, vs fp32 attention "
        "with the same mask (radial) or dense (meansim; cuDNN's row is then its own "
        "bf16 error).",
        f"wall time of the script: {time.perf_counter() - t0:.0f} s before the crossover.",
    ]
    write_table(args.results, rows, COLUMNS, "fs.attention(auto) vs cuDNN and FlexAttention",
                notes)
    if not args.no_crossover:
        cross = crossover(reps)
        cols = ["kept", "cuDNN ms", "flex ms", "flex x cuDNN", "quant ms", "quant x cuDNN"]
        write_table(args.results, cross, cols,
                    "Crossover: random 128x64 tile maps, B=2 H=30 N=17776 D=64",
                    ["kept: fraction of 128x64 tiles computed (random per batch and head).",
                     f"total wall time: {time.perf_counter() - t0:.0f} s."])


if __name__ == "__main__":
    main()
