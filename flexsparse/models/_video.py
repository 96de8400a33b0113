"""The one adapter base for diffusers transformers: ``Adapter`` (video and image models),
``VideoAdapter`` (CogVideoX, HunyuanVideo, Wan; ``_image.ImageAdapter`` for Flux and
HunyuanDiT).

Everything a patch shares lives here once: finding the transformer of a pipeline, the
pixel -> token layout rule, the static pattern (radial / scenes / an explicit mask, and-ed
with a tuned per-layer mask), dense layers and dense denoising steps, the layout check by
*shape*, ``recording()``, the typed patch state, deep copies, fused QKV projections,
``unpatch`` and the processors' plumbing (``qkv_heads``, ``SparseProcessor.attend_tokens``,
``output_projection``). A model's module holds only what differs: which attention modules
to patch, its token order, its processor's arithmetic, its config keys.

Writing an adapter (``flexsparse/models/wan.py`` is the worked example)::

    from ._video import SparseProcessor, VideoAdapter, output_projection, project_qkv, split_heads

    class FlexSparseWanProcessor(SparseProcessor):
        # the stock processor's arithmetic, with the attention call replaced
        def __call__(self, attn, hidden_states, encoder_hidden_states=None,
                     attention_mask=None, rotary_emb=None):
            if encoder_hidden_states is not None:       # cross-attention: not ours
                return self.stock(attn, hidden_states, encoder_hidden_states,
                                  attention_mask, rotary_emb)
            self.check_tokens(text_len=0, seq_len=hidden_states.shape[1])
            q, k, v = project_qkv(attn, hidden_states)  # fused or not, [B, N, H*D]
            ...                                          # the model's norms
            q, k, v = split_heads(attn, q, k, v)        # [B, N, H, D]
            ...                                          # its RoPE
            return output_projection(attn, self.attend_tokens(q, k, v))

    class WanAdapter(VideoAdapter):
        kind = "wan"                                # PatchHandle.kind
        transformer_classes = ("WanTransformer3DModel",)
        radial_model = "wan"                        # masks.radial(..., model=)
        text_position = None                        # no text tokens in self-attention
        processor = FlexSparseWanProcessor
        latent_dims = "BCFHW"                       # hidden_states (the token grid of a call)
        default_pixels = (81, 480, 832)             # the pipeline's default size

        def attention_modules(self, transformer):   # what to patch, in layer order
            return [block.attn1 for block in transformer.blocks]

        def patch_sizes(self, transformer):         # (patch_t, patch_h, patch_w)
            return tuple(transformer.config.patch_size)

        # also, where the defaults do not fit: default_vae (VAE factors without a
        # pipeline), layout_text_tokens, pixel_frames (the pipeline's frame rounding)

    ADAPTER = WanAdapter()          # the module exports ADAPTER, patch, unpatch, layout_for,
    patch, unpatch, layout_for = ADAPTER.patch, ADAPTER.unpatch, ADAPTER.layout_for
    # ... and re-exports recording, reset_steps from here (they work on any patch)

What the base does with it, on ``adapter.patch(pipe_or_transformer, ...)``:

- arguments are checked first (nothing on the model changes when one is wrong);
- ``video_layout`` gives the ``VideoLayout`` and the expected ``TokenGrid`` (frames x
  height x width in tokens) from the hooks above; ``layout=`` overrides it (its text
  order is checked against ``text_position``);
- every module of ``attention_modules`` gets ``processor(layer_idx, handle, stock)``
  through diffusers' ``set_processor``; ``stock`` is the processor it replaced;
- a forward pre-hook on the transformer binds the call's arguments to ``forward``'s
  signature, counts denoising steps from ``timestep`` (for ``dense_timesteps``) and checks
  ``token_grid(...)`` against the patched grid: a different shape raises ``ValueError``
  naming both, even when the token counts agree (49x480x720 and 33x480x1040 are both
  17,776 CogVideoX tokens);
- the pipeline's ``progress_bar`` resets the step count at every generation;
- ``fuse_qkv_projections`` / ``unfuse_qkv_projections`` keep the patch (processors must
  read q, k, v with ``project_qkv``, which follows ``attn.fused_projections``);
- ``copy.deepcopy`` of a patched transformer gives an independent patch (own step
  counter, trace, handle; its ``unpatch`` touches only the copy): hooks, guards and the
  state are objects, not closures, and the immutable settings are shared.

In the processor: ``self.check_tokens(text_len, seq_len)`` before the attention (catches a
call the pre-hook could not see), ``self.attend(q, k, v, extra=None)`` for the attention
itself (layer mask at this step or dense SDPA, trace, observers, sequence parallel;
``extra`` is and-ed in, e.g. a text padding mask; ``attend_tokens`` for ``[B, N, H, D]``
inputs), ``self.state`` for the rest. An image adapter (``_image.ImageAdapter``) resolves
its layout from height x width and goes through the same ``Adapter.install``.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from .._checks import check_choice, check_float, check_int
from ..attention import BACKENDS, attention
from ..layout import VideoLayout
from ..mask import DynamicMask, Mask
from ._patch import ATTR, PatchHandle, get_handle

log = logging.getLogger("flexsparse")

PATTERNS = ("radial", "dense", "scenes")
#: One ``recording()`` entry: ``(step, layer_idx, "dense" | "sparse")``.
TraceEntry = tuple[int, int, str]


# -- shapes -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class TokenGrid:
    """The video part of a sequence in tokens: ``frames x height x width`` (after the VAE
    and the patch embedding)."""

    frames: int
    height: int
    width: int

    @property
    def tokens(self) -> int:
        return self.frames * self.height * self.width

    def layout(self, *, text_tokens: int, text_position: str = "start",
               temporal_compression: int = 4) -> VideoLayout:
        """The ``VideoLayout`` of this grid with ``text_tokens`` text tokens."""
        return VideoLayout(frames=self.frames, tokens_per_frame=self.height * self.width,
                           text_tokens=text_tokens, text_position=text_position,
                           temporal_compression=temporal_compression)

    def __str__(self) -> str:
        return f"{self.frames} frames x {self.height}x{self.width} tokens"


def video_grid(num_frames: int, height: int, width: int, *, temporal: int, spatial: int,
               patch: int, patch_t: int = 1) -> TokenGrid:
    """Token grid of a ``num_frames x height x width`` pixel video, by diffusers' rule.

    Latent frames are ``(num_frames - 1) // temporal + 1`` (what the pipelines'
    ``prepare_latents`` computes, so 8 or 24 frames are accepted like 9 or 25), padded to
    a multiple of ``patch_t`` (CogVideoX 1.5) and cut into ``patch_t``-frame patches.
    ``height`` / ``width`` must be multiples of ``spatial * patch``.
    """
    num_frames = check_int("num_frames", num_frames, minimum=1)
    sizes = {"height": check_int("height", height, minimum=1),
             "width": check_int("width", width, minimum=1)}
    for name, value in (("temporal", temporal), ("spatial", spatial), ("patch", patch),
                        ("patch_t", patch_t)):
        check_int(name, value, minimum=1)
    for name, size in sizes.items():
        if size % (spatial * patch):
            raise ValueError(f"{name} must be a multiple of {spatial * patch} (VAE {spatial} "
                             f"x patch {patch}), got {size}")
    latent = (num_frames - 1) // temporal + 1
    return TokenGrid(-(-latent // patch_t), height // spatial // patch,
                     width // spatial // patch)


def describe(layout: VideoLayout, grid: TokenGrid | None) -> str:
    """``"13 frames x 30x45 tokens + 226 text = 17,776 tokens"`` (text first or last)."""
    video = (str(grid) if grid is not None
             else f"{layout.frames} frames x {layout.tokens_per_frame} tokens")
    if layout.text_tokens:
        video = (f"{layout.text_tokens} text + {video}" if layout.text_position == "start"
                 else f"{video} + {layout.text_tokens} text")
    return f"{video} = {layout.length:,} tokens"


# -- masks ------------------------------------------------------------------------------------
def scene_mask(layout: VideoLayout, scenes) -> Mask:
    """``scenes`` as ``(boundaries, adjacency)`` or a dict of ``masks.scenes`` keywords."""
    if isinstance(scenes, dict):
        if "boundaries" not in scenes or "adjacency" not in scenes:
            raise ValueError(
                f"scenes dict must hold 'boundaries' and 'adjacency', got keys {sorted(scenes)}"
            )
        kwargs = dict(scenes)
    elif isinstance(scenes, (tuple, list)) and len(scenes) == 2:
        kwargs = dict(boundaries=scenes[0], adjacency=scenes[1])
    else:
        raise TypeError(
            "scenes must be (boundaries, adjacency) or a dict with 'boundaries' and "
            f"'adjacency' (adjacency: a matrix or a networkx graph), got {scenes!r}"
        )
    from ..masks.scenes import scenes as build_scenes

    return build_scenes(layout, **kwargs)


def build_mask(layout: VideoLayout, pattern: str = "radial", *, model: str = "cogvideox",
               decay_factor: float = 1.0, scenes=None, block_size: int = 128) -> Mask | None:
    """The static mask of ``pattern`` on ``layout`` (None = dense attention).

    ``"radial"``: ``masks.radial(layout, decay_factor, model=model, block_size)``;
    ``"dense"``: None; ``"scenes"``: the scene mask alone (``scenes`` required). With
    ``scenes`` given, the scene mask is and-ed with the pattern (radial & scenes).
    """
    check_choice("pattern", pattern, PATTERNS)
    decay_factor = check_float("decay_factor", decay_factor, low=0.0)
    if decay_factor == float("inf"):
        raise ValueError("decay_factor must be finite, got inf")
    block_size = check_int("block_size", block_size, minimum=1)
    if pattern == "scenes" and scenes is None:
        raise ValueError("pattern='scenes' needs scenes=(boundaries, adjacency)")
    mask = None
    if pattern == "radial":
        from ..masks.radial import radial

        mask = radial(layout, decay_factor=decay_factor, model=model, block_size=block_size)
    if scenes is not None:
        scene = scene_mask(layout, scenes)
        mask = scene if mask is None else mask & scene
    return mask


class LayerMasks:
    """``layer_idx -> Mask | DynamicMask | None``: None (dense) for the first
    ``dense_layers``, else the static mask and-ed with the layer's tuned dynamic mask.

    Args:
        static: the mask of every sparse layer (None = dense).
        tuned: path of a parameter file (None: no tuned masks); read on first use, once.
        dense_layers: the first N layers stay dense.
        loader: ``path -> TunedParams`` (default ``flexsparse.tune.load_params``; adapters
            with their own layer numbering pass theirs).
        shape: ``(layers, heads)`` the file must hold (None: not checked); a file of
            another shape raises ``ValueError`` naming both on first use.

    Masks are immutable descriptions: a deep copy of a patched model shares them."""

    def __init__(self, static, tuned: str | None, dense_layers: int, *, loader=None,
                 shape: tuple[int, int] | None = None):
        self.static, self.tuned, self.dense_layers = static, tuned, dense_layers
        self.loader, self.shape = loader, shape
        self._cache: dict[int, Any] = {}

    @functools.cached_property
    def _params(self):
        if self.loader is None:
            from ..tune import load_params  # looked up per call: tests stub it

            params = load_params(self.tuned)
        else:
            params = self.loader(self.tuned)
        if self.shape is not None and (params.layers, params.heads) != self.shape:
            raise ValueError(
                f"tuned file {str(self.tuned)!r} holds {params.layers} layers x "
                f"{params.heads} heads but the patched model has {self.shape[0]} attention "
                f"layers x {self.shape[1]} heads"
            )
        return params

    def __call__(self, layer_idx: int):
        if layer_idx not in self._cache:
            self._cache[layer_idx] = self._build(layer_idx)
        return self._cache[layer_idx]

    def _build(self, layer_idx: int):
        if layer_idx < self.dense_layers:
            return None
        dyn = self._params.layer_mask(layer_idx) if self.tuned is not None else None
        if dyn is None:
            return self.static
        return dyn if self.static is None else dyn & self.static

    def __deepcopy__(self, memo):
        return self


# -- state ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class VideoSettings:
    """What a patch was asked for; immutable, shared by deep copies.

    Attributes:
        layout: the token layout the masks are built on.
        grid: the expected video token grid (None when ``layout=`` was given: then frames
            and tokens per frame are checked).
        video: how the layout was given (``"49 frames at 480x720"``, ``"the given layout"``).
        mask: the static pattern (after ``scenes``), None = dense.
        layer_masks: ``layer_idx -> mask | None`` (dense layers, tuned masks composed in).
        dense_layers, dense_timesteps, block_size: as passed to ``patch``.
        parallel: the ``torch.distributed`` group of sequence-parallel attention, or None.
        resize: what to patch again with when a call has another shape (the adapter's
            ``resize`` wording: frames for video, height x width for images).
    """

    layout: VideoLayout
    grid: TokenGrid | None
    video: str
    mask: Mask | DynamicMask | None
    layer_masks: LayerMasks
    dense_layers: int = 0
    dense_timesteps: int = 0
    block_size: int = 128
    parallel: Any = None
    resize: str = "num_frames / height / width (or layout=)"

    def __deepcopy__(self, memo):
        return self  # holds masks and a process group: shared, never copied

    def describe(self) -> str:
        return f"{describe(self.layout, self.grid)} ({self.video})"


@dataclass
class StepCounter:
    """Denoising step of one patched transformer, learnt from its ``timestep`` input.

    Timesteps decrease within a generation: a lower value than the last call's is the next
    step, an equal one the same step (CFG run as two calls), a higher one a new generation.
    """

    step: int = 0
    last: float | None = None

    def reset(self) -> None:
        self.step, self.last = 0, None

    def see(self, timestep) -> None:
        if timestep is None:
            return
        # The largest entry: a batch shares one step, and Wan 2.2 TI2V passes [B, tokens]
        # timesteps whose conditioning-frame entries are 0.
        value = float(torch.as_tensor(timestep).amax())
        if self.last is None or value > self.last:
            self.step = 0
        elif value < self.last:
            self.step += 1
        self.last = value


@dataclass
class VideoState:
    """The typed state of one video patch (``handle.state``); mutable parts are per model,
    so a deep copy of the transformer counts and records on its own."""

    settings: VideoSettings
    transformer: Any
    modules: list
    originals: list
    steps: StepCounter = field(default_factory=StepCounter)
    trace: list[TraceEntry] | None = None
    seen: TokenGrid | None = None  # token grid of the current forward (pre-hook)
    hook: Any = None
    pipe: Any = None  # weakref.ref to the pipeline whose progress_bar resets the steps

    def restore(self) -> None:
        """Undo the patch on ``self.transformer`` (and the pipeline hook), nothing else."""
        for module, original in zip(self.modules, self.originals):
            module.set_processor(original)
        owned = getattr(self.transformer, "original_attn_processors", None)
        if isinstance(owned, dict):  # fused while patched: unfuse must not bring us back
            for name, proc in list(owned.items()):
                if isinstance(proc, SparseProcessor) and proc.handle.state is self:
                    owned[name] = self.originals[proc.layer_idx]
        _remove_pre_hook(self.transformer, self.hook)
        for name in _FUSE_METHODS:
            if isinstance(vars(self.transformer).get(name), _FuseGuard):
                delattr(self.transformer, name)
        pipe = self.pipe() if self.pipe is not None else None
        wrapper = vars(pipe).get("progress_bar") if pipe is not None else None
        if isinstance(wrapper, _ResetSteps) and wrapper.steps is self.steps:
            if wrapper.had_own:
                pipe.progress_bar = wrapper.original
            else:
                del vars(pipe)["progress_bar"]
        handle = getattr(self.transformer, ATTR, None)
        if handle is not None and handle.state is self:
            delattr(self.transformer, ATTR)

    def reinstall(self, handle: PatchHandle, processor: type) -> None:
        """Put our processors back where a model method swapped them out."""
        for i, module in enumerate(self.modules):
            if not isinstance(module.processor, SparseProcessor):
                module.set_processor(processor(i, handle, self.originals[i]))


# -- hooks (objects, so that a deep copy gets its own) ----------------------------------------
@functools.cache
def _forward_signature(cls) -> inspect.Signature:
    return inspect.signature(cls.forward)


class _PreHook:
    """Forward pre-hook: counts steps from ``timestep``, checks the token grid."""

    def __init__(self, state: VideoState, adapter: Adapter):
        self.state, self.adapter = state, adapter

    def __call__(self, module, args, kwargs) -> None:
        try:
            bound = _forward_signature(type(module)).bind_partial(module, *args, **kwargs)
        except TypeError:
            return None  # the forward itself will say what is wrong with the call
        inputs = bound.arguments
        if self.state.settings.dense_timesteps or self.state.trace is not None:
            # reading the timestep is a host sync (and data-dependent under fullgraph
            # compile): only when the step decides dense layers or is recorded
            self.state.steps.see(inputs.get("timestep"))
        seen = self.adapter.token_grid(module, inputs)
        self.state.seen = seen
        if seen is not None:
            _check_grid(self.adapter.kind, self.state.settings, seen)
        return None


def _check_grid(kind: str, settings: VideoSettings, seen: TokenGrid) -> None:
    grid, layout = settings.grid, settings.layout
    same = (seen == grid if grid is not None else
            (seen.frames, seen.height * seen.width) == (layout.frames, layout.tokens_per_frame))
    if not same:
        got = describe(seen.layout(text_tokens=layout.text_tokens,
                                   text_position=layout.text_position), seen)
        raise ValueError(
            f"flexsparse {kind} patch was built for {settings.describe()} but the "
            f"transformer got {got}: patch again with this call's {settings.resize}"
        )


def _remove_pre_hook(module, hook) -> None:
    # by identity, not a RemovableHandle: a deep copy's hook dict holds the copied hook
    for key, fn in list(module._forward_pre_hooks.items()):
        if fn is hook:
            del module._forward_pre_hooks[key]
            module._forward_pre_hooks_with_kwargs.pop(key, None)


class _ResetSteps:
    """The pipeline's ``progress_bar`` (opened once per denoising loop), resetting the
    step count first."""

    def __init__(self, original, had_own: bool, steps: StepCounter):
        self.original, self.had_own, self.steps = original, had_own, steps

    def __call__(self, *args, **kwargs):
        self.steps.reset()
        return self.original(*args, **kwargs)


_FUSE_METHODS = ("fuse_qkv_projections", "unfuse_qkv_projections")


class _FuseGuard:
    """``transformer.fuse_qkv_projections()`` (or ``unfuse_``) that keeps the patch: some
    models swap every processor for a fused stock one; ours read fused projections."""

    def __init__(self, transformer, name: str, handle: PatchHandle, processor: type):
        self.transformer, self.name = transformer, name
        self.handle, self.processor = handle, processor

    def __call__(self, *args, **kwargs):
        out = getattr(type(self.transformer), self.name)(self.transformer, *args, **kwargs)
        self.handle.state.reinstall(self.handle, self.processor)
        return out


def project_qkv(attn, hidden_states: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(q, k, v)`` projections ``[B, N, H * D]`` of self-attention, through ``to_qkv``
    when the module's projections are fused (``fuse_qkv_projections``)."""
    if getattr(attn, "fused_projections", False) and hasattr(attn, "to_qkv"):
        return attn.to_qkv(hidden_states).chunk(3, dim=-1)
    return attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)


