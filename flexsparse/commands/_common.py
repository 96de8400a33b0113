"""Shared parsing for the commands: flag values (``49x480x720``, ``0,5,9``, ``110,111,011``,
``12:20,18,22:6``), spec files (JSON / YAML) and building a pattern from them.

Every parser raises ``UsageError`` with one line naming the option, the value and what is
allowed; ``cli.main`` prints it and exits with code 2.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from ..cli import UsageError, user_input
from ..layout import MODEL_PRESETS, SegmentLayout, VideoLayout

PATTERNS = ("radial", "scenes", "segments", "causal", "window")
VIDEO_PATTERNS = ("radial", "scenes")
#: CogVideoX-2b, 49 x 480 x 720 pixels: 13 latent frames x 1350 tokens + 226 text tokens.
DEFAULT_VIDEO = (49, 480, 720)
DEFAULT_LENGTH = 4096
DEFAULT_WINDOW = 256
#: Longest sequence ``show`` accepts (query or key side), checked before anything is
#: allocated: 8x HunyuanVideo's 115,456 tokens.
MAX_TOKENS = 1 << 20
#: Most tiles ``show`` counts (query tiles x key tiles; int8 states, several temporaries).
MAX_TILES = 1 << 26
#: Largest spec file read (a pattern spec is a few hundred bytes).
MAX_SPEC_BYTES = 1 << 20

#: Every option a spec file may set (same names as the flags, dashes or underscores).
SPEC_KEYS = (
    "pattern", "frames", "tokens_per_frame", "text", "text_position", "video", "model",
    "decay", "block_size", "granularity", "boundaries", "adjacency", "scene_names",
    "frame_units", "text_mode", "segments", "generated", "length", "window", "bidirectional",
    "q_len",
)


# -- flag values ---------------------------------------------------------------------------
def parse_int(option: str, text, minimum: int | None = 0) -> int:
    """An int from a flag / spec value; UsageError naming ``option`` otherwise."""
    if isinstance(text, bool):
        raise UsageError(f"{option} must be an integer, got {text!r}")
    try:
        value = int(str(text).strip().replace("_", ""))
    except ValueError:
        raise UsageError(f"{option} must be an integer, got {text!r}") from None
    if minimum is not None and value < minimum:
        raise UsageError(f"{option} must be >= {minimum}, got {value}")
    return value


def parse_float(option: str, text, *, positive: bool = False) -> float:
    """A finite float from a flag / spec value (> 0 with ``positive``)."""
    try:
        value = float(text)
    except (TypeError, ValueError, OverflowError):
        raise UsageError(f"{option} must be a number, got {text!r}") from None
    if not math.isfinite(value):
        raise UsageError(f"{option} must be a finite number, got {text!r}")
    if positive and value <= 0:
        raise UsageError(f"{option} must be > 0, got {value:g}")
    return value


def parse_tokens(option: str, text, minimum: int = 1) -> int:
    """A token count: an int in ``[minimum, MAX_TOKENS]``, refused before any allocation."""
    value = parse_int(option, text, minimum)
    if value > MAX_TOKENS:
        raise UsageError(f"{option} must be <= {MAX_TOKENS:,} tokens (the limit of this "
                         f"command), got {value:,}")
    return value


def check_tiles(q_len: int, kv_len: int, tile: int) -> None:
    """Refuse a tile count that would not fit in memory (``MAX_TILES``)."""
    for option, n in (("sequence length", q_len), ("sequence length", kv_len)):
        if n > MAX_TOKENS:
            raise UsageError(f"{option} {n:,} is over the limit of {MAX_TOKENS:,} tokens")
    tiles = math.ceil(q_len / tile) * math.ceil(kv_len / tile)
    if tiles > MAX_TILES:
        raise UsageError(f"--tile {tile} gives {tiles:,} tiles for {q_len:,} x {kv_len:,} "
                         f"tokens; the limit is {MAX_TILES:,}: use a larger --tile")


def parse_device(option: str, text: str | None, *, auto: str | None = "auto"):
    """A ``torch.device`` that exists on this machine; ``None`` or ``auto``: CUDA when
    available, else the CPU."""
    import torch

    if text is None or text == auto:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(str(text))
    except (RuntimeError, ValueError, TypeError):
        raise UsageError(f"{option} must be a torch device like cpu, cuda or cuda:1"
                         f"{' or ' + auto if auto else ''}, got {text!r}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"{option} {text}: CUDA is not available on this machine")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UsageError(f"{option} {text}: this machine has "
                             f"{torch.cuda.device_count()} CUDA device(s)")
    elif device.type != "cpu":
        raise UsageError(f"{option} must be cpu or cuda[:N], got {text!r}")
    return device


def output_file(option: str, path: str | Path, suffixes: tuple[str, ...] = ()) -> Path:
    """Check an output file before any work: not a directory, an allowed suffix, and a
    parent that is a writable directory (created later when missing)."""
    path = Path(path)
    if suffixes and path.suffix.lower() not in suffixes:
        allowed = " or ".join([", ".join(suffixes[:-1]), suffixes[-1]] if len(suffixes) > 1
                              else suffixes)
        raise UsageError(f"{option} must end in {allowed}, got {str(path)!r}")
    if path.is_dir():
        raise UsageError(f"{option} {str(path)!r} is a directory; give a file name")
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise UsageError(f"{option} {str(path)!r}: {str(parent)!r} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"{option} {str(path)!r}: directory {str(parent)!r} is not writable")
    return path


def local_dir(option: str, path: str | Path, *, what: str = "a local directory") -> Path:
    """A path that must be an existing directory (never a hub name: no network)."""
    path = Path(path)
    if not path.is_dir():
        state = "does not exist" if not path.exists() else "is not a directory"
        raise UsageError(f"{option} must be {what}; {str(path)!r} {state}")
    return path


def parse_ints(option: str, text, minimum: int | None = 0) -> list[int]:
    """``"0,5,9"`` (or a list from a spec) -> ``[0, 5, 9]``."""
    if isinstance(text, (list, tuple)):
        items = list(text)
    else:
        items = [s for s in str(text).replace(" ", "").split(",") if s != ""]
    if not items:
        raise UsageError(f"{option} must be a comma-separated list of integers, got {text!r}")
    return [parse_int(option, s, minimum) for s in items]


def parse_video(text) -> tuple[int, int, int]:
    """``"49x480x720"`` (frames x height x width in pixels) -> ``(49, 480, 720)``."""
    if isinstance(text, (list, tuple)):
        parts = list(text)
    else:
        parts = str(text).lower().replace("×", "x").split("x")
    bad = UsageError(f"--video must be FRAMESxHEIGHTxWIDTH like 49x480x720, got {text!r}")
    if len(parts) != 3:
        raise bad
    try:
        f, h, w = (parse_int("--video", p, minimum=1) for p in parts)
    except UsageError:
        raise bad from None
    return f, h, w


def parse_adjacency(text, num_scenes: int | None = None) -> list[list[int]]:
    """``"110,111,011"`` / ``"1,1,0;1,1,1;0,1,1"`` (one row per scene), a file (.json,
    .npy, .txt) or a nested list -> ``[[1,1,0],[1,1,1],[0,1,1]]``: the library's parser
    (``flexsparse.masks.scenes.parse_adjacency``), its errors named after the flag."""
    from ..masks.scenes import parse_adjacency as parse

    with user_input("--adjacency"):
        return parse(text, num_scenes=num_scenes).to(int).tolist()


def parse_segments(text) -> SegmentLayout:
    """``"12:20,18,22:6"`` = prefix 12, segments 20, 18, 22, suffix 6; ``"20,18"`` (no
    prefix / suffix) and ``"12:20,18"`` (no suffix) also work. A spec may give a mapping
    ``{"prefix": 12, "segments": [20, 18, 22], "suffix": 6}``."""
    if isinstance(text, Mapping):
        unknown = set(text) - {"prefix", "segments", "suffix"}
        if unknown:
            raise UsageError(f"segments: unknown keys {sorted(unknown)}; allowed: prefix, "
                             "segments, suffix")
        prefix = parse_int("segments.prefix", text.get("prefix", 0))
        suffix = parse_int("segments.suffix", text.get("suffix", 0))
        segs = parse_ints("segments.segments", text.get("segments", ""), minimum=1)
        return SegmentLayout(prefix=prefix, segments=segs, suffix=suffix)
    parts = str(text).replace(" ", "").split(":")
    if len(parts) > 3 or not parts[min(1, len(parts) - 1)]:
        raise UsageError(
            f"--segments must be PREFIX:LEN,LEN,...:SUFFIX like 12:20,18,22:6, got {text!r}"
        )
    if len(parts) == 1:
        prefix, segs, suffix = "0", parts[0], "0"
    elif len(parts) == 2:
        (prefix, segs), suffix = parts, "0"
    else:
        prefix, segs, suffix = parts
    return SegmentLayout(
        prefix=parse_int("--segments prefix", prefix or 0),
        segments=parse_ints("--segments", segs, minimum=1),
        suffix=parse_int("--segments suffix", suffix or 0),
    )


def load_spec(path: str | Path) -> dict:
    """Options from a JSON (``.json``) or YAML (``.yaml`` / ``.yml``) file: a mapping with
    the flag names as keys (dashes or underscores); a nested ``layout`` mapping may hold
    ``frames``, ``tokens_per_frame``, ``text_tokens`` / ``text`` and ``text_position``."""
    path = Path(path)
    ext = path.suffix.lower()
    if ext not in (".json", ".yaml", ".yml"):
        raise UsageError(f"--spec must be a .json, .yaml or .yml file, got {str(path)!r}")
    raw = read_text_file("--spec", path, MAX_SPEC_BYTES)
    try:
        if ext == ".json":
            data = _parse_json("--spec", path, raw)
        else:
            data = _parse_yaml(path, raw)
    except (RecursionError, MemoryError):
        raise UsageError(f"--spec {str(path)!r} is nested too deeply to be a spec") from None
    if not isinstance(data, Mapping):
        raise UsageError(f"--spec {str(path)!r} must hold a mapping of options, got "
                         f"{type(data).__name__}")
    out: dict = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name == "layout" and isinstance(value, Mapping):
            for k, v in value.items():
                k = str(k).replace("-", "_")
                k = "text" if k == "text_tokens" else k
                if k not in ("frames", "tokens_per_frame", "text", "text_position"):
                    raise UsageError(f"--spec layout: unknown key {k!r}; allowed: frames, "
                                     "tokens_per_frame, text_tokens, text_position")
                out[k] = v
            continue
        name = "text" if name == "text_tokens" else name
        if name not in SPEC_KEYS:
            raise UsageError(f"--spec: unknown key {key!r}; allowed: layout, "
                             f"{', '.join(SPEC_KEYS)}")
        out[name] = value
    return out


def read_text_file(option: str, path: Path, limit: int) -> str:
    """The UTF-8 text of a small input file, refused above ``limit`` bytes before reading."""
    try:
        size = path.stat().st_size
        if path.is_dir():
            raise UsageError(f"{option} {str(path)!r} is a directory, not a file")
        if size > limit:
            raise UsageError(f"{option} {str(path)!r} is {size:,} bytes; the limit is "
                             f"{limit:,}")
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FileNotFoundError(f"{option} file not found: {str(path)!r}") from None
    except (PermissionError, UnicodeDecodeError) as exc:
        raise UsageError(f"{option} {str(path)!r} cannot be read: {exc}") from None


def _parse_json(option: str, path: Path, raw: str):
    try:
        return json.loads(raw)
    except json.JSONDecodeError as exc:
        raise UsageError(f"{option} {str(path)!r} is not valid JSON: {exc}") from None


def _parse_yaml(path: Path, raw: str):
    try:
        import yaml
    except ImportError:
        raise UsageError("--spec: reading YAML needs PyYAML (pip install pyyaml)") from None
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError as exc:
        msg = " ".join(str(exc).split())
        raise UsageError(f"--spec {str(path)!r} is not valid YAML: {msg}") from None


# -- argparse ------------------------------------------------------------------------------
def one_line_errors(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Make ``parser`` report bad flags in one line on stderr (exit code 2) instead of the
    usage block followed by the error."""

    def error(message: str):
        print(f"{parser.prog}: error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)

    parser.error = error
    return parser


def add_pattern_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags that describe a pattern and its layout (all default to None so that a
    ``--spec`` file can fill them; ``resolve_options`` applies the real defaults)."""
    g = parser.add_argument_group("video layout (radial, scenes)")
    g.add_argument("--video", metavar="FxHxW",
                   help="pixel frames x height x width, e.g. 49x480x720; latent sizes follow "
                        "from --model (default when no --frames: 49x480x720)")
    g.add_argument("--frames", metavar="N", help="latent frames")
    g.add_argument("--tokens-per-frame", metavar="N", help="tokens per latent frame")
    g.add_argument("--text", metavar="N", help="text tokens (default: the model's with "
                   "--video, else 0)")
    g.add_argument("--text-position", choices=("start", "end"),
                   help="where the text sits (default: the model's)")
    g.add_argument("--model", choices=tuple(MODEL_PRESETS),
                   help="model whose compression (--video) and radial rule are used "
                        "(default cogvideox)")
    g = parser.add_argument_group("radial")
    g.add_argument("--decay", metavar="X", help="decay factor δ > 0 (default 1.0)")
    g.add_argument("--block-size", metavar="N", help="radial block size (default 128)")
    g.add_argument("--granularity", choices=("block", "token"), help="default block")
    g = parser.add_argument_group("scenes")
    g.add_argument("--boundaries", metavar="F,F,..",
                   help="first latent frame of each scene, e.g. 0,5,9")
    g.add_argument("--adjacency", metavar="ROWS",
                   help="scene adjacency, one row of 0/1 per scene, e.g. 110,111,011 "
                        "(default: each scene sees itself and its neighbours)")
    g.add_argument("--scene-names", metavar="A,B,..", help="names of the scenes")
    g.add_argument("--frame-units", choices=("latent", "pixel"),
                   help="units of --boundaries (default latent)")
    g.add_argument("--text-mode", choices=("global", "none"),
                   help="global: text sees and is seen by everything; none: text sees only "
                        "text (default global)")
    g = parser.add_argument_group("segments, causal, window")
    g.add_argument("--segments", metavar="P:S,S,..:X",
                   help="self-ensemble layout: prefix:segment lengths:suffix, e.g. 12:20,18,22:6")
    g.add_argument("--generated", metavar="N", help="generated tokens after the layout "
                   "(segments; default 0)")
    g.add_argument("--length", metavar="N",
                   help=f"sequence length for causal / window (default {DEFAULT_LENGTH}, or the "
                        "layout's)")
    g.add_argument("--window", metavar="W", help=f"window size (default {DEFAULT_WINDOW})")
    g.add_argument("--bidirectional", action="store_true", default=None,
                   help="window: |q - k| < W instead of the causal window")
    parser.add_argument("--q-len", metavar="N",
                        help="show only the last N query rows (a decode step)")
    parser.add_argument("--spec", metavar="FILE",
                        help="read the options from a JSON or YAML file (flags override it)")


def resolve_options(args: argparse.Namespace, pattern: str | None) -> dict:
    """Options from ``--spec`` overridden by the flags given; ``pattern`` from the
    positional argument (or the spec)."""
    opts = load_spec(args.spec) if getattr(args, "spec", None) else {}
    for key in SPEC_KEYS:
        value = getattr(args, key, None)
        if value is not None:
            opts[key] = value
    if pattern is not None:
        opts["pattern"] = pattern
    if opts.get("pattern") is None:
        raise UsageError(f"give a pattern ({', '.join(PATTERNS)}) or a --spec with 'pattern'")
    if opts["pattern"] not in PATTERNS:
        raise UsageError(f"pattern must be one of {', '.join(PATTERNS)}; got {opts['pattern']!r}")
    return opts


# -- building a pattern ----------------------------------------------------------------------
@dataclass
class Built:
    """A pattern built from options: the mask and how to draw it."""

    mask: object
    layout: VideoLayout | SegmentLayout | None
    q_len: int
    kv_len: int
    scenes: list[int] | None = None
    scene_names: list[str] | None = None
    description: str = ""
    extra: dict = field(default_factory=dict)


def pattern_function(name: str) -> Callable:
    """``flexsparse.masks.<name>`` (the function, also when only its module exists)."""
    from .. import masks

    fn = getattr(masks, name, None)
    if fn is None:
        try:
            fn = importlib.import_module(f"flexsparse.masks.{name}")
        except ModuleNotFoundError:
            fn = None
    if fn is not None and not callable(fn):  # the module of the same name
        fn = getattr(fn, name, None)
    if fn is None:
        raise UsageError(f"pattern {name!r} is not available in this flexsparse install "
                         f"(flexsparse.masks.{name} is missing)")
    return fn


def video_layout(opts: dict, required: bool) -> VideoLayout | None:
    """The ``VideoLayout`` the options describe, the CogVideoX default when ``required``
    and nothing is given, else None."""
    model = opts.get("model") or "cogvideox"
    if model not in MODEL_PRESETS:
        raise UsageError(f"--model must be one of {', '.join(MODEL_PRESETS)}; got {model!r}")
    given = any(opts.get(k) is not None for k in ("video", "frames", "tokens_per_frame"))
    if not given and not required:
        return None
    text = None if opts.get("text") is None else parse_tokens("--text", opts["text"], 0)
    position = opts.get("text_position")
    if position is not None and position not in ("start", "end"):
        raise UsageError(f"--text-position must be start or end, got {position!r}")
    if opts.get("video") is not None or not given:
        if opts.get("frames") is not None or opts.get("tokens_per_frame") is not None:
            raise UsageError("give either --video or --frames/--tokens-per-frame, not both")
        f, h, w = parse_video(opts["video"]) if opts.get("video") is not None else DEFAULT_VIDEO
        with user_input("--video"):
            layout = VideoLayout.from_video(f, h, w, model, text_tokens=text,
                                            text_position=position)
        return check_length("--video", layout)
    missing = [k for k in ("frames", "tokens_per_frame") if opts.get(k) is None]
    if missing:
        raise UsageError(f"--{missing[0].replace('_', '-')} is needed with --frames / "
                         "--tokens-per-frame (or use --video FxHxW)")
    frames = parse_tokens("--frames", opts["frames"])
    per_frame = parse_tokens("--tokens-per-frame", opts["tokens_per_frame"])
    if frames * per_frame + (text or 0) > MAX_TOKENS:
        raise UsageError(f"--frames {frames:,} x --tokens-per-frame {per_frame:,} + --text "
                         f"{text or 0:,} is over the limit of {MAX_TOKENS:,} tokens")
    return VideoLayout(
        frames=frames, tokens_per_frame=per_frame, text_tokens=text or 0,
        text_position=position or MODEL_PRESETS[model]["text_position"],
    )


def check_length(option: str, layout):
    """``layout`` if its length is within ``MAX_TOKENS``, else a UsageError."""
    if layout.length > MAX_TOKENS:
        raise UsageError(f"{option} gives {layout.length:,} tokens; the limit is "
                         f"{MAX_TOKENS:,}")
    return layout


def chain_adjacency(n: int) -> list[list[int]]:
    """Each scene sees itself and its temporal neighbours."""
    return [[int(abs(i - j) <= 1) for j in range(n)] for i in range(n)]


def build(opts: dict) -> Built:
    """Build the pattern ``opts["pattern"]`` (see ``add_pattern_arguments``). The library
    checks the values it is given: its ``ValueError`` / ``TypeError`` here are the user's
    mistake (``UsageError``)."""
    with user_input():
        return _build(opts)


def _build(opts: dict) -> Built:
    from .. import masks

    pattern = opts["pattern"]
    if pattern == "radial":
        layout = video_layout(opts, required=True)
        fn = pattern_function("radial")
        mask = fn(
            layout,
            decay_factor=parse_float("--decay", opts.get("decay", 1.0), positive=True),
            model=opts.get("model") or "cogvideox",
            block_size=parse_tokens("--block-size", opts.get("block_size", 128)),
            granularity=opts.get("granularity") or "block",
        )
        return _finish(mask, layout, opts)
    if pattern == "scenes":
        layout = video_layout(opts, required=True)
        if opts.get("boundaries") is None:
            raise UsageError("scenes needs --boundaries (first latent frame of each scene, "
                             "e.g. 0,5,9)")
        bounds = parse_ints("--boundaries", opts["boundaries"])
        adjacency = (parse_adjacency(opts["adjacency"]) if opts.get("adjacency") is not None
                     else chain_adjacency(len(bounds)))
        if len(adjacency) != len(bounds):
            raise UsageError(f"--adjacency is {len(adjacency)} x {len(adjacency)} but "
                             f"--boundaries names {len(bounds)} scenes")
        names = None
        if opts.get("scene_names") is not None:
            raw = opts["scene_names"]
            names = list(raw) if isinstance(raw, (list, tuple)) else str(raw).split(",")
            if len(names) != len(bounds):
                raise UsageError(f"--scene-names needs {len(bounds)} names, got {len(names)}")
        kwargs = {}
        if opts.get("text_mode") is not None:
            kwargs["text"] = opts["text_mode"]
        if opts.get("frame_units") is not None:
            kwargs["frame_units"] = opts["frame_units"]
        mask = pattern_function("scenes")(layout, bounds, adjacency, **kwargs)
        latent = bounds
        if opts.get("frame_units") == "pixel":
            latent = [layout.latent_frame(b) for b in bounds]
        built = _finish(mask, layout, opts)
        built.scenes, built.scene_names = latent, names
        built.extra["adjacency"] = adjacency
        return built
    if pattern == "segments":
        if opts.get("segments") is None:
            raise UsageError("segments needs --segments PREFIX:LEN,LEN,..:SUFFIX, "
                             "e.g. 12:20,18,22:6")
        seg = check_length("--segments", parse_segments(opts["segments"]))
        mask = pattern_function("segments")(seg)
        generated = parse_tokens("--generated", opts.get("generated", 0), 0)
        return _finish(mask, seg, opts, kv_len=parse_tokens(
            "--segments + --generated", seg.length + generated))
    # causal / window: any length; a layout given only annotates the picture.
    layout = video_layout(opts, required=False)
    if layout is None and opts.get("segments") is not None:
        layout = check_length("--segments", parse_segments(opts["segments"]))
    if opts.get("length") is not None:
        kv_len = parse_tokens("--length", opts["length"])
    else:
        kv_len = layout.length if layout is not None else DEFAULT_LENGTH
    mask = masks.causal()
    if pattern == "window":
        w = parse_tokens("--window", opts.get("window", DEFAULT_WINDOW))
        window = masks.sliding_window(w)
        mask = window if opts.get("bidirectional") else mask & window
        if not opts.get("bidirectional"):
            mask.name = f"causal_window({w})"
    return _finish(mask, layout, opts, kv_len=kv_len)


def _finish(mask, layout, opts: dict, kv_len: int | None = None) -> Built:
    if kv_len is None:
        kv_len = mask.length or layout.length
    q_len = kv_len
    if opts.get("q_len") is not None:
        q_len = parse_tokens("--q-len", opts["q_len"])
        if q_len > kv_len:
            raise UsageError(f"--q-len must be <= the sequence length {kv_len}, got {q_len}")
    return Built(mask, layout, q_len, kv_len, description=describe_layout(layout, kv_len))


def describe_layout(layout, kv_len: int) -> str:
    """One line: what the sequence is made of."""
    if isinstance(layout, VideoLayout):
        text = ""
        if layout.text_tokens:
            text = f" + {layout.text_tokens} text ({layout.text_position})"
        return (f"{layout.frames} frames x {layout.tokens_per_frame} tokens{text} = "
                f"{layout.length:,} tokens")
    if isinstance(layout, SegmentLayout):
        gen = f" + {kv_len - layout.length} generated" if kv_len > layout.length else ""
        return (f"prefix {layout.prefix} + segments {list(layout.segments)} + suffix "
                f"{layout.suffix}{gen} = {kv_len:,} tokens")
    return f"{kv_len:,} tokens"
