"""CogVideoX-2b-shaped transformer: stock attention (SDPA) vs radial attention through
flexsparse, one transformer forward and the attention alone.

    python benchmarks/cogvideox.py [--quick] [--frames 49 97]

Model: ``CogVideoXTransformer3DModel`` with the CogVideoX-2b config (30 blocks, 30 heads x
64, hidden 1920, text length 226, sincos positions), random weights built on the GPU in
bf16 (no download). Batch 2 (CFG), 480 x 720: 49 frames = 13 latent frames = 17,776
tokens, 97 frames = 25 latent frames = 33,976 tokens.

Rows per frame count:
- ``forward stock``: the transformer with diffusers' own processor (SDPA; the kernel
  SDPA picks, cuDNN or flash on an H100);
- ``forward radial/<backend>``: ``flexsparse.models.cogvideox.patch(pattern="radial")``
  on every block (no dense layers / steps), backend ``flex`` and ``quant`` (when the
  quantized kernel loads);
- ``attention sdpa`` / ``attention radial/<backend>``: one attention call at the same
  shape (``[2, 30, N, 64]`` bf16).
Times: median of CUDA-event timings after warm-up (compilation excluded). Speedup is
against the stock / SDPA row of the same frame count.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import time_ms  # noqa: E402

COGVIDEOX_2B = dict(
    num_attention_heads=30, attention_head_dim=64, in_channels=16, out_channels=16,
    time_embed_dim=512, text_embed_dim=4096, num_layers=30, sample_width=90, sample_height=60,
    sample_frames=49, patch_size=2, max_text_seq_length=226, temporal_compression_ratio=4,
    use_rotary_positional_embeddings=False,
)
HEIGHT, WIDTH, BATCH = 480, 720, 2


def build_transformer():
    from diffusers import CogVideoXTransformer3DModel

    with torch.device("cuda"):
        model = CogVideoXTransformer3DModel(**COGVIDEOX_2B)
    return model.to(torch.bfloat16).eval()


def quant_available(q, k, v, mask) -> str | None:
    """None when backend="quant" can run this call, else the reason it cannot."""
    import flexsparse as fs

    try:
        fs.explain(q, k, v, mask, backend="quant")
    except (ValueError, ImportError, RuntimeError) as exc:
        return str(exc)
    return None


def attention_rows(row, mask, density, n, warmup, reps, g) -> str | None:
    """Time SDPA and the radial mask on flex (and quant); returns why quant was skipped."""
    import flexsparse as fs

    q, k, v = (torch.randn(BATCH, 30, n, 64, generator=g, device="cuda", dtype=torch.bfloat16)
               for _ in range(3))
    sdpa = torch.nn.functional.scaled_dot_product_attention
    base = time_ms(lambda: sdpa(q, k, v), warmup, reps * 3)
    row("attention sdpa", base, base, 1.0)
    why_not_quant = quant_available(q, k, v, mask)
    for backend in ["flex"] + (["quant"] if why_not_quant is None else []):
        ms = time_ms(lambda b=backend: fs.attention(q, k, v, mask, backend=b), warmup + 1,
                     reps * 3)
        row(f"attention radial/{backend}", ms, base, density)
    return why_not_quant


def bench_frames(model, frames: int, warmup: int, reps: int, decay: float) -> list[dict]:
    from flexsparse.models import cogvideox

    layout = cogvideox.layout_for(model, frames, HEIGHT, WIDTH)
    n = layout.length
    rows: list[dict] = []
    g = torch.Generator("cuda").manual_seed(0)
    lat = torch.randn(BATCH, layout.frames, 16, HEIGHT // 8, WIDTH // 8, generator=g,
                      device="cuda", dtype=torch.bfloat16)
    text = torch.randn(BATCH, layout.text_tokens, 4096, generator=g, device="cuda",
                       dtype=torch.bfloat16)
    timestep = torch.full((BATCH,), 500, device="cuda")

    def forward():
        with torch.no_grad():
            return model(lat, text, timestep, return_dict=False)[0]

    def row(name, ms, base, density=None, note=""):
        rows.append(dict(name=name, frames=frames, tokens=n, ms=round(ms, 2),
                         speedup=round(base / ms, 3) if base else None,
                         density=None if density is None else round(density, 4), note=note))
        print(f"  {name:28s} {frames:3d} frames {ms:9.2f} ms", file=sys.stderr)

    # -- attention alone -------------------------------------------------------------------
    mask = cogvideox.build_mask(layout, "radial", decay_factor=decay)
    density = mask.density()
    why_not_quant = attention_rows(row, mask, density, n, warmup, reps, g)
    backends = ["flex"] + (["quant"] if why_not_quant is None else [])
    if why_not_quant is not None:
        rows.append(dict(name="attention radial/quant", frames=frames, tokens=n, ms=None,
                         speedup=None, density=round(density, 4),
                         note=f"skipped: {why_not_quant}"))

    # -- one transformer forward -------------------------------------------------------------
    cogvideox.unpatch(model)
    base = time_ms(forward, warmup, reps)
    row("forward stock (sdpa)", base, base, 1.0)
    for backend in backends:
        cogvideox.patch(model, pattern="radial", num_frames=frames, height=HEIGHT, width=WIDTH,
                        decay_factor=decay, backend=backend)
        ms = time_ms(forward, warmup + 1, reps)  # +1: compiles flex for the shape
        row(f"forward radial/{backend}", ms, base, density)
        cogvideox.unpatch(model)
    if why_not_quant is not None:
        rows.append(dict(name="forward radial/quant", frames=frames, tokens=n, ms=None,
                         speedup=None, density=round(density, 4),
                         note=f"skipped: {why_not_quant}"))
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats")
    parser.add_argument("--frames", type=int, nargs="+", default=[49, 97])
    parser.add_argument("--decay", type=float, default=1.0)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("benchmarks/cogvideox.py needs CUDA", file=sys.stderr)
        return 1
    try:
        import diffusers  # noqa: F401
    except ImportError:
        print("benchmarks/cogvideox.py: diffusers is not installed; nothing to run",
              file=sys.stderr)
        return 0
    warmup, reps = (1, 2) if args.quick else (2, 5)
    model = build_transformer()
    rows = []
    for frames in args.frames:
        rows += bench_frames(model, frames, warmup, reps, args.decay)
        torch.cuda.empty_cache()

    device = torch.cuda.get_device_name()
    command = "python benchmarks/cogvideox.py" + (" --quick" if args.quick else "")
    date = datetime.date.today().isoformat()
    print(f"\n`{command}` on {device}, torch {torch.__version__}, {date}\n")
    print("| row | frames | tokens | density | ms | speedup | note |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        ms = "-" if r["ms"] is None else f"{r['ms']:.2f}"
        sp = "-" if r["speedup"] is None else f"{r['speedup']:.2f}x"
        dens = "-" if r["density"] is None else f"{r['density']:.3f}"
        print(f"| {r['name']} | {r['frames']} | {r['tokens']} | {dens} | {ms} | {sp} | "
              f"{r['note']} |")
    out = os.environ.get("OUT")
    if out:
        os.makedirs(out, exist_ok=True)
        meta = dict(command=command, device=device, torch=torch.__version__, date=date)
        with open(os.path.join(out, "cogvideox.json"), "w") as f:
            json.dump(dict(meta=meta, rows=rows), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