def added_qkv(attn, encoder_hidden_states: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The text stream's ``(q, k, v)`` ``[B, T, H * D]`` of a joint-attention block
    (``add_*_proj``), through ``to_added_qkv`` when fused."""
    if getattr(attn, "fused_projections", False) and hasattr(attn, "to_added_qkv"):
        return attn.to_added_qkv(encoder_hidden_states).chunk(3, dim=-1)
    return (attn.add_q_proj(encoder_hidden_states), attn.add_k_proj(encoder_hidden_states),
            attn.add_v_proj(encoder_hidden_states))


def split_heads(attn, *tensors: Tensor) -> tuple[Tensor, ...]:
    """``[B, N, H * D] -> [B, N, H, D]`` for each tensor (``attn.heads`` heads)."""
    return tuple(t.unflatten(-1, (attn.heads, -1)) for t in tensors)


def norm_qk(attn, q: Tensor, k: Tensor, *, added: bool = False) -> tuple[Tensor, Tensor]:
    """The module's per-head q / k norms (``norm_q`` / ``norm_k``, or the text stream's
    ``norm_added_q`` / ``norm_added_k``) where it has them; ``[..., D]`` in and out."""
    norm_q = getattr(attn, "norm_added_q" if added else "norm_q", None)
    norm_k = getattr(attn, "norm_added_k" if added else "norm_k", None)
    return (q if norm_q is None else norm_q(q)), (k if norm_k is None else norm_k(k))


def qkv_heads(attn, hidden_states: Tensor, *, added: bool = False
              ) -> tuple[Tensor, Tensor, Tensor]:
    """``(q, k, v)`` ``[B, N, H, D]`` of ``hidden_states``: projected (fused or not; the
    text stream's projections when ``added``), split into heads, q / k normed."""
    project = added_qkv if added else project_qkv
    q, k, v = split_heads(attn, *project(attn, hidden_states))
    q, k = norm_qk(attn, q, k, added=added)
    return q, k, v


def output_projection(attn, hidden_states: Tensor) -> Tensor:
    """``attn.to_out``: the output linear, then its dropout."""
    return attn.to_out[1](attn.to_out[0](hidden_states))


# -- the processor base -----------------------------------------------------------------------
class SparseProcessor:
    """Base of the adapters' attention processors.

    Args:
        layer_idx: index of the patched attention module (``attention_modules`` order).
        handle: the ``PatchHandle`` (``handle.state`` is the ``VideoState``).
        stock: the processor this one replaced (for calls the adapter leaves alone).
    """

    def __init__(self, layer_idx: int, handle: PatchHandle, stock=None):
        self.layer_idx, self.handle, self.stock = layer_idx, handle, stock

    @property
    def state(self) -> VideoState:
        return self.handle.state

    def mask_now(self) -> Mask | DynamicMask | None:
        """The mask of this layer at the current step (None = dense)."""
        state = self.state
        if state.steps.step < state.settings.dense_timesteps:
            return None
        return state.settings.layer_masks(self.layer_idx)

    def check_tokens(self, text_len: int, seq_len: int) -> None:
        """``ValueError`` naming both layouts unless ``text_len`` text tokens and
        ``seq_len`` tokens in all are what the patch was built for."""
        settings = self.state.settings
        layout = settings.layout
        if text_len == layout.text_tokens and seq_len == layout.length:
            return
        seen = self.state.seen
        got = (describe(seen.layout(text_tokens=text_len, text_position=layout.text_position),
                        seen) if seen is not None and seen.tokens + text_len == seq_len
               else f"{text_len} text + {seq_len - text_len} video = {seq_len:,} tokens")
        raise ValueError(
            f"flexsparse {self.handle.kind} patch of layer {self.layer_idx} was built for "
            f"{settings.describe()} but the transformer got {got}: patch again with this "
            f"call's {settings.resize} and a text length of {layout.text_tokens} tokens"
        )

    def attend(self, q: Tensor, k: Tensor, v: Tensor, *, extra: Mask | None = None) -> Tensor:
        """Attention of ``q, k, v`` ``[B, H, N, D]`` with this layer's mask at this step
        (dense: the stock SDPA call), ``extra`` and-ed in; records the trace, notifies the
        observers and runs sequence-parallel when patched with ``parallel=``."""
        state, settings = self.state, self.state.settings
        mask = self.mask_now()
        if state.trace is not None:
            state.trace.append((state.steps.step, self.layer_idx,
                                "dense" if mask is None else "sparse"))
        self.handle.notify(self.layer_idx, q, k, v)
        if extra is not None:
            mask = extra if mask is None else _and_extra(mask, extra)
        if settings.parallel is not None:
            return _sequence_parallel(q, k, v, mask, settings.parallel, self.handle.backend)
        if mask is None:
            return attention(q, k, v, None, backend="sdpa")
        # a data-dependent (tuned) mask builds its BlockMask at its own tile size
        tiles = None if mask.is_dynamic else settings.block_size
        return attention(q, k, v, mask, backend=self.handle.backend, block_size=tiles)


    def attend_tokens(self, q: Tensor, k: Tensor, v: Tensor, *,
                      extra: Mask | None = None) -> Tensor:
        """``attend`` for token-major ``q, k, v`` ``[B, N, H, D]`` (as ``qkv_heads`` gives
        them): the output ``[B, N, H * D]`` in ``q``'s dtype."""
        out = self.attend(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), extra=extra)
        return out.transpose(1, 2).flatten(2, 3).to(q.dtype)


