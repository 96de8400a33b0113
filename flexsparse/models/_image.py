"""The image adapter base (Flux, HunyuanDiT): the shared ``_video.Adapter`` with one frame of
``height x width`` tokens (text first, or none) and the image patterns.

An image model's module holds what differs: which attention modules, its processor (an
``ImageProcessor``: the stock arithmetic with the attention replaced), pixels per token,
the default size, the token grid of a call, how a tuned file numbers its layers::

    class HunyuanDiTAdapter(ImageAdapter):
        kind = "hunyuan_dit"
        transformer_classes = ("HunyuanDiT2DModel",)
        text_position = None                  # attn1 holds image tokens only
        processor = FlexSparseHunyuanDiTProcessor

        def attention_modules(self, transformer): return [b.attn1 for b in transformer.blocks]
        def spatial(self, transformer, pipe): return vae_factor(pipe) * 2
        def default_size(self, transformer, pipe): return 1024, 1024
        def token_grid(self, transformer, inputs): ...   # ImageGrid of the call

**What runs** (``ImageAdapter.patch``): ``pattern=None`` (default): the ``mask`` and / or
the ``tuned`` file; neither given: meansim with SpargeAttn's defaults
(``SPARGE_DEFAULTS``). ``pattern="meansim"``: meansim (``SPARGE_DEFAULTS`` updated by
``meansim=``) and-ed with ``mask``. ``pattern="dense"``: the stock attention (with the step
trace). ``tuned=``: a parameter file whose layers x heads must match the patched model's.

A pipeline's own attention mask (SDPA's bool or additive float ``attn_mask``) becomes a
``Mask`` with ``mask_from_dense(dense_attention_mask(...))``, once per forward
(``ImageProcessor.extra_mask``), and is and-ed with the layer's mask.
"""

from __future__ import annotations

import dataclasses
import functools
import weakref
from typing import Any

import torch
from torch import Tensor

from .._checks import check_int
from ..layout import VideoLayout
from ..mask import DynamicMask, Mask
from ._patch import PatchHandle
from ._video import Adapter, SparseProcessor, TokenGrid, check_mask_type, split_pipeline

#: ``patch(pattern=...)`` of the image models (None: the mask / tuned file as given).
IMAGE_PATTERNS = ("meansim", "dense")
#: SpargeAttn's untuned defaults (``spas_sage2_attn_meansim_cuda``: simthreshd1=0.6,
#: cdfthreshd=0.98, smooth_k=True, no attention sink, 128 x 64 tiles); its Flux example
#: only tunes per head (``l1=0.06, pv_l1=0.065``) and ships no tuned file.
SPARGE_DEFAULTS: dict[str, Any] = dict(simthreshd1=0.6, cdfthreshd=0.98, block_q=128,
                                       block_kv=64, smooth_k=True, attention_sink=False)


# -- image shapes -----------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class ImageGrid(TokenGrid):
    """The image part of a sequence in tokens: one ``height x width`` frame."""

    def __str__(self) -> str:
        return f"{self.height}x{self.width} image tokens"


