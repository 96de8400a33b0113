"""``attention(q, k, v, mask)``: one entry point, one way down to a kernel.

A call is validated once into an ``AttentionCall`` (``flexsparse.call``); a
``DynamicMask`` is predicted from ``q, k`` on the way. Backends are objects in one static
priority list, ``PRIORITY``:

- ``"sdpa"``: ``scaled_dot_product_attention``: cuDNN / flash without a mask when the mask
  keeps everything or is plainly causal, else the mask's rows materialised in chunks of
  bounded memory (``flexsparse.backends``).
- ``"quant"``: ``flexsparse.kernels.quant.QuantBackend``, the quantized block-sparse
  kernel (CUDA), imported on first use.
- ``"flex"``: FlexAttention with the mask's ``BlockMask`` (compiled on CUDA, eager on the
  CPU unless ``compile=True``).

``backend="auto"`` runs the first backend with nothing against it; ``explain(...)`` gives
the choice and every backend's reasons. Fully masked query rows return zeros, never NaN.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from . import backends as _b
from ._checks import block_pair, check_choice, check_float
from .backends import DECODE_ROWS, FlexBackend, SdpaBackend
from .call import AttentionCall, TileCounts, needs_backward
from .mask import DynamicMask, Mask, _ComposedDynamic
from .tiles import FULL, PARTIAL

log = logging.getLogger("flexsparse")

BACKENDS = ("auto", "flex", "sdpa", "quant")
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

#: Kept fraction of a *predicted* tile map at or above which running no map at all is at
#: least as fast as the backend that would run the sparse map, so ``auto`` drops the
#: prediction. A predicted map only approximates dense attention, so no map is also the
#: more accurate answer there; a static map is never dropped (its empty tiles are part of
#: its meaning) except when it keeps every tile. A dropped prediction (with no static
#: mask beside it) runs on the quant kernel's dense mode where that kernel runs (CUDA,
#: 16-bit inputs): a prediction stands in for SpargeAttn, whose arithmetic is quantized,
#: and that mode outruns cuDNN (9.83 vs 11.3 ms on the 2b shape, H100); elsewhere on the
#: dense walk (cuDNN / flash SDPA).
#:
#: Measured with ``benchmarks/attention.py`` (crossover table; H200, torch 2.11,
#: 2026-11-25; random 128 x 64 tile maps, B=2, H=30, N=17,776, D=64, bf16; cuDNN dense
#: 11.1 ms), speed relative to cuDNN (cuDNN ms / ms) at kept fractions 0.75 / 0.9 / 1.0:
#:
#: - ``flex``: 1.09x / 0.92x / 0.83x: break-even with cuDNN near 0.83 kept.
#: - ``quant`` (before its register cap): 1.23x / 1.03x / 0.85x. With the cap (H100,
#:   ``benchmarks/quant.py --part lists``): 128 x 64 lists keeping every tile 10.5 ms, its
#:   dense mode 9.83 ms: break-even with its dense mode near 0.93 kept.
#: - ``sdpa`` (CPU, materialised rows): on the CPU the map's meaning is kept rather than
#:   traded for speed: dropped only when it keeps every tile.
#:
#: The thresholds sit just below the break-even points, since dropping a prediction is
#: also the more accurate answer. The predictor's own time (0.40-0.47 ms with the CUDA-graph
#: predictor, 3.5-4.1 % of cuDNN; H100 and H200, BENCHMARKS.md, 2026-11-25 afternoon) is
#: spent before this decision, which is taken from the predicted map (one count, one host
#: read) before any BlockMask is built; it counts in the benchmark's comparisons.
DENSE_CROSSOVER = {"flex": 0.8, "quant": 0.9, "sdpa": 1.0}


@dataclass(frozen=True)
class Choice:
    """Which backend ``attention`` runs for a call, why, and why not the others.

    Attributes:
        backend: the backend's name.
        reason: why it runs the call (worded on first read: ``attention`` builds a Choice
            per call and only ``explain`` and the DEBUG log read it).
        sdpa_mode: ``"none" | "causal" | "mask"``: how SDPA would run the call.
        reasons: ``(name, reasons)`` for every backend in priority order; empty reasons for
            the one picked (and for those after it that could have run the call).
        notes: what lowering decided (e.g. a predicted map dropped for the dense kernel).
    """

    backend: str
    describe: str | Callable[[], str] = field(repr=False)
    sdpa_mode: str = "mask"
    reasons: tuple[tuple[str, tuple[str, ...]], ...] = ()
    notes: tuple[str, ...] = ()

    @property
    def reason(self) -> str:
        if callable(self.describe):
            object.__setattr__(self, "describe", self.describe())
        return self.describe

    def __str__(self) -> str:
        lines = [f"{self.backend}: {self.reason}"]
        lines += [f"  note: {note}" for note in self.notes]
        for name, why in self.reasons:
            if name != self.backend and why:
                lines.append(f"  {name}: not picked: {'; '.join(why)}")
        return "\n".join(lines)


class _QuantBackend:
    """``flexsparse.kernels.quant.QuantBackend``, imported on first use so that
    ``import flexsparse`` stays light and ``kernels`` never imports this module back."""

    name = "quant"

    @functools.cached_property
    def _impl(self):
        try:
            from .kernels.quant import QuantBackend
        except ImportError as exc:  # depends on the install
            return f"flexsparse.kernels did not load: {exc}"
        return QuantBackend()

    def not_supported_reasons(self, call: AttentionCall) -> list[str]:
        impl = self._impl
        return [impl] if isinstance(impl, str) else list(impl.not_supported_reasons(call))

    def auto_reasons(self, call: AttentionCall) -> list[str]:
        return list(getattr(self._impl, "auto_reasons", lambda c: [])(call))

    def describe(self, call: AttentionCall) -> str:
        describe = getattr(self._impl, "describe", None)
        if describe is not None:
            return describe(call)
        return "quantized block-sparse kernel: a mask it supports, on CUDA"

    def run(self, call: AttentionCall) -> Tensor:
        return self._impl.run(call)


SDPA, QUANT, FLEX = SdpaBackend(), _QuantBackend(), FlexBackend()
#: The order ``auto`` tries backends in; the first with no reason against it runs.
PRIORITY = (SDPA, QUANT, FLEX)
_BY_NAME = {b.name: b for b in PRIORITY}


# -- validation (once per call) ---------------------------------------------------------------


def _check_tensors(q: Tensor, k: Tensor, v: Tensor, enable_gqa) -> bool:
    """Validate ``q, k, v`` (and ``enable_gqa``); returns whether the call is GQA."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must be [B, H, N, D], got shape {tuple(t.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.dtype not in FLOAT_DTYPES:
        allowed = ", ".join(str(d).removeprefix("torch.") for d in FLOAT_DTYPES)
        raise TypeError(f"q, k, v must be floating point ({allowed}), got {q.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if not (q.shape[0] == k.shape[0] == v.shape[0]):
        raise ValueError(
            f"batch sizes differ: q {q.shape[0]}, k {k.shape[0]}, v {v.shape[0]}"
        )
    if k.shape[1] != v.shape[1]:
        raise ValueError(f"k and v must have the same heads, got {k.shape[1]} and {v.shape[1]}")
    if k.shape[2] != v.shape[2]:
        raise ValueError(f"k and v must have the same length, got {k.shape[2]} and {v.shape[2]}")
    if q.shape[3] != k.shape[3]:
        raise ValueError(f"head_dim of q ({q.shape[3]}) and k ({k.shape[3]}) must match")
    if enable_gqa is not None and not isinstance(enable_gqa, bool):
        raise TypeError(
            f"enable_gqa must be True, False or None, got {enable_gqa!r} "
            f"({type(enable_gqa).__name__})"
        )
    hq, hkv = q.shape[1], k.shape[1]
    gqa = hq != hkv
    if gqa and (enable_gqa is False or hq % hkv):
        raise ValueError(
            f"q has {hq} heads and k/v {hkv}: allowed are equal heads, or (GQA) q heads a "
            f"multiple of kv heads with enable_gqa left None or True"
        )
    return gqa


def _check_scale(scale, head_dim: int) -> float:
    """The softmax scale: ``head_dim ** -0.5`` for None, else a finite number > 0."""
    if scale is None:
        return head_dim**-0.5
    value = check_float("scale", scale)
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"scale must be a finite number > 0 (or None), got {scale!r}")
    return value


