"""flexsparse masks inside transformers LLaMA-family models (LLaMA, Mistral, Qwen2, Qwen3).

>>> from flexsparse import masks
>>> from flexsparse.models import llama
>>> llama.patch(model, masks.causal() & masks.sliding_window(512), layers=range(8, 16))
>>> model.generate(**inputs)                 # prefill: BlockMask; decode: the mask's rows
>>> with llama.masked(model, seg_mask): ...  # another mask for a block of calls
>>> llama.unpatch(model)

How it hooks in (no copy of ``LlamaAttention.forward``; RoPE, GQA heads and the KV cache
stay transformers' own):

- Two attention functions are registered once in transformers' registries,
  ``"flexsparse"`` (original implementation ``sdpa``) and ``"flexsparse_eager"`` (original
  ``eager``), in ``ALL_ATTENTION_FUNCTIONS`` and, with the original mask builder, in
  ``ALL_MASK_ATTENTION_FUNCTIONS``. ``patch`` sets ``config._attn_implementation`` to one
  of them, so every layer calls our function with the mask transformers built for the
  original implementation.
- Our function dispatches on ``module.layer_idx``: a patched layer runs
  ``flexsparse.attention`` with its ``Mask``; any other layer (and a patched layer whose
  mask is None) calls the original function with the original mask, so its output is
  bit-identical to the unpatched model.

Semantics of the mask in a patched layer:

- The flexsparse mask *replaces* the model's causal mask (compose with ``masks.causal()``
  yourself; every built-in LLM pattern is causal already). Query rows of a call are the
  last ``q_len`` rows of the mask, which is what a decode step with a ``DynamicCache``
  needs (static caches, whose key tensors are longer than the sequence, are not supported).
- Padding (the 2-D ``attention_mask`` given to the model) is composed in: padding keys are
  masked out. With *left* padding each row's mask is evaluated on that row's unpadded
  positions, i.e. shifted by its number of leading padding tokens: a mask bound to a
  layout (segments, documents) means the same tokens whether or not the row is padded in
  a batch. Padding query rows see nothing (their outputs are zeros, never NaN).
- A mask with a fixed ``length`` may be used on rows up to that many tokens (a shorter
  row uses the top-left corner of the mask); longer inputs raise ``ValueError``.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor

from .._checks import check_choice
from ..attention import BACKENDS, DECODE_ROWS
from ..attention import attention as fs_attention
from ..mask import DynamicMask, Mask
from ._patch import ATTR, PatchHandle, get_handle

#: ``config.model_type`` values whose attention goes through the registry with the
#: ``(module, q, k, v, attention_mask, scaling=..., dropout=...)`` call this module handles
#: (verified in tests/test_llama.py).
SUPPORTED = ("llama", "mistral", "qwen2", "qwen3")
#: Original implementation -> the name registered for "flexsparse on top of it".
_IMPL_NAMES = {"sdpa": "flexsparse", "eager": "flexsparse_eager"}
_ORIGINAL = {v: k for k, v in _IMPL_NAMES.items()}
#: Attribute set on every attention module of a patched model (points to the handle).
_MODULE_ATTR = "_flexsparse_handle"

MaskArg = Mask | DynamicMask | Callable[[int], Any] | None

__all__ = ["SUPPORTED", "patch", "unpatch", "masked", "is_patched"]


# -- registration ---------------------------------------------------------------------------
_registered = False


def _register() -> None:
    """Register our attention and mask functions in transformers' registries (once)."""
    global _registered
    if _registered:
        return
    from transformers import AttentionInterface

    try:
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    except ImportError as exc:  # transformers < 4.53 has no mask registry
        raise ImportError(
            "flexsparse.models.llama needs transformers >= 4.53 (masking_utils); "
            f"found an older version: {exc}"
        ) from exc
    for original, name in _IMPL_NAMES.items():
        AttentionInterface.register(name, _attention_forward)
        AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[original])
    _registered = True