#: ``extra`` (a per-forward mask such as text padding) -> {layer mask: layer mask & extra}:
#: every layer of a forward shares one composed mask, so its BlockMask is built once.
_COMPOSED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _and_extra(mask: Mask | DynamicMask, extra: Mask) -> Mask | DynamicMask:
    per_layer_mask = _COMPOSED.setdefault(extra, {})
    composed = per_layer_mask.get(mask)
    if composed is None:
        composed = per_layer_mask[mask] = mask & extra
    return composed


def _sequence_parallel(q, k, v, mask, group, backend) -> Tensor:
    """Attention split over the ranks of ``group`` (Ulysses), gathered back.

    Every rank runs the whole block on the same inputs; only the attention is split: each
    rank keeps its contiguous shard of q, k, v, ``ulysses_attention`` exchanges heads for
    sequence with all-to-alls, and the output shards are all-gathered so the block goes on
    with the full sequence.
    """
    from .. import distributed

    n = q.shape[2]
    local = [distributed.shard(t, group).contiguous() for t in (q, k, v)]
    out_local = distributed.ulysses_attention(*local, mask, group, seq_len=n, backend=backend)
    return distributed.gather(out_local, group, seq_len=n)


# -- the adapter ------------------------------------------------------------------------------
def split_pipeline(obj) -> tuple[Any, Any | None]:
    """``(transformer, pipeline or None)`` of a diffusers pipeline or a transformer."""
    transformer = getattr(obj, "transformer", None)
    if isinstance(transformer, torch.nn.Module):
        return transformer, obj
    return obj, None


