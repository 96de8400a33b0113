"""Time to build the BlockMask of a frame-structured mask: tile-rule path vs create_block_mask.

    python benchmarks/mask_build.py [--quick]

For each size, "first" is the first call in the process for that shape (including any
compilation) and "warm" the median of later calls on a *fresh* Mask object (no cache hit:
the tile rule really runs). ``create_block_mask`` is timed with ``_compile=True`` (the way
attention-gym recommends using it). The kept tiles of both are checked to be equal.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
from torch.nn.attention.flex_attention import create_block_mask

sys.path.insert(0, os.path.dirname(__file__))
from common import header, save, table, wall_ms  # noqa: E402

import flexsparse as fs  # noqa: E402
from flexsparse import masks  # noqa: E402

CONFIGS = [
    ("CogVideoX 49x480x720", (49, 480, 720, "cogvideox")),
    ("Wan 69x768x1280", (69, 768, 1280, "wan")),
    ("Hunyuan 117x768x1280", (117, 768, 1280, "hunyuan")),
]


def pattern_builders(layout):
    out = {"frame_window(2)": lambda: masks.frame_window(layout, 2)}
    if hasattr(masks, "radial"):
        model = {17776: "cogvideox", 69120: "wan"}.get(layout.length, "hunyuan")
        out["radial(block)"] = lambda: masks.radial(layout, model=model)
    return out


def kept_tiles(bm):
    return bm.to_dense().bool()


def measure(label: str, n: int, name: str, build, dev, reps: int) -> dict:
    def rule_path():
        return build().block_mask(n, n, device=dev)

    def cbm_path():
        return create_block_mask(mod, None, None, n, n, device=dev, _compile=True)

    first = wall_ms(rule_path)
    warm = wall_ms(rule_path, reps=reps)
    cached_mask = build()
    cached_mask.block_mask(n, n, device=dev)
    cached = wall_ms(lambda: cached_mask.block_mask(n, n, device=dev), reps=reps)
    mod = build().mask_mod_for(dev)
    cbm_first = wall_ms(cbm_path)
    cbm_warm = wall_ms(cbm_path, reps=max(3, reps // 4))
    same = bool(torch.equal(kept_tiles(rule_path()), kept_tiles(cbm_path())))
    return dict(
        config=label, tokens=n, pattern=name, density=build().density(n, n, device=dev),
        rule_first_ms=first, rule_warm_ms=warm, cached_ms=cached,
        cbm_first_ms=cbm_first, cbm_warm_ms=cbm_warm, same_tiles=same,
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    dev = torch.device("cuda")
    reps = 5 if args.quick else 20
    rows = []
    for label, (frames, h, w, model) in CONFIGS:
        layout = fs.VideoLayout.from_video(frames, h, w, model=model)
        for name, build in pattern_builders(layout).items():
            rows.append(measure(label, layout.length, name, build, dev, reps))
            print(rows[-1], flush=True)
            torch.cuda.empty_cache()
    cols = ["config", "tokens", "pattern", "density", "rule_first_ms", "rule_warm_ms",
            "cached_ms", "cbm_first_ms", "cbm_warm_ms", "same_tiles"]
    text = header("BlockMask construction") + "\n" + table(rows, cols)
    print(text)
    save("mask_build", rows, text)


if __name__ == "__main__":
    main()