def _check_options(block_size, compile) -> tuple[int, int] | None:
    if compile is not None and not isinstance(compile, bool):
        raise TypeError(
            f"compile must be True, False or None, got {compile!r} ({type(compile).__name__})"
        )
    return None if block_size is None else block_pair("block_size", block_size)


def _check_mask(mask, q: Tensor, k: Tensor) -> Mask | None:
    """A static ``Mask`` (a ``DynamicMask`` bound to ``q, k``) checked against the call."""
    if mask is None:
        return None
    if isinstance(mask, DynamicMask):
        mask = mask.bind(q, k)
    if not isinstance(mask, Mask):
        raise TypeError(
            f"mask must be a flexsparse Mask, DynamicMask or None, got {type(mask).__name__}"
        )
    mask.check_lengths(q.shape[2], k.shape[2])
    if mask.heads is not None and mask.heads != q.shape[1]:
        raise ValueError(f"mask {mask.name!r} has {mask.heads} heads but q has {q.shape[1]}")
    if mask.batch is not None and mask.batch != q.shape[0]:
        raise ValueError(f"mask {mask.name!r} has batch {mask.batch} but q has {q.shape[0]}")
    return mask


# -- choosing a backend ---------------------------------------------------------------------


def _reasons(backend, call: AttentionCall) -> list[str]:
    """Everything against ``backend`` for ``auto``: what it cannot run, then why another
    backend is preferred."""
    why = list(backend.not_supported_reasons(call))
    if not why:
        why += list(getattr(backend, "auto_reasons", lambda c: [])(call))
    return why


