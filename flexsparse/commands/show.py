"""``flexsparse show PATTERN``: build a pattern from flags or a spec file, print its density
and tile counts, and render it (``-o mask.png``)."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from ..cli import UsageError, user_input
from . import _common as C

#: ``--level token`` draws at most this many (query, key) pairs; above it the picture
#: falls back to tiles (a 17,776-token dense picture needed 19 GB). Same number as
#: ``flexsparse.viz.TOKEN_LEVEL_MAX``, kept here so that ``--help`` needs no matplotlib.
TOKEN_LEVEL_MAX = 4096 * 4096
TUNED_FIELDS = ("all", "sparsity", "cdfthreshd", "simthreshd1", "pvthreshd", "is_sparse")

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
    t.add_argument("--field", default="all", choices=TUNED_FIELDS,
                   help="for 'show tuned': the per-head value drawn (default all: sparsity, "
                        "simthreshd1 and cdfthreshd side by side; unknown values are marked)")
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
                   help="token: every pair, up to 4096 x 4096 pairs (larger pictures fall "
                        "back to block, and say so); block: one cell per tile; auto: token up "
                        "to 2048 x 2048 pairs, else block")
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
    _check_output(args.output)
    tile = C.parse_tokens("--tile", args.tile) if args.tile is not None else 128
    dpi = C.parse_int("--dpi", args.dpi, minimum=10)
    if dpi > 1200:
        raise UsageError(f"--dpi must be <= 1200, got {dpi}")
    head = C.parse_int("--head", args.head)
    built = C.build(opts)
    mask = built.mask
    if mask.heads is not None and head >= mask.heads:
        raise UsageError(f"--head must be < {mask.heads} (the mask's heads), got {head}")
    C.check_tiles(built.q_len, built.kv_len, tile)
    level, note = picture_level(args.level, built.q_len, built.kv_len)
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
        if note:
            rows.append(("level", note))
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


def picture_level(level: str, q_len: int, kv_len: int) -> tuple[str, str]:
    """The level drawn and a note when ``--level token`` falls back to tiles."""
    if level == "token" and q_len * kv_len > TOKEN_LEVEL_MAX:
        return "block", (f"block (token level draws at most {TOKEN_LEVEL_MAX:,} pairs = "
                         f"4096 x 4096; this is {q_len:,} x {kv_len:,})")
    return level, ""


def _check_output(path: str | None) -> None:
    if path is not None:
        C.output_file("-o", path, (".png", ".svg", ".pdf"))


def _show_tuned(args: argparse.Namespace) -> int:
    """``show tuned FILE``: summary of tuned per-head parameters and a layers x heads map."""
    from .. import tune

    if args.file is None:
        raise UsageError("show tuned needs a parameter FILE (ours or a SpargeAttn .pt)")
    _check_output(args.output)
    with user_input(f"show tuned {args.file!r}"):
        params = tune.load_params(args.file)
    print(params)
    for line in describe_unknown(params):
        print(line)
    if args.output is not None:
        from .. import viz

        if args.field == "all":
            fig = viz.plot_tuned(params, path=args.output, title=args.title)
        else:
            dense = None if args.field in ("sparsity", "is_sparse") else ~params.is_sparse
            values = params.is_sparse.float() if args.field == "is_sparse" else None
            title = args.title or f"{params.model or 'tuned'}: {args.field} per head"
            fig = viz.plot_head_sparsity(
                params if values is None else values, args.field, path=args.output,
                title=title, not_applicable=dense)
        width, height = fig.canvas.get_width_height()
        print(f"wrote {args.output} ({width}x{height} px)")
    return 0


def describe_unknown(params) -> list[str]:
    """Lines saying which per-head values the file does not record."""
    import torch

    lines = []
    for name in ("sparsity", "simthreshd1", "cdfthreshd", "pvthreshd"):
        value = getattr(params, name, None)
        if value is None:
            lines.append(f"{name}: not in the file")
            continue
        unknown = int((~torch.isfinite(value.float())).sum())
        if unknown:
            lines.append(f"{name}: unknown for {unknown} of {value.numel()} heads (not "
                         "recorded in the file; drawn grey)")
    return lines


def _show_packed_prompt(args: argparse.Namespace) -> int:
    """``show segments --tokenizer DIR --prompt-json FILE``: the segment mask of a real
    packed self-ensemble prompt, its pieces labelled with their text."""
    import json

    from .. import masks
    from ..ensemble import PromptPacker

    if not (args.tokenizer and args.prompt_json):
        raise UsageError("--tokenizer and --prompt-json go together")
    _check_output(args.output)
    tokenizer_dir = C.local_dir("--tokenizer", args.tokenizer,
                                what="a local tokenizer directory")
    raw = C.read_text_file("--prompt-json", Path(args.prompt_json), C.MAX_SPEC_BYTES)
    try:
        spec = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise UsageError(f"--prompt-json {args.prompt_json!r} is not valid JSON: {exc}") from None
    except RecursionError:
        raise UsageError(f"--prompt-json {args.prompt_json!r} is nested too deeply") from None
    if not isinstance(spec, dict) or not isinstance(spec.get("paraphrases"), list):
        raise UsageError(f"--prompt-json must hold an object with a 'paraphrases' list, got "
                         f"{type(spec).__name__}")
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)
    except (OSError, ValueError) as exc:
        raise UsageError(f"--tokenizer {args.tokenizer!r}: no tokenizer could be loaded from "
                         f"it ({' '.join(str(exc).split())[:200]})") from None
    with user_input("--prompt-json"):
        packed = PromptPacker(tokenizer).pack(spec["paraphrases"], spec.get("prefix", ""),
                                              spec.get("suffix", ""))
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
