"""Time to build the BlockMask of a frame-structured mask: tile-rule path vs create_block_mask.

    python benchmarks/mask_build.py [--quick]

For each size, "first" is the first call in the process for that shape (including any
compilation) and "warm" the median of later calls on a *fresh* Mask object (no cache hit:
the tile rule really runs). ``create_block_mask`` is timed with ``_compile=True`` (the way
attention-gym recommends using it). The kept tiles of both are checked to be equal.

A second table splits the radial build into its stages: the block map, the lowering of
tile states to a BlockMask (``tiles.to_block_mask``: direct construction, ``noop_mask``
for block-granular maps) and, for comparison in the same run, torch's
``BlockMask.from_kv_blocks`` on the same ordered tiles (which derives the query side
through a dense round trip).
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
from torch.nn.attention.flex_attention import BlockMask, create_block_mask

sys.path.insert(0, os.path.dirname(__file__))
from common import header, save, table, wall_ms  # noqa: E402

import flexsparse as fs  # noqa: E402
from flexsparse import masks  # noqa: E402
from flexsparse import tiles as T  # noqa: E402
from flexsparse.layout import MODEL_PRESETS  # noqa: E402
from flexsparse.masks.radial import radial_block_map, radial_tables  # noqa: E402

CONFIGS = [  # label, (frames, height, width, preset), radial decay
    ("CogVideoX 49x480x720", (49, 480, 720, "cogvideox"), 1.0),
    ("Wan2.1 81x720x1280", (81, 720, 1280, "wan2.1"), 0.2),
    ("Hunyuan 117x768x1280", (117, 768, 1280, "hunyuan"), 0.95),
]


def pattern_builders(layout, preset, decay, radial_only=False):
    out = {"radial(block)": lambda: masks.radial(layout, decay, model=preset)}
    if not radial_only:
        out["frame_window(2)"] = lambda: masks.frame_window(layout, 2)
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
        noop=rule_path().mask_mod.__name__ == "noop_mask",
    )


def stages(label: str, layout, preset: str, decay: float, dev, reps: int) -> dict:
    """Warm time of each stage of a radial BlockMask build at 128 x 128 tiles."""
    n, model = layout.length, MODEL_PRESETS[preset]["radial"]
    tables = radial_tables(layout, model, decay, 128)
    kept = radial_block_map(layout, tables, 128, dev, keep_diagonal=True)
    states = kept.to(torch.int8) * T.FULL
    mod = masks.radial(layout, decay, model=preset).mask_mod_for(dev)

    def torch_lowering():
        s4 = states[None, None]
        return BlockMask.from_kv_blocks(
            *T._ordered(s4 == T.PARTIAL), *T._ordered(s4 == T.FULL), BLOCK_SIZE=128,
            mask_mod=mod, seq_lengths=(n, n))

    return dict(
        config=label, tokens=n, tiles=kept.numel(),
        map_ms=wall_ms(lambda: radial_block_map(layout, tables, 128, dev, True), reps=reps),
        lowering_ms=wall_ms(lambda: T.to_block_mask(states, mod, n, n, 128, 128), reps=reps),
        from_kv_blocks_ms=wall_ms(torch_lowering, reps=reps),
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--radial-only", action="store_true", help="skip frame_window")
    args = ap.parse_args()
    dev = torch.device("cuda")
    reps = 5 if args.quick else 20
    rows, split = [], []
    for label, (frames, h, w, preset), decay in CONFIGS:
        layout = fs.VideoLayout.from_video(frames, h, w, model=preset)
        for name, build in pattern_builders(layout, preset, decay, args.radial_only).items():
            rows.append(measure(label, layout.length, name, build, dev, reps))
            print(rows[-1], flush=True)
        split.append(stages(label, layout, preset, decay, dev, reps))
        print(split[-1], flush=True)
        torch.cuda.empty_cache()
    cols = ["config", "tokens", "pattern", "density", "rule_first_ms", "rule_warm_ms",
            "cached_ms", "cbm_first_ms", "cbm_warm_ms", "same_tiles", "noop"]
    text = (header("BlockMask construction") + "\n" + table(rows, cols) + "\n\n"
            + "Radial build by stage (warm, median ms)\n\n"
            + table(split, ["config", "tokens", "tiles", "map_ms", "lowering_ms",
                            "from_kv_blocks_ms"]))
    print(text)
    save("mask_build", rows + split, text)


if __name__ == "__main__":
    main()