def _describe(backend, call: AttentionCall) -> str:
    describe = getattr(backend, "describe", None)
    return describe(call) if describe is not None else "first in priority order"


def _walk(call: AttentionCall, every: bool = False) -> tuple[object, Choice]:
    """The first backend of ``PRIORITY`` with no reason against it. Backends after it are
    asked only when ``every`` (``explain``): a decode step should not pay for them."""
    reasons, picked = [], None
    for backend in PRIORITY:
        why = () if picked is not None and not every else tuple(_reasons(backend, call))
        reasons.append((backend.name, why))
        if picked is None and not why:
            picked = backend
    if picked is None:
        # Every backend prefers another (e.g. FLEXSPARSE_COMPILE=0 on CUDA): run the first
        # that can run the call at all.
        picked = next(b for b in PRIORITY if not b.not_supported_reasons(call))
    return picked, Choice(picked.name, lambda: _describe(picked, call), _b.sdpa_mode(call),
                          tuple(reasons), call.notes)


def _requested(name: str, call: AttentionCall) -> tuple[object, Choice]:
    backend = _BY_NAME[name]
    why = backend.not_supported_reasons(call)
    if why:
        raise ValueError(f"backend={name!r} cannot run this call: {'; '.join(why)}")
    return backend, Choice(name, lambda: f"requested; {_describe(backend, call)}",
                           _b.sdpa_mode(call), ((name, ()),), call.notes)


def _split_dynamic(mask: DynamicMask) -> tuple[DynamicMask | None, Mask | None]:
    """``(predictor, static rest)`` of ``predictor`` or ``predictor & static``; ``(None,
    None)`` for compositions whose prediction cannot be dropped on its own.

    Only a predictor that declares ``approximates_dense = True`` (meansim: its map stands
    in for dense attention) is ever dropped; any other ``DynamicMask`` is part of the
    pattern's meaning and always applied."""
    if not isinstance(mask, _ComposedDynamic):
        return mask, None
    if mask.op == "&" and isinstance(mask.other, Mask) and not isinstance(
        mask.dyn, _ComposedDynamic
    ):
        return mask.dyn, mask.other
    return None, None


def _without_prediction(dyn: DynamicMask, rest: Mask | None) -> Mask | None:
    """What a prediction approximates: dense attention (causal for a causal predictor),
    composed with the static rest."""
    from .masks.basic import causal

    base = causal() if getattr(dyn, "causal", False) else None
    if base is None or rest is None:
        return rest if base is None else base
    return rest & base


