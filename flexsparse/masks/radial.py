"""Radial attention: attention energy that decays with the distance between frames.

Radial Attention (Li et al., 2025, mit-han-lab/radial-attention) keeps, for a query in
latent frame ``fq`` and a key in frame ``fk`` (``d = |fq - fk|``, ``T`` tokens per frame,
``B`` the block size, ``δ`` the decay factor), the pairs whose in-frame indices are close:
``|local_q - local_kv| <= w(d)``, with

- ``w = T`` for ``d <= 1`` (``"hunyuan"``, ``"wan"``); ``w = T`` for ``d = 0`` and
  ``T // 2`` for ``d = 1`` (``"cogvideox"``);
- otherwise ``w = max(2**bit_length(T) / 2**bit_length(d) * δ, B)``;
- a *temporal split*: with ``L0 = 2**bit_length(T) / 2**bit_length(d)``, when ``L0 < 128``
  the frame pair is kept only if ``d`` is a multiple of ``int(128 / L0)``;
- ``"wan"`` keeps every pair whose key frame is frame 0 (attention sink);
- text tokens see everything and are seen by everything.

The compute is O(n log n) in the number of frames. ``granularity="block"`` reproduces
the published block map tile for tile (``gen_log_mask_shrinked``: every frame pair is
shrunk to tiles with a column-density vote); ``granularity="token"`` is the exact rule
above as a ``mask_mod`` with partial tiles.

Measured densities at block 128 (``benchmarks/densities.py``, ``docs/densities.md``):
fraction of (query, key) pairs computed by the block map / kept by the token rule, and
the tiles the block map skips.

=====================================  =======  =====  =====  =============
config                                 tokens   block  token  tiles skipped
=====================================  =======  =====  =====  =============
CogVideoX-2b, 49 x 480 x 720, δ=1      17,776   0.534  0.504  0.467
Wan 2.1, 69 x 768 x 1280, δ=0.2        69,120   0.287  0.269  0.713
HunyuanVideo, 117 x 768 x 1280, δ=0.95 115,456  0.278  0.263  0.722
=====================================  =======  =====  =====  =============
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .. import tiles as T
from .._checks import check_bool, check_choice, check_float, check_int
from ..layout import MODEL_PRESETS, VideoLayout
from ..mask import Mask

MODELS = ("cogvideox", "hunyuan", "wan")
GRANULARITIES = ("block", "token")
#: The temporal split compares against a fixed 128 in the original, whatever the block size.
SPLIT_THRESHOLD = 128
#: Elements materialised at once while building maps (bounds memory at any length).
_CHUNK_ELEMENTS = 1 << 22


@dataclass(frozen=True)
class RadialTables:
    """Per frame-distance rule of one configuration (``d`` in ``[0, frames)``).

    Attributes:
        width: ``[F]`` band half-width ``floor(w(d))`` (``>= T`` means the whole pair).
        keep: ``[F]`` whether the temporal split keeps pairs at distance ``d``.
        sink: every pair whose key frame is frame 0 is fully kept (``"wan"``).
    """

    width: tuple[int, ...]
    keep: tuple[bool, ...]
    sink: bool


def window_width(d: int, tokens_per_frame: int, model: str, decay: float, block: int) -> float:
    """Band half-width ``w(d)`` of the original ``get_window_width`` (a float)."""
    t = tokens_per_frame
    if d == 0 or (d == 1 and model in ("hunyuan", "wan")):
        return float(t)
    if d == 1:  # cogvideox
        return float(t // 2)
    decay_length = 2 ** t.bit_length() / 2 ** d.bit_length() * decay
    return max(decay_length, float(block))


def split_keeps(d: int, tokens_per_frame: int) -> bool:
    """The temporal split of the original ``get_diagonal_split_mask``: is distance ``d``
    kept?"""
    decay_length = 2 ** tokens_per_frame.bit_length() / 2 ** d.bit_length()
    if decay_length >= SPLIT_THRESHOLD:
        return True
    return d % int(SPLIT_THRESHOLD / decay_length) == 0


def radial_tables(
    layout: VideoLayout, model: str, decay_factor: float, block_size: int
) -> RadialTables:
    """The per-distance tables of a configuration (validated elsewhere)."""
    t = layout.tokens_per_frame
    width, keep = [], []
    for d in range(layout.frames):
        w = window_width(d, t, model, decay_factor, block_size)
        # |i - j| <= w on integers is |i - j| <= floor(w); anything >= T covers the pair.
        width.append(min(int(w), t))
        keep.append(split_keeps(d, t))
    return RadialTables(tuple(width), tuple(keep), sink=model == "wan")


def radial(
    layout: VideoLayout,
    decay_factor: float = 1.0,
    model: str = "cogvideox",
    block_size: int = 128,
    granularity: str = "block",
    keep_diagonal: bool = True,
) -> Mask:
    """Radial attention over a video layout.

    Args:
        layout: the ``VideoLayout`` (frames, tokens per frame, text and where it sits).
        decay_factor: ``δ > 0``, scales the band width at frame distances ``d >= 2``.
        model: ``"cogvideox"``, ``"hunyuan"`` or ``"wan"`` (rule variants, see the module),
            or any ``VideoLayout.from_video`` preset name (``"cogvideox1.5"``,
            ``"hunyuan_video"``, ``"wan2.1"``, ``"wan2.2-5b"``), which picks its variant.
        block_size: the tile size ``B`` of the original: the minimum band width, and the
            native block size of the ``"block"`` map.
        granularity: ``"block"`` (default) reproduces the original's block map (every kept
            tile computed densely); ``"token"`` is the exact token rule with partial tiles.
        keep_diagonal: ``"block"`` only. True (default): the published map plus the
            diagonal tiles of every block holding video, so that every query token sees at
            least its own key (the published map leaves some tokens blind to their own
            frame, e.g. the last 56 video tokens of CogVideoX 97 x 480 x 720). False: the
            published map bit for bit. The token rule always keeps a token's own frame.

    Returns:
        A ``Mask`` bound to ``layout.length`` tokens. ``"block"``: block-granular at
        ``block_size`` (other tile sizes are derived exactly from that map);
        ``"token"``: element-exact ``mask_mod`` and an exact tile rule at any tile size.
    """
    if not isinstance(layout, VideoLayout):
        raise TypeError(f"layout must be a flexsparse.VideoLayout, got {type(layout).__name__}")
    decay_factor = check_float("decay_factor", decay_factor)
    if not 0 < decay_factor < math.inf:
        raise ValueError(f"decay_factor must be > 0 and finite, got {decay_factor}")
    check_choice("model", model, MODELS + tuple(k for k in MODEL_PRESETS if k not in MODELS))
    model = MODEL_PRESETS[model]["radial"] if model in MODEL_PRESETS else model
    block_size = check_int("block_size", block_size, minimum=1)
    check_choice("granularity", granularity, GRANULARITIES)
    keep_diagonal = check_bool("keep_diagonal", keep_diagonal)
    tables = radial_tables(layout, model, decay_factor, block_size)
    name = f"radial({model}, δ={decay_factor:g}, {granularity})"
    if granularity == "block":
        if not keep_diagonal:
            name = f"radial({model}, δ={decay_factor:g}, block, published)"
        return _block_radial(layout, tables, block_size, name, keep_diagonal)
    return _token_radial(layout, tables, name)


# -- granularity="block": the original's tile map ------------------------------------------
def blind_tokens(kept: Tensor, layout: VideoLayout, block: int) -> int:
    """How many video query tokens of a block-granular tile map see no key of their own
    frame (the hole ``keep_diagonal=True`` closes in the published radial map).

    Args:
        kept: bool ``[Qb, KVb]``, the map at ``block x block`` tiles (``radial_block_map``).
        layout: the layout the map was built for.
        block: its tile size.

    A token of frame ``f`` in block row ``r`` sees its frame iff a kept tile of row ``r``
    overlaps the key blocks of ``f``: prefix sums along the rows, no ``N^2`` work.
    """
    t, vs = layout.tokens_per_frame, layout.video_start
    sums = torch.nn.functional.pad(kept.to(torch.int64).cumsum(1), (1, 0)).tolist()
    blind = 0
    for f in range(layout.frames):
        lo, hi = vs + f * t, vs + (f + 1) * t - 1
        for row in range(lo // block, hi // block + 1):
            if sums[row][hi // block + 1] == sums[row][lo // block]:
                blind += min(hi, row * block + block - 1) - max(lo, row * block) + 1
    return blind


def _block_radial(
    layout: VideoLayout, tables: RadialTables, block: int, name: str, keep_diagonal: bool
) -> Mask:
    def on_device(device):
        # The map is built once per device, on that device (Mask caches the result).
        kept = radial_block_map(layout, tables, block, device, keep_diagonal)
        inner = Mask.from_tiles(kept, block, length=layout.length)
        return inner.mask_mod_for(device), inner.tile_rule_for(device)

    return Mask(
        on_device=on_device, has_tile_rule=True, name=name, length=layout.length,
        binary_tiles=True,
    )


def radial_block_map(
    layout: VideoLayout, tables: RadialTables, block: int, device="cpu",
    keep_diagonal: bool = False,
) -> Tensor:
    """The original Radial Attention block map: bool ``[Nb, Nb]``, ``Nb = ceil(N / B)``.

    Every frame pair ``(fq, fk)`` is laid on a local grid of ``n = ceil(T / B)`` blocks
    starting at block ``(s(fq) // B, s(fk) // B)`` with offsets ``s(f) % B``; a local tile is
    kept when more than 60 % of its non-empty columns have a column density above 1/3.
    Blocks holding text are kept whole; with the text at the end (the original's layout)
    so is a partial last video block, as the original does even when there is no text.
    Inside a pair the local mask is the band ``|i - j| <= w``, so a column's count of true
    rows in a tile is an interval overlap, computed in closed form for all pairs at once
    (pairs with the same offsets and width share one evaluation). Memory is bounded by
    chunking; no ``N x N`` tensor is built. ``keep_diagonal`` adds the diagonal tile of
    every block holding video (see ``radial``).

    The per-pair bookkeeping (frames^2 pairs, dedup of their local maps) is tiny and runs
    on the CPU; ``device`` receives it in one copy, evaluates the distinct local maps and
    does the one scatter that places every pair's, with no data-dependent sync.
    """
    device = torch.device(device)
    t, frames, n_tok = layout.tokens_per_frame, layout.frames, layout.length
    nb = -(-n_tok // block)
    n_loc = -(-t // block)
    width = torch.tensor(tables.width)
    keep = torch.tensor(tables.keep)
    f = torch.arange(frames)
    fq, fk = f[:, None].expand(frames, frames).reshape(-1), f.repeat(frames)
    d = (fq - fk).abs()
    sink = (fk == 0) if tables.sink else torch.zeros_like(keep[d])
    live = keep[d] | sink
    fq, fk, d, sink = fq[live], fk[live], d[live], sink[live]
    w = torch.where(sink, t, width[d])
    start_q = layout.video_start + fq * t
    start_k = layout.video_start + fk * t
    # Pairs with equal (row offset, column offset, width) have equal local maps; one
    # integer code per triple keeps the dedup a 1-D unique.
    code = ((start_q % block) * block + start_k % block) * (t + 1) + w
    uniq, inverse = torch.unique(code, return_inverse=True)
    keys = torch.stack([uniq // (t + 1) // block, uniq // (t + 1) % block, uniq % (t + 1)], 1)
    # Scatter into an (Nb + n)^2 canvas so that local tiles past the edge need no test.
    stride = nb + n_loc
    base = (start_q // block) * stride + start_k // block
    a = torch.arange(n_loc)
    offs = (a[:, None] * stride + a[None, :]).reshape(-1)
    diag = _video_blocks(layout, block, nb) if keep_diagonal else torch.zeros(nb, dtype=bool)
    parts = (inverse, base, offs, keys.reshape(-1), diag.long())
    packed = torch.cat(parts).to(device)
    inverse, base, offs, keys, diag = packed.split([len(x) for x in parts])
    # The distinct local maps: many per layout when frames start off the block grid
    # (CogVideoX, Wan), so they are evaluated on the device.
    local = _local_tiles(keys.view(-1, 3), t, block, n_loc)  # [U, n, n]
    kept_local = local.view(-1, n_loc * n_loc)[inverse]  # [P, n * n]
    flat = base[:, None] + offs[None, :]
    spare = stride * stride
    canvas = torch.zeros(spare + 1, dtype=torch.bool, device=device)
    canvas[torch.where(kept_local, flat, spare)] = True
    out = canvas[:spare].view(stride, stride)[:nb, :nb].contiguous()
    if layout.text_position == "end":
        # As the original: every block from video_tokens // B on (text, and a partial last
        # video block even without text) is kept whole.
        lo, hi = layout.video_tokens // block, nb - 1
    else:
        lo, hi = 0, (layout.text_tokens - 1) // block if layout.text_tokens else -1
    out[lo : hi + 1] = True
    out[:, lo : hi + 1] = True
    if keep_diagonal:
        out.diagonal().logical_or_(diag.bool())
    return out


def _video_blocks(layout: VideoLayout, block: int, nb: int) -> Tensor:
    """bool ``[Nb]``: which blocks hold a video token. Tile ``(i // B, i // B)`` holds the
    pair ``(i, i)``, so keeping those diagonal tiles lets every video query see at least
    its own key, hence its own frame."""
    starts = torch.arange(nb) * block
    ends = torch.clamp(starts + block - 1, max=layout.length - 1)
    return layout.tile_frames(starts, ends)["has_video"]


def _local_tiles(keys: Tensor, t: int, block: int, n_loc: int) -> Tensor:
    """Shrunk local maps ``[U, n, n]`` for ``keys [U, 3] = (row offset, col offset, w)``.

    For local tile row ``a`` the frame's rows inside the tile are ``[i_lo, i_hi]`` (frame
    indices; rows past ``n * B`` are cut as in the original); column ``c`` of the local grid
    is frame column ``j = c - c0``. The tile's true rows in column ``j`` number
    ``|[i_lo, i_hi] ∩ [j - w, j + w]|``.
    """
    device = keys.device
    per_key = n_loc * n_loc * block
    # A GPU takes bigger chunks: fewer launches, and its memory holds them easily.
    budget = _CHUNK_ELEMENTS * (1 if device.type == "cpu" else 8)
    step = max(1, budget // per_key)
    a = torch.arange(n_loc, device=device)
    c = torch.arange(n_loc * block, device=device)
    out = []
    for chunk in keys.split(step):
        r0, c0, w = (x[:, None, None] for x in chunk.unbind(1))
        i_lo = torch.clamp(a[None, :, None] * block - r0, min=0)  # [U, n, 1]
        i_hi = torch.minimum(
            a[None, :, None] * block + block - 1, torch.clamp(r0 + t - 1, max=n_loc * block - 1)
        ) - r0
        j = c[None, None, :] - c0  # [U, 1, nB]
        col_ok = (j >= 0) & (j < t)
        count = torch.minimum(i_hi, j + w) - torch.maximum(i_lo, j - w) + 1
        count = torch.where(col_ok, torch.clamp(count, min=0), 0)  # [U, n, nB]
        count = count.view(count.shape[0], n_loc, n_loc, block)
        nonzero = (count > 0).sum(-1)
        # density > 1/3 and fraction > 0.6, in integers (exact for the original's floats).
        high = (3 * count > block).sum(-1)
        out.append(5 * high > 3 * nonzero)
    return torch.cat(out) if out else torch.zeros(0, n_loc, n_loc, dtype=torch.bool,
                                                  device=device)


# -- granularity="token": the exact rule -----------------------------------------------------
def _token_radial(layout: VideoLayout, tables: RadialTables, name: str) -> Mask:
    n_tok, frames = layout.length, layout.frames
    last = n_tok - 1

    def on_device(device):
        lk = layout.lookups(device)
        frame, local, is_text = lk["frame"], lk["local"], lk["is_text"]
        width = torch.tensor(tables.width, device=device)
        keep = torch.tensor(tables.keep, device=device)
        sink = tables.sink

        def mask_mod(b, h, q_idx, kv_idx):
            qi, ki = torch.clamp(q_idx, 0, last), torch.clamp(kv_idx, 0, last)
            fq, fk = frame[qi], frame[ki]
            d = torch.clamp((fq - fk).abs(), max=frames - 1)  # text (-1) is overridden below
            video = keep[d] & ((local[qi] - local[ki]).abs() <= width[d])
            if sink:
                video = video | (fk == 0)
            return is_text[qi] | is_text[ki] | video

        def rule(grid: T.TileGrid) -> Tensor:
            return _token_tile_rule(layout, width, keep, sink, grid)

        return mask_mod, rule

    return Mask(on_device=on_device, has_tile_rule=True, name=name, length=n_tok)


def _frame_pieces(layout: VideoLayout, lo: Tensor, hi: Tensor, span: int):
    """For token ranges ``[lo, hi]`` ``[R]``: the frames they touch and, per frame, the
    in-frame index range. Returns ``frame, local_lo, local_hi, valid``, each ``[R, span]``,
    plus ``has_text [R]``."""
    t = layout.tokens_per_frame
    info = layout.tile_frames(lo, hi)
    u = torch.arange(span, device=lo.device)
    frame = info["first_frame"][:, None] + u[None, :]
    valid = info["has_video"][:, None] & (frame <= info["last_frame"][:, None])
    start = layout.video_start + frame * t
    local_lo = torch.clamp(lo[:, None] - start, min=0)
    local_hi = torch.clamp(hi[:, None] - start, max=t - 1)
    return frame, local_lo, local_hi, valid, info["has_text"]


def _token_tile_rule(
    layout: VideoLayout, width: Tensor, keep: Tensor, sink: bool, grid: T.TileGrid
) -> Tensor:
    """Exact tile states of the token rule. A tile is cut into (query frame, key frame)
    sub-rectangles; inside one, the band ``|i - j| <= w`` holds for some pair iff the
    smallest ``|i - j|`` does, and for all iff the largest does."""
    frames = layout.frames
    t = layout.tokens_per_frame
    span_q = (grid.block_q - 1) // t + 2
    span_k = (grid.block_kv - 1) // t + 2
    fq, qlo, qhi, vq, text_q = _frame_pieces(layout, grid.q_lo, grid.q_hi, span_q)
    fk, klo, khi, vk, text_k = _frame_pieces(layout, grid.kv_lo, grid.kv_hi, span_k)
    kb = grid.shape[1]
    rows_per_chunk = max(1, _CHUNK_ELEMENTS // (kb * span_q * span_k))
    out = []
    for r in range(0, grid.shape[0], rows_per_chunk):
        s = slice(r, r + rows_per_chunk)
        # [R, 1, Uq, 1] against [1, KVb, 1, Uk]
        a_f, a_lo, a_hi, a_v = (x[s][:, None, :, None] for x in (fq, qlo, qhi, vq))
        b_f, b_lo, b_hi, b_v = (x[None, :, None, :] for x in (fk, klo, khi, vk))
        d = torch.clamp((a_f - b_f).abs(), max=frames - 1)
        w, kp = width[d], keep[d]
        min_dist = torch.clamp(torch.maximum(b_lo - a_hi, a_lo - b_hi), min=0)
        max_dist = torch.maximum(a_hi - b_lo, b_hi - a_lo)
        sub_all, sub_any = kp & (max_dist <= w), kp & (min_dist <= w)
        if sink:
            sub_all, sub_any = sub_all | (b_f == 0), sub_any | (b_f == 0)
        valid = a_v & b_v
        all_video = (sub_all | ~valid).flatten(2).all(-1)
        any_video = (sub_any & valid).flatten(2).any(-1)
        text = text_q[s][:, None] | text_k[None, :]
        # Pairs with a text token are all kept, so only video pairs can spoil "all".
        out.append(T.from_bounds(all_video, text | any_video))
    return torch.cat(out)
