"""``flexsparse video``: generate a video with a local diffusers video pipeline whose
transformer runs a flexsparse pattern (any model ``flexsparse.models.patch`` knows).

    flexsparse video --model ./CogVideoX-2b --prompt "a cat on the beach" --pattern radial \\
        --frames 49 --dense-layers 2 --dense-timesteps 5 --decay 1.0 -o out.mp4 --save-mask

The weights are read from ``--model`` (a pipeline's ``save_pretrained`` folder; the pipeline
class is the ``_class_name`` of its ``model_index.json``); the
video is written with ``diffusers.utils.export_to_video`` (needs ``imageio`` +
``imageio-ffmpeg`` or ``opencv-python``); without a writer the frames are saved as a
``.npy`` array ``[frames, height, width, 3]`` (floats in [0, 1]) beside the requested path.
"""

from __future__ import annotations

import argparse
import importlib.util
import inspect
import json
import sys
import warnings
from pathlib import Path

from ..cli import UsageError, user_input
from . import _common as C


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "video",
        help="generate a video with a local diffusers video pipeline and a sparse pattern",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", required=True,
                   help="folder of a diffusers video pipeline (local weights)")
    p.add_argument("--prompt", required=True)
    p.add_argument("--negative-prompt", default=None)
    p.add_argument("--pattern", choices=("radial", "dense", "scenes"), default="radial",
                   help="radial (with --boundaries: radial & scenes), dense, or scenes alone")
    p.add_argument("--frames", type=int, default=49, help="pixel frames (default 49)")
    p.add_argument("--height", type=int, default=None, help="default: the model's sample size")
    p.add_argument("--width", type=int, default=None, help="default: the model's sample size")
    p.add_argument("--steps", type=int, default=50, help="denoising steps (default 50)")
    p.add_argument("--guidance", type=float, default=6.0, help="CFG scale (default 6.0)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--dense-layers", type=int, default=0, help="first N blocks stay dense")
    p.add_argument("--dense-timesteps", type=int, default=0,
                   help="first N denoising steps run dense")
    p.add_argument("--decay", type=float, default=1.0, help="radial decay factor (default 1.0)")
    p.add_argument("--block-size", type=int, default=128, help="tile size (default 128)")
    p.add_argument("--boundaries", default=None,
                   help="scene start frames, comma separated, e.g. 0,5,9")
    p.add_argument("--adjacency", default=None,
                   help="scene adjacency: rows separated by ';' (e.g. '1,1,0;1,1,1;0,1,1') "
                        "or a .json / .npy / .txt file")
    p.add_argument("--frame-units", choices=("latent", "pixel"), default="latent",
                   help="unit of --boundaries (default latent frames)")
    p.add_argument("--backend", choices=("auto", "flex", "sdpa", "quant"), default="auto")
    p.add_argument("--tuned", default=None, help="flexsparse.tune parameter file")
    p.add_argument("--dtype", choices=("auto", "bf16", "fp16", "fp32"), default="auto",
                   help="auto: bf16 on CUDA, fp32 on the CPU")
    p.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    p.add_argument("--cpu-offload", action="store_true",
                   help="pipe.enable_model_cpu_offload() (CUDA, needs accelerate)")
    p.add_argument("--fps", type=int, default=8)
    p.add_argument("-o", "--output", required=True, help="video path (.mp4)")
    p.add_argument("--save-mask", action="store_true",
                   help="also write the mask picture as <output>_mask.png")
    p.add_argument("--trace", action="store_true",
                   help="print which blocks ran dense / sparse at each step")
    p.set_defaults(func=run)