def _census(mask: Mask, q_len: int, kv_len: int, device) -> tuple[tuple[int, int], TileCounts]:
    """``(tile size, TileCounts)`` of a bound prediction at its own tile size from its tile
    states (no ``BlockMask``): one reduction, one host read."""
    size = tuple(mask.native_block_size or _b.DEFAULT_BLOCK)
    states = mask.tile_states(q_len, kv_len, size, device=device)
    partial, full = (int(c) for c in torch.stack(
        [(states == PARTIAL).sum(), (states == FULL).sum()]).tolist())
    return size, TileCounts(states.numel() - partial - full, partial, full)


#: Build a predicted map's BlockMask before its tile count is read back (CUDA). H100,
#: ``benchmarks/lowering.py``: 2-3 % faster where the prediction runs (meansim 0.35/0.98,
#: 0.3/0.9), 3-4 % slower where ``auto`` drops it (0.6/0.98: the build is wasted).
#: Benchmarks flip it.
PRELOWER = True


def _bind_counted(dyn: DynamicMask, q: Tensor, k: Tensor, v: Tensor):
    """``(bound mask, (tile size, TileCounts))`` of a predictor for this call.

    A predictor that hands over its tile map (``bind_tiles``: meansim) is counted on the
    map itself, one reduction and one host read: the map is whole tiles at the bound mask's
    tile size, so it has no partial tiles and its kept tiles are the BlockMask's full ones
    (when the query rows start on a tile boundary; else the tile states are counted). On
    CUDA the map's BlockMask is built before that read (see below)."""
    bind_tiles = getattr(dyn, "bind_tiles", None)
    if bind_tiles is None:
        bound = _check_mask(dyn, q, k)
        return bound, _census(bound, q.shape[2], k.shape[2], q.device)
    bound, tiles = bind_tiles(q, k)
    bound = _check_mask(bound, q, k)
    size = bound.native_block_size
    if size is None or (k.shape[2] - q.shape[2]) % size[0]:
        return bound, _census(bound, q.shape[2], k.shape[2], q.device)
    kept = tiles.sum()
    if q.is_cuda and PRELOWER:
        # Lower the map while the GPU is still predicting, before the host read: the read
        # then waits for prediction and lowering together instead of the host lowering
        # after it with the GPU idle (0.33 ms of a 9 ms meansim call, H100). A dropped
        # prediction leaves this BlockMask unused (cached on the bound mask only).
        bound.block_mask(q.shape[2], k.shape[2], device=q.device, heads=bound.heads,
                         batch=bound.batch, block_size=tuple(size), noop=True,
                         backward=needs_backward(q, k, v))
    kept = int(kept)
    return bound, (tuple(size), TileCounts(tiles.numel() - kept, 0, kept))


def _prepare(q, k, v, mask, scale, backend, enable_gqa, block_size, compile, every=False):
    """Validate once and choose: ``(backend object, Choice, AttentionCall)``."""
    check_choice("backend", backend, BACKENDS)
    gqa = _check_tensors(q, k, v, enable_gqa)
    scale = _check_scale(scale, q.shape[3])
    block = _check_options(block_size, compile)

    def make(m, notes=(), census=None):
        return AttentionCall(
            q, k, v, _check_mask(m, q, k), scale, gqa, block, compile, notes, census
        )

    if backend != "auto":
        call = make(mask)
        return (*_requested(backend, call), call)
    dyn, rest = _split_dynamic(mask) if isinstance(mask, DynamicMask) else (None, None)
    if dyn is None or not getattr(dyn, "approximates_dense", False):
        call = make(mask)
        return (*_walk(call, every), call)
    # Data-dependent map: whether skipping its tiles pays is decided from the counted map
    # before any BlockMask is built; the walk on the prediction alone reads the census
    # (the crossover is that of the backend that would run the prediction).
    bound, census = _bind_counted(dyn, q, k, v)
    probe = make(bound, census=census)
    chosen, choice = _walk(probe, every and rest is None)
    kept = census[1].kept_fraction
    limit = DENSE_CROSSOVER.get(chosen.name, 1.0)
    if kept < limit:
        if rest is None:
            return chosen, choice, probe
        call = make(bound & rest)
        return (*_walk(call, every), call)
    note = (
        f"the predicted map keeps {kept:.1%} of its tiles (>= {limit:.0%}, {chosen.name}'s "
        "crossover against the dense kernel): prediction dropped"
    )
    call = make(_without_prediction(dyn, rest), (note,))
    picked, choice = _walk(call, every)
    if rest is None and not QUANT.not_supported_reasons(call):
        # A prediction stands in for SpargeAttn, whose arithmetic is quantized, and the
        # quant kernel's dense mode outruns cuDNN (DENSE_CROSSOVER): a dropped map runs
        # there rather than on SDPA.
        return QUANT, dataclasses.replace(choice, backend=QUANT.name, describe=lambda: (
            f"a dropped prediction runs quantized, without its map; {_describe(QUANT, call)}"
        )), call
    return picked, choice, call