def class_names(obj) -> list[str]:
    """Names of ``type(obj)`` and its bases (a subclass of a supported model is one)."""
    return [cls.__name__ for cls in type(obj).__mro__]


def config_value(transformer, key: str, default=None):
    """``transformer.config.<key>``, or ``default`` where the config lacks it (or is None)."""
    config = getattr(transformer, "config", None)
    value = getattr(config, key, None) if config is not None else None
    return default if value is None else value


def check_mask_type(mask) -> None:
    """``TypeError`` unless ``mask`` is None, a ``Mask`` or a ``DynamicMask``."""
    if mask is not None and not isinstance(mask, (Mask, DynamicMask)):
        raise TypeError(f"mask must be a flexsparse Mask or DynamicMask, got "
                        f"{type(mask).__name__}")


class Adapter:
    """What every diffusers adapter shares, video or image: finding the transformer,
    checking the options, installing the processors, hooks and state (``install``),
    ``unpatch``. ``VideoAdapter`` and ``_image.ImageAdapter`` add how a layout is resolved
    and which patterns run.

    Class attributes: ``kind`` (``PatchHandle.kind``), ``transformer_classes`` (class names
    accepted by ``patch``), ``text_position`` (``"start"`` / ``"end"``: where the model puts
    text tokens in the patched attention; None: no text there), ``processor`` (a
    ``SparseProcessor`` subclass), ``patterns`` (the ``pattern=`` values ``patch`` allows),
    ``resize`` (the ``patch`` arguments a shape-mismatch error points to).
    """

    kind: str = ""
    transformer_classes: tuple[str, ...] = ()
    text_position: str | None = "start"
    processor: type[SparseProcessor] = SparseProcessor
    patterns: tuple[str, ...] = ()
    resize: str = "num_frames / height / width (or layout=)"

    # -- what an adapter implements ------------------------------------------------------------
    def attention_modules(self, transformer) -> list:
        """The attention modules to patch, in layer order (each has ``set_processor``)."""
        raise NotImplementedError

    def token_grid(self, transformer, inputs: dict[str, Any]) -> TokenGrid | None:
        """The token grid of a forward call from its bound arguments (``inputs`` maps
        ``forward``'s parameter names to values); None if it cannot be told."""
        return None

    def load_tuned(self, path):
        """The ``TunedParams`` of a ``tuned=`` file (``flexsparse.tune.load_params``)."""
        from ..tune import load_params

        return load_params(path)

    def tuned_shape(self, transformer, modules: list) -> tuple[int, int] | None:
        """``(layers, heads)`` a tuned file must hold (None: not checked)."""
        return None

    # -- shared --------------------------------------------------------------------------------
    def heads(self, transformer) -> int:
        """Attention heads of the first patched module."""
        return int(self.attention_modules(transformer)[0].heads)

    def transformer_of(self, obj) -> tuple[Any, Any | None]:
        """``(transformer, pipeline or None)``; ``TypeError`` for another model."""
        transformer, pipe = split_pipeline(obj)
        if not set(class_names(transformer)) & set(self.transformer_classes):
            raise TypeError(
                f"pipe_or_transformer must be a {self.kind} pipeline or a "
                f"{' / '.join(self.transformer_classes)}, got {type(obj).__name__}"
            )
        return transformer, pipe

    def check_pattern(self, pattern: str | None) -> None:
        """``ValueError`` unless ``pattern`` is one of ``self.patterns`` (None passes)."""
        if pattern is not None:
            check_choice("pattern", pattern, self.patterns)

    @staticmethod
    def check_options(backend: str, dense_layers: int, dense_timesteps: int,
                      block_size: int, tuned) -> tuple[int, int, int]:
        """The options every ``patch`` takes, checked: ``(dense_layers, dense_timesteps,
        block_size)``."""
        check_choice("backend", backend, BACKENDS)
        dense_layers = check_int("dense_layers", dense_layers, minimum=0)
        dense_timesteps = check_int("dense_timesteps", dense_timesteps, minimum=0)
        block_size = check_int("block_size", block_size, minimum=1)
        if tuned is not None and not isinstance(tuned, (str, bytes)) and not hasattr(
                tuned, "__fspath__"):
            raise TypeError(f"tuned must be a path, got {type(tuned).__name__}")
        return dense_layers, dense_timesteps, block_size

    def install(self, pipe_or_transformer, static: Mask | DynamicMask | None, *,
                layout: VideoLayout, grid: TokenGrid | None, video: str, tuned=None,
                dense_layers: int = 0, dense_timesteps: int = 0, backend: str = "auto",
                block_size: int = 128, parallel=None) -> PatchHandle:
        """Put ``processor`` on every attention module, with the hooks and the state.

        ``layout`` / ``grid`` / ``video``: the resolved layout, its token grid (None: only
        frames and tokens per frame are checked) and how it was given; ``static``: the mask
        of every sparse layer (its length must be the layout's); the rest as ``patch``'s
        (checked by ``check_options``). Patching a patched model replaces the patch.
        """
        transformer, pipe = self.transformer_of(pipe_or_transformer)
        if isinstance(static, Mask) and static.length not in (None, layout.length):
            raise ValueError(
                f"mask {static.name!r} was built for {static.length:,} tokens but {video} "
                f"is {describe(layout, grid)}: build it for this layout (layout_for)"
            )
        modules = list(self.attention_modules(transformer))
        for i, module in enumerate(modules):
            if not hasattr(module, "set_processor"):
                raise TypeError(f"attention module {i} of {type(transformer).__name__} has "
                                "no set_processor: not a diffusers attention module")
        if getattr(transformer, ATTR, None) is not None:
            self.unpatch(transformer)

        layer_masks = LayerMasks(static, tuned, dense_layers, loader=self.load_tuned,
                                 shape=self.tuned_shape(transformer, modules))
        settings = VideoSettings(
            layout=layout, grid=grid, video=video, mask=static, layer_masks=layer_masks,
            dense_layers=dense_layers, dense_timesteps=dense_timesteps,
            block_size=block_size, parallel=parallel, resize=self.resize,
        )
        state = VideoState(settings=settings, transformer=transformer, modules=modules,
                           originals=[m.processor for m in modules])
        handle = PatchHandle(kind=self.kind, layers=list(range(len(modules))),
                             mask_for_layer=layer_masks, backend=backend,
                             restore=state.restore, state=state)
        state.hook = _PreHook(state, self)
        transformer.register_forward_pre_hook(state.hook, with_kwargs=True)
        self._hook_pipeline(pipe, state)
        for name in _FUSE_METHODS:
            if callable(getattr(type(transformer), name, None)):
                setattr(transformer, name, _FuseGuard(transformer, name, handle,
                                                      self.processor))
        for i, module in enumerate(modules):
            module.set_processor(self.processor(i, handle, state.originals[i]))
        setattr(transformer, ATTR, handle)
        log.info("flexsparse: patched %d %s attention modules with %s (%s)", len(modules),
                 self.kind, static, settings.describe())
        return handle

    @staticmethod
    def _hook_pipeline(pipe, state: VideoState) -> None:
        if pipe is None or not callable(getattr(pipe, "progress_bar", None)):
            return
        had_own = "progress_bar" in vars(pipe)
        pipe.progress_bar = _ResetSteps(pipe.progress_bar, had_own, state.steps)
        state.pipe = weakref.ref(pipe)

    def unpatch(self, pipe_or_transformer) -> None:
        """Restore the stock processors and remove the hooks (no-op if unpatched)."""
        transformer, _ = split_pipeline(pipe_or_transformer)
        handle = getattr(transformer, ATTR, None)
        if handle is None:
            return
        if handle.restore is not None:
            handle.restore()
        if getattr(transformer, ATTR, None) is handle:
            delattr(transformer, ATTR)