# -- argument parsing helpers (pure) -------------------------------------------------------------
def parse_boundaries(text: str) -> list[int]:
    """``"0,5,9"`` -> ``[0, 5, 9]``."""
    try:
        return [int(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise UsageError(
            f"--boundaries must be comma-separated frame numbers like 0,5,9, got {text!r}"
        ) from None


def scenes_arg(args) -> dict | None:
    """The ``scenes=`` argument of ``patch`` from the flags (None without them)."""
    if args.boundaries is None and args.adjacency is None:
        if args.pattern == "scenes":
            raise UsageError("--pattern scenes needs --boundaries and --adjacency")
        return None
    if args.boundaries is None or args.adjacency is None:
        raise UsageError("--boundaries and --adjacency go together: give both")
    return dict(boundaries=parse_boundaries(args.boundaries),
                adjacency=C.parse_adjacency(args.adjacency), frame_units=args.frame_units)


def _writer_available() -> bool:
    return any(importlib.util.find_spec(m) is not None for m in ("imageio_ffmpeg", "cv2"))


# -- the command ----------------------------------------------------------------------------------
def check_args(args) -> None:
    """The numeric flags and ``--tuned``, before anything is loaded (one-line errors)."""
    import math

    for name in ("frames", "steps", "fps", "block_size", "height", "width"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    for name in ("height", "width"):
        value = getattr(args, name)
        if value is not None and value % 8:
            raise UsageError(f"--{name} must be a multiple of 8 (the VAE), got {value}")
    for name in ("dense_layers", "dense_timesteps"):
        if getattr(args, name) < 0:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 0, got "
                             f"{getattr(args, name)}")
    if not math.isfinite(args.decay) or args.decay < 0:
        raise UsageError(f"--decay must be a finite number >= 0, got {args.decay}")
    if args.tuned is not None and not Path(args.tuned).is_file():
        raise UsageError(f"--tuned {args.tuned!r} is not a file")


def pipeline_class(model: Path):
    """The diffusers pipeline class named by ``model_index.json`` (``_class_name``)."""
    index = model / "model_index.json"
    if not index.is_file():
        raise UsageError(
            f"--model {str(model)!r} is not a diffusers pipeline folder (no model_index.json)"
        )
    try:
        name = json.loads(index.read_text()).get("_class_name")
    except (OSError, ValueError, AttributeError) as exc:
        raise UsageError(f"--model {str(model)!r}: unreadable model_index.json ({exc})") from None
    import diffusers

    cls = getattr(diffusers, name, None) if isinstance(name, str) else None
    if cls is None or not hasattr(cls, "from_pretrained"):
        raise UsageError(f"--model {str(model)!r}: model_index.json names pipeline {name!r}, "
                         f"which diffusers {diffusers.__version__} does not have")
    return cls


def run(args) -> int:
    import torch

    scenes = scenes_arg(args)
    check_args(args)
    model = C.local_dir("--model", args.model, what="a diffusers pipeline folder")
    out = C.output_file("--output", args.output)
    device = C.parse_device("--device", args.device).type
    if args.cpu_offload and device != "cuda":
        raise UsageError("--cpu-offload needs CUDA")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}.get(
        args.dtype, torch.bfloat16 if device == "cuda" else torch.float32)

    from .. import models
    from ..models._video import recording

    cls = pipeline_class(model)
    with warnings.catch_warnings():  # newer diffusers renamed torch_dtype; older lack dtype
        warnings.filterwarnings("ignore", message=".*torch_dtype.*", category=FutureWarning)
        pipe = cls.from_pretrained(str(model), torch_dtype=dtype)
    adapter = getattr(models.adapter_for(pipe), "ADAPTER", None)
    if adapter is None:
        raise UsageError(f"--model {str(model)!r} holds {cls.__name__}, not a video model")
    default = adapter.default_video(pipe.transformer, pipe)
    height = args.height or default[1]
    width = args.width or default[2]
    with user_input():
        handle = models.patch(
            pipe, pattern=args.pattern, num_frames=args.frames, height=height, width=width,
            decay_factor=args.decay, dense_layers=args.dense_layers,
            dense_timesteps=args.dense_timesteps, scenes=scenes, backend=args.backend,
            block_size=args.block_size, tuned=args.tuned,
        )
    if args.cpu_offload:
        pipe.enable_model_cpu_offload()
    else:
        pipe.to(device)
    settings = handle.state.settings
    layout, mask = settings.layout, settings.mask
    density = "1.000 (dense)" if mask is None or mask.is_dynamic else f"{mask.density():.3f}"
    print(f"flexsparse video: {args.frames} frames at {height}x{width} -> {layout.length} "
          f"tokens; mask {mask!r}, density {density}")

    out.parent.mkdir(parents=True, exist_ok=True)
    if args.save_mask:
        _save_mask(mask, layout, out.with_name(out.stem + "_mask.png"))

    generator = None if args.seed is None else torch.Generator("cpu").manual_seed(args.seed)
    call = dict(prompt=args.prompt, negative_prompt=args.negative_prompt,
                num_frames=args.frames, height=height, width=width,
                num_inference_steps=args.steps, guidance_scale=args.guidance,
                generator=generator, output_type="np")
    if layout.text_tokens and "max_sequence_length" in inspect.signature(pipe.__call__).parameters:
        call["max_sequence_length"] = layout.text_tokens  # the text length patched for
    with recording(pipe) as trace:
        result = pipe(**call)
    if args.trace:
        for line in format_trace(trace):
            print(line)
    frames = result.frames[0]  # [F, H, W, 3] floats in [0, 1]
    print(f"wrote {_write_video(frames, out, args.fps)}")
    return 0


def format_trace(trace: list[tuple[int, int, str]]) -> list[str]:
    """``["step 0: dense dense ...", ...]``: the path of every block (in order) per step."""
    steps: dict[int, list[str]] = {}
    for step, _layer, path in trace:
        steps.setdefault(step, []).append(path)
    return [f"step {s}: {' '.join(paths)}" for s, paths in sorted(steps.items())]


def _save_mask(mask, layout, path: Path) -> None:
    if mask is None or mask.is_dynamic:
        print("flexsparse video: --save-mask: the pattern is dense or data dependent; no picture",
              file=sys.stderr)
        return
    try:
        from ..viz import plot_mask
    except ImportError as exc:
        print(f"flexsparse video: --save-mask needs flexsparse.viz ({exc}); skipped",
              file=sys.stderr)
        return
    plot_mask(mask, layout=layout, path=path)
    print(f"wrote {path}")


def _write_video(frames, out: Path, fps: int) -> Path:
    """``export_to_video`` when a writer is installed, else a ``.npy`` of the frames."""
    import numpy as np

    if _writer_available():
        from diffusers.utils import export_to_video

        try:
            export_to_video(list(frames), str(out), fps=fps)
            return out
        except (ImportError, AttributeError, RuntimeError, OSError) as exc:
            reason = f"export_to_video failed ({exc})"
    else:
        reason = "no video writer (pip install imageio imageio-ffmpeg, or opencv-python)"
    fallback = out.with_suffix(".npy")
    np.save(fallback, np.asarray(frames, dtype=np.float32))
    print(f"flexsparse video: {reason}; saved the frames as {fallback} "
          "([frames, height, width, 3] floats in [0, 1])", file=sys.stderr)
    return fallback