# -- public API -----------------------------------------------------------------------------
def patch(
    model,
    mask: MaskArg = None,
    layers: Iterable[int] | None = None,
    backend: str = "auto",
    *,
    decode_backend: str = "auto",
    tuned: str | None = None,
    parallel=None,
    block_size: int | tuple[int, int] | None = None,
) -> PatchHandle:
    """Make the chosen attention layers of ``model`` use a flexsparse mask.

    Args:
        model: a transformers LLaMA-family model (``LlamaForCausalLM``, ``LlamaModel``, ...,
            see ``SUPPORTED``) loaded with ``attn_implementation`` ``"sdpa"`` (default) or
            ``"eager"``.
        mask: a ``Mask`` / ``DynamicMask`` for every chosen layer, a callable
            ``layer_idx -> Mask | DynamicMask | None``, or None; None for a layer means its
            original dense causal attention.
        layers: indices of the layers to patch (default: all).
        backend: ``flexsparse.attention`` backend for prefill calls
            (``"auto" | "flex" | "sdpa" | "quant"``).
        decode_backend: backend for decode calls (``q_len < kv_len`` and at most
            ``attention.DECODE_ROWS`` query rows); ``"auto"`` materialises the mask rows.
        tuned: path of a parameter file from ``flexsparse.tune``; its per-layer
            ``DynamicMask`` is composed (``&``) with ``mask``. Dynamic masks apply to
            prefill calls; decode steps use the static part.
        parallel: a ``torch.distributed`` ProcessGroup: prefill of patched layers runs
            sequence-parallel (``flexsparse.distributed.ulysses_attention``), each rank
            holding a contiguous shard of the sequence.
        block_size: BlockMask tile size for ``"flex"``; None = the mask's native size (128,
            or a tuned meansim map's ``(block_q, block_kv)``).

    Returns:
        The ``PatchHandle``, also stored as ``model._flexsparse_patch``. Patching a patched
        model replaces the previous patch.
    """
    check_choice("backend", backend, BACKENDS)
    check_choice("decode_backend", decode_backend, BACKENDS)
    config = _text_config(model)
    attn_modules = _attention_modules(model)
    n = len(attn_modules)
    chosen = _check_layers(layers, n)
    static_for = _mask_function(mask)
    tuned_params = None
    if tuned is not None:
        from .. import tune

        tuned_params = tune.load_params(tuned)

    if getattr(model, ATTR, None) is not None:
        unpatch(model)
    original = config._attn_implementation or "sdpa"
    if original not in _IMPL_NAMES:
        raise ValueError(
            f"model uses attn_implementation={original!r}; flexsparse patches models loaded "
            f"with one of {sorted(_IMPL_NAMES)} (from_pretrained(..., attn_implementation="
            "'sdpa'))"
        )
    _register()

    def layer_masks(layer_idx: int) -> tuple[Any, Any]:
        static = static_for(layer_idx)
        dynamic = tuned_params.layer_mask(layer_idx) if tuned_params is not None else None
        return static, dynamic

    def mask_for_layer(layer_idx: int):
        static, dynamic = layer_masks(layer_idx)
        if dynamic is None:
            return static
        return dynamic if static is None else dynamic & static

    handle = PatchHandle(
        kind="llama", layers=chosen, mask_for_layer=mask_for_layer, backend=backend
    )
    handle.extra.update(
        layer_masks=layer_masks,
        chosen=frozenset(chosen),
        original=original,
        decode_backend=decode_backend,
        parallel=parallel,
        block_size=block_size,
        cache={"padding": None, "padded": {}, "unbound": {}},
    )

    def restore() -> None:
        config._attn_implementation = original
        for module in attn_modules:
            if getattr(module, _MODULE_ATTR, None) is handle:
                delattr(module, _MODULE_ATTR)
        if getattr(model, ATTR, None) is handle:
            delattr(model, ATTR)

    handle.restore = restore
    for module in attn_modules:
        setattr(module, _MODULE_ATTR, handle)
    setattr(model, ATTR, handle)
    config._attn_implementation = _IMPL_NAMES[original]
    return handle


def unpatch(model) -> None:
    """Restore the model's original attention (a ``ValueError`` if it is not patched)."""
    handle = get_handle(model)
    handle.restore()