def image_grid(height: int, width: int, *, spatial: int) -> ImageGrid:
    """Token grid of a ``height x width`` pixel image when one token covers
    ``spatial x spatial`` pixels (VAE factor x patch size); sizes must be multiples."""
    sizes = {"height": check_int("height", height, minimum=1),
             "width": check_int("width", width, minimum=1)}
    for name, size in sizes.items():
        if size % spatial:
            raise ValueError(f"{name} must be a multiple of {spatial} pixels (one image token "
                             f"is {spatial} x {spatial} pixels), got {size}")
    return ImageGrid(1, height // spatial, width // spatial)


def image_layout(grid: TokenGrid, text_tokens: int = 0) -> VideoLayout:
    """The one-frame ``VideoLayout`` of an image grid, ``text_tokens`` text tokens first."""
    return grid.layout(text_tokens=check_int("text_tokens", text_tokens, minimum=0),
                       text_position="start", temporal_compression=1)


# -- attention masks given by the pipeline ------------------------------------------------------
def dense_attention_mask(attention_mask: Tensor, seq_len: int) -> Tensor:
    """An SDPA ``attn_mask`` (bool: True keeps; float: additive) as bool
    ``[B', H', N, N]`` (``B'``, ``H'`` 1 where it broadcasts).

    A float mask must be a pure mask: 0 where kept, ``-inf`` or below ``finfo.min / 2``
    where dropped; any other value is a bias the sparse kernels cannot apply."""
    if not isinstance(attention_mask, Tensor):
        raise TypeError(f"attention_mask must be a tensor, got {type(attention_mask).__name__}")
    if not 2 <= attention_mask.dim() <= 4:
        raise ValueError(f"attention_mask must have 2 to 4 dims (broadcastable to "
                         f"[B, H, {seq_len}, {seq_len}]), got shape "
                         f"{tuple(attention_mask.shape)}")
    if attention_mask.dtype == torch.bool:
        keep = attention_mask
    elif attention_mask.is_floating_point():
        dropped = attention_mask <= torch.finfo(attention_mask.dtype).min / 2
        if not bool(((attention_mask == 0) | dropped).all()):
            raise ValueError("attention_mask holds additive values other than 0 and -inf / "
                             "finfo.min (a bias); flexsparse composes masks only")
        keep = ~dropped
    else:
        raise TypeError(f"attention_mask must be bool or floating, got {attention_mask.dtype}")
    while keep.dim() < 4:
        keep = keep.unsqueeze(0)
    try:
        return keep.expand(keep.shape[0], keep.shape[1], seq_len, seq_len)
    except RuntimeError:
        raise ValueError(f"attention_mask of shape {tuple(attention_mask.shape)} does not "
                         f"broadcast to [B, H, {seq_len}, {seq_len}]") from None


def mask_from_dense(keep: Tensor, name: str = "attention_mask") -> Mask:
    """A ``Mask`` of a materialised bool ``[B', H', N, N]`` matrix (``B'`` / ``H'`` of 1
    broadcast); tiles are classified from the matrix itself."""
    from ..tiles import states_from_dense

    n_b, n_h = keep.shape[:2]
    batch = n_b if n_b > 1 else None
    heads = n_h if n_h > 1 else None

    def on_device(device):
        kd = keep.to(device)
        b_step, h_step = int(n_b > 1), int(n_h > 1)

        def mask_mod(b, h, q_idx, kv_idx):
            return kd[b * b_step, h * h_step, q_idx, kv_idx]

        @functools.lru_cache(maxsize=4)
        def states(block_q, block_kv):
            s = states_from_dense(kd, block_q, block_kv)  # [B', H', Qb, KVb]
            if batch is None:
                s = s[0]
                return s if heads is not None else s[0]
            return s

        def tile_rule(grid):
            return states(grid.block_q, grid.block_kv)

        return mask_mod, tile_rule

    return Mask(on_device=on_device, has_tile_rule=True, name=name, heads=heads,
                batch=batch, length=keep.shape[-1])


class AttentionMaskCache:
    """The ``Mask`` of the last ``attention_mask`` tensor seen (every block of a forward
    gets the same tensor: converted once per forward)."""

    def __init__(self):
        self.ref, self.version, self.mask = None, None, None

    def get(self, attention_mask: Tensor, seq_len: int) -> Mask:
        if (self.ref is not None and self.ref() is attention_mask
                and self.version == attention_mask._version
                and self.mask.length == seq_len):
            return self.mask
        mask = mask_from_dense(dense_attention_mask(attention_mask, seq_len))
        self.ref, self.version, self.mask = (weakref.ref(attention_mask),
                                             attention_mask._version, mask)
        return mask

    def __deepcopy__(self, memo):
        return AttentionMaskCache()


def vae_factor(pipe) -> int:
    """The pipeline's spatial VAE factor (``vae_scale_factor``), 8 without a pipeline."""
    return int(getattr(pipe, "vae_scale_factor", None) or 8)


class ImageProcessor(SparseProcessor):
    """``SparseProcessor`` for image models: ``extra_mask`` turns the call's
    ``attention_mask`` into a ``Mask`` (converted once per forward)."""

    def __init__(self, layer_idx: int, handle: PatchHandle, stock=None):
        super().__init__(layer_idx, handle, stock)
        self._masks = AttentionMaskCache()

    def extra_mask(self, attention_mask: Tensor | None, seq_len: int) -> Mask | None:
        """The call's SDPA-style ``attention_mask`` as a ``Mask`` (None: none given)."""
        if attention_mask is None:
            return None
        return self._masks.get(attention_mask, seq_len)


# -- the image adapter ------------------------------------------------------------------------
class ImageAdapter(Adapter):
    """The adapter base for image transformers: one frame of ``height x width`` tokens,
    text first (or none), and the image patterns (meansim / tuned / mask / dense).

    Subclasses set ``kind``, ``transformer_classes``, ``processor``, ``text_position``
    (``"start"`` or None), ``default_text_tokens`` and implement ``attention_modules``,
    ``spatial`` (pixels per token side), ``token_grid`` and ``default_size``."""

    default_text_tokens: int = 0
    patterns = IMAGE_PATTERNS
    resize = "height / width (and text_tokens)"

    def spatial(self, transformer, pipe) -> int:
        """Pixels per image-token side (VAE factor x patch size)."""
        raise NotImplementedError

    def default_size(self, transformer, pipe) -> tuple[int, int]:
        """``(height, width)`` in pixels when ``patch`` gets none."""
        raise NotImplementedError

    def tuned_shape(self, transformer, modules: list) -> tuple[int, int]:
        return len(modules), self.heads(transformer)

    def image_layout(self, pipe_or_transformer, height: int | None = None,
                     width: int | None = None, *, text_tokens: int | None = None
                     ) -> tuple[VideoLayout, ImageGrid, str]:
        """``(layout, grid, description)`` of a ``height x width`` pixel image."""
        transformer, pipe = split_pipeline(pipe_or_transformer)
        if height is None or width is None:
            d_height, d_width = self.default_size(transformer, pipe)
            height = d_height if height is None else height
            width = d_width if width is None else width
        grid = image_grid(height, width, spatial=self.spatial(transformer, pipe))
        text = self.default_text_tokens if text_tokens is None else text_tokens
        if self.text_position is None and text:
            raise ValueError(f"text_tokens must be 0 for {self.kind} (its patched "
                             f"self-attention holds image tokens only), got {text}")
        return image_layout(grid, text), grid, f"{height}x{width} pixels"

    def layout_for(self, pipe_or_transformer, height: int | None = None,
                   width: int | None = None, *, text_tokens: int | None = None
                   ) -> VideoLayout:
        """Token layout of a ``height x width`` pixel generation (one frame, text
        first)."""
        return self.image_layout(pipe_or_transformer, height, width,
                                 text_tokens=text_tokens)[0]

    def static_mask(self, mask, pattern: str | None, tuned, meansim: dict | None):
        """The mask every sparse layer gets before its tuned mask is and-ed in."""
        self.check_pattern(pattern)
        check_mask_type(mask)
        if meansim is not None and not isinstance(meansim, dict):
            raise TypeError(f"meansim must be a dict of masks.meansim keywords, got "
                            f"{type(meansim).__name__}")
        if pattern == "dense":
            if mask is not None or tuned is not None:
                raise ValueError("pattern='dense' runs the stock attention: pass no mask "
                                 "and no tuned file with it")
            return None
        if pattern == "meansim" and tuned is not None:
            raise ValueError("pattern='meansim' and tuned= both give meansim thresholds: "
                             "the tuned file's per-head values are used with pattern=None")
        if meansim is not None and pattern != "meansim" and (mask is not None
                                                             or tuned is not None):
            raise ValueError("meansim= options need pattern='meansim' when a mask or a "
                             "tuned file is given")
        if pattern == "meansim" or (mask is None and tuned is None):
            from ..masks.meansim import meansim as build_meansim

            dyn = build_meansim(**{**SPARGE_DEFAULTS, **(meansim or {})})
            return dyn if mask is None else dyn & mask
        return mask

    def patch(
        self,
        pipe_or_transformer,
        mask: Mask | DynamicMask | None = None,
        *,
        pattern: str | None = None,
        height: int | None = None,
        width: int | None = None,
        text_tokens: int | None = None,
        tuned: str | None = None,
        meansim: dict | None = None,
        dense_layers: int = 0,
        dense_timesteps: int = 0,
        backend: str = "auto",
        block_size: int = 128,
        parallel=None,
    ) -> PatchHandle:
        """Make every patched attention module use a sparse mask.

        Args:
            pipe_or_transformer: a diffusers pipeline with this model as ``.transformer``,
                or the transformer.
            mask: a ``Mask`` over the joint sequence of ``layout_for(obj, height, width,
                text_tokens=)`` (or a ``DynamicMask``).
            pattern: None (the mask / tuned file; neither: meansim), ``"meansim"`` (and-ed
                with ``mask``) or ``"dense"``.
            height, width: pixels of the images the pipeline will make (default: the
                model's default size).
            text_tokens: text tokens before the image tokens (Flux: the pipeline's
                ``max_sequence_length``, 512 by default).
            tuned: path of a flexsparse or SpargeAttn parameter file; per layer, its
                meansim thresholds per head (and-ed with ``mask``; loaded on first use;
                its layers x heads must be the model's).
            meansim: ``masks.meansim`` keywords replacing ``SPARGE_DEFAULTS`` entries.
            dense_layers: the first N patched layers stay dense.
            dense_timesteps: the first N denoising steps run dense.
            backend: ``flexsparse.attention`` backend of the sparse layers.
            block_size: tile size of the ``BlockMask`` of a static mask (a meansim or
                tuned mask uses its own tiles).
            parallel: a ``torch.distributed`` ProcessGroup for sequence-parallel attention.

        Returns:
            The ``PatchHandle`` (``handle.state``: the ``VideoState``, its settings' grid
            an ``ImageGrid``).
        """
        self.transformer_of(pipe_or_transformer)
        dense_layers, dense_timesteps, block_size = self.check_options(
            backend, dense_layers, dense_timesteps, block_size, tuned)
        layout, grid, video = self.image_layout(pipe_or_transformer, height, width,
                                                text_tokens=text_tokens)
        static = self.static_mask(mask, pattern, tuned, meansim)
        return self.install(pipe_or_transformer, static, layout=layout, grid=grid, video=video,
                            tuned=tuned, dense_layers=dense_layers,
                            dense_timesteps=dense_timesteps, backend=backend,
                            block_size=block_size, parallel=parallel)


__all__ = [
    "AttentionMaskCache", "IMAGE_PATTERNS", "ImageAdapter", "ImageGrid", "ImageProcessor",
    "SPARGE_DEFAULTS", "dense_attention_mask", "image_grid", "image_layout",
    "mask_from_dense", "vae_factor",
]
