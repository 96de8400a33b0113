"""``attention(q, k, v, mask)``: one entry point, several backends.

Backends
--------
- ``"flex"``: FlexAttention with the mask's ``BlockMask`` (compiled on CUDA, the compiled
  callable cached; eager on the CPU unless ``compile=True``).
- ``"sdpa"``: ``scaled_dot_product_attention`` with the materialised mask rows (the
  reference; cuDNN / flash without a mask when the mask is full or plainly causal).
- ``"quant"``: the quantized block-sparse kernel of ``flexsparse.kernels`` (CUDA).
- ``"auto"``: the fastest correct one for the call; ``explain(...)`` says which and why.

Fully masked query rows return zeros, never NaN, on every backend.
"""

from __future__ import annotations

import functools
import logging
import math
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.nn.attention.flex_attention import flex_attention

from ._checks import check_choice
from .mask import DynamicMask, Mask

log = logging.getLogger("flexsparse")

BACKENDS = ("auto", "flex", "sdpa", "quant")
#: Up to this many query rows the mask rows are materialised for SDPA (decode steps).
DECODE_ROWS = 64
#: On the CPU, masks up to this many elements are materialised for SDPA.
CPU_DENSE_LIMIT = 1 << 26


@dataclass(frozen=True)
class Choice:
    """Which backend ``attention`` runs for a call, and why."""

    backend: str
    reason: str
    sdpa_mode: str = "mask"  # "mask" | "none" | "causal"

    def __str__(self) -> str:
        return f"{self.backend}: {self.reason}"


#: Extra backends registered by optional modules: name -> (supports(q, k, mask) -> str|None,
#: run(q, k, v, mask, scale, enable_gqa) -> Tensor). ``supports`` returns None when it can
#: run the call, else the reason it cannot.
_EXTRA: dict[str, tuple[Callable, Callable]] = {}


def register_backend(name: str, supports: Callable, run: Callable) -> None:
    """Register a backend (used by ``flexsparse.kernels`` for ``"quant"``)."""
    _EXTRA[name] = (supports, run)


def _load_extra(name: str) -> None:
    if name == "quant" and name not in _EXTRA:
        try:
            from . import kernels  # noqa: F401  (registers "quant")
        except ImportError as exc:  # pragma: no cover - depends on the install
            log.debug("quant backend unavailable: %s", exc)