def is_patched(model) -> bool:
    return getattr(model, ATTR, None) is not None


@contextmanager
def masked(model, mask: MaskArg, layers: Iterable[int] | None = None, **patch_kwargs):
    """Use ``mask`` for the calls inside the block.

    On a patched model the patched layers switch to ``mask`` (``layers`` must be None:
    the patched set stays) and switch back afterwards; an unpatched model is patched with
    ``mask`` (and ``layers``, ``patch_kwargs``) and unpatched afterwards."""
    handle = getattr(model, ATTR, None)
    if handle is None:
        handle = patch(model, mask, layers, **patch_kwargs)
        try:
            yield handle
        finally:
            unpatch(model)
        return
    if layers is not None or patch_kwargs:
        raise ValueError(
            "model is already patched: masked(model, mask) only swaps the mask; got "
            f"layers={layers!r}, {sorted(patch_kwargs)}. Unpatch first to change them."
        )
    static_for = _mask_function(mask)
    saved = handle.extra["layer_masks"], handle.mask_for_layer
    old_layer_masks = saved[0]

    def layer_masks(layer_idx: int):
        return static_for(layer_idx), old_layer_masks(layer_idx)[1]

    def mask_for_layer(layer_idx: int):
        static, dynamic = layer_masks(layer_idx)
        if dynamic is None:
            return static
        return dynamic if static is None else dynamic & static

    handle.extra["layer_masks"], handle.mask_for_layer = layer_masks, mask_for_layer
    try:
        yield handle
    finally:
        handle.extra["layer_masks"], handle.mask_for_layer = saved


# -- model inspection -----------------------------------------------------------------------
def _text_config(model):
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED:
        raise ValueError(
            f"model of type {type(model).__name__} (model_type={model_type!r}) is not "
            f"supported; supported architectures: {', '.join(SUPPORTED)}"
        )
    return config


def _attention_modules(model) -> list:
    base = model
    for _ in range(3):  # ForCausalLM -> .model -> layers
        if hasattr(base, "layers"):
            break
        base = getattr(base, "model", None)
        if base is None:
            break
    layers = getattr(base, "layers", None)
    if layers is None:
        raise ValueError(f"cannot find the decoder layers of {type(model).__name__}")
    modules = []
    for i, layer in enumerate(layers):
        attn = getattr(layer, "self_attn", None)
        if attn is None or getattr(attn, "layer_idx", None) != i:
            raise ValueError(
                f"layer {i} of {type(model).__name__} has no self_attn with layer_idx={i}"
            )
        modules.append(attn)
    return modules


def _check_layers(layers, n: int) -> list[int]:
    if layers is None:
        return list(range(n))
    if isinstance(layers, (int, str)) or not hasattr(layers, "__iter__"):
        raise TypeError(f"layers must be an iterable of layer indices or None, got {layers!r}")
    out = []
    for i in layers:
        if isinstance(i, bool) or not isinstance(i, int):
            raise TypeError(f"layers must hold ints, got {i!r}")
        if not 0 <= i < n:
            raise ValueError(f"layer index {i} out of range: the model has layers 0..{n - 1}")
        out.append(i)
    return sorted(set(out))


def _mask_function(mask: MaskArg) -> Callable[[int], Any]:
    if mask is None:
        return lambda layer_idx: None
    if isinstance(mask, (Mask, DynamicMask)):
        return lambda layer_idx: mask
    if callable(mask):

        def checked(layer_idx: int):
            m = mask(layer_idx)
            if m is not None and not isinstance(m, (Mask, DynamicMask)):
                raise TypeError(
                    f"mask({layer_idx}) must return a Mask, DynamicMask or None, "
                    f"got {type(m).__name__}"
                )
            return m

        return checked
    raise TypeError(
        "mask must be a Mask, a DynamicMask, a callable layer_idx -> Mask | None, or None; "
        f"got {type(mask).__name__}"
    )


# -- the attention function ------------------------------------------------------------------
def _original_function(module, original: str):
    if original == "sdpa":
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward
    return sys.modules[type(module).__module__].eager_attention_forward


