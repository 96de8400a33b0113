"""``flexsparse demo``: the whole library on built-in defaults, no downloads.

The demo is a list of *sections* (``SECTIONS``). A section is a function
``section(ctx: DemoContext) -> SectionResult``: it builds what it shows, writes its
pictures into ``ctx.out`` and returns table rows, picture paths and notes. The command
prints each table and writes everything into ``DIR/report.md``.

To add a section (e.g. one per new model), write the function next to the model's code
and add one entry to ``SECTIONS`` below, ``(name, "module:function")`` (imported only
when the section runs, so a missing optional dependency skips it with a note) or
``(name, function)``; or call ``register_section(name, target)`` from anywhere. A section
should finish in a few seconds on a 2-core CPU (``ctx.quick``: less).
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..cli import UsageError
from . import _common as C

#: (name, "module:function" or a function) in the order they run.
SECTIONS: list[tuple[str, str | Callable]] = [
    ("patterns", "flexsparse.commands.demo:patterns_section"),
    ("ensemble", "flexsparse.commands.demo_sections:ensemble_section"),
    ("cogvideox", "flexsparse.commands.demo_sections:cogvideox_section"),
    ("hunyuan_video", "flexsparse.commands.demo_video_models:hunyuan_video_section"),
    ("wan", "flexsparse.commands.demo_video_models:wan_section"),
    ("flux", "flexsparse.commands.demo_image_models:flux_section"),
    ("hunyuan_dit", "flexsparse.commands.demo_image_models:hunyuan_dit_section"),
    ("tuning", "flexsparse.commands.demo_sections:tuning_section"),
]

ATTENTION_BACKENDS = ("flex", "sdpa", "quant", "auto")


def register_section(name: str, target: str | Callable) -> None:
    """Add (or replace) the section ``name``, run by ``target``: a function
    ``(DemoContext) -> SectionResult`` or ``"module:function"``."""
    if not callable(target) and (not isinstance(target, str) or ":" not in target):
        raise ValueError(f"target must be a function or 'module:function', got {target!r}")
    for i, (n, _) in enumerate(SECTIONS):
        if n == name:
            SECTIONS[i] = (name, target)
            return
    SECTIONS.append((name, target))


@dataclass
class DemoContext:
    """What a section gets.

    Attributes:
        out: directory for pictures (and ``report.md``).
        quick: smaller sizes and fewer repeats (tests, a first look).
        device: where attention runs (CUDA when available, else the CPU).
        dtype: of q, k, v (bfloat16 on CUDA, float32 on the CPU).
        repeats: timed calls per measurement (median reported).
        log: progress messages (stderr).
    """

    out: Path
    quick: bool
    device: torch.device
    dtype: torch.dtype
    repeats: int
    log: Callable[[str], None]


@dataclass
class SectionResult:
    """A section's output: a table (``columns``, ``rows`` of strings), pictures (paths
    inside ``ctx.out``) and notes (markdown lines)."""

    title: str
    columns: list[str] = field(default_factory=list)
    rows: list[list[str]] = field(default_factory=list)
    figures: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "demo",
        help="render every pattern and check attention on all backends (no downloads)",
        description="Render each pattern family for a CogVideoX-sized layout and a "
                    "self-ensemble layout, run flexsparse.attention with every available "
                    "backend against the float64 dense reference, print a table and write "
                    "pictures and report.md into DIR.",
    )
    C.one_line_errors(p)
    p.add_argument("-o", "--output", metavar="DIR", default="flexsparse-demo",
                   help="output directory (default ./flexsparse-demo)")
    p.add_argument("--quick", action="store_true",
                   help="smaller attention sizes and fewer repeats")
    p.add_argument("--sections", metavar="A,B",
                   help=f"run only these sections (default all: "
                        f"{', '.join(n for n, _ in SECTIONS)})")
    p.add_argument("--device", metavar="DEV",
                   help="device for attention (default cuda when available, else cpu)")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    out = Path(args.output)
    if out.exists() and not out.is_dir():
        raise UsageError(f"-o must be a directory, {str(out)!r} is a file")
    out.mkdir(parents=True, exist_ok=True)
    device = C.parse_device("--device", args.device, auto=None)
    chosen = _select(args.sections)
    ctx = DemoContext(
        out=out, quick=args.quick, device=device,
        dtype=torch.bfloat16 if device.type == "cuda" else torch.float32,
        repeats=1 if args.quick else (5 if device.type == "cuda" else 3),
        log=lambda msg: print(msg, file=sys.stderr),
    )
    results = []
    for name, target in chosen:
        fn, why = _load(target)
        if fn is None:
            results.append(SectionResult(name, notes=[f"skipped: {why}"]))
            continue
        ctx.log(f"[demo] {name} ...")
        start = time.perf_counter()
        with warnings.catch_warnings():
            # Eager FlexAttention on the CPU warns that it is unfused: expected here.
            warnings.filterwarnings("ignore", message=".*flex_attention called without torch")
            try:
                res = fn(ctx)
            except Exception as exc:  # noqa: BLE001 - one failing section must not end the demo
                msg = " ".join(f"{type(exc).__name__}: {exc}".split())[:300]
                ctx.log(f"[demo]   {name} failed: {msg}")
                res = SectionResult(name, notes=[f"failed: {msg}"])
        res.notes.append(f"section time: {time.perf_counter() - start:.1f} s")
        results.append(res)
    header = _header(ctx, args)
    for res in results:
        print(f"\n## {res.title}\n")
        if res.rows:
            print(markdown_table(res.columns, res.rows))
        for note in res.notes:
            print(f"- {note}")
    report = out / "report.md"
    report.write_text(_report(header, results, out))
    print(f"\nwrote {report} and {sum(len(r.figures) for r in results)} pictures into {out}")
    return 0


def _select(names: str | None) -> list[tuple[str, str]]:
    if names is None:
        return list(SECTIONS)
    wanted = [n.strip() for n in names.split(",") if n.strip()]
    known = {n for n, _ in SECTIONS}
    bad = [n for n in wanted if n not in known]
    if bad or not wanted:
        raise UsageError(f"--sections: unknown {bad or names!r}; available: "
                         f"{', '.join(n for n, _ in SECTIONS)}")
    return [(n, t) for n, t in SECTIONS if n in wanted]


def _load(target: str | Callable) -> tuple[Callable | None, str]:
    if callable(target):
        return target, ""
    module, _, attr = target.partition(":")
    try:
        mod = importlib.import_module(module)
    except ImportError as exc:
        return None, f"{module} is not available ({exc})"
    fn = getattr(mod, attr, None)
    if fn is None:
        return None, f"{module} has no {attr}"
    return fn, ""


def _header(ctx: DemoContext, args) -> list[str]:
    dev = torch.cuda.get_device_name(ctx.device) if ctx.device.type == "cuda" else (
        f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)")
    argv = " ".join(["flexsparse", "demo", *sys.argv[2:]]) if sys.argv[1:2] == ["demo"] else (
        f"flexsparse demo -o {args.output}" + (" --quick" if args.quick else ""))
    return [
        f"- command: `{argv}`",
        f"- device: {dev}; dtype {str(ctx.dtype).replace('torch.', '')}",
        f"- torch {torch.__version__}, Python {platform.python_version()}",
        f"- date: {datetime.datetime.now().strftime('%Y-%m-%d %H:%M')}",
    ]


def _report(header: list[str], results: list[SectionResult], out: Path) -> str:
    lines = ["# flexsparse demo", "", *header, ""]
    for res in results:
        lines += [f"## {res.title}", ""]
        if res.rows:
            lines += [markdown_table(res.columns, res.rows), ""]
        for note in res.notes:
            lines.append(f"- {note}")
        if res.notes:
            lines.append("")
        for fig in res.figures:
            rel = Path(fig).relative_to(out) if Path(fig).is_relative_to(out) else Path(fig)
            lines += [f"![{rel.stem}]({rel.as_posix()})", ""]
    return "\n".join(lines)


def markdown_table(columns: list[str], rows: list[list[str]]) -> str:
    """A markdown table with padded columns."""
    cells = [list(map(str, columns))] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]

    def line(r):
        return "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"

    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(cells[0]), sep, *map(line, cells[1:])])


# -- the patterns section ----------------------------------------------------------------------
@dataclass
class Case:
    """One pattern family: how to build it for a layout, and which layout kind it needs."""

    name: str
    kind: str  # "video" | "segments"
    build: Callable  # (layout) -> Mask
    scenes: Callable | None = None  # (layout) -> boundaries, for the annotation
    notes: str = ""


#: Four scenes; the last returns to the place of the first (a far edge 0 - 3).
SCENE_ADJACENCY = [[1, 1, 0, 1], [1, 1, 1, 0], [0, 1, 1, 1], [1, 0, 1, 1]]
SCENE_NAMES = ["street", "cafe", "park", "street again"]


def _scene_bounds(layout) -> list[int]:
    """Four scene starts spread like 0, 4, 7, 10 of 13 frames (needs >= 4 frames)."""
    bounds = [0]
    for frac in (4, 7, 10):
        bounds.append(max(bounds[-1] + 1, (frac * layout.frames) // 13))
    return bounds


def _cases() -> tuple[list[Case], list[str]]:
    """The families available in this install (and notes on the missing ones)."""
    from .. import masks

    cases, notes = [], []

    def available(name):
        try:
            return C.pattern_function(name)
        except UsageError:
            notes.append(f"{name}: not available in this install (flexsparse.masks.{name})")
            return None

    radial = available("radial")
    if radial:
        cases.append(Case("radial", "video", lambda lay: radial(lay, 1.0, "cogvideox")))
    scenes = available("scenes")
    if scenes:
        cases.append(Case("scenes", "video",
                          lambda lay: scenes(lay, _scene_bounds(lay), SCENE_ADJACENCY),
                          scenes=_scene_bounds))
    frame_window = available("frame_window")
    if frame_window:
        cases.append(Case("frame_window", "video", lambda lay: frame_window(lay, 2)))
    segments = available("segments")
    if segments:
        cases.append(Case("segments", "segments", segments))
    cases.append(Case("causal", "segments", lambda lay: masks.causal()))
    def causal_window(lay):
        w = max(64, lay.length // 8)
        m = masks.causal() & masks.sliding_window(w)
        m.name = f"causal_window({w})"
        return m

    cases.append(Case("causal_window", "segments", causal_window))
    cases.append(Case("document", "segments",
                      lambda lay: masks.document([lay.prefix, *lay.segments, lay.suffix])))
    return cases, notes


def layouts(quick: bool, device: torch.device) -> dict[str, tuple]:
    """``{kind: (layout shown, layout attention runs on)}``. Pictures always use the real
    sizes (CogVideoX-2b 49 x 480 x 720; a 4-way self-ensemble); attention on the CPU uses
    reduced layouts of the same structure so that the demo finishes in about a minute."""
    from ..layout import SegmentLayout, VideoLayout

    video = VideoLayout.from_video(49, 480, 720, "cogvideox")  # 13 x 1350 + 226 = 17,776
    seg = SegmentLayout(prefix=96, segments=[1024, 896, 1152, 960], suffix=64)
    if device.type == "cuda":
        return {"video": (video, video), "segments": (seg, seg)}
    if quick:
        small_v = VideoLayout(frames=5, tokens_per_frame=64, text_tokens=32)
        small_s = SegmentLayout(prefix=16, segments=[96, 80, 112], suffix=16)
    else:
        small_v = VideoLayout(frames=13, tokens_per_frame=128, text_tokens=64)
        small_s = SegmentLayout(prefix=32, segments=[320, 288, 352, 256], suffix=32)
    return {"video": (video, small_v), "segments": (seg, small_s)}


def patterns_section(ctx: DemoContext) -> SectionResult:
    """Every pattern family: a picture at full size, density and tiles skipped, and
    attention on every backend against the float64 dense reference."""
    from .. import viz

    cases, notes = _cases()
    sizes = layouts(ctx.quick, ctx.device)
    backends = list(ATTENTION_BACKENDS)
    res = SectionResult(
        "Patterns: density, tiles skipped, attention error and time per backend",
        columns=["pattern", "tokens", "density", "tiles skipped", "attn tokens",
                 *[f"{b}: ms (max err)" for b in backends]],
    )
    heads, dim = (4, 64) if ctx.device.type == "cuda" else (2, 64)
    unavailable: dict[str, str] = {}
    auto_picks: list[str] = []
    for case in cases:
        shown, small = sizes[case.kind]
        ctx.log(f"[demo]   {case.name}")
        mask = case.build(shown)
        n = shown.length
        stats = mask.stats(n, n)
        path = ctx.out / f"{case.name}.png"
        scenes = case.scenes(shown) if case.scenes else None
        viz.plot_mask(mask, n, n, layout=shown, level="block", path=path, scenes=scenes,
                      scene_names=SCENE_NAMES if scenes else None)
        res.figures.append(path)
        small_mask = case.build(small)
        cells, picked = _attention_cells(ctx, small_mask, small.length, heads, dim, backends,
                                         unavailable)
        res.rows.append([
            mask.name, f"{n:,}", f"{stats['density']:.3f}", f"{stats['tiles_skipped']:.1%}",
            f"{small.length:,}", *cells,
        ])
        if picked:
            auto_picks.append(f"{case.name} → {picked}")
    if "scenes" in [c.name for c in cases]:
        shown = sizes["video"][0]
        path = ctx.out / "scene_graph.png"
        viz.plot_scene_graph(SCENE_ADJACENCY, layout=shown, boundaries=_scene_bounds(shown),
                             names=SCENE_NAMES, path=path)
        res.figures.append(path)
    if "radial" in [c.name for c in cases]:
        # The published tile map next to the exact token rule, on the reduced layout.
        from ..layout import VideoLayout

        small = VideoLayout(frames=5 if ctx.quick else 13, tokens_per_frame=128, text_tokens=64)
        radial = C.pattern_function("radial")
        path = ctx.out / "radial_block_vs_token.png"
        viz.compare(radial(small, granularity="block"), radial(small, granularity="token"),
                    layout=small, path=path, names=("block", "token"))
        res.figures.append(path)
    if auto_picks:
        notes.append("auto chose: " + ", ".join(auto_picks))
    notes += [f"{b}: {why}" if b.endswith("failed") else f"{b}: n/a here: {why}"
              for b, why in unavailable.items()]
    res.notes = notes + [
        f"attention: batch 1, {heads} heads, head dim {dim}, {str(ctx.dtype).replace('torch.', '')}"
        f" on {ctx.device}; time = median of {ctx.repeats} calls after a warm-up; max err = "
        "max |out - reference| against the float64 dense reference (masked softmax).",
        "tokens / density / tiles skipped: the full-size layout at 128 x 128 tiles; "
        "attn tokens: the layout attention ran on (reduced on the CPU).",
    ]
    return res


def _attention_cells(ctx, mask, n, heads, dim, backends, unavailable: dict):
    import flexsparse as fs

    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, heads, n, dim, generator=gen).to(ctx.device, ctx.dtype)
               for _ in range(3))
    ref = fs.reference(q, k, v, mask)  # float64 on the CPU, rows materialised in chunks
    cells, picked = [], ""
    for backend in backends:
        try:
            choice = fs.explain(q, k, v, mask, backend=backend)
        except ValueError as exc:
            cells.append("n/a")
            unavailable[backend] = str(exc)
            continue
        if backend == "auto":
            picked = choice.backend
        try:
            ms, out = time_call(lambda b=backend: fs.attention(q, k, v, mask, backend=b),
                                ctx.repeats, ctx.device)
        except Exception as exc:  # noqa: BLE001 - one failing backend must not end the demo
            cells.append("error")
            msg = " ".join(f"{type(exc).__name__}: {exc}".split())[:300]
            unavailable[f"{backend} failed"] = msg
            ctx.log(f"[demo]     {backend} failed: {msg}")
            continue
        err = (out.detach().to("cpu", torch.float64) - ref).abs().max().item()
        cells.append(f"{ms:.2f} ({err:.1e})")
    return cells, picked


def time_call(fn: Callable, repeats: int, device: torch.device):
    """``(median milliseconds of repeats calls after one warm-up, last output)``."""
    out = fn()  # warm-up: compiles flex on CUDA, builds and caches the BlockMask
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = fn()
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            out = fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times), out
