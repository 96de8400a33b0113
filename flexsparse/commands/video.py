"""``flexsparse video``: generate a video with a local CogVideoX pipeline whose
transformer runs a flexsparse pattern.

    flexsparse video --model ./CogVideoX-2b --prompt "a cat on the beach" --pattern radial \\
        --frames 49 --dense-layers 2 --dense-timesteps 5 --decay 1.0 -o out.mp4 --save-mask

The weights are read from ``--model`` (a ``CogVideoXPipeline.save_pretrained`` folder); the
video is written with ``diffusers.utils.export_to_video`` (needs ``imageio`` +
``imageio-ffmpeg`` or ``opencv-python``); without a writer the frames are saved as a
``.npy`` array ``[frames, height, width, 3]`` (floats in [0, 1]) beside the requested path.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import warnings
from pathlib import Path

from ..cli import UsageError


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "video",
        help="generate a video with a local CogVideoX pipeline and a sparse pattern",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", required=True, help="folder of a CogVideoXPipeline (local weights)")
    p.add_argument("--prompt", required=True)
    p.add_argument("--negative-prompt", default=None)
    p.add_argument("--pattern", choices=("radial", "dense", "scenes"), default="radial",
                   help="radial (with --boundaries: radial & scenes), dense, or scenes alone")
    p.add_argument("--frames", type=int, default=49, help="pixel frames (1 + 4k; default 49)")
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


def parse_adjacency(text: str) -> list[list[int]]:
    """``"1,1;1,1"`` or a .json / .npy / .txt file -> a square 0/1 matrix (list of rows)."""
    path = Path(text)
    if path.suffix in (".json", ".npy", ".txt") or path.exists():
        if not path.exists():
            raise FileNotFoundError(f"--adjacency file {text!r} does not exist")
        if path.suffix == ".json":
            rows = json.loads(path.read_text())
        elif path.suffix == ".npy":
            import numpy as np

            rows = np.load(path).tolist()
        else:
            rows = [line.replace(",", " ").split() for line in path.read_text().splitlines()
                    if line.strip()]
    else:
        rows = [row.split(",") for row in text.replace(" ", "").split(";") if row]
    try:
        matrix = [[int(float(x)) for x in row] for row in rows]
    except (TypeError, ValueError):
        raise UsageError(
            f"--adjacency must be rows of 0/1 like '1,1,0;1,1,1;0,1,1', got {text!r}"
        ) from None
    if not matrix or any(len(r) != len(matrix) for r in matrix):
        raise UsageError(f"--adjacency must be a square matrix, got {len(matrix)} rows of "
                         f"lengths {[len(r) for r in matrix]}")
    return matrix


def scenes_arg(args) -> dict | None:
    """The ``scenes=`` argument of ``cogvideox.patch`` from the flags (None without them)."""
    if args.boundaries is None and args.adjacency is None:
        if args.pattern == "scenes":
            raise UsageError("--pattern scenes needs --boundaries and --adjacency")
        return None
    if args.boundaries is None or args.adjacency is None:
        raise UsageError("--boundaries and --adjacency go together: give both")
    return dict(boundaries=parse_boundaries(args.boundaries),
                adjacency=parse_adjacency(args.adjacency), frame_units=args.frame_units)


def _writer_available() -> bool:
    return any(importlib.util.find_spec(m) is not None for m in ("imageio_ffmpeg", "cv2"))


# -- the command ----------------------------------------------------------------------------------
def run(args) -> int:
    import torch

    scenes = scenes_arg(args)
    model = Path(args.model)
    if not (model / "model_index.json").is_file():
        raise FileNotFoundError(
            f"--model {str(model)!r} is not a diffusers pipeline folder (no model_index.json)"
        )
    for name in ("frames", "steps", "fps"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda but CUDA is not available")
    device = args.device if args.device != "auto" else (
        "cuda" if torch.cuda.is_available() else "cpu")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}.get(
        args.dtype, torch.bfloat16 if device == "cuda" else torch.float32)

    from diffusers import CogVideoXPipeline

    from ..models import cogvideox

    with warnings.catch_warnings():  # newer diffusers renamed torch_dtype; older lack dtype
        warnings.filterwarnings("ignore", message=".*torch_dtype.*", category=FutureWarning)
        pipe = CogVideoXPipeline.from_pretrained(str(model), torch_dtype=dtype)
    cfg = pipe.transformer.config
    height = args.height or cfg.sample_height * pipe.vae_scale_factor_spatial
    width = args.width or cfg.sample_width * pipe.vae_scale_factor_spatial
    if args.cpu_offload:
        if device != "cuda":
            raise UsageError("--cpu-offload needs CUDA")
        pipe.enable_model_cpu_offload()
    else:
        pipe.to(device)

    handle = cogvideox.patch(
        pipe, pattern=args.pattern, num_frames=args.frames, height=height, width=width,
        decay_factor=args.decay, dense_layers=args.dense_layers,
        dense_timesteps=args.dense_timesteps, scenes=scenes, backend=args.backend,
        block_size=args.block_size, tuned=args.tuned,
    )
    layout, mask = handle.extra["layout"], handle.extra["mask"]
    density = "1.000 (dense)" if mask is None or mask.is_dynamic else f"{mask.density():.3f}"
    print(f"flexsparse video: {args.frames} frames at {height}x{width} -> {layout.length} "
          f"tokens; mask {mask!r}, density {density}")

    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.save_mask:
        _save_mask(mask, layout, out.with_name(out.stem + "_mask.png"))

    generator = None if args.seed is None else torch.Generator("cpu").manual_seed(args.seed)
    with cogvideox.recording(pipe) as trace:
        result = pipe(
            prompt=args.prompt, negative_prompt=args.negative_prompt, num_frames=args.frames,
            height=height, width=width, num_inference_steps=args.steps,
            guidance_scale=args.guidance, generator=generator, output_type="np",
            max_sequence_length=cfg.max_text_seq_length,
        )
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
