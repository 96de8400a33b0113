"""Tuned meansim parameters: per layer, per head; our file format and SpargeAttn's.

Our format is a ``.safetensors`` file: tensors ``simthreshd1``, ``cdfthreshd``,
``pvthreshd``, ``sparsity`` (float32 ``[L, H]``) and ``is_sparse`` (bool ``[L, H]``);
its metadata holds ``format = "flexsparse.tuned/1"`` and ``header``, a JSON object with
the model name, the error bounds and the predictor settings (block sizes, causal, ...).

SpargeAttn saves ``torch.save`` state dicts with keys
``<prefix>.<layer>.<...>.{is_sparse,cdfthreshd,simthreshd1,simthreshd2,pvthreshd}``
(``transformer_blocks.N.attn1.inner_attention.*`` for CogVideoX); ``load_spargeattn``
imports them.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from ..masks.meansim import MeansimMask

FORMAT = "flexsparse.tuned/1"
#: SpargeAttn's ``pvthreshd`` search range ends at 50: that value means "no PV skipping".
PV_OFF = 50.0
SPARGEATTN_EXAMPLE = "spargeattn_cogvideox-2b_l1-0.06_pv-0.07.pt"
_FIELDS = ("simthreshd1", "cdfthreshd", "pvthreshd", "is_sparse", "sparsity")


@dataclass
class TunedParams:
    """Per-layer, per-head meansim hyperparameters.

    Attributes:
        simthreshd1, cdfthreshd, pvthreshd: float32 ``[L, H]``.
        is_sparse: bool ``[L, H]``; False heads run dense (their other values are ignored).
        sparsity: float32 ``[L, H]``, fraction of attention pairs skipped measured during
            calibration (NaN where unknown, e.g. imported SpargeAttn files).
        model: model name or path. l1, pv_l1: the error bounds tuned for.
        metric: ``"l1" | "cosine" | "rmse"``; bound: the bound of that metric.
        block_q, block_kv, causal, attention_sink, smooth_k: predictor settings.
        source: ``"flexsparse"`` or ``"spargeattn"``. extra: free-form JSON metadata.

    ``pvthreshd`` is carried for kernels with SpargeAttn's PV-skip stage; FlexAttention
    does not use it.
    """

    simthreshd1: Tensor
    cdfthreshd: Tensor
    pvthreshd: Tensor
    is_sparse: Tensor
    sparsity: Tensor
    model: str = ""
    l1: float | None = None
    pv_l1: float | None = None
    metric: str = "l1"
    bound: float | None = None
    block_q: int = 128
    block_kv: int = 64
    causal: bool = False
    attention_sink: bool = False
    smooth_k: bool = False
    source: str = "flexsparse"
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        shape = None
        for name in _FIELDS:
            value = getattr(self, name)
            if not isinstance(value, Tensor):
                value = torch.as_tensor(value)
            if value.dim() != 2:
                raise ValueError(f"{name} must be [layers, heads], got shape {tuple(value.shape)}")
            if shape is not None and tuple(value.shape) != shape:
                raise ValueError(
                    f"{name} has shape {tuple(value.shape)}, expected {shape} like simthreshd1"
                )
            shape = tuple(value.shape)
            dtype = torch.bool if name == "is_sparse" else torch.float32
            setattr(self, name, value.detach().to("cpu", dtype).contiguous())

    @property
    def layers(self) -> int:
        return self.simthreshd1.shape[0]

    @property
    def heads(self) -> int:
        return self.simthreshd1.shape[1]

    def __repr__(self) -> str:
        dense = int((~self.is_sparse).sum())
        return (
            f"TunedParams({self.model or 'model'}: {self.layers} layers x {self.heads} heads, "
            f"{dense} dense heads, {self.source}, metric={self.metric}, bound={self.bound})"
        )

    def layer_mask(self, layer_idx: int) -> MeansimMask | None:
        """The ``DynamicMask`` of layer ``layer_idx`` (None when all its heads are dense).

        Dense heads get ``simthreshd1 = inf`` (no block is self-similar, so every tile is
        kept) and ``cdfthreshd = 1``."""
        if isinstance(layer_idx, bool) or not isinstance(layer_idx, int):
            raise TypeError(f"layer_idx must be an int, got {layer_idx!r}")
        if not -self.layers <= layer_idx < self.layers:
            raise ValueError(f"layer_idx must be in [0, {self.layers}), got {layer_idx}")
        sparse = self.is_sparse[layer_idx]
        if not bool(sparse.any()):
            return None
        sim1 = torch.where(sparse, self.simthreshd1[layer_idx], torch.tensor(math.inf))
        cdf = torch.where(sparse, self.cdfthreshd[layer_idx], torch.tensor(1.0)).clamp(0, 1)
        return MeansimMask(
            sim1, cdf, None, self.block_q, self.block_kv, self.causal, self.attention_sink,
            smooth_k=self.smooth_k,
        )

    def header(self) -> dict:
        return {
            "model": self.model, "l1": self.l1, "pv_l1": self.pv_l1, "metric": self.metric,
            "bound": self.bound, "block_q": self.block_q, "block_kv": self.block_kv,
            "causal": self.causal, "attention_sink": self.attention_sink,
            "smooth_k": self.smooth_k, "source": self.source, "layers": self.layers,
            "heads": self.heads, "extra": self.extra,
        }

    def save(self, path: str | Path) -> Path:
        """Write our format (``.safetensors`` + JSON header); returns the path."""
        from safetensors.torch import save_file

        path = Path(path)
        tensors = {name: getattr(self, name).contiguous() for name in _FIELDS}
        meta = {"format": FORMAT, "header": json.dumps(self.header())}
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(path), metadata=meta)
        return path

    @classmethod
    def load(cls, path: str | Path) -> TunedParams:
        """Read a file written by ``save``."""
        from safetensors import safe_open

        path = _existing(path)
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                tensors = {name: f.get_tensor(name) for name in f.keys()}
        except Exception as exc:  # safetensors raises its own error types
            raise ValueError(f"{path} is not a readable safetensors file: {exc}") from None
        if meta.get("format") != FORMAT:
            raise ValueError(
                f"{path} is not a flexsparse tuned-parameter file (metadata format is "
                f"{meta.get('format')!r}, expected {FORMAT!r})"
            )
        missing = [n for n in _FIELDS if n not in tensors]
        if missing:
            raise ValueError(f"{path} lacks tensors {missing}")
        head = json.loads(meta.get("header", "{}"))
        known = {k: head[k] for k in (
            "model", "l1", "pv_l1", "metric", "bound", "block_q", "block_kv", "causal",
            "attention_sink", "smooth_k", "source", "extra",
        ) if k in head}
        return cls(**{n: tensors[n] for n in _FIELDS}, **known)


def _existing(path) -> Path:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"parameter file {str(path)!r} does not exist")
    return path


_SPARGE_KEY = re.compile(
    r"^(?P<prefix>.*?)(?P<layer>\d+)\.(?P<rest>(?:.*\.)?)"
    r"(?P<field>is_sparse|cdfthreshd|simthreshd1|simthreshd2|pvthreshd)$"
)


def load_spargeattn(
    path: str | Path,
    *,
    model: str = "",
    block_q: int = 128,
    block_kv: int = 64,
    causal: bool = False,
    attention_sink: bool = True,
    smooth_k: bool = True,
) -> TunedParams:
    """Import a SpargeAttn tuned state dict (``torch.save`` of ``{key: tensor [H]}``).

    Keys look like ``transformer_blocks.N.attn1.inner_attention.<field>``; the layer
    index ``N`` is the last integer before the field. Defaults match SpargeAttn's inference
    (``smooth_k`` on, ``attention_sink`` on, tiles 128 x 64). The l1 / pv_l1 bounds are
    read from the file name when it contains ``l1-X`` / ``pv-Y``.
    """
    path = _existing(path)
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle / zip errors of all kinds
        raise ValueError(f"{path} is not a readable torch state dict: {exc}") from None
    if not isinstance(state, dict):
        raise ValueError(f"{path} holds a {type(state).__name__}, expected a state dict")
    per_layer: dict[int, dict[str, Tensor]] = {}
    for key, value in state.items():
        match = _SPARGE_KEY.match(str(key))
        if match is None:
            continue
        layer = int(match["layer"])
        per_layer.setdefault(layer, {})[match["field"]] = torch.as_tensor(value).reshape(-1)
    if not per_layer:
        raise ValueError(
            f"{path} has no SpargeAttn keys (expected '<...>.<layer>.<...>.simthreshd1' etc.)"
        )
    layers = sorted(per_layer)
    if layers != list(range(len(layers))):
        raise ValueError(f"{path}: layer indices {layers} are not 0..{len(layers) - 1}")
    rows: dict[str, list[Tensor]] = {n: [] for n in ("simthreshd1", "cdfthreshd", "pvthreshd",
                                                     "is_sparse", "simthreshd2")}
    for layer in layers:
        got = per_layer[layer]
        for name in ("simthreshd1", "cdfthreshd", "is_sparse"):
            if name not in got:
                raise ValueError(f"{path}: layer {layer} lacks {name}")
        heads = got["simthreshd1"].numel()
        rows["simthreshd1"].append(got["simthreshd1"].float())
        rows["cdfthreshd"].append(got["cdfthreshd"].float())
        rows["is_sparse"].append(got["is_sparse"].bool())
        rows["pvthreshd"].append(got.get("pvthreshd", torch.full((heads,), PV_OFF)).float())
        rows["simthreshd2"].append(got.get("simthreshd2", torch.zeros(heads)).float())
    try:
        stacked = {n: torch.stack(v) for n, v in rows.items()}
    except RuntimeError:
        raise ValueError(f"{path}: layers have different head counts") from None
    is_sparse = stacked["is_sparse"]
    sparsity = torch.where(is_sparse, torch.tensor(math.nan), torch.tensor(0.0))
    name = path.name
    l1 = re.search(r"l1[-_]([0-9.]*[0-9])", name)
    pv = re.search(r"pv[-_]([0-9.]*[0-9])", name)
    return TunedParams(
        stacked["simthreshd1"], stacked["cdfthreshd"], stacked["pvthreshd"], is_sparse,
        sparsity, model=model or name, l1=float(l1[1]) if l1 else None,
        pv_l1=float(pv[1]) if pv else None, metric="l1",
        bound=float(l1[1]) if l1 else None, block_q=block_q, block_kv=block_kv,
        causal=causal, attention_sink=attention_sink, smooth_k=smooth_k,
        source="spargeattn", extra={"file": name},
    )


def file_format(path: str | Path) -> str:
    """``"safetensors"``, ``"zip"`` (``torch.save``), ``"pickle"`` (legacy ``torch.save``)
    or ``"unknown"``, from the first bytes of the file at ``path``.

    A safetensors file is an 8-byte little-endian header length followed by a JSON header
    that starts with ``{``; the length's low byte can be anything (0x80 or ``P`` included),
    so the check reads the byte after it, not the first one."""
    with open(path, "rb") as f:
        head = f.read(9)
    if head[:4] == b"PK\x03\x04":
        return "zip"
    if len(head) == 9 and head[8:9] == b"{":
        size = int.from_bytes(head[:8], "little")
        if 2 <= size <= Path(path).stat().st_size - 8:
            return "safetensors"
    # pickle protocol >= 2 (all torch.save has written) opens with the PROTO opcode
    return "pickle" if head[:1] == b"\x80" else "unknown"


def spargeattn_example_path() -> Path:
    """Path of the bundled example: SpargeAttn's published CogVideoX-2b tuned parameters
    (``l1 = 0.06``, ``pv_l1 = 0.07``; from the SpargeAttn repository, Apache-2.0)."""
    return Path(__file__).resolve().parents[1] / "data" / SPARGEATTN_EXAMPLE


def load_params(path: str | Path, **spargeattn_options) -> TunedParams:
    """Load tuned parameters, detecting the format: our ``.safetensors`` files, or
    SpargeAttn ``torch.save`` state dicts (``spargeattn_options`` go to
    ``load_spargeattn``)."""
    path = _existing(path)
    kind = file_format(path)
    if kind == "unknown":
        raise ValueError(
            f"{path} is not a parameter file: neither safetensors (8-byte header length, "
            "then a JSON header) nor a torch.save zip or pickle"
        )
    if kind != "safetensors":
        return load_spargeattn(path, **spargeattn_options)
    if spargeattn_options:
        raise TypeError(
            f"{path} is a flexsparse file: options {sorted(spargeattn_options)} only apply to "
            "SpargeAttn state dicts"
        )
    return TunedParams.load(path)


def plot_params(params: TunedParams | str | Path, path: str | Path | None = None, **kwargs):
    """Layers x heads sparsity map of tuned parameters (a matplotlib Figure), saved to
    ``path`` when given. Uses ``flexsparse.viz.plot_head_sparsity``; unknown sparsity
    (NaN, imported files) is drawn blank."""
    if not isinstance(params, TunedParams):
        params = load_params(params)
    from ..viz import plot_head_sparsity

    kwargs.setdefault(
        "title", f"{params.model or 'tuned'}: skipped fraction per head ({params.source})"
    )
    return plot_head_sparsity(params, "sparsity", path=path, **kwargs)