def _validate(q: Tensor, k: Tensor, v: Tensor, enable_gqa: bool | None) -> bool:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must be [B, H, N, D], got shape {tuple(t.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
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
    hq, hkv = q.shape[1], k.shape[1]
    gqa = hq != hkv
    if gqa and (enable_gqa is False or hq % hkv):
        raise ValueError(
            f"q has {hq} heads and k/v {hkv}: allowed are equal heads, or (GQA) q heads a "
            f"multiple of kv heads with enable_gqa left None or True"
        )
    return gqa


def _resolve_mask(mask, q: Tensor, k: Tensor) -> Mask | None:
    if mask is None:
        return None
    if isinstance(mask, DynamicMask):
        mask = mask.bind(q, k)
    if not isinstance(mask, Mask):
        raise TypeError(f"mask must be a flexsparse Mask or None, got {type(mask).__name__}")
    q_len, kv_len = q.shape[2], k.shape[2]
    mask.check_lengths(q_len, kv_len)
    if mask.heads is not None and mask.heads != q.shape[1]:
        raise ValueError(f"mask {mask.name!r} has {mask.heads} heads but q has {q.shape[1]}")
    if mask.batch is not None and mask.batch != q.shape[0]:
        raise ValueError(f"mask {mask.name!r} has batch {mask.batch} but q has {q.shape[0]}")
    return mask


def _choose(q: Tensor, k: Tensor, mask: Mask | None, backend: str) -> Choice:
    q_len, kv_len = q.shape[2], k.shape[2]
    hint = None if mask is None else mask.sdpa_hint
    if backend == "sdpa":
        if mask is None or hint == "full":
            return Choice("sdpa", "requested; mask keeps everything", "none")
        if hint == "causal" and q_len == kv_len:
            return Choice("sdpa", "requested; plainly causal", "causal")
        return Choice("sdpa", "requested; materialised mask")
    if backend == "flex":
        return Choice("flex", "requested")
    if backend == "quant":
        _load_extra("quant")
        if "quant" not in _EXTRA:
            raise ValueError("backend='quant' is not available: flexsparse.kernels did not load")
        why_not = _EXTRA["quant"][0](q, k, mask)
        if why_not:
            raise ValueError(f"backend='quant' cannot run this call: {why_not}")
        return Choice("quant", "requested")
    # auto
    if mask is None or hint == "full":
        return Choice("sdpa", "mask keeps everything: SDPA's dense kernel is fastest", "none")
    if hint == "causal" and q_len == kv_len:
        return Choice("sdpa", "plainly causal: SDPA's causal kernel", "causal")
    if q_len <= DECODE_ROWS and q_len < kv_len:
        return Choice("sdpa", f"{q_len} query rows: materialising them is cheaper than a BlockMask")
    if q.device.type != "cuda":
        if q_len * kv_len <= CPU_DENSE_LIMIT:
            return Choice("sdpa", "CPU, small mask: materialised mask")
        return Choice("flex", "CPU, large mask: FlexAttention")
    _load_extra("quant")
    if "quant" in _EXTRA and _EXTRA["quant"][0](q, k, mask) is None:
        return Choice("quant", "CUDA, block-granular mask the quantized kernel supports")
    return Choice("flex", "CUDA: FlexAttention with the BlockMask")


def explain(
    q: Tensor, k: Tensor, v: Tensor, mask=None, *, backend: str = "auto", enable_gqa=None
) -> Choice:
    """The backend ``attention`` would run for these arguments, with the reason."""
    check_choice("backend", backend, BACKENDS)
    _validate(q, k, v, enable_gqa)
    return _choose(q, k, _resolve_mask(mask, q, k), backend)


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
        q: ``[B, Hq, Q, D]``. k, v: ``[B, Hkv, KV, D]`` (``Hq`` a multiple of ``Hkv`` for GQA).
        mask: a ``Mask`` (query rows are the last ``Q`` rows of its ``KV x KV`` matrix, so a
            decode step passes ``Q < KV``), a ``DynamicMask`` (bound to ``q, k`` here), or
            None for full attention.
        scale: softmax scale, default ``D ** -0.5``.
        backend: ``"auto" | "flex" | "sdpa" | "quant"``.
        enable_gqa: None infers it from the head counts.
        block_size: tile size of the ``BlockMask`` for ``"flex"``; None = the mask's
            ``native_block_size`` if it has one (a predicted tile map), else 128.
        compile: compile FlexAttention; None = on CUDA only.

    Returns:
        ``[B, Hq, Q, D]`` in the dtype of ``q``. Rows with no kept key are zeros.
    """
    check_choice("backend", backend, BACKENDS)
    gqa = _validate(q, k, v, enable_gqa)
    mask = _resolve_mask(mask, q, k)
    choice = _choose(q, k, mask, backend)
    log.debug("flexsparse.attention: %s", choice)
    if choice.backend == "sdpa":
        return _run_sdpa(q, k, v, mask, scale, gqa, choice.sdpa_mode)
    if choice.backend == "quant":
        return _EXTRA["quant"][1](q, k, v, mask, scale, gqa)
    return _run_flex(q, k, v, mask, scale, gqa, block_size, compile)


attention.explain = explain  # fs.attention.explain(q, k, v, mask)


def _run_sdpa(q, k, v, mask, scale, gqa, mode) -> Tensor:
    sdpa = torch.nn.functional.scaled_dot_product_attention
    if mode == "none":
        return sdpa(q, k, v, scale=scale, enable_gqa=gqa)
    if mode == "causal":
        return sdpa(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
    dense = mask.to_dense(q.shape[2], k.shape[2], device=q.device)
    while dense.dim() < 4:
        dense = dense.unsqueeze(0)
    out = sdpa(q, k, v, attn_mask=dense, scale=scale, enable_gqa=gqa)
    # SDPA gives NaN for rows with no kept key; the contract is zeros.
    return torch.where(dense.any(-1, keepdim=True), out, torch.zeros((), dtype=out.dtype,
                                                                      device=out.device))


#: Compiled variants kept by Dynamo for one function (new shapes, dtypes, masks recompile).
_RECOMPILE_LIMIT = 64


@functools.lru_cache(maxsize=1)
def _compiled_flex():
    # A model sees many sequence lengths; Dynamo's default of 8 variants would silently fall
    # back to the unfused eager path after the eighth.
    config = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(config, name) and getattr(config, name) < _RECOMPILE_LIMIT:
            setattr(config, name, _RECOMPILE_LIMIT)
    return torch.compile(flex_attention, dynamic=False)


def _use_compile(device: torch.device, compile: bool | None) -> bool:
    if compile is not None:
        return compile
    env = os.environ.get("FLEXSPARSE_COMPILE", "auto")
    if env in ("0", "never"):
        return False
    if env in ("1", "always"):
        return True
    return device.type == "cuda"


def _run_flex(q, k, v, mask, scale, gqa, block_size, compile) -> Tensor:
    if mask is None:
        from .masks.basic import full

        mask = full()
    if block_size is None:
        block_size = getattr(mask, "native_block_size", None) or 128
    bm = mask.block_mask(
        q.shape[2], k.shape[2], device=q.device, heads=mask.heads, batch=mask.batch,
        block_size=block_size,
    )
    fn = _compiled_flex() if _use_compile(q.device, compile) else flex_attention
    compiled = fn is not flex_attention
    options = _kernel_options(bm.BLOCK_SIZE, q, compiled)
    if options:
        return fn(q, k, v, block_mask=bm, scale=scale, enable_gqa=gqa, kernel_options=options)
    return fn(q, k, v, block_mask=bm, scale=scale, enable_gqa=gqa)


def _kernel_options(block_size, q: Tensor, compiled: bool) -> dict | None:
    """Kernel options for compiled FlexAttention on CUDA.

    - Sparse blocks smaller than 128: the kernel's tile must divide the BlockMask's block
      size, so a (128, 64) map needs ``BLOCK_N <= 64``.
    - Hopper, head_dim <= 64: 128 x 64 tiles, 4 warps, 3 stages and TMA loads measured
      7.9 ms vs 12.3 ms with torch's defaults on the CogVideoX-2b radial mask (density
      0.53) and 13.4 vs 14.8 ms dense (H100, BENCHMARKS.md). Other head dims keep torch's
      tiles and only add TMA.
    """
    if q.device.type != "cuda" or not compiled:
        return None
    options: dict = {}
    hopper = torch.cuda.get_device_capability(q.device)[0] == 9
    if hopper and _TUNED and q.shape[-1] <= 64:
        options.update(BLOCK_M=128, BLOCK_N=64, num_warps=4, num_stages=3)
    bq, bk = (int(x) for x in block_size)
    if bq < options.get("BLOCK_M", 128) or bk < options.get("BLOCK_N", 128):
        options.update(
            BLOCK_M=math.gcd(bq, options.get("BLOCK_M", 128)),
            BLOCK_N=math.gcd(bk, options.get("BLOCK_N", 128)),
        )
    if hopper and _TUNED and q.shape[-1] % 16 == 0:
        options["USE_TMA"] = True
    return options or None


#: FLEXSPARSE_FLEX_TUNING=0 keeps torch's default FlexAttention kernel options.
_TUNED = os.environ.get("FLEXSPARSE_FLEX_TUNING", "1") != "0"


def reference(q: Tensor, k: Tensor, v: Tensor, mask=None, *, scale=None) -> Tensor:
    """Dense float64 reference on the CPU: softmax(q k^T * scale + mask) v with zeros for
    fully masked rows. Inputs of any dtype/device; returns float64 on the CPU."""
    q64, k64, v64 = (t.detach().to("cpu", torch.float64) for t in (q, k, v))
    gqa = _validate(q64, k64, v64, None)
    mask = _resolve_mask(mask, q, k)
    if mask is None:
        mode = "none"
    else:
        mode = "mask"
    return _run_sdpa(q64, k64, v64, mask, scale, gqa, mode)
