"""``fs.attention(backend="auto")`` against cuDNN dense and FlexAttention on the same mask.

    python benchmarks/attention.py [--quick] [--cases cogvideox,wan,hunyuan,meansim]
                                   [--rounds R] [--no-crossover] [--results PATH]

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
and with torch's defaults, ``backend="quant"`` where it can run the call, and on an sm_90
GPU the same call on the Triton kernel (``sm90.MODE = "off"``), timed in the same rounds.
Accuracy on 256 sampled query rows of batch 0, all heads, against fp32: the masked reference for
radial, dense attention for meansim (what it approximates); relative L1 and L2.

The crossover table times FlexAttention (and quant where it runs) on random 128 x 64 tile
maps at CogVideoX-2b shapes against cuDNN: where a sparse map stops paying
(``flexsparse.attention.DENSE_CROSSOVER``).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from unittest import mock

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(__file__))
from common import banded_tiles, cudnn, queued_ms, time_ms, write_table  # noqa: E402,F401  (banded_tiles, cudnn: old import paths)

import flexsparse as fs  # noqa: E402
from flexsparse import backends, masks  # noqa: E402
from flexsparse.kernels import sm90  # noqa: E402

RADIAL = {
    "cogvideox": dict(video=(49, 480, 720), model="cogvideox", decay=1.0, b=2, h=30, d=64),
    "wan": dict(video=(69, 768, 1280), model="wan", decay=0.2, b=1, h=12, d=128),
    "hunyuan": dict(video=(117, 768, 1280), model="hunyuan", decay=0.95, b=1, h=8, d=128),
}
MEANSIM = ((0.6, 0.98), (0.35, 0.98), (0.3, 0.9))
SAMPLE_ROWS = 256
COLUMNS = ["case", "kernel", "ms", "x cuDNN", "ms queued", "x cuDNN queued", "tiles skipped",
           "rel L1", "rel L2", "note"]


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


def triton_only(fn):
    """``fn`` with the Hopper kernel switched off: the quant backend runs Triton's."""
    return mock.patch.object(sm90, "MODE", "off")(fn)


