"""CogVideoX (diffusers): radial and scene-aware self-attention.

``patch(pipe_or_transformer, ...)`` installs ``FlexSparseCogVideoXProcessor`` on the
self-attention (``attn1``) of every block of a ``CogVideoXTransformer3DModel``. The
processor repeats the stock ``CogVideoXAttnProcessor2_0`` arithmetic (text tokens first,
video after; ``norm_q`` / ``norm_k``; RoPE on the video part only) and computes the
attention with ``flexsparse.attention(q, k, v, mask, backend=...)``.

>>> from flexsparse.models import cogvideox
>>> handle = cogvideox.patch(pipe, pattern="radial", num_frames=49, height=480, width=720,
...                          dense_layers=2, dense_timesteps=5)          # doctest: +SKIP
>>> video = pipe(prompt, num_frames=49, height=480, width=720).frames[0]  # doctest: +SKIP
>>> cogvideox.unpatch(pipe)                                               # doctest: +SKIP

How the denoising step is learnt (for ``dense_timesteps``): a forward pre-hook on the
transformer reads its ``timestep`` input. Denoising timesteps decrease, so a value lower
than the previous call's starts the next step, an equal value is the same step (CFG run as
two calls), and a higher value starts a new generation (step 0). When a pipeline is
patched, its ``progress_bar`` (opened once at the start of every denoising loop) also
resets the count, so a generation that starts at a lower timestep (video-to-video with
``strength``) is counted from 0 too. The counter lives on the patch handle of that
transformer: nothing is shared between pipelines. ``reset_steps(obj)`` resets it by hand.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .._checks import check_choice, check_float, check_int
from ..attention import BACKENDS, attention
from ..layout import VideoLayout
from ..mask import DynamicMask, Mask
from ._patch import ATTR, PatchHandle

log = logging.getLogger("flexsparse")

PATTERNS = ("radial", "dense", "scenes")


# -- finding the transformer and its layout ---------------------------------------------------
def _split(obj) -> tuple[Any, Any | None]:
    """``(transformer, pipeline or None)`` of a pipeline or a transformer."""
    transformer = getattr(obj, "transformer", None)
    if transformer is not None and hasattr(transformer, "transformer_blocks"):
        return transformer, obj
    if hasattr(obj, "transformer_blocks"):
        return obj, None
    raise TypeError(
        "pipe_or_transformer must be a CogVideoX pipeline or a CogVideoXTransformer3DModel "
        f"(something with .transformer_blocks), got {type(obj).__name__}"
    )


def _config(transformer, key: str, default=None):
    config = getattr(transformer, "config", None)
    return getattr(config, key, default) if config is not None else default


def layout_for(
    pipe_or_transformer, num_frames: int = 49, height: int = 480, width: int = 720
) -> VideoLayout:
    """Token layout of a ``num_frames x height x width`` (pixel) generation.

    Patch size and text length (``max_text_seq_length``) come from the transformer
    config; the VAE compression factors from the pipeline (``vae_scale_factor_temporal``
    / ``vae_scale_factor_spatial``) when one is given, else the transformer's
    ``temporal_compression_ratio`` and a spatial factor of 8. For CogVideoX 1.5
    (``patch_size_t``) the latent frames are padded to a multiple of ``patch_size_t``, as
    the pipeline does, and one layout "frame" is ``patch_size_t`` latent frames.

    CogVideoX-2b at 49 x 480 x 720: 13 frames x 1350 tokens + 226 text = 17,776 tokens.
    """
    transformer, pipe = _split(pipe_or_transformer)
    text = check_int("max_text_seq_length", _config(transformer, "max_text_seq_length", 226))
    patch = check_int("patch_size", _config(transformer, "patch_size", 2), minimum=1)
    temporal = getattr(pipe, "vae_scale_factor_temporal", None) or _config(
        transformer, "temporal_compression_ratio", 4
    )
    spatial = getattr(pipe, "vae_scale_factor_spatial", None) or 8
    base = VideoLayout.from_video(
        num_frames, height, width, "cogvideox", text_tokens=text, text_position="start",
        temporal_compression=temporal, spatial_compression=spatial, patch_size=patch,
    )
    patch_t = _config(transformer, "patch_size_t", None)
    if not patch_t:
        return base
    patch_t = check_int("patch_size_t", patch_t, minimum=1)
    return VideoLayout(
        frames=-(-base.frames // patch_t), tokens_per_frame=base.tokens_per_frame,
        text_tokens=text, text_position="start", temporal_compression=temporal * patch_t,
    )


# -- masks --------------------------------------------------------------------------------------
def _scene_mask(layout: VideoLayout, scenes) -> Mask:
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
    try:
        from ..masks.scenes import scenes as scene_mask
    except ImportError as exc:
        raise ValueError(f"scenes= needs flexsparse.masks.scenes, which failed: {exc}") from exc
    return scene_mask(layout, **kwargs)


def build_mask(
    layout: VideoLayout,
    pattern: str = "radial",
    *,
    decay_factor: float = 1.0,
    scenes=None,
    block_size: int = 128,
) -> Mask | None:
    """The static mask of ``pattern`` on ``layout`` (None = dense attention).

    ``"radial"``: ``masks.radial(layout, decay_factor, model="cogvideox", block_size)``;
    ``"dense"``: None; ``"scenes"``: the scene mask alone (``scenes`` required). With
    ``scenes`` given, the scene mask is and-ed with the pattern (radial & scenes).
    """
    check_choice("pattern", pattern, PATTERNS)
    decay_factor = check_float("decay_factor", decay_factor, low=0.0)
    block_size = check_int("block_size", block_size, minimum=1)
    if pattern == "scenes" and scenes is None:
        raise ValueError("pattern='scenes' needs scenes=(boundaries, adjacency)")
    mask = None
    if pattern == "radial":
        try:
            from ..masks.radial import radial
        except ImportError as exc:
            raise ValueError(f"pattern='radial' needs flexsparse.masks.radial: {exc}") from exc
        mask = radial(
            layout, decay_factor=decay_factor, model="cogvideox", block_size=block_size
        )
    if scenes is not None:
        scene = _scene_mask(layout, scenes)
        mask = scene if mask is None else mask & scene
    return mask


# -- step tracking -------------------------------------------------------------------------------
@dataclass
class _Steps:
    """Denoising step of one patched transformer, learnt from its ``timestep`` input."""

    step: int = 0
    last: float | None = None

    def reset(self) -> None:
        self.step, self.last = 0, None

    def see(self, timestep) -> None:
        if timestep is None:
            return
        value = float(torch.as_tensor(timestep).reshape(-1)[0])  # one scalar per forward
        if self.last is None or value > self.last:
            self.step = 0  # timesteps decrease within a generation: a rise is a new one
        elif value < self.last:
            self.step += 1
        self.last = value


def _timestep_hook(steps: _Steps):
    def hook(module, args, kwargs):
        # forward(hidden_states, encoder_hidden_states, timestep, ...)
        steps.see(kwargs["timestep"] if "timestep" in kwargs else (args[2] if len(args) > 2
                                                                    else None))

    return hook


# -- the processor --------------------------------------------------------------------------------
class FlexSparseCogVideoXProcessor:
    """``CogVideoXAttnProcessor2_0`` with the attention computed by ``flexsparse.attention``.

    Args:
        layer_idx: index of the block.
        handle: the ``PatchHandle`` (mask per layer, backend, observers, step state).
        stock: the processor this one replaced (run when an ``attention_mask`` is passed,
            which CogVideoX blocks never do).
    """

    def __init__(self, layer_idx: int, handle: PatchHandle, stock=None):
        self.layer_idx = layer_idx
        self.handle = handle
        self.stock = stock

    def mask_now(self) -> Mask | DynamicMask | None:
        """The mask of this layer at the current step (None = dense)."""
        extra = self.handle.extra
        if extra["steps"].step < extra["dense_timesteps"]:
            return None
        return self.handle.mask_for_layer(self.layer_idx)

    def __call__(
        self,
        attn,
        hidden_states: Tensor,
        encoder_hidden_states: Tensor,
        attention_mask: Tensor | None = None,
        image_rotary_emb=None,
    ) -> tuple[Tensor, Tensor]:
        if attention_mask is not None and self.stock is not None:
            return self.stock(attn, hidden_states, encoder_hidden_states, attention_mask,
                              image_rotary_emb)
        text_len = encoder_hidden_states.size(1)
        hidden_states = torch.cat([encoder_hidden_states, hidden_states], dim=1)
        batch, seq_len, _ = hidden_states.shape
        self._check_layout(text_len, seq_len)

        q, k, v = (proj(hidden_states) for proj in (attn.to_q, attn.to_k, attn.to_v))
        head_dim = k.shape[-1] // attn.heads
        q, k, v = (t.view(batch, -1, attn.heads, head_dim).transpose(1, 2) for t in (q, k, v))
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            k = attn.norm_k(k)
        if image_rotary_emb is not None:
            from diffusers.models.embeddings import apply_rotary_emb

            # RoPE on the video tokens only; cat instead of the stock in-place write.
            q = torch.cat([q[:, :, :text_len], apply_rotary_emb(q[:, :, text_len:],
                                                                 image_rotary_emb)], dim=2)
            if not attn.is_cross_attention:
                k = torch.cat([k[:, :, :text_len], apply_rotary_emb(k[:, :, text_len:],
                                                                     image_rotary_emb)], dim=2)

        mask = self.mask_now()
        trace = self.handle.extra.get("trace")
        if trace is not None:
            trace.append((self.handle.extra["steps"].step, self.layer_idx,
                          "dense" if mask is None else "sparse"))
        self.handle.notify(self.layer_idx, q, k, v)
        group = self.handle.extra.get("parallel")
        if group is not None:
            out = _sequence_parallel(q, k, v, mask, group, self.handle.backend)
        elif mask is None:
            out = attention(q, k, v, None, backend="sdpa")  # the stock dense SDPA call
        else:
            # a data-dependent (tuned) mask builds its BlockMask at its own tile size
            tiles = None if mask.is_dynamic else self.handle.extra["block_size"]
            out = attention(q, k, v, mask, backend=self.handle.backend, block_size=tiles)

        out = out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim)
        out = attn.to_out[1](attn.to_out[0](out))  # linear, dropout
        encoder_out, video_out = out.split([text_len, seq_len - text_len], dim=1)
        return video_out, encoder_out

    def _check_layout(self, text_len: int, seq_len: int) -> None:
        layout: VideoLayout = self.handle.extra["layout"]
        if text_len != layout.text_tokens or seq_len != layout.length:
            raise ValueError(
                f"flexsparse patch of block {self.layer_idx} was built for {layout.length} "
                f"tokens ({layout.text_tokens} text + {layout.frames} frames x "
                f"{layout.tokens_per_frame}, i.e. {self.handle.extra['video']}) but the "
                f"transformer got {seq_len} tokens ({text_len} text + {seq_len - text_len} "
                "video): patch again with this call's num_frames / height / width (or layout=)"
                " and max_sequence_length = the layout's text tokens"
            )


def _sequence_parallel(q, k, v, mask, group, backend) -> Tensor:
    """Attention split over the ranks of ``group`` (Ulysses), gathered back.

    Every rank runs the whole block on the same inputs (same seed / latents); only the
    attention is split: each rank keeps its contiguous shard (``distributed.shard``) of
    q, k, v, ``ulysses_attention`` exchanges heads for sequence with all-to-alls, and the
    output shards are all-gathered (``distributed.gather``) so the block continues on the
    full sequence.
    """
    from .. import distributed

    n = q.shape[2]
    local = [distributed.shard(t, group).contiguous() for t in (q, k, v)]
    out_local = distributed.ulysses_attention(*local, mask, group, seq_len=n, backend=backend)
    return distributed.gather(out_local, group, seq_len=n)


# -- patch / unpatch ------------------------------------------------------------------------------
def patch(
    pipe_or_transformer,
    mask: Mask | DynamicMask | None = None,
    *,
    pattern: str = "radial",
    num_frames: int = 49,
    height: int = 480,
    width: int = 720,
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
    """Make every block's self-attention of a CogVideoX transformer use a sparse pattern.

    Args:
        pipe_or_transformer: a ``CogVideoXPipeline`` (or any pipeline with a CogVideoX
            ``.transformer``) or a ``CogVideoXTransformer3DModel``.
        mask: an explicit mask over the ``[text + video]`` sequence (``length`` must be the
            layout's); replaces ``pattern``.
        pattern: ``"radial" | "dense" | "scenes"`` (see ``build_mask``).
        num_frames, height, width: the pixel video the pipeline will be called with; gives
            the layout (``layout_for``) unless ``layout`` is passed.
        layout: the token layout, overriding num_frames / height / width.
        decay_factor: radial decay (larger keeps fewer far-frame tokens).
        dense_layers: the first N blocks stay dense.
        dense_timesteps: the first N denoising steps run dense (module docstring: how).
        scenes: ``(boundaries, adjacency)`` or a dict of ``masks.scenes`` keywords;
            adjacency a matrix or networkx graph; and-ed with the pattern.
        backend: ``flexsparse.attention`` backend for the sparse layers ("auto", "flex",
            "sdpa", "quant"); dense layers/steps call SDPA like the stock processor.
        block_size: tile size of the radial mask and of the ``BlockMask``.
        tuned: path of a ``flexsparse.tune`` parameter file; its per-layer dynamic mask
            (``load_params(path).layer_mask(i)``) is and-ed with the pattern.
        parallel: a ``torch.distributed`` ProcessGroup: attention runs sequence-parallel
            through ``flexsparse.distributed.ulysses_attention`` (see ``_sequence_parallel``).

    Returns:
        The ``PatchHandle``, also stored as ``transformer._flexsparse_patch``. Its
        ``mask_for_layer(i)`` is the layer's mask after the dense timesteps (None = dense).
        Patching a patched model replaces the earlier patch.
    """
    transformer, pipe = _split(pipe_or_transformer)
    check_choice("backend", backend, BACKENDS)
    dense_layers = check_int("dense_layers", dense_layers, minimum=0)
    dense_timesteps = check_int("dense_timesteps", dense_timesteps, minimum=0)
    block_size = check_int("block_size", block_size, minimum=1)
    if layout is None:
        layout = layout_for(pipe_or_transformer, num_frames, height, width)
        video = f"{num_frames} frames at {height}x{width}"
    elif not isinstance(layout, VideoLayout):
        raise TypeError(f"layout must be a flexsparse.VideoLayout, got {type(layout).__name__}")
    else:
        video = "the given layout"
    if mask is None:
        static = build_mask(layout, pattern, decay_factor=decay_factor, scenes=scenes,
                            block_size=block_size)
    else:
        if not isinstance(mask, (Mask, DynamicMask)):
            raise TypeError(f"mask must be a flexsparse Mask or DynamicMask, got "
                            f"{type(mask).__name__}")
        static = mask if scenes is None else mask & _scene_mask(layout, scenes)
    if isinstance(static, Mask) and static.length not in (None, layout.length):
        raise ValueError(
            f"mask {static.name!r} was built for {static.length} tokens but {video} is "
            f"{layout.length} tokens ({layout.text_tokens} text + {layout.frames} x "
            f"{layout.tokens_per_frame}): build it for this layout"
        )

    blocks = list(transformer.transformer_blocks)
    for i, block in enumerate(blocks):
        if not hasattr(getattr(block, "attn1", None), "set_processor"):
            raise TypeError(f"transformer_blocks[{i}] has no diffusers attn1: not CogVideoX?")
    if getattr(transformer, ATTR, None) is not None:
        unpatch(transformer)

    layer_masks = _layer_masks(static, tuned, dense_layers, len(blocks))
    originals = [block.attn1.processor for block in blocks]
    steps = _Steps()
    handle = PatchHandle(
        kind="cogvideox",
        layers=list(range(len(blocks))),
        mask_for_layer=layer_masks,
        backend=backend,
        extra=dict(layout=layout, video=video, steps=steps, dense_layers=dense_layers,
                   dense_timesteps=dense_timesteps, block_size=block_size, parallel=parallel,
                   mask=static, trace=None),
    )
    hooks = [transformer.register_forward_pre_hook(_timestep_hook(steps), with_kwargs=True)]
    pipe_restore = _hook_pipeline(pipe, steps)

    def restore() -> None:
        for block, proc in zip(blocks, originals):
            block.attn1.set_processor(proc)
        for h in hooks:
            h.remove()
        pipe_restore()

    handle.restore = restore
    for i, block in enumerate(blocks):
        block.attn1.set_processor(FlexSparseCogVideoXProcessor(i, handle, originals[i]))
    setattr(transformer, ATTR, handle)
    log.info("flexsparse: patched %d CogVideoX blocks with %s (%s)", len(blocks),
             static, video)
    return handle


def _layer_masks(static, tuned, dense_layers: int, num_layers: int):
    """``layer_idx -> mask | None``: dense for the first ``dense_layers``, else the static
    mask and-ed with the tuned dynamic mask of the layer (loaded lazily, once)."""

    @functools.cache
    def params():
        from ..tune import load_params

        return load_params(tuned)

    @functools.cache
    def for_layer(layer_idx: int):
        if layer_idx < dense_layers:
            return None
        dyn = params().layer_mask(layer_idx) if tuned is not None else None
        if dyn is None:
            return static
        return dyn if static is None else dyn & static

    return for_layer


def _hook_pipeline(pipe, steps: _Steps):
    """Reset the step count whenever the pipeline opens its denoising progress bar (once
    per call). Returns the undo function."""
    if pipe is None or not callable(getattr(pipe, "progress_bar", None)):
        return lambda: None
    had_own = "progress_bar" in vars(pipe)
    original = pipe.progress_bar

    def progress_bar(*args, **kwargs):
        steps.reset()
        return original(*args, **kwargs)

    pipe.progress_bar = progress_bar

    def undo() -> None:
        if had_own:
            pipe.progress_bar = original
        else:
            vars(pipe).pop("progress_bar", None)

    return undo


def unpatch(pipe_or_transformer) -> None:
    """Restore the stock attention processors and remove the hooks (no-op if unpatched)."""
    transformer, _ = _split(pipe_or_transformer)
    handle = getattr(transformer, ATTR, None)
    if handle is None:
        return
    if handle.restore is not None:
        handle.restore()
    delattr(transformer, ATTR)


def reset_steps(pipe_or_transformer) -> None:
    """Start counting denoising steps from 0 again (e.g. before a hand-written loop)."""
    transformer, _ = _split(pipe_or_transformer)
    from ._patch import get_handle

    get_handle(transformer).extra["steps"].reset()


@contextlib.contextmanager
def recording(pipe_or_transformer) -> Iterator[list[tuple[int, int, str]]]:
    """Record ``(step, layer_idx, "dense" | "sparse")`` for every patched attention call
    inside the block (the path each block took at each step)."""
    transformer, _ = _split(pipe_or_transformer)
    from ._patch import get_handle

    handle = get_handle(transformer)
    trace: list[tuple[int, int, str]] = []
    handle.extra["trace"] = trace
    try:
        yield trace
    finally:
        handle.extra["trace"] = None


__all__ = [
    "FlexSparseCogVideoXProcessor",
    "PATTERNS",
    "build_mask",
    "layout_for",
    "patch",
    "recording",
    "reset_steps",
    "unpatch",
]
