"""``flexsparse tune``: calibrate per-head meansim parameters of a model on text.

    flexsparse tune --model PATH --data FILE --out params.safetensors [--l1 0.06]

``PATH`` is a saved transformers model directory (LLaMA family: llama, mistral, qwen2,
qwen3). ``FILE`` holds calibration text: ``.jsonl`` lines with ``"text"`` (or
``"input_ids"``), or plain text, one sample per line. The model runs dense with every
layer observed; ``flexsparse.tune.MeansimTuner`` then tunes each layer and head.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..cli import UsageError, user_input
from . import _common as C


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "tune", help="calibrate meansim sparsity per layer and head",
        description="Calibrate per-head meansim parameters (SpargeAttn-style) of a model.",
    )
    p.add_argument("--model", required=True, help="saved transformers model directory")
    p.add_argument("--data", required=True, help="calibration text: .jsonl or .txt")
    p.add_argument("--out", required=True, help="output parameter file (.safetensors)")
    p.add_argument("--l1", type=float, default=0.06, help="relative L1 bound (default 0.06)")
    p.add_argument("--pv-l1", type=float, default=0.07, help="PV-stage L1 bound (recorded)")
    p.add_argument("--metric", default="l1", choices=("l1", "cosine", "rmse"))
    p.add_argument("--samples", type=int, default=8, help="calibration texts used (default 8)")
    p.add_argument("--max-tokens", type=int, default=2048, help="tokens per text (default 2048)")
    p.add_argument("--block-q", type=int, default=128)
    p.add_argument("--block-kv", type=int, default=64)
    p.add_argument("--keep", type=int, default=4, help="calls kept per layer (default 4)")
    p.add_argument("--device", default="auto", help="'auto', 'cpu', 'cuda', 'cuda:1', ...")
    p.set_defaults(func=run)


def _positive(name: str, value: int) -> int:
    if value < 1:
        raise UsageError(f"--{name} must be >= 1, got {value}")
    return value


def read_texts(path: Path, limit: int) -> list:
    """Up to ``limit`` samples: strings, or lists of token ids (jsonl ``input_ids``)."""
    if not path.is_file():
        raise FileNotFoundError(f"--data {str(path)!r} does not exist")
    out: list = []
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8").strip()
            except UnicodeDecodeError:
                raise UsageError(f"--data {path}: line {n} is not UTF-8 text") from None
            if not line:
                continue
            if path.suffix == ".jsonl":
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise UsageError(f"--data {path}: line {n} is not JSON ({exc})") from None
                except RecursionError:
                    raise UsageError(f"--data {path}: line {n} is nested too deeply") from None
                if isinstance(row, dict) and "input_ids" in row:
                    out.append(_token_ids(path, n, row["input_ids"]))
                elif isinstance(row, dict) and isinstance(row.get("text"), str):
                    out.append(row["text"])
                else:
                    raise UsageError(
                        f"--data {path}: line {n} needs a 'text' string or 'input_ids' list"
                    )
            else:
                out.append(line)
            if len(out) >= limit:
                break
    if not out:
        raise UsageError(f"--data {path} holds no samples")
    return out


def _token_ids(path: Path, n: int, ids) -> list[int]:
    if not isinstance(ids, list) or not all(
        isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in ids
    ):
        raise UsageError(f"--data {path}: line {n}: 'input_ids' must be a list of token ids "
                         "(integers >= 0)")
    return ids


def _model_type(model_dir: Path) -> str:
    config = model_dir / "config.json"
    if not config.is_file():
        raise UsageError(f"--model {str(model_dir)!r} has no config.json (a saved model dir)")
    try:
        cfg = json.loads(C.read_text_file("--model config.json", config, C.MAX_SPEC_BYTES))
    except (json.JSONDecodeError, RecursionError):
        raise UsageError(f"--model {str(config)!r} is not a readable JSON config") from None
    if not isinstance(cfg, dict):
        raise UsageError(f"--model {str(config)!r} must hold a JSON object")
    if "CogVideoX" in str(cfg.get("_class_name", "")):
        raise UsageError(
            "CogVideoX tuning from the command line is not supported: use "
            "flexsparse.tune.MeansimTuner with flexsparse.models.cogvideox.patch (docs/tuning.md)"
        )
    return str(cfg.get("model_type", ""))


def _encoder(model_dir: Path, vocab_size: int):
    """The directory's tokenizer, or UTF-8 bytes as token ids when it has none."""
    has_tok = any((model_dir / n).is_file() for n in (
        "tokenizer.json", "tokenizer.model", "tokenizer_config.json"))
    if has_tok:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
        return lambda text: tok(text)["input_ids"]
    if vocab_size < 256:
        raise UsageError(
            f"--model {model_dir} has no tokenizer and a vocabulary of {vocab_size} < 256 "
            "(byte fallback impossible); pass input_ids in a .jsonl --data file"
        )
    print(f"note: no tokenizer in {model_dir}: using UTF-8 bytes as token ids")
    return lambda text: list(text.encode("utf-8"))


def run(args) -> int:
    import torch

    from .. import masks, tune

    model_dir = C.local_dir("--model", args.model, what="a saved model directory")
    for name in ("samples", "max_tokens", "block_q", "block_kv", "keep"):
        _positive(name.replace("_", "-"), getattr(args, name))
    l1 = C.parse_float("--l1", args.l1, positive=True)
    pv_l1 = C.parse_float("--pv-l1", args.pv_l1, positive=True)
    # Everything the user named is checked before the model is loaded and calibrated.
    out = C.output_file("--out", args.out, (".safetensors",))
    device = C.parse_device("--device", args.device)
    with user_input():
        tuner = tune.MeansimTuner(
            l1=l1, pv_l1=pv_l1, metric=args.metric, block_q=args.block_q,
            block_kv=args.block_kv, max_samples=args.keep,
        )
    kind = _model_type(model_dir)
    from ..models import llama

    if kind not in llama.SUPPORTED:
        raise UsageError(
            f"--model {model_dir}: model_type {kind!r} is not supported; supported: "
            f"{', '.join(llama.SUPPORTED)}"
        )
    texts = read_texts(Path(args.data), args.samples)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), attn_implementation="sdpa")
    model = model.to(device).eval()
    encode = _encoder(model_dir, model.config.vocab_size)
    llama.patch(model, masks.causal())  # dense causal attention, observable
    try:
        with tuner.attach(model), torch.no_grad():
            for text in texts:
                ids = text if isinstance(text, list) else encode(text)
                ids = [t % model.config.vocab_size for t in ids[: args.max_tokens]]
                if ids:
                    model(torch.tensor([ids], device=device))
    finally:
        llama.unpatch(model)
    params = tuner.tune(model_name=str(model_dir), num_layers=model.config.num_hidden_layers)
    out.parent.mkdir(parents=True, exist_ok=True)
    path = params.save(out)
    sparse = params.is_sparse
    print(
        f"wrote {path}: {params.layers} layers x {params.heads} heads, "
        f"{int(sparse.sum())} sparse heads, mean skipped fraction "
        f"{float(params.sparsity.mean()):.3f} ({args.metric} bound {params.bound})"
    )
    return 0