def run_case(name, q, k, v, mask, reps, rows, rounds=1, error_mask="same"):
    """Time every kernel on one case and append the rows. With ``rounds`` > 1 the kernels
    are timed in turn, round after round, and each row gives the median round: the
    card's clock drifts under sustained load (one H100 gave cuDNN 46.4 ms, then 53.2 ms
    within one run), so kernels timed in one block each would compare different clocks."""
    ref_mask = None if error_mask == "dense" else mask
    dynamic = isinstance(mask, fs.DynamicMask)
    bound = mask.bind(q, k) if dynamic else mask
    bm = bound.block_mask(q.shape[2], device=q.device, heads=bound.heads, batch=bound.batch,
                          block_size=bound.native_block_size or 128)
    tiles = skipped(bm)
    compiled = backends.compiled_flex()

    def flex_default(predict: bool):
        m = mask.bind(q, k) if dynamic and predict else bound  # a prediction counts
        b = m.block_mask(q.shape[2], device=q.device, heads=m.heads, batch=m.batch,
                         block_size=m.native_block_size or 128)
        # torch's default tiles must divide the map's: only BLOCK_N is narrowed for 128x64
        opts = {"BLOCK_N": b.BLOCK_SIZE[1]} if b.BLOCK_SIZE[1] < 128 else None
        return compiled(q, k, v, block_mask=b, kernel_options=opts)

    choice = fs.explain(q, k, v, mask)
    # (kernel, timed call, output for the error columns, note, also on the queued clock)
    entries = [("cuDNN dense", lambda: cudnn(q, k, v), lambda: cudnn(q, k, v), "peer", True)]
    if dynamic:
        entries.append(("meansim predictor", lambda: mask.bind(q, k), None,
                        "predict + bind alone", False))
    entries += [
        ("auto", lambda: fs.attention(q, k, v, mask), lambda: fs.attention(q, k, v, mask),
         f"picked {choice.backend}" + ("; prediction dropped" if choice.notes else ""), True),
        ("flex (tuned)", lambda: fs.attention(q, k, v, mask, backend="flex"),
         lambda: fs.attention(q, k, v, mask, backend="flex"), "", True),
        ("flex (torch defaults)", lambda: flex_default(True), lambda: flex_default(False), "",
         False),
    ]
    try:
        fs.explain(q, k, v, mask, backend="quant")
        entries.append(("quant", lambda: fs.attention(q, k, v, mask, backend="quant"),
                        lambda: fs.attention(q, k, v, mask, backend="quant"), "", True))
        if not sm90.device_reasons(q, v):  # the Triton kernel, for the same-run comparison
            run_triton = triton_only(lambda: fs.attention(q, k, v, mask, backend="quant"))
            entries.append(("quant (Triton kernel)", run_triton, run_triton, "", True))
            if "Hopper" in fs.explain(q, k, v, mask, backend="quant").reason and (
                sm90.CONSUMERS.get(q.shape[-1]) == 3
            ):  # the previous layout of the Hopper kernel, same run
                two = mock.patch.dict(sm90.CONSUMERS, {q.shape[-1]: 2})(
                    lambda: fs.attention(q, k, v, mask, backend="quant"))
                entries.append(("quant (sm90, 2 warpgroups)", two, two, "", True))
    except ValueError as exc:
        quant_na = f"n/a: {str(exc)[:80]}"
    else:
        quant_na = None
    sync: dict[str, list[float]] = {e[0]: [] for e in entries}
    queued: dict[str, list[float]] = {e[0]: [] for e in entries}
    failed: dict[str, str] = {}
    for _ in range(rounds):
        for kernel, fn, _, _, with_queued in entries:
            if kernel in failed:
                continue
            try:
                sync[kernel].append(time_ms(fn, warmup=2, reps=reps))
                if with_queued:
                    queued[kernel].append(queued_ms(fn, warmup=2, reps=reps))
            except Exception as exc:  # noqa: BLE001 - report and go on
                failed[kernel] = type(exc).__name__
    dense_ms = statistics.median(sync["cuDNN dense"])
    dense_queued = statistics.median(queued["cuDNN dense"])
    for kernel, _, out_fn, note, _ in entries:
        if kernel in failed:
            rows.append({"case": name, "kernel": kernel, "tiles skipped": tiles,
                         "note": failed[kernel]})
            continue
        ms = statistics.median(sync[kernel])
        ms_q = statistics.median(queued[kernel]) if queued[kernel] else None
        l1, l2 = (sampled_error(out_fn(), q, k, v, ref_mask) if out_fn is not None
                  else (None, None))
        rows.append({"case": name, "kernel": kernel, "ms": ms, "x cuDNN": dense_ms / ms,
                     "ms queued": ms_q,
                     "x cuDNN queued": None if ms_q is None else dense_queued / ms_q,
                     "tiles skipped": 0.0 if kernel == "cuDNN dense" else tiles,
                     "rel L1": l1, "rel L2": l2, "note": note})
        print(rows[-1], flush=True)
    if quant_na is not None:
        rows.append({"case": name, "kernel": "quant", "note": quant_na})


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
    ap.add_argument("--rounds", type=int, default=1,
                    help="time the kernels of a case in turn this many times (median)")
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
            run_case(name, q, k, v, mask, reps, rows, args.rounds)
            del q, k, v
        elif case == "meansim":
            from meansim import video_like

            q, k, v = video_like(0, torch.device("cuda"))
            for sim, cdf in MEANSIM:
                mask = masks.meansim(sim, cdfthreshd=cdf)
                name = f"meansim {sim}/{cdf}, {q.shape[2]:,} tok, B=2 H=30 D=64"
                run_case(name, q, k, v, mask, reps, rows, args.rounds, error_mask="dense")
        else:
            raise SystemExit(f"--cases: unknown case {case!r}; allowed: "
                             f"{', '.join([*RADIAL, 'meansim'])}")
        torch.cuda.empty_cache()
    notes = [
        "ms: median of CUDA-event timings after 2 warm-up calls, the GPU synchronised after "
        "each call (host time before the first launch counts); x cuDNN: cuDNN dense ms / ms.",
        f"rounds: {args.rounds} (the kernels of a case timed in turn; each figure is the "
        "median round).",
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