class VideoAdapter(Adapter):
    """What differs per video model; subclass it (module docstring: an example).

    Besides ``Adapter``'s: ``radial_model`` (``masks.radial``'s ``model``), ``latent_dims``
    (the order of the 5-D ``hidden_states``: ``"BCFHW"`` or ``"BFCHW"``) and
    ``default_pixels`` (``(num_frames, height, width)`` of the pipeline's call when
    ``patch`` gets none). The layout comes from ``patch_sizes``, ``vae_factors``,
    ``layout_text_tokens`` and ``pixel_frames`` (``video_layout`` combines them).
    """

    radial_model: str = "cogvideox"
    patterns = PATTERNS
    latent_dims: str = "BCFHW"
    default_pixels: tuple[int, int, int] | None = None

    # -- what an adapter implements ------------------------------------------------------------
    def patch_sizes(self, transformer) -> tuple[int, int, int]:
        """``(patch_t, patch_h, patch_w)``: latent frames, rows and columns per token
        (default: the config's ``patch_size_t`` (1) and ``patch_size`` (2))."""
        patch = check_int("patch_size", config_value(transformer, "patch_size", 2), minimum=1)
        patch_t = check_int("patch_size_t", config_value(transformer, "patch_size_t", 1),
                            minimum=1)
        return patch_t, patch, patch

    def default_vae(self, transformer) -> tuple[int, int]:
        """``(temporal, spatial)`` VAE factors when the pipeline gives none."""
        return 4, 8

    def layout_text_tokens(self, transformer) -> int:
        """Text tokens in the patched attention (0 without text)."""
        return 0

    def pixel_frames(self, num_frames: int, temporal: int) -> int:
        """``num_frames`` as the pipeline uses it (some round it)."""
        return num_frames

    # -- shared --------------------------------------------------------------------------------
    def vae_factors(self, transformer, pipe) -> tuple[int, int]:
        """``(temporal, spatial)``: the pipeline's ``vae_scale_factor_temporal`` /
        ``_spatial``, else ``default_vae``."""
        temporal, spatial = self.default_vae(transformer)
        return (getattr(pipe, "vae_scale_factor_temporal", None) or temporal,
                getattr(pipe, "vae_scale_factor_spatial", None) or spatial)

    def video_layout(self, transformer, pipe, num_frames: int, height: int, width: int
                     ) -> tuple[VideoLayout, TokenGrid]:
        """Layout and token grid of a ``num_frames x height x width`` pixel video (the
        config's patch sizes and text length; the pipeline's VAE factors if given)."""
        patch_t, patch_h, patch_w = self.patch_sizes(transformer)
        if patch_h != patch_w:
            raise ValueError(f"{self.kind} patch_size must be square in height and width, "
                             f"got {(patch_t, patch_h, patch_w)}")
        temporal, spatial = self.vae_factors(transformer, pipe)
        grid = video_grid(self.pixel_frames(num_frames, temporal), height, width,
                          temporal=temporal, spatial=spatial, patch=patch_h, patch_t=patch_t)
        layout = grid.layout(text_tokens=self.layout_text_tokens(transformer),
                             text_position=self.text_position or "end",
                             temporal_compression=temporal * patch_t)
        return layout, grid

    def token_grid(self, transformer, inputs: dict[str, Any]) -> TokenGrid | None:
        """From the 5-D latents ``hidden_states`` (``latent_dims`` order) and the patch
        sizes; latent frames padded to whole temporal patches like ``video_grid``."""
        latents = inputs.get("hidden_states")
        if not isinstance(latents, Tensor) or latents.dim() != 5:
            return None
        size = dict(zip(self.latent_dims, latents.shape))
        patch_t, patch_h, patch_w = self.patch_sizes(transformer)
        return TokenGrid(-(-size["F"] // patch_t), size["H"] // patch_h, size["W"] // patch_w)

    def default_video(self, transformer, pipe) -> tuple[int, int, int]:
        """``(num_frames, height, width)`` when ``patch`` gets none (``default_pixels``)."""
        if self.default_pixels is None:
            raise ValueError(f"flexsparse {self.kind} patch needs num_frames, height and "
                             "width (or layout=)")
        return self.default_pixels

    def layout_for(self, pipe_or_transformer, num_frames: int | None = None,
                   height: int | None = None, width: int | None = None) -> VideoLayout:
        """Token layout of a ``num_frames x height x width`` pixel generation."""
        transformer, pipe = split_pipeline(pipe_or_transformer)
        return self._resolve(transformer, pipe, num_frames, height, width)[0]

    def _resolve(self, transformer, pipe, num_frames, height, width):
        if num_frames is None or height is None or width is None:
            d_frames, d_height, d_width = self.default_video(transformer, pipe)
            num_frames = d_frames if num_frames is None else num_frames
            height = d_height if height is None else height
            width = d_width if width is None else width
        layout, grid = self.video_layout(transformer, pipe, num_frames, height, width)
        return layout, grid, f"{num_frames} frames at {height}x{width}"

    def check_layout(self, layout) -> VideoLayout:
        """``layout=`` as given: a ``VideoLayout`` in this model's token order."""
        if not isinstance(layout, VideoLayout):
            raise TypeError(f"layout must be a flexsparse.VideoLayout, got "
                            f"{type(layout).__name__}")
        if self.text_position is None and layout.text_tokens:
            raise ValueError(f"layout has {layout.text_tokens} text tokens but {self.kind} "
                             "self-attention holds video tokens only: text_tokens must be 0")
        if layout.text_tokens and layout.text_position != self.text_position:
            raise ValueError(f"layout.text_position must be {self.text_position!r} for "
                             f"{self.kind} (its token order), got {layout.text_position!r}")
        return layout

    def patch(
        self,
        pipe_or_transformer,
        mask: Mask | DynamicMask | None = None,
        *,
        pattern: str = "radial",
        num_frames: int | None = None,
        height: int | None = None,
        width: int | None = None,
        layout: VideoLayout | None = None,
        decay_factor: float = 1.0,
        dense_layers: int = 0,
        dense_timesteps: int = 0,
        scenes=None,
        backend: str = "auto",
        block_size: int = 128,
        tuned: str | None = None,
        parallel=None,
    ) -> PatchHandle:
        """Make every patched attention module of the transformer use a sparse pattern.

        Args:
            pipe_or_transformer: a diffusers pipeline with this model as ``.transformer``,
                or the transformer.
            mask: an explicit mask over the whole sequence (its ``length`` must be the
                layout's); replaces ``pattern``.
            pattern: ``"radial" | "dense" | "scenes"`` (``build_mask``).
            num_frames, height, width: the pixel video the pipeline will be called with
                (default: the pipeline's defaults); give the layout unless ``layout``.
            layout: the token layout, overriding num_frames / height / width.
            decay_factor: radial decay (larger keeps fewer far-frame tokens).
            dense_layers: the first N patched layers stay dense.
            dense_timesteps: the first N denoising steps run dense.
            scenes: ``(boundaries, adjacency)`` or a dict of ``masks.scenes`` keywords;
                and-ed with the pattern.
            backend: ``flexsparse.attention`` backend of the sparse layers ("auto", "flex",
                "sdpa", "quant"); dense layers / steps call SDPA like the stock processor.
            block_size: tile size of the radial mask and of the ``BlockMask``.
            tuned: path of a ``flexsparse.tune`` parameter file; its per-layer dynamic
                mask is and-ed with the pattern (loaded on first use).
            parallel: a ``torch.distributed`` ProcessGroup: attention runs
                sequence-parallel (``flexsparse.distributed.ulysses_attention``).

        Returns:
            The ``PatchHandle`` (``handle.state``: the ``VideoState``), also stored as
            ``transformer._flexsparse_patch``. Patching a patched model replaces the patch.
        """
        transformer, pipe = self.transformer_of(pipe_or_transformer)
        self.check_pattern(pattern)
        dense_layers, dense_timesteps, block_size = self.check_options(
            backend, dense_layers, dense_timesteps, block_size, tuned)
        if layout is None:
            layout, grid, video = self._resolve(transformer, pipe, num_frames, height, width)
        else:
            layout, grid, video = self.check_layout(layout), None, "the given layout"
        static = self._static_mask(layout, mask, pattern, decay_factor, scenes, block_size)
        return self.install(pipe_or_transformer, static, layout=layout, grid=grid, video=video,
                            tuned=tuned, dense_layers=dense_layers,
                            dense_timesteps=dense_timesteps, backend=backend,
                            block_size=block_size, parallel=parallel)

    def _static_mask(self, layout, mask, pattern, decay_factor, scenes, block_size):
        if mask is None:
            return build_mask(layout, pattern, model=self.radial_model,
                              decay_factor=decay_factor, scenes=scenes, block_size=block_size)
        check_mask_type(mask)
        return mask if scenes is None else mask & scene_mask(layout, scenes)


# -- functions on any patched video model -----------------------------------------------------
def video_state(pipe_or_transformer) -> VideoState:
    """The ``VideoState`` of a patched video transformer (or pipeline)."""
    state = get_handle(pipe_or_transformer).state
    if not isinstance(state, VideoState):
        raise ValueError(f"{type(pipe_or_transformer).__name__} is not patched by a "
                         "flexsparse video adapter")
    return state


def reset_steps(pipe_or_transformer) -> None:
    """Start counting denoising steps from 0 again (e.g. before a hand-written loop)."""
    video_state(pipe_or_transformer).steps.reset()


@contextlib.contextmanager
def recording(pipe_or_transformer) -> Iterator[list[TraceEntry]]:
    """Record ``(step, layer_idx, "dense" | "sparse")`` for every patched attention call
    inside the block (the path each layer took at each step)."""
    state = video_state(pipe_or_transformer)
    trace: list[TraceEntry] = []
    state.trace = trace
    try:
        yield trace
    finally:
        state.trace = None


__all__ = [
    "Adapter", "LayerMasks", "PATTERNS", "SparseProcessor", "StepCounter", "TokenGrid",
    "VideoAdapter", "VideoSettings", "VideoState", "added_qkv", "build_mask",
    "check_mask_type", "config_value", "describe", "norm_qk", "output_projection",
    "project_qkv", "qkv_heads", "recording", "reset_steps", "scene_mask", "split_heads",
    "split_pipeline", "video_grid", "video_state",
]