def explain(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Mask | DynamicMask | None = None,
    *,
    backend: str = "auto",
    scale: float | None = None,
    enable_gqa: bool | None = None,
    block_size: int | tuple[int, int] | None = None,
    compile: bool | None = None,
) -> Choice:
    """The backend ``attention`` would run for these arguments, why, and every backend's
    reasons against it (``str(choice)`` prints them). A ``DynamicMask`` is predicted.
    Raises ``ValueError`` when a requested backend cannot run the call."""
    choice = _prepare(
        q, k, v, mask, scale, backend, enable_gqa, block_size, compile, every=True
    )[1]
    choice.reason  # noqa: B018 - worded now, so the Choice keeps no reference to the call
    return choice


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Mask | DynamicMask | None = None,
    *,
    scale: float | None = None,
    backend: str = "auto",
    enable_gqa: bool | None = None,
    block_size: int | tuple[int, int] | None = None,
    compile: bool | None = None,
) -> Tensor:
    """Masked attention.

    Args:
        q: ``[B, Hq, Q, D]``. k, v: ``[B, Hkv, KV, D]`` (``Hq`` a multiple of ``Hkv`` for GQA);
            one floating dtype (float16, bfloat16, float32, float64), one device.
        mask: a ``Mask`` (query rows are the last ``Q`` rows of its ``KV x KV`` matrix, so a
            decode step passes ``Q < KV``), a ``DynamicMask`` (predicted from ``q, k`` here),
            or None for full attention.
        scale: softmax scale, a finite number > 0; default ``D ** -0.5``.
        backend: ``"auto" | "flex" | "sdpa" | "quant"``.
        enable_gqa: True, False or None (inferred from the head counts).
        block_size: tile size of the ``BlockMask`` (an int or ``(Bq, Bkv)``); None = the
            mask's ``native_block_size`` if it has one (a predicted tile map), else 128.
        compile: compile FlexAttention; None = on CUDA only.

    Returns:
        ``[B, Hq, Q, D]`` in the dtype of ``q``. Rows with no kept key are zeros.
    """
    chosen, choice, call = _prepare(
        q, k, v, mask, scale, backend, enable_gqa, block_size, compile
    )
    if not torch.compiler.is_compiling():  # logging is not traceable (fullgraph compile)
        log.debug("flexsparse.attention: %s", choice)
    return chosen.run(call)


attention.explain = explain  # fs.attention.explain(q, k, v, mask)


def reference(q: Tensor, k: Tensor, v: Tensor, mask=None, *, scale=None) -> Tensor:
    """Dense float64 reference on the CPU: softmax(q k^T * scale + mask) v with zeros for
    fully masked rows (the mask materialised row chunk by row chunk). Inputs of any
    floating dtype / device; returns float64 ``[B, Hq, Q, D]`` on the CPU."""
    gqa = _check_tensors(q, k, v, None)
    q64, k64, v64 = (t.detach().to("cpu", torch.float64) for t in (q, k, v))
    call = AttentionCall(
        q64, k64, v64, _check_mask(mask, q, k), _check_scale(scale, q.shape[3]), gqa
    )
    if call.mask is None:
        return _b.SdpaBackend().run(call)
    return _b.sdpa_rows(call)


__all__ = [
    "BACKENDS",
    "DECODE_ROWS",
    "DENSE_CROSSOVER",
    "PRIORITY",
    "Choice",
    "attention",
    "explain",
    "reference",
]
