"""Densities of the radial pattern at the video sizes of the mission (CPU, seconds).

    python benchmarks/densities.py [--quick] [--device cpu|cuda]

For CogVideoX-2b (49 x 480 x 720), Wan 2.1 (69 x 768 x 1280, δ = 0.2) and HunyuanVideo
(117 x 768 x 1280, δ = 0.95): the original's block map at block 128 (``granularity=
"block"``: fraction of (query, key) pairs computed, tiles skipped) and the exact token
rule (``granularity="token"``: fraction of pairs kept, tiles skipped at block 128). The
token density is counted in closed form per frame pair (a band ``|i - j| <= w`` in a
``T x T`` square keeps ``T + 2 * sum_{k=1..w} (T - k)`` pairs), checked against
``Mask.density`` on a small layout first. Bounded memory: no ``N x N`` tensor.
``--quick`` skips HunyuanVideo. Results go to docs/densities.md.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import header, save, table  # noqa: E402

import flexsparse as fs  # noqa: E402
from flexsparse import masks  # noqa: E402
from flexsparse import tiles as T  # noqa: E402

CONFIGS = [
    # label, (frames, height, width, model), decay factor
    ("CogVideoX-2b 49x480x720", (49, 480, 720, "cogvideox"), 1.0),
    ("Wan 2.1 69x768x1280", (69, 768, 1280, "wan"), 0.2),
    ("HunyuanVideo 117x768x1280", (117, 768, 1280, "hunyuan"), 0.95),
]
BLOCK = 128


def band_pairs(t: int, w: int) -> int:
    """Pairs (i, j) in a t x t square with |i - j| <= w."""
    w = min(w, t - 1)
    return t + 2 * (w * t - w * (w + 1) // 2)


def token_density(layout: fs.VideoLayout, model: str, decay: float, block: int) -> float:
    """Exact density of ``radial(..., granularity="token")`` without materialising it."""
    radial_mod = sys.modules["flexsparse.masks.radial"]
    tab = radial_mod.radial_tables(layout, model, decay, block)
    t, frames, n = layout.tokens_per_frame, layout.frames, layout.length
    kept = n * n - layout.video_tokens**2  # every pair that involves a text token
    for fq in range(frames):
        for fk in range(frames):
            d = abs(fq - fk)
            if tab.sink and fk == 0:
                kept += t * t
            elif tab.keep[d]:
                kept += band_pairs(t, tab.width[d])
    return kept / (n * n)


def check_closed_form() -> None:
    for layout, model in [
        (fs.VideoLayout(4, 150, 9, "start"), "cogvideox"),
        (fs.VideoLayout(5, 130, 0, "end"), "wan"),
        (fs.VideoLayout(3, 200, 11, "end"), "hunyuan"),
    ]:
        mask = masks.radial(layout, 0.5, model, 16, "token")
        exact = mask.to_dense().double().mean().item()
        got = token_density(layout, model, 0.5, 16)
        if abs(exact - got) > 1e-12:
            raise AssertionError(f"closed-form density {got} != dense {exact} for {layout}")


def measure(label: str, layout: fs.VideoLayout, model: str, decay: float, device) -> dict:
    n = layout.length
    t0 = time.perf_counter()
    block = masks.radial(layout, decay, model, BLOCK)
    states = block.tile_states(n, n, BLOCK, device=device)
    build_ms = (time.perf_counter() - t0) * 1e3
    token = masks.radial(layout, decay, model, BLOCK, "token")
    tstates = token.tile_states(n, n, BLOCK, device=device)
    counts, tcounts = T.summary(states), T.summary(tstates)
    return dict(
        config=label,
        model=model,
        decay=decay,
        tokens=n,
        frames=f"{layout.frames} x {layout.tokens_per_frame} + {layout.text_tokens} text",
        block_density=block.density(n, n, device=device),
        tiles_skipped=counts["empty"] / counts["total"],
        token_density=token_density(layout, model, decay, BLOCK),
        token_tiles_skipped=tcounts["empty"] / tcounts["total"],
        token_partial_tiles=tcounts["partial"] / tcounts["total"],
        block_map_ms=build_ms,
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="skip HunyuanVideo")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    check_closed_form()
    rows = []
    for label, (frames, h, w, model), decay in CONFIGS[: 2 if args.quick else 3]:
        layout = fs.VideoLayout.from_video(frames, h, w, model=model)
        rows.append(measure(label, layout, model, decay, torch.device(args.device)))
        print(rows[-1], flush=True)
    cols = ["config", "decay", "tokens", "frames", "block_density", "tiles_skipped",
            "token_density", "token_tiles_skipped", "token_partial_tiles", "block_map_ms"]
    text = header("Radial attention densities (block 128)") + "\n" + table(rows, cols)
    print("\n" + text)
    save("densities", rows, text)


if __name__ == "__main__":
    main()
