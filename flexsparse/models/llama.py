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
  yourself; every built-in LLM pattern is causal already). Query rows of a call sit where
  the cache wrote them: transformers' own 4-D mask tells which key slots hold a token, so a
  ``StaticCache`` (allocated at its full length) or a left-padded batch puts the rows at
  the right positions and its empty slots are never keys. Eager prefills cut the keys to
  the written slots; decode steps and compiled calls (``torch.compile``, generate's
  compiled static-cache decode) keep the tensor shapes and mask the empty slots instead
  (no host sync, one shape per static cache).
- Decode steps (and every compiled call) of a ``causal()`` mask run the model's own
  attention call with its own mask: the same mask, bit for bit the stock path. Other masks
  materialise their rows for SDPA there.
- ``output_attentions=True`` returns every layer's weights ``[B, H, Q, KV]``, computed for
  that call by an eager masked softmax (unpatched layers of an SDPA model too).
- Padding (the 2-D ``attention_mask`` given to the model) is composed in: padding keys are
  masked out. With *left* padding each row's mask is evaluated on that row's unpadded
  positions, i.e. shifted by its number of leading padding tokens: a mask bound to a
  layout (segments, documents) means the same tokens whether or not the row is padded in
  a batch. Padding query rows see nothing (their outputs are zeros, never NaN).
- A mask with a fixed ``length`` may be used on rows up to that many tokens (a shorter
  row uses the top-left corner of the mask); longer inputs raise ``ValueError`` (compiled:
  a key tensor longer than ``length``, e.g. a static cache, raises).
- Layers with a sliding window (Mistral, Qwen2 sliding layers) raise once the sequence is
  longer than the window (their cache drops keys the flexsparse mask may keep).
- ``copy.deepcopy`` of a patched model is patched independently; switching
  ``config._attn_implementation`` between ``"sdpa"`` and ``"eager"`` keeps the patch on
  top of the new one, any other implementation raises at the next forward.
"""

from __future__ import annotations

import functools
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
        cache={"geometry": None, "rows_geometry": None, "rows": {}, "padded": {},
               "unbound": {}},
    )

    # A partial, not a closure: ``copy.deepcopy(model)`` copies its arguments along with the
    # model, so unpatching a copy restores the copy and leaves the original patched.
    handle.restore = functools.partial(_restore, model, handle)
    for module in attn_modules:
        setattr(module, _MODULE_ATTR, handle)
        module.register_forward_pre_hook(_follow_implementation)
    setattr(model, ATTR, handle)
    config._attn_implementation = _IMPL_NAMES[original]
    return handle


def unpatch(model) -> None:
    """Restore the model's original attention (a ``ValueError`` if it is not patched)."""
    handle = get_handle(model)
    handle.restore()


def _restore(model, handle: PatchHandle) -> None:
    config = _text_config(model)
    if config._attn_implementation in _ORIGINAL:
        config._attn_implementation = handle.extra["original"]
    for module in _attention_modules(model):
        hooks = module._forward_pre_hooks
        for key in [k for k, fn in hooks.items() if fn is _follow_implementation]:
            del hooks[key]
        if getattr(module, _MODULE_ATTR, None) is handle:
            delattr(module, _MODULE_ATTR)
    if getattr(model, ATTR, None) is handle:
        delattr(model, ATTR)


def _follow_implementation(module, args) -> None:
    """Forward pre-hook of every attention module of a patched model.

    ``model.set_attn_implementation("eager")`` (or writing ``config._attn_implementation``)
    after ``patch`` would silently route around the patch: a switch between ``"sdpa"`` and
    ``"eager"`` keeps the patch on top of the new implementation; any other one raises."""
    handle = getattr(module, _MODULE_ATTR, None)
    if handle is None:
        return
    config = module.config
    current = config._attn_implementation
    if current in _ORIGINAL:
        return
    if current in _IMPL_NAMES:
        handle.extra["original"] = current
        config._attn_implementation = _IMPL_NAMES[current]
        return
    raise ValueError(
        f"model is patched by flexsparse but config._attn_implementation was switched to "
        f"{current!r}; flexsparse layers run on top of {sorted(_IMPL_NAMES)}: "
        "llama.unpatch(model) before switching to another implementation"
    )


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


def _is_compiling() -> bool:
    compiler = getattr(torch, "compiler", None)
    return bool(compiler is not None and compiler.is_compiling())


def _wants_weights(module, kwargs: dict) -> bool:
    """``output_attentions`` of this call (transformers passes it down as a kwarg; the
    config's value is the default)."""
    flag = kwargs.get("output_attentions")
    if flag is None:
        flag = getattr(module.config, "output_attentions", False)
    return bool(flag)


