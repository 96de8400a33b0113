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
  flexsparse show tuned params.safetensors --field cdfthreshd -o heads.png
  flexsparse show segments --tokenizer DIR --prompt-json question.json -o packed.png
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
    p.add_argument("file", nargs="?", metavar="FILE",
                   help="for 'show tuned': a parameter file (ours or SpargeAttn's .pt)")
    C.add_pattern_arguments(p)
    t = p.add_argument_group("tuned parameters and packed prompts")
    t.add_argument("--field", default="sparsity",
                   choices=("sparsity", "cdfthreshd", "simthreshd1", "pvthreshd", "is_sparse"),
                   help="for 'show tuned': the per-head value drawn (default sparsity)")
    t.add_argument("--tokenizer", metavar="DIR",
                   help="for 'show segments': tokenizer of the packed prompt (local directory)")
    t.add_argument("--prompt-json", metavar="FILE",
                   help="for 'show segments': {\"prefix\": str, \"paraphrases\": [str, ...], "
                        "\"suffix\": str}, packed exactly as the self-ensemble packs it")
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
    if args.pattern == "tuned":
        return _show_tuned(args)
    if args.pattern == "segments" and (args.tokenizer or args.prompt_json):
        return _show_packed_prompt(args)
    if args.file is not None:
        raise UsageError(f"unexpected argument {args.file!r} (a FILE goes with 'show tuned')")
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


def _check_output(path: str | None) -> None:
    if path is not None and not path.lower().endswith((".png", ".svg", ".pdf")):
        raise UsageError(f"-o must end in .png, .svg or .pdf, got {path!r}")


def _show_tuned(args: argparse.Namespace) -> int:
    """``show tuned FILE``: summary of tuned per-head parameters and a layers x heads map."""
    from .. import tune

    if args.file is None:
        raise UsageError("show tuned needs a parameter FILE (ours or a SpargeAttn .pt)")
    _check_output(args.output)
    params = tune.load_params(args.file)
    print(params)
    if args.output is not None:
        from .. import viz

        title = args.title or f"{params.model or 'tuned'}: {args.field} per head"
        fig = viz.plot_head_sparsity(params, args.field, path=args.output, title=title)
        width, height = fig.canvas.get_width_height()
        print(f"wrote {args.output} ({width}x{height} px)")
    return 0


def _show_packed_prompt(args: argparse.Namespace) -> int:
    """``show segments --tokenizer DIR --prompt-json FILE``: the segment mask of a real
    packed self-ensemble prompt, its pieces labelled with their text."""
    import json

    from .. import masks
    from ..ensemble import PromptPacker

    if not (args.tokenizer and args.prompt_json):
        raise UsageError("--tokenizer and --prompt-json go together")
    _check_output(args.output)
    try:
        with open(args.prompt_json) as f:
            spec = json.load(f)
    except json.JSONDecodeError as exc:
        raise UsageError(f"--prompt-json {args.prompt_json!r} is not valid JSON: {exc}") from None
    if not isinstance(spec, dict) or not isinstance(spec.get("paraphrases"), list):
        raise UsageError(f"--prompt-json must hold an object with a 'paraphrases' list, got "
                         f"{type(spec).__name__}")
    from transformers import AutoTokenizer

    packer = PromptPacker(AutoTokenizer.from_pretrained(args.tokenizer))
    packed = packer.pack(spec["paraphrases"], spec.get("prefix", ""), spec.get("suffix", ""))
    n = packed.layout.length
    mask = masks.segments(packed.layout)
    stats = mask.stats(n, n, block_size=16)
    sizes = ", ".join(f"{name} {end - start}" for name, start, end in packed.layout.spans())
    print(f"tokens    {n} ({sizes})")
    print(f"density   {stats['density']:.4f}")
    if args.output is not None:
        from .. import viz

        labels = {}
        for name, text in packed.pieces:
            if name != "template":
                short = " ".join(text.split())
                labels[name] = f"{name}: {short[:28]}{'...' if len(short) > 28 else ''}"
        viz.plot_mask(mask, n, n, layout=packed.layout, labels=labels, path=args.output,
                      title=args.title or f"packed prompt, {n} tokens")
        print(f"wrote {args.output}")
    return 0
