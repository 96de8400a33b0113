"""``flexsparse show PATTERN``: build a pattern from flags or a spec file, print its density
and tile counts, and render it (``-o mask.png``)."""

from __future__ import annotations

import argparse
import time

from ..cli import UsageError
from . import _common as C

EXAMPLES = """examples:
  flexsparse show radial --video 49x480x720 --model cogvideox --decay 1.0 -o radial.png
  flexsparse show radial --frames 13 --tokens-per-frame 1350 --text 226 -o radial.png
  flexsparse show scenes --boundaries 0,5,9 --adjacency 110,111,011 -o scenes.png
  flexsparse show segments --segments 12:20,18,22:6 --generated 8 -o segments.png
  flexsparse show window --length 4096 --window 512 -o window.png
  flexsparse show --spec layout.yaml -o mask.svg
"""


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "show",
        help="render a pattern and print its density and tile counts",
        description="Build a sparse-attention pattern from flags or a JSON/YAML spec, print "
                    "its density and tile counts, and render it with -o.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    C.one_line_errors(p)
    p.add_argument("pattern", nargs="?", metavar="PATTERN",
                   help=f"one of: {', '.join(C.PATTERNS)} (or 'pattern' in --spec)")
    C.add_pattern_arguments(p)
    g = p.add_argument_group("picture")
    g.add_argument("-o", "--output", metavar="FILE",
                   help="write the picture (.png, .svg or .pdf); without it only the numbers "
                        "are printed")
    g.add_argument("--level", choices=("auto", "token", "block"), default="auto",
                   help="token: every pair; block: one cell per tile; auto: by size")
    g.add_argument("--tile", metavar="N", help="tile size for the counts and block level "
                   "(default 128)")
    g.add_argument("--head", metavar="H", default="0", help="head shown if the mask has heads")
    g.add_argument("--title", help="title of the picture")
    g.add_argument("--dpi", metavar="N", default="100", help="resolution (default 100)")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    opts = C.resolve_options(args, args.pattern)
    if args.output is not None and not args.output.lower().endswith((".png", ".svg", ".pdf")):
        raise UsageError(f"-o must end in .png, .svg or .pdf, got {args.output!r}")
    tile = C.parse_int("--tile", args.tile, minimum=1) if args.tile is not None else 128
    dpi = C.parse_int("--dpi", args.dpi, minimum=10)
    head = C.parse_int("--head", args.head)
    built = C.build(opts)
    mask = built.mask
    stats = mask.stats(built.q_len, built.kv_len, block_size=tile)
    rows = [
        ("pattern", mask.name),
        ("layout", built.description),
    ]
    if built.q_len != built.kv_len:
        rows.append(("queries", f"last {built.q_len:,} rows"))
    total = stats["total"]
    rows += [
        ("density", f"{stats['density']:.4f} of {built.q_len * built.kv_len:,} pairs"),
        ("tiles", f"{tile}x{tile}: {total:,} total, {stats['empty']:,} empty "
                  f"({stats['tiles_skipped']:.1%} skipped), {stats['partial']:,} partial, "
                  f"{stats['full']:,} full"),
    ]
    if args.output is not None:
        from .. import viz

        start = time.perf_counter()
        level = args.level
        fig = viz.plot_mask(
            mask, built.q_len, built.kv_len, layout=built.layout, level=level,
            path=args.output, title=args.title, block_size=tile if args.tile else None,
            head=head, scenes=built.scenes, scene_names=built.scene_names, dpi=dpi,
        )
        width, height = fig.canvas.get_width_height()
        rows.append(("wrote", f"{args.output} ({width}x{height} px, "
                              f"{time.perf_counter() - start:.1f} s)"))
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    return 0
