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

    python benchmarks/densities.py --diagonal

counts, for the standard configurations, the tiles that ``keep_diagonal=True`` (the
default) adds to the published block map at block 128, and the video query tokens that
see no key of their own frame in the published map (from the map and the layout, no
``N x N`` work).
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
from flexsparse.masks.radial import blind_tokens  # noqa: E402

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


DIAGONAL_CONFIGS = [
    ("CogVideoX-2b 49x480x720", (49, 480, 720, "cogvideox"), 1.0),
    ("CogVideoX 97x480x720", (97, 480, 720, "cogvideox"), 1.0),
    ("CogVideoX1.5 81x768x1360", (81, 768, 1360, "cogvideox1.5"), 1.0),
    ("HunyuanVideo 117x768x1280", (117, 768, 1280, "hunyuan"), 0.95),
    ("Wan2.1 81x720x1280", (81, 720, 1280, "wan2.1"), 0.2),
]


def diagonal_rows() -> list[dict]:
    rows = []
    for label, (frames, h, w, preset), decay in DIAGONAL_CONFIGS:
        for position in ("start", "end"):
            layout = fs.VideoLayout.from_video(frames, h, w, model=preset)
            if layout.text_tokens == 0 and position == "start":
                continue
            layout = fs.VideoLayout(layout.frames, layout.tokens_per_frame,
                                    layout.text_tokens, position)
            n = layout.length
            old = masks.radial(layout, decay, preset, BLOCK, keep_diagonal=False)
            new = masks.radial(layout, decay, preset, BLOCK)
            old_map, new_map = old.block_map(n, n, BLOCK), new.block_map(n, n, BLOCK)
            rows.append(dict(
                config=label, decay=decay, text=f"{layout.text_tokens} {position}",
                tokens=n, tiles=old_map.numel(), kept_published=int(old_map.sum()),
                tiles_added=int((new_map & ~old_map).sum()),
                blind_published=blind_tokens(old_map, layout, BLOCK),
                blind_kept_diagonal=blind_tokens(new_map, layout, BLOCK),
            ))
            print(rows[-1], flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="skip HunyuanVideo")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--diagonal", action="store_true",
                    help="tiles keep_diagonal adds at the standard configurations")
    args = ap.parse_args()
    if args.diagonal:
        rows = diagonal_rows()
        cols = ["config", "decay", "text", "tokens", "tiles", "kept_published",
                "tiles_added", "blind_published", "blind_kept_diagonal"]
        text = (header("Radial keep_diagonal: tiles added to the published map (block 128)")
                + "\n" + table(rows, cols))
        print("\n" + text)
        save("radial_keep_diagonal", rows, text)
        return
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
