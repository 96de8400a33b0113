"""``meansim``: SpargeAttn-style data-dependent tile selection.

Which tiles to compute is predicted from ``q`` and ``k`` of each call:

1. ``q`` is split into blocks of ``block_q`` tokens and ``k`` into blocks of ``block_kv``.
   Per block: its mean vector (pooled) and its self-similarity, the mean over all token
   pairs (diagonal included) of the cosine similarity. A block is *self-similar* when that
   value is ``> simthreshd1`` of its head. A block with fewer tokens than the block size
   (the trailing one, or the leading one of a decode step) is never self-similar.
2. Pooled scores ``pooled_q @ pooled_k.T * D**-0.5``; key blocks that are not self-similar
   get ``-inf``; with ``causal``, key block ``j >= (i + 1) * block_q / block_kv`` gets
   ``-inf`` for query block ``i``. Softmax over key blocks.
3. Per query block the probabilities are sorted descending and the smallest prefix whose
   cumulative sum reaches ``cdfthreshd`` is kept (``count(cdf <= cdfthreshd)``, a
   right-sided search, at least one), or the top ``topk`` fraction of key blocks.
4. Always kept: tiles whose key block or query block is not self-similar. With ``causal``
   tiles above the block diagonal are dropped at the end; with ``attention_sink`` key
   block 0 is kept.

Everything is tensor arithmetic on ``[B, H, Qb, KVb]`` maps (sort, cumsum, searchsorted,
scatter): no ``.item()``, no ``nonzero``, no data-dependent shapes, so on CUDA a call
never waits for the device.

The self-similarity uses ``mean_ij cos(x_i, x_j) = |sum_i x_i / |x_i||^2 / n^2``, which is
the mean of the normalised Gram matrix at O(n D) instead of O(n^2 D). Zero tokens count
as zero vectors.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .._checks import check_int
from ..mask import DynamicMask, Mask

Hyper = float | Tensor


def _check_hyper(name: str, value, *, low: float | None, high: float | None) -> Hyper:
    """A float, or a 0-d / 1-d tensor of per-head values, within ``[low, high]``."""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be a float or a per-head tensor, got {value!r}")
    if isinstance(value, (int, float)):
        value = float(value)
        vals = torch.tensor([value])
    elif isinstance(value, Tensor):
        if value.dim() > 1:
            raise ValueError(
                f"{name} must be a float or a 1-d per-head tensor, got shape {tuple(value.shape)}"
            )
        if value.dtype == torch.bool or not (value.is_floating_point() or value.dtype in (
            torch.int8, torch.int16, torch.int32, torch.int64,
        )):
            raise TypeError(f"{name} must be a real tensor, got dtype {value.dtype}")
        value = value.detach().to(torch.float32)
        vals = value.cpu().reshape(-1)
    else:
        try:
            import numpy as np

            if isinstance(value, np.ndarray):
                return _check_hyper(name, torch.as_tensor(value), low=low, high=high)
        except ImportError:  # pragma: no cover - numpy is a dependency
            pass
        raise TypeError(
            f"{name} must be a float or a per-head tensor, got {type(value).__name__}"
        )
    if torch.isnan(vals).any():
        raise ValueError(f"{name} must not contain NaN, got {value}")
    if low is not None and (vals < low).any():
        raise ValueError(f"{name} must be >= {low}, got {value}")
    if high is not None and (vals > high).any():
        raise ValueError(f"{name} must be <= {high}, got {value}")
    return value


def _per_head(name: str, value: Hyper, heads: int, device) -> Tensor:
    """``value`` as a float32 ``[H]`` tensor on ``device``."""
    if isinstance(value, float):
        return torch.full((heads,), value, dtype=torch.float32, device=device)
    value = value.to(device=device, dtype=torch.float32)
    if value.dim() == 0:
        return value.expand(heads)
    if value.numel() != heads:
        raise ValueError(
            f"{name} has {value.numel()} per-head values but q has {heads} heads"
        )
    return value


def block_stats(x: Tensor, block: int, lead: int = 0, smooth: bool = False):
    """Pooled mean and self-similarity of each block of tokens.

    Args:
        x: ``[B, H, N, D]``.
        block: tokens per block.
        lead: number of virtual (absent) tokens before ``x[..., 0, :]`` so that blocks are
            aligned to absolute positions (decode: ``(kv_len - q_len) % block_q``).
        smooth: subtract the mean token of the sequence first (SpargeAttn's ``smooth_k``).

    Returns:
        ``(pooled [B, H, nb, D] float32, selfsim [B, H, nb] float32, complete [nb] bool)``
        where ``complete`` says the block holds ``block`` real tokens; ``selfsim`` is
        ``-inf`` for incomplete blocks.
    """
    b, h, n, d = x.shape
    xf = x.to(torch.float32)
    if smooth:
        xf = xf - xf.mean(dim=-2, keepdim=True)
    total = lead + n
    nb = -(-total // block)
    tail = nb * block - total
    if lead or tail:
        xf = torch.nn.functional.pad(xf, (0, 0, lead, tail))
    pos = torch.arange(nb * block, device=x.device)
    valid = ((pos >= lead) & (pos < total)).view(nb, block)
    count = valid.sum(-1).to(torch.float32)  # [nb]
    xb = xf.view(b, h, nb, block, d)
    pooled = xb.sum(-2) / count.clamp(min=1.0)[:, None]
    # Normalise each token; a zero token (padding) stays zero.
    inv = torch.linalg.vector_norm(xb, dim=-1, keepdim=True).clamp(min=1e-12).reciprocal()
    unit_sum = (xb * inv).sum(-2)
    selfsim = unit_sum.square().sum(-1) / count.clamp(min=1.0).square()
    complete = count == block
    selfsim = torch.where(complete, selfsim, torch.full_like(selfsim, -math.inf))
    return pooled, selfsim, complete


def select_tiles(
    pooled_q: Tensor,
    selfsim_q: Tensor,
    pooled_k: Tensor,
    selfsim_k: Tensor,
    simthreshd1: Tensor,
    *,
    cdfthreshd: Tensor | None = None,
    topk: Tensor | None = None,
    block_q: int,
    block_kv: int,
    causal: bool = False,
    attention_sink: bool = False,
    q_block_offset: int = 0,
) -> Tensor:
    """Steps 2-4 of the predictor on block statistics (see the module docstring).

    Args:
        pooled_q: ``[B, H, Qb, D]``; selfsim_q: ``[B, H, Qb]`` (``H`` = query heads).
        pooled_k: ``[B, H, KVb, D]``; selfsim_k: ``[B, H, KVb]`` (already repeated for GQA).
        simthreshd1, cdfthreshd, topk: float32 ``[H]``; exactly one of cdfthreshd / topk.
        q_block_offset: absolute index of query block 0 (decode steps), for ``causal``.

    Returns:
        bool ``[B, H, Qb, KVb]``.
    """
    heads = pooled_q.shape[1]
    d = pooled_q.shape[-1]
    qb, kb = pooled_q.shape[-2], pooled_k.shape[-2]
    dev = pooled_q.device
    thr = simthreshd1.view(1, heads, 1)
    sim_q = selfsim_q > thr  # [B, H, Qb]
    sim_k = selfsim_k > thr  # [B, H, KVb]
    score = pooled_q @ pooled_k.transpose(-1, -2) * d**-0.5
    neg_inf = torch.full((), -math.inf, device=dev)
    score = torch.where(sim_k[..., None, :], score, neg_inf)
    allowed = None
    if causal:
        qi = torch.arange(qb, device=dev)[:, None] + q_block_offset
        ki = torch.arange(kb, device=dev)[None, :]
        # k >= (q + 1) * block_q / block_kv, in exact integer arithmetic.
        allowed = ki * block_kv < (qi + 1) * block_q
        score = torch.where(allowed, score, neg_inf)
    prob = score.softmax(-1)
    # A row with no finite score gives NaN; all its allowed tiles are kept by step 4.
    prob = torch.nan_to_num(prob, nan=0.0)
    order = torch.sort(prob, dim=-1, descending=True, stable=True)
    if cdfthreshd is not None:
        cdf = order.values.cumsum(-1)
        target = cdfthreshd.view(1, heads, 1, 1).expand(*cdf.shape[:-1], 1).contiguous()
        num = torch.searchsorted(cdf.contiguous(), target, right=True)  # [B, H, Qb, 1]
    else:
        num = (topk * kb).to(torch.int64).view(1, heads, 1, 1)
    num = num.clamp(min=1)
    rank = torch.arange(kb, device=dev)
    chosen = (rank < num).expand_as(order.indices)  # [B, H, Qb, KVb], sorted order
    kept = torch.zeros_like(chosen).scatter(-1, order.indices, chosen)
    kept = kept | ~sim_k[..., None, :] | ~sim_q[..., :, None]
    if allowed is not None:
        kept = kept & allowed
    if attention_sink:
        # built from arange: item assignment would copy a host scalar (a sync on CUDA)
        kept = kept | (torch.arange(kb, device=dev) == 0)
    return kept


class MeansimMask(DynamicMask):
    """The meansim predictor as a ``DynamicMask`` (build it with ``masks.meansim``).

    ``predict(q, k)`` gives the bool tile map ``[B, H, Qb, KVb]`` at
    ``(block_q, block_kv)``; ``bind(q, k)`` wraps it in a block-granular ``Mask`` whose
    ``native_block_size`` is ``(block_q, block_kv)``, so ``attention`` builds the
    ``BlockMask`` at that size. The bound mask keeps whole tiles: with ``causal=True`` the
    diagonal tiles are kept in full, so compose with ``masks.causal()`` for exact causality
    (``fs.attention(q, k, v, mask=meansim(..., causal=True) & masks.causal())``).
    """

    def __init__(
        self,
        simthreshd1: Hyper,
        cdfthreshd: Hyper | None = None,
        topk: Hyper | None = None,
        block_q: int = 128,
        block_kv: int = 64,
        causal: bool = False,
        attention_sink: bool = False,
        smooth_k: bool = False,
    ):
        if (cdfthreshd is None) == (topk is None):
            raise ValueError(
                "pass exactly one of cdfthreshd (a cumulative-probability threshold in "
                f"[0, 1]) or topk (a fraction in [0, 1]); got cdfthreshd={cdfthreshd!r}, "
                f"topk={topk!r}"
            )
        self.simthreshd1 = _check_hyper("simthreshd1", simthreshd1, low=None, high=None)
        self.cdfthreshd = (
            None if cdfthreshd is None
            else _check_hyper("cdfthreshd", cdfthreshd, low=0.0, high=1.0)
        )
        self.topk = None if topk is None else _check_hyper("topk", topk, low=0.0, high=1.0)
        self.block_q = check_int("block_q", block_q, minimum=1)
        self.block_kv = check_int("block_kv", block_kv, minimum=1)
        for flag, val in (("causal", causal), ("attention_sink", attention_sink),
                          ("smooth_k", smooth_k)):
            if not isinstance(val, bool):
                raise TypeError(f"{flag} must be a bool, got {val!r}")
        self.causal, self.attention_sink, self.smooth_k = causal, attention_sink, smooth_k
        # Per-head values copied to each device once: a host-to-device copy synchronises.
        self._device_values: dict = {}
        self.name = f"meansim({_short(self.simthreshd1)}, " + (
            f"cdf={_short(self.cdfthreshd)})" if topk is None else f"topk={_short(self.topk)})"
        )

    def _on(self, value, device):
        if not isinstance(value, Tensor):
            return value
        key = (id(value), str(device))
        if key not in self._device_values:
            self._device_values[key] = value.to(device=device, dtype=torch.float32)
        return self._device_values[key]

    def heads_slice(self, start: int, stop: int) -> MeansimMask:
        """The same predictor for query heads ``start:stop`` only (per-head hyperparameters
        sliced; floats kept), e.g. for the heads one rank owns under sequence parallelism."""

        def part(value):
            if isinstance(value, Tensor) and value.dim() == 1 and value.numel() > 1:
                if stop > value.numel():
                    raise ValueError(
                        f"heads_slice({start}, {stop}) is past the {value.numel()} heads of "
                        f"{self.name}"
                    )
                return value[start:stop]
            return value

        return MeansimMask(
            part(self.simthreshd1),
            cdfthreshd=None if self.cdfthreshd is None else part(self.cdfthreshd),
            topk=None if self.topk is None else part(self.topk),
            block_q=self.block_q, block_kv=self.block_kv, causal=self.causal,
            attention_sink=self.attention_sink, smooth_k=self.smooth_k,
        )

    def _check_qk(self, q: Tensor, k: Tensor) -> None:
        for name, t in (("q", q), ("k", k)):
            if not isinstance(t, Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
            if t.dim() != 4:
                raise ValueError(f"{name} must be [B, H, N, D], got shape {tuple(t.shape)}")
        if q.shape[0] != k.shape[0] or q.shape[-1] != k.shape[-1]:
            raise ValueError(
                f"q {tuple(q.shape)} and k {tuple(k.shape)} must share batch and head_dim"
            )
        if q.shape[1] % k.shape[1]:
            raise ValueError(
                f"q heads ({q.shape[1]}) must be a multiple of k heads ({k.shape[1]})"
            )
        if q.shape[2] > k.shape[2]:
            raise ValueError(
                f"q_len ({q.shape[2]}) must be <= kv_len ({k.shape[2]}): query rows are the "
                "last q_len rows"
            )

    def stats(self, q: Tensor, k: Tensor):
        """Block statistics ``(pooled_q, selfsim_q, pooled_k, selfsim_k, q_block_offset)``
        with k's repeated to the query heads (GQA). ``predict`` = ``stats`` + ``decide``;
        the tuner computes the statistics once and decides many times."""
        self._check_qk(q, k)
        offset = k.shape[2] - q.shape[2]
        pq, sq, _ = block_stats(q, self.block_q, lead=offset % self.block_q)
        pk, sk, _ = block_stats(k, self.block_kv, smooth=self.smooth_k)
        rep = q.shape[1] // k.shape[1]
        if rep > 1:
            pk = pk.repeat_interleave(rep, dim=1)
            sk = sk.repeat_interleave(rep, dim=1)
        return pq, sq, pk, sk, offset // self.block_q

    def decide(self, stats, *, simthreshd1=None, cdfthreshd=None, topk=None) -> Tensor:
        """Steps 2-4 on ``stats(q, k)``; the keyword overrides (``[H]`` tensors) replace
        this mask's hyperparameters (used by calibration)."""
        pq, sq, pk, sk, q_block_offset = stats
        heads, dev = pq.shape[1], pq.device
        sim1 = _per_head("simthreshd1", self._on(self.simthreshd1, dev) if simthreshd1 is None
                         else simthreshd1, heads, dev)
        if cdfthreshd is None and topk is None:
            cdfthreshd, topk = self._on(self.cdfthreshd, dev), self._on(self.topk, dev)
        cdf = None if cdfthreshd is None else _per_head("cdfthreshd", cdfthreshd, heads, dev)
        top = None if topk is None else _per_head("topk", topk, heads, dev)
        return select_tiles(
            pq, sq, pk, sk, sim1, cdfthreshd=cdf, topk=top, block_q=self.block_q,
            block_kv=self.block_kv, causal=self.causal, attention_sink=self.attention_sink,
            q_block_offset=q_block_offset,
        )

    @torch.no_grad()
    def predict(self, q: Tensor, k: Tensor) -> Tensor:
        """bool ``[B, H, Qb, KVb]``: the tiles to compute, ``H`` = query heads.

        Query blocks are aligned to absolute positions: for ``q_len < kv_len`` block 0
        starts at position ``(kv_len - q_len) // block_q * block_q`` and a block only
        partly inside ``q`` is never self-similar."""
        return self.decide(self.stats(q, k))

    def bind(self, q: Tensor, k: Tensor) -> Mask:
        """The block-granular ``Mask`` of this call (batch- and head-dependent)."""
        kept = self.predict(q, k)
        kv_len = k.shape[2]
        skipped = (kv_len - q.shape[2]) // self.block_q
        if skipped:
            # Rows before the query are never used; any value keeps the map aligned.
            pad = kept.new_ones(*kept.shape[:2], skipped, kept.shape[-1])
            kept = torch.cat([pad, kept], dim=-2)
        mask = Mask.from_tiles(
            kept, (self.block_q, self.block_kv), name=self.name, length=kv_len
        )
        mask.native_block_size = (self.block_q, self.block_kv)
        return mask

    def __repr__(self) -> str:
        return (
            f"MeansimMask({self.name}, block=({self.block_q}, {self.block_kv}), "
            f"causal={self.causal}, attention_sink={self.attention_sink})"
        )


def _short(value) -> str:
    if value is None:
        return "None"
    if isinstance(value, float):
        return f"{value:g}"
    if value.dim() == 0:
        return f"{float(value):g}"
    return f"[{value.numel()} heads]"


def meansim(
    simthreshd1: Hyper,
    cdfthreshd: Hyper | None = None,
    topk: Hyper | None = None,
    block_q: int = 128,
    block_kv: int = 64,
    causal: bool = False,
    attention_sink: bool = False,
    *,
    smooth_k: bool = False,
) -> MeansimMask:
    """SpargeAttn-style data-dependent tiles (see the module docstring for the rule).

    Args:
        simthreshd1: self-similarity threshold, a float or a per-head ``[H]`` tensor
            (SpargeAttn's range is [-1, 1); a value >= 1 makes the head dense).
        cdfthreshd: keep the most probable key blocks up to this cumulative probability
            (float or ``[H]`` in [0, 1]). Exactly one of cdfthreshd / topk.
        topk: keep this fraction of key blocks per query block (float or ``[H]``).
        block_q, block_kv: tile size, SpargeAttn's (128, 64) by default.
        causal: predict for causal attention (tiles above the block diagonal dropped).
        attention_sink: always keep key block 0.
        smooth_k: subtract the mean key before the statistics (SpargeAttn's kernels do;
            the issue's rule does not).

    Returns:
        a ``DynamicMask``: ``.predict(q, k) -> bool [B, H, Qb, KVb]``,
        ``.bind(q, k) -> Mask``; ``fs.attention(q, k, v, mask=meansim(...) & static)``.
    """
    return MeansimMask(
        simthreshd1, cdfthreshd, topk, block_q, block_kv, causal, attention_sink,
        smooth_k=smooth_k,
    )