def _attention_forward(
    module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[Tensor, None]:
    """Registered as ``"flexsparse"`` / ``"flexsparse_eager"``. q ``[B, Hq, Q, D]``, k, v
    ``[B, Hkv, KV, D]`` after RoPE and the cache update; returns ``([B, Q, Hq, D], None)``."""
    handle: PatchHandle | None = getattr(module, _MODULE_ATTR, None)
    original = _ORIGINAL.get(module.config._attn_implementation, "sdpa")
    layer_idx = module.layer_idx
    static = dynamic = None
    if handle is not None and layer_idx in handle.extra["chosen"]:
        static, dynamic = handle.extra["layer_masks"](layer_idx)
    if static is None and dynamic is None:
        fn = _original_function(module, original)
        return fn(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                  **kwargs)

    handle.notify(layer_idx, query, key, value)
    if dropout and module.training:
        raise ValueError(
            f"attention dropout {dropout} is not supported in flexsparse layers; call "
            "model.eval() or set attention_dropout=0"
        )
    q_len, kv_len = query.shape[2], key.shape[2]
    window = kwargs.get("sliding_window")
    if window is not None and kv_len > window:
        raise ValueError(
            f"layer {layer_idx} has a sliding window of {window} tokens and the input has "
            f"{kv_len}; flexsparse layers replace the model's mask: compose "
            "masks.sliding_window(...) into your mask and load the model with "
            "sliding_window=None"
        )
    extra = handle.extra
    decoding = q_len < kv_len and q_len <= DECODE_ROWS
    mask = static
    if dynamic is not None and not decoding:
        mask = dynamic if static is None else dynamic & static
    if mask is None:  # decode step of a dynamic-only layer: its static part is dense causal
        fn = _original_function(module, original)
        return fn(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                  **kwargs)

    padding = _padding(extra["cache"], attention_mask, kv_len)
    backend = extra["decode_backend"] if decoding else handle.backend
    gqa = query.shape[1] != key.shape[1]
    group = extra["parallel"]
    if group is not None and q_len == kv_len:
        if padding is not None:
            raise ValueError("sequence-parallel prefill does not support padded batches")
        from .. import distributed

        seq_len = _global_length(q_len, group, query.device)
        out = distributed.ulysses_attention(
            query, key, value, mask, group, seq_len=seq_len, backend=backend, scale=scaling,
            enable_gqa=gqa,
        )
    else:
        if isinstance(mask, DynamicMask) and padding is not None:
            mask = mask.bind(query, key)
        mask = _call_mask(
            extra["cache"], mask, padding, q_len, kv_len, layer_idx, decoding, query.shape[1]
        )
        out = fs_attention(
            query, key, value, mask, scale=scaling, backend=backend, enable_gqa=gqa,
            block_size=extra["block_size"],
        )
    return out.transpose(1, 2).contiguous(), None


def _global_length(local: int, group, device) -> int:
    import torch.distributed as dist

    t = torch.tensor([local], device=device)
    dist.all_reduce(t, group=group)
    return int(t.item())


class _Padding:
    """Key validity of a padded batch: ``valid`` bool ``[B, KV]``, ``shift`` long ``[B]``
    (leading padding tokens per row) and the unpadded length of the longest row."""

    def __init__(self, valid: Tensor):
        self.valid = valid
        self.shift = valid.to(torch.int8).argmax(-1)
        self.longest = int((valid.shape[-1] - self.shift).max())
        self.batch = valid.shape[0]


def _padding(cache: dict, attention_mask, kv_len: int) -> _Padding | None:
    """Padding of this forward call from the mask transformers built (the same tensor
    object reaches every layer of one forward, so this runs once per forward).

    Key ``j`` of row ``b`` is valid when some query row may see it: with the model's causal
    mask every real key is seen (by itself at prefill, by the new token when decoding)."""
    if attention_mask is None:
        return None
    hit = cache["padding"]
    if hit is not None and hit[0] is attention_mask:
        return hit[1]
    m = attention_mask
    if m.dim() != 4:
        raise ValueError(
            f"expected a 4-D attention mask from transformers, got shape {tuple(m.shape)}"
        )
    if m.dtype != torch.bool:
        m = m > torch.finfo(m.dtype).min / 2
    valid = m.any(dim=-2).any(dim=1)[..., -kv_len:]  # [B, KV]
    result = None if bool(valid.all()) else _Padding(valid)
    cache["padding"] = (attention_mask, result)
    cache["padded"].clear()  # padded masks depend on this call's padding
    return result


def _call_mask(
    cache: dict, mask, padding: _Padding | None, q_len, kv_len, layer_idx, decoding, heads
):
    """The mask ``flexsparse.attention`` gets for this call: the user's mask, unbound from
    its fixed length when the rows are shorter, and composed with the padding."""
    if isinstance(mask, DynamicMask):
        return mask  # bound per call by flexsparse.attention (no padding, full length)
    longest = kv_len if padding is None else padding.longest
    if mask.length is not None and longest > mask.length:
        raise ValueError(
            f"mask {mask.name!r} was built for sequences of {mask.length} tokens but layer "
            f"{layer_idx} got {longest} (prompt and generated tokens); build the mask for "
            "the whole sequence or use one without a fixed length"
        )
    if padding is None:
        if mask.length is not None and kv_len != mask.length:
            mask = _cached(cache["unbound"], id(mask), mask, lambda: _unbound(mask))
        if decoding and q_len == 1 and mask.sdpa_hint == "causal":
            return None  # the last row of a causal mask keeps every key: SDPA's dense path
        return mask
    return _cached(cache["padded"], id(mask), mask, lambda: _padded(mask, padding, heads))


def _cached(cache: dict, key, mask, build):
    hit = cache.get(key)
    if hit is not None and hit[0] is mask:
        return hit[1]
    value = build()
    if len(cache) >= 32:  # masks built per call (a callable returning new objects)
        cache.clear()
    cache[key] = (mask, value)  # keeps ``mask`` alive, so its id is not reused
    return value


def _unbound(mask: Mask) -> Mask:
    """``mask`` without its fixed length: shorter sequences use its top-left corner."""
    def on_device(device):
        return mask.mask_mod_for(device), mask.tile_rule_for(device)

    return Mask(
        on_device=on_device, has_tile_rule=mask.has_tile_rule, name=mask.name,
        heads=mask.heads, batch=mask.batch, binary_tiles=mask.binary_tiles,
        sdpa_hint=mask.sdpa_hint,
    )


def _padded(mask: Mask, padding: _Padding, heads: int) -> Mask:
    """Batch-dependent mask: row ``b`` evaluates ``mask`` at positions shifted by its
    leading padding ``shift[b]`` and drops padding keys.

    It carries ``heads`` even when ``mask`` is head independent: ``Mask.to_dense`` of a
    batch-dependent mask needs both dimensions."""
    if mask.batch is not None and mask.batch != padding.batch:
        raise ValueError(
            f"mask {mask.name!r} has batch {mask.batch} but the input has {padding.batch} rows"
        )
    valid, shift = padding.valid, padding.shift
    kv_last = valid.shape[-1] - 1
    limit = mask.length - 1 if mask.length is not None else None

    def on_device(device):
        mod = mask.mask_mod_for(device)
        valid_d, shift_d = valid.to(device), shift.to(device)

        def mask_mod(b, h, q_idx, kv_idx):
            s = shift_d[b]
            q = torch.clamp(q_idx - s, min=0, max=limit)
            kv = torch.clamp(kv_idx - s, min=0, max=limit)
            # Padding query rows see nothing (zeros), like transformers' own mask.
            ok = valid_d[b, torch.clamp(kv_idx, 0, kv_last)] & valid_d[b, torch.clamp(
                q_idx, 0, kv_last)]
            return mod(b, h, q, kv) & ok

        return mask_mod, None

    return Mask(
        on_device=on_device, name=f"padded({mask.name})", heads=mask.heads or heads,
        batch=padding.batch,
    )