def _attention_forward(
    module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[Tensor, Tensor | None]:
    """Registered as ``"flexsparse"`` / ``"flexsparse_eager"``. q ``[B, Hq, Q, D]``, k, v
    ``[B, Hkv, KV, D]`` after RoPE and the cache update; returns ``([B, Q, Hq, D], weights)``
    with weights ``[B, Hq, Q, KV]`` when ``output_attentions`` is on, else None."""
    handle: PatchHandle | None = getattr(module, _MODULE_ATTR, None)
    original = _ORIGINAL.get(module.config._attn_implementation, "sdpa")
    layer_idx = module.layer_idx
    weights = _wants_weights(module, kwargs)
    static = dynamic = None
    if handle is not None and layer_idx in handle.extra["chosen"]:
        static, dynamic = handle.extra["layer_masks"](layer_idx)
    if static is None and dynamic is None:
        return _run_original(module, original, query, key, value, attention_mask, scaling,
                             dropout, weights, kwargs)

    handle.notify(layer_idx, query, key, value)
    if dropout and module.training:
        raise ValueError(
            f"attention dropout {dropout} is not supported in flexsparse layers; call "
            "model.eval() or set attention_dropout=0"
        )
    compiling = _is_compiling()
    q_len = query.shape[2]
    _check_window(layer_idx, kwargs.get("sliding_window"), key.shape[2],
                  kwargs.get("position_ids"), compiling)
    extra = handle.extra
    if not compiling and _decode_fast_path(extra, static, dynamic, attention_mask, q_len,
                                           key.shape[2], weights):
        if static is None or static.sdpa_hint == "causal":
            return _run_original(module, original, query, key, value, attention_mask, scaling,
                                 dropout, weights, kwargs)
        return _decode_rows(extra["cache"], static, query, key, value, attention_mask,
                            scaling), None
    geom = _geometry(extra["cache"], attention_mask, q_len, key.shape[2], compiling,
                     query.device)
    if compiling:
        decoding = q_len == 1 or (q_len < key.shape[2] and q_len <= DECODE_ROWS
                                  and dynamic is None)
    else:
        decoding = q_len < geom.end and q_len <= DECODE_ROWS
    mask = static
    if dynamic is not None and not decoding:
        if compiling:
            raise ValueError(
                f"layer {layer_idx} has a data-dependent (tuned / meansim) mask, which cannot "
                "run inside torch.compile for a prefill; run the prefill uncompiled (as "
                "generate() does with a static cache) or patch without tuned="
            )
        mask = dynamic if static is None else dynamic & static
    rows = compiling or weights or (decoding and extra["decode_backend"] in ("auto", "sdpa"))
    if mask is None or (rows and not weights and isinstance(mask, Mask)
                        and mask.sdpa_hint == "causal"):
        # A decode step of a dynamic-only layer (its static part is dense causal), or a
        # causal mask: the model's own mask is this mask (padding and unwritten cache slots
        # included), so the original function is the stock path, bit for bit.
        return _run_original(module, original, query, key, value, attention_mask, scaling,
                             dropout, weights, kwargs)
    if not compiling and geom.end < key.shape[2]:
        # A static cache is allocated at its full length: the slots past the tokens seen so
        # far hold no token yet, and they are no keys of this call.
        key, value = key[:, :, : geom.end], value[:, :, : geom.end]
    kv_len = key.shape[2]
    gqa = query.shape[1] != key.shape[1]
    if rows:
        if isinstance(mask, DynamicMask):
            mask = mask.bind(query, key)
        _check_length(mask, geom.longest if geom.longest is not None else kv_len, layer_idx)
        keep = _rows_keep(mask, geom, q_len, kv_len, query.shape[1], query.device)
        if weights:
            return _eager_with_weights(query, key, value, keep, scaling)
        return _sdpa_rows(query, key, value, keep, scaling, gqa).transpose(1, 2), None

    padding = geom.padding
    backend = extra["decode_backend"] if decoding else handle.backend
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


def _run_original(module, original, query, key, value, attention_mask, scaling, dropout,
                  weights, kwargs):
    """The layer's unpatched attention. With ``output_attentions`` on a model loaded with
    SDPA (which has no weights to return) the weights come from an eager computation with
    the model's own mask, so every layer reports them."""
    if weights and original == "sdpa":
        q_len, kv_len = query.shape[2], key.shape[2]
        if attention_mask is None:
            pos = torch.arange(kv_len - q_len, kv_len, device=query.device)
            keep = torch.arange(kv_len, device=query.device)[None, :] <= pos[:, None]
        else:
            keep = _keep_of(attention_mask, kv_len)
        while keep.dim() < 4:
            keep = keep.unsqueeze(0)
        return _eager_with_weights(query, key, value, keep, scaling)
    kwargs = dict(kwargs, output_attentions=weights) if "output_attentions" in kwargs else kwargs
    fn = _original_function(module, original)
    return fn(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
              **kwargs)


def _check_window(layer_idx: int, window, kv_len: int, position_ids, compiling: bool) -> None:
    """A layer with a sliding window (Mistral, Qwen2 sliding layers) drops keys older than
    the window from its cache and its mask; past the window the flexsparse mask (which
    replaces the model's) would be evaluated on a cache that lost tokens. Refused there."""
    if window is None:
        return
    seen = kv_len
    if not compiling and isinstance(position_ids, Tensor) and position_ids.numel():
        seen = max(seen, int(position_ids.max()) + 1)
    # Compiled calls cannot read positions; a cache as long as the window may be past it.
    if seen > window or (compiling and kv_len >= window):
        raise ValueError(
            f"layer {layer_idx} has a sliding window of {window} tokens and the sequence has "
            f"{seen}; flexsparse layers replace the model's mask: compose "
            "masks.sliding_window(...) into your mask and load the model with "
            "sliding_window=None"
        )


class _Geometry:
    """Where the tokens of one forward call sit in the key tensor.

    ``valid`` bool ``[B, KV]``: slot ``j`` of row ``b`` holds a real (not padding, already
    written) token, or None when every slot does. ``end``: slots written so far (a static
    cache is longer); query row ``i`` is slot ``end - Q + i``. Eager calls have ``valid``
    cut to ``end`` and ``end`` an int; compiled calls keep the full length and a 0-d tensor
    ``end`` (no host sync). ``longest``: unpadded length of the longest row (eager only).
    ``padding``: the ``_Padding`` of ``valid`` for ``flexsparse.attention`` (eager only).
    """

    def __init__(self, valid: Tensor | None, end, longest: int | None):
        self.valid = valid
        self.end = end
        self.longest = longest
        self.padding = _Padding(valid) if valid is not None and longest is not None else None


def _keep_of(attention_mask: Tensor, kv_len: int) -> Tensor:
    """Boolean keep-matrix ``[B, 1|H, Q, KV]`` of the mask transformers built (boolean for
    SDPA, additive float for eager)."""
    m = attention_mask
    if m.dim() != 4:
        raise ValueError(
            f"expected a 4-D attention mask from transformers, got shape {tuple(m.shape)}"
        )
    if m.dtype != torch.bool:
        m = m > torch.finfo(m.dtype).min / 2
    return m[..., -kv_len:]


def _geometry(cache: dict, attention_mask, q_len: int, kv_len: int, compiling: bool,
              device=None) -> _Geometry:
    """The ``_Geometry`` of this call from the mask transformers built.

    Slot ``j`` of row ``b`` is valid when some query row may see it: with the model's causal
    mask every real token is seen (by itself at prefill, by the new token when decoding),
    while padding and unwritten static-cache slots are seen by none. The same mask object
    reaches every layer of one forward, so an eager forward computes this once.
    ``compiling``: tensor operations only (no host sync), the keys keep their length."""
    if attention_mask is None:
        if 1 < q_len < kv_len:
            # transformers (>= 5.2x) passes no mask for the prefill of an empty static cache
            # and lets SDPA's top-left ``is_causal`` skip the unwritten slots: the tokens
            # are the first ``q_len`` slots, not the last.
            if compiling:
                return _Geometry(torch.arange(kv_len, device=device)[None] < q_len, q_len,
                                 None)
            return _Geometry(None, q_len, q_len)
        # The plain causal case (or one new token against the whole cache): every slot
        # holds a token.
        return _Geometry(None, kv_len, kv_len)
    key = (attention_mask, attention_mask._version, q_len, kv_len)
    if not compiling:
        hit = cache["geometry"]
        if hit is not None and hit[0][0] is key[0] and hit[0][1:] == key[1:]:
            return hit[1]
    valid = _keep_of(attention_mask, kv_len).any(dim=-2).any(dim=1)  # [B, KV]
    slots = torch.arange(1, kv_len + 1, device=valid.device)
    end = (valid.any(0) * slots).amax().clamp(min=q_len)
    if compiling:
        return _Geometry(valid, end, None)
    end = int(end)
    valid = valid[:, :end]
    if bool(valid.all()):
        result = _Geometry(None, end, end)
    else:
        shift = valid.to(torch.int8).argmax(-1)
        result = _Geometry(valid, end, int(end - shift.min()))
    cache["geometry"] = (key, result)  # keeps the mask alive, so the identity test is sound
    cache["padded"].clear()  # padded masks depend on this call's padding
    return result


def _check_length(mask: Mask, longest: int, layer_idx: int) -> None:
    if mask.length is not None and longest > mask.length:
        raise ValueError(
            f"mask {mask.name!r} was built for sequences of {mask.length} tokens but layer "
            f"{layer_idx} got {longest} (prompt and generated tokens, or the length of a "
            "compiled static cache); build the mask for the whole sequence or use one "
            "without a fixed length"
        )


def _rows_keep(mask: Mask, geom: _Geometry, q_len: int, kv_len: int, heads: int,
               device) -> Tensor:
    """Bool ``[B|1, H|1, Q, KV]``: the mask's rows for this call's query slots, evaluated
    on each row's unpadded positions, with padding and unwritten slots dropped. Tensor
    operations only (no host sync), so it traces under ``torch.compile``."""
    if mask.heads is not None and mask.heads != heads:
        raise ValueError(f"mask {mask.name!r} has {mask.heads} heads but the layer has {heads}")
    zero = torch.zeros((), dtype=torch.long, device=device)
    b = zero if mask.batch is None else torch.arange(mask.batch, device=device).view(-1, 1, 1, 1)
    h = zero if mask.heads is None else torch.arange(mask.heads, device=device).view(1, -1, 1, 1)
    q = (geom.end - q_len + torch.arange(q_len, device=device)).view(q_len, 1)
    kv = torch.arange(kv_len, device=device).view(1, kv_len)
    mod = mask.mask_mod_for(device)
    if geom.valid is None:
        keep = mod(b, h, q, kv)
    else:
        valid = geom.valid
        if mask.batch is not None and mask.batch != valid.shape[0]:
            raise ValueError(
                f"mask {mask.name!r} has batch {mask.batch} but the input has "
                f"{valid.shape[0]} rows"
            )
        shift = valid.to(torch.int8).argmax(-1).view(-1, 1, 1, 1)
        top = kv_len - 1 if mask.length is None else mask.length - 1
        keep = mod(b, h, (q - shift).clamp(0, top), (kv - shift).clamp(0, top))
        q_ok = valid[:, q.view(-1).clamp(0, kv_len - 1)]  # padding query rows see nothing
        keep = keep & valid[:, None, None, :] & q_ok[:, None, :, None]
    keep = keep.to(torch.bool)
    while keep.dim() < 4:
        keep = keep.unsqueeze(0)
    return keep.expand(*keep.shape[:2], q_len, kv_len)


def _sdpa_mask(keep: Tensor, hq: int, hkv: int, dtype: torch.dtype | None = None
               ) -> tuple[Tensor, Tensor]:
    """``(attn_mask, any_key)`` for ``_sdpa_rows``: SDPA's mask for the rows ``keep``
    (``[B|1, H|1, Q, KV]``) and bool ``[B|1, H|1, Q, 1]``, whether a row keeps a key.

    A head-independent mask of a GQA layer is stacked ``[B|1, 1, G*Q, KV]``: the query heads
    of one KV head become rows, so the fused kernels take it (enable_gqa with a mask falls
    back to the math kernel). With ``dtype`` the mask is additive (0 / -inf), as SDPA would
    convert a bool mask on every call."""
    any_key = keep.any(-1, keepdim=True)
    if hq != hkv and keep.shape[1] == 1:
        rows, _, q_len, kv_len = keep.shape
        g = hq // hkv
        keep = keep.unsqueeze(2).expand(rows, 1, g, q_len, kv_len).reshape(
            rows, 1, g * q_len, kv_len)
    if dtype is not None:
        keep = torch.zeros(keep.shape, dtype=dtype, device=keep.device).masked_fill_(
            ~keep, float("-inf"))
    return keep, any_key


def _sdpa_rows(query: Tensor, key: Tensor, value: Tensor, keep: Tensor | None, scale,
               gqa: bool | None = None, prepared: tuple[Tensor, Tensor] | None = None
               ) -> Tensor:
    """SDPA with the materialised rows ``keep`` (or ``prepared = _sdpa_mask(keep, ...)``);
    ``[B, Hq, Q, D]``, zeros where a row keeps no key."""
    sdpa = torch.nn.functional.scaled_dot_product_attention
    b, hq, q_len, d = query.shape
    hkv = key.shape[1]
    attn_mask, any_key = prepared if prepared is not None else _sdpa_mask(keep, hq, hkv)
    if hq != hkv and attn_mask.shape[1] == 1:
        g = hq // hkv
        out = sdpa(query.reshape(b, hkv, g * q_len, d), key, value, attn_mask=attn_mask,
                   scale=scale).reshape(b, hq, q_len, d)
    else:
        out = sdpa(query, key, value, attn_mask=attn_mask, scale=scale, enable_gqa=hq != hkv)
    return torch.where(any_key, out, out.new_zeros(()))


#: ``decode_backend`` values whose decode steps materialise the mask rows for SDPA.
_ROWS_BACKENDS = ("auto", "sdpa")


def _decode_fast_path(extra: dict, static, dynamic, attention_mask, q_len: int, kv_len: int,
                      weights: bool) -> bool:
    """Whether an eager call is a decode step that can run without a host sync.

    A few rows against a longer key tensor: one new token, or (with transformers' mask to
    place them) up to ``DECODE_ROWS`` rows without a tuned part. Such a call needs neither
    the number of written slots nor the keys cut to them: a causal mask is the model's own
    (its original call), any other mask's rows are evaluated against every slot, the
    unwritten ones masked. Reading the written length would sync the host once per forward
    and cutting the keys would give SDPA a new shape every step (as a static cache never
    does). Masks with a fixed length (checked against the unpadded length) and tuned-only
    or data-dependent masks keep the general path."""
    if weights or extra["decode_backend"] not in _ROWS_BACKENDS:
        return False
    if not (q_len < kv_len and q_len <= DECODE_ROWS):
        return False
    if q_len > 1 and (dynamic is not None or attention_mask is None):
        return False
    if static is None:
        return True
    return isinstance(static, Mask) and (static.sdpa_hint == "causal" or static.length is None)


def _rows_geometry(cache: dict, attention_mask, q_len: int, kv_len: int, device) -> _Geometry:
    """``_geometry`` without a host sync (keys of full length), once per eager forward."""
    key = (attention_mask, getattr(attention_mask, "_version", None), q_len, kv_len)
    hit = cache["rows_geometry"]
    if hit is not None and hit[0][0] is key[0] and hit[0][1:] == key[1:]:
        return hit[1]
    geom = _geometry(cache, attention_mask, q_len, kv_len, True, device)
    cache["rows_geometry"] = (key, geom)  # keeps the mask alive: the identity test is sound
    cache["rows"].clear()  # rows depend on this geometry
    return geom


def _decode_rows(cache: dict, mask: Mask, query: Tensor, key: Tensor, value: Tensor,
                 attention_mask, scale) -> Tensor:
    """A decode step of ``mask`` without a host sync: ``[B, Q, Hq, D]``.

    The mask's rows (and SDPA's mask made of them) are built once per forward and shared
    by every layer with the same mask, heads and dtype."""
    q_len, kv_len = query.shape[2], key.shape[2]
    hq, hkv = query.shape[1], key.shape[1]
    geom = _rows_geometry(cache, attention_mask, q_len, kv_len, query.device)
    rows = cache["rows"]
    tag = (id(mask), hq, hkv, query.dtype)
    hit = rows.get(tag)
    if hit is None or hit[0] is not mask:
        keep = _rows_keep(mask, geom, q_len, kv_len, hq, query.device)
        hit = (mask, _sdpa_mask(keep, hq, hkv, query.dtype))
        if len(rows) >= 32:  # masks built per call (a callable returning new objects)
            rows.clear()
        rows[tag] = hit  # keeps ``mask`` alive, so its id is not reused
    out = _sdpa_rows(query, key, value, None, scale, prepared=hit[1])
    return out.transpose(1, 2).contiguous()


def _eager_with_weights(query: Tensor, key: Tensor, value: Tensor, keep: Tensor, scale
                        ) -> tuple[Tensor, Tensor]:
    """Attention written out, as transformers' eager path computes it: returns
    ``([B, Q, Hq, D], weights [B, Hq, Q, KV])``; rows that keep no key are zeros."""
    g = query.shape[1] // key.shape[1]
    if g > 1:
        key, value = key.repeat_interleave(g, dim=1), value.repeat_interleave(g, dim=1)
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    scores = torch.matmul(query, key.transpose(2, 3)) * scale
    scores = scores.masked_fill(~keep, float("-inf"))
    weights = torch.softmax(scores, dim=-1, dtype=torch.float32)
    weights = torch.nan_to_num(weights, nan=0.0).to(query.dtype)
    out = torch.matmul(weights, value)
    return out.transpose(1, 2).contiguous(), weights


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
