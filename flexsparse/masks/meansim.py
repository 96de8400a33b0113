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

Everything is tensor arithmetic on ``[B, H, Qb, KVb]`` maps (sort, cumsum, gather, cumulative
tie counts): no ``.item()``, no ``nonzero``, no data-dependent shapes, so on CUDA a call
never waits for the device.

The self-similarity uses ``mean_ij cos(x_i, x_j) = |sum_i x_i / |x_i||^2 / n^2``, which is
the mean of the normalised Gram matrix at O(n D) instead of O(n^2 D). Zero tokens count
as zero vectors.
"""

from __future__ import annotations

import math
import os
import warnings
from collections import OrderedDict

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

    No padded or float32 copy of ``x`` is made: the complete blocks are a view of ``x``
    reduced with float32 accumulation, the partial leading / trailing block (at most one
    each) is reduced on its own and only pooled (its self-similarity is ``-inf``).
    """
    b, h, n, d = x.shape
    fast = bool(x.is_cuda and x.numel() and _fast().available(x))
    if fast:
        return _fast_block_stats(x, block, lead, smooth)
    if smooth:
        xf = x.to(torch.float32)
        x = xf - xf.mean(dim=-2, keepdim=True)
    f32 = torch.float32
    total = lead + n
    nb = -(-total // block)
    # Tokens of the partial leading block, of the complete blocks and of the partial tail.
    head = min(n, (block - lead % block) % block) if lead else 0
    full = (n - head) // block
    tail = n - head - full * block
    pooled, selfsim, counts = [], [], []
    if head:
        pooled.append(_partial_mean(x[:, :, :head], lead, block - lead - head, head))
        counts.append([head])
    if full:
        xb = x[:, :, head:head + full * block].reshape(b, h, full, block, d)
        if torch.compiler.is_compiling() or x.device.type != "cpu":
            step = full  # one pass; compiled, the float32 upcast fuses into the reductions
        else:
            # CPU eager: chunks of about 4 MiB, so that the float32 temporaries are reused
            # from the heap instead of freshly mapped (page faults dominate otherwise).
            step = max(1, (1 << 20) // max(1, b * h * block * d))
        sums, units = [], []
        for i in range(0, full, step):
            xc = xb[:, :, i:i + step]
            if not torch.compiler.is_compiling():
                xc = xc.to(f32)  # eager: faster than mixed-dtype kernels; no-op for float32
            sums.append(xc.sum(-2, dtype=f32))
            # Normalise each token; a zero token stays zero.
            inv = torch.linalg.vector_norm(xc, dim=-1, keepdim=True, dtype=f32)
            units.append((xc * inv.clamp(min=1e-12).reciprocal()).sum(-2))
        total_sum = sums[0] if len(sums) == 1 else torch.cat(sums, dim=-2)
        unit_sum = units[0] if len(units) == 1 else torch.cat(units, dim=-2)
        pooled.append(total_sum / float(block))
        selfsim.append(unit_sum.square().sum(-1) / float(block * block))
        counts.append([block] * full)
    if tail:
        pooled.append(_partial_mean(x[:, :, n - tail:], 0, block - tail, tail))
        counts.append([tail])
    if not pooled:
        pooled.append(x.new_zeros(b, h, 0, d, dtype=f32))
    pooled = pooled[0] if len(pooled) == 1 else torch.cat(pooled, dim=-2)
    if head or tail or not full:
        neg = torch.full((b, h, 1), -math.inf, dtype=f32, device=x.device)
        parts = ([neg] if head else []) + selfsim + ([neg] if tail else [])
        selfsim = torch.cat(parts, dim=-1) if parts else x.new_zeros(b, h, 0, dtype=f32)
    else:
        selfsim = selfsim[0]
    # Built from arange (a host list would be a host-to-device copy).
    pos = torch.arange(nb, device=x.device)
    complete = (pos >= (1 if head else 0)) & (pos < nb - (1 if tail else 0))
    return pooled, selfsim, complete


def _fast():
    from ..kernels import meansim_fast

    return meansim_fast


def _fast_block_stats(x: Tensor, block: int, lead: int, smooth: bool):
    """``block_stats`` by one Triton launch (CUDA): the kernel subtracts the mean itself
    (``smooth``), so no float32 copy of ``x`` is made."""
    b, h, n, d = x.shape
    nb = -(-(lead + n) // block)
    pooled = torch.empty(b, h, nb, d, dtype=torch.float32, device=x.device)
    selfsim = torch.empty(b, h, nb, dtype=torch.float32, device=x.device)
    mean = torch.mean(x, dim=-2, dtype=torch.float32) if smooth else None
    _fast().block_stats_into(x, block, lead, pooled, selfsim, mean)
    return pooled, selfsim, _complete(nb, block, lead, n, x.device)


def _complete(nb: int, block: int, lead: int, n: int, device) -> Tensor:
    """bool ``[nb]``: blocks holding ``block`` real tokens (from arange: a host list would be
    a host-to-device copy)."""
    pos = torch.arange(nb, device=device)
    return (pos * block - lead >= 0) & ((pos + 1) * block - lead <= n)


def _partial_mean(part: Tensor, before: int, after: int, count: int) -> Tensor:
    """Mean of a partial block ``[B, H, count, D]`` -> ``[B, H, 1, D]`` float32, summed
    zero-padded to the block size (one small copy) so the rounding is that of a full block."""
    padded = torch.nn.functional.pad(part.to(torch.float32), (0, 0, before, after))
    return padded.sum(-2, keepdim=True) / float(count)


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
    triton: bool | None = None,
) -> Tensor:
    """Steps 2-4 of the predictor on block statistics (see the module docstring).

    Args:
        pooled_q: ``[B, H, Qb, D]``; selfsim_q: ``[B, H, Qb]`` (``H`` = query heads).
        pooled_k: ``[B, H, KVb, D]``; selfsim_k: ``[B, H, KVb]`` (already repeated for GQA).
        simthreshd1, cdfthreshd, topk: float32 ``[H]``; exactly one of cdfthreshd / topk.
        q_block_offset: absolute index of query block 0 (decode steps), for ``causal``.
        triton: steps 3-4 by the Triton kernels (``kernels/meansim_fast.select``: the same
            tiles); None = where ``FLEXSPARSE_MEANSIM_TRITON=1`` asks for them.

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
    if triton is None:
        triton = prob.is_cuda and _fast().available(prob)
    if triton and prob.numel():
        return _fast().select(
            prob, sim_q, sim_k, cdfthreshd, topk, block_q=block_q, block_kv=block_kv,
            causal=causal, attention_sink=attention_sink, q_block_offset=q_block_offset,
        )
    # Only the sorted values are needed (ties are resolved below as a stable sort would).
    ordered = torch.sort(prob, dim=-1, descending=True).values
    if cdfthreshd is not None:
        cdf = ordered.cumsum(-1)
        # cdf is non-decreasing: the count equals a right-sided searchsorted.
        num = (cdf <= cdfthreshd.view(1, heads, 1, 1)).sum(-1, keepdim=True)
    else:
        num = (topk * kb).to(torch.int64).view(1, heads, 1, 1)
    num = num.clamp(min=1, max=kb).expand(*prob.shape[:-1], 1)
    # The first ``num`` of a stable descending sort: every probability above the num-th
    # largest value, and of the ties with it the ones with the lowest indices.
    cut = ordered.gather(-1, num - 1)
    above = prob > cut
    tie = prob == cut
    room = num - above.sum(-1, keepdim=True)
    kept = above | (tie & (tie.cumsum(-1) <= room))
    kept = kept | ~sim_k[..., None, :] | ~sim_q[..., :, None]
    if allowed is not None:
        kept = kept & allowed
    if attention_sink:
        # built from arange: item assignment would copy a host scalar (a sync on CUDA)
        kept = kept | (torch.arange(kb, device=dev) == 0)
    return kept


def _predict(q, k, sim1, cdf, top, block_q, block_kv, causal, attention_sink, smooth_k):
    """``stats`` + ``decide`` as one function of tensors (the unit that is compiled)."""
    offset = k.shape[2] - q.shape[2]
    pq, sq, _ = block_stats(q, block_q, lead=offset % block_q)
    pk, sk, _ = block_stats(k, block_kv, smooth=smooth_k)
    rep = q.shape[1] // k.shape[1]
    if rep > 1:
        pk = pk.repeat_interleave(rep, dim=1)
        sk = sk.repeat_interleave(rep, dim=1)
    return select_tiles(
        pq, sq, pk, sk, sim1, cdfthreshd=cdf, topk=top, block_q=block_q, block_kv=block_kv,
        causal=causal, attention_sink=attention_sink, q_block_offset=offset // block_q,
    )


# The fast predictor, one per shape: on CUDA the block statistics by one Triton launch per
# tensor and steps 2-4 (PyTorch's own ops, so the tile map is the eager path's for the same
# statistics) replayed from a CUDA graph (``_GraphPredictor``); elsewhere (FLEXSPARSE_COMPILE
# =1) or with FLEXSPARSE_MEANSIM_GRAPH=0, torch.compile'd ``_predict`` (``dynamic=False``).
# Shapes that change every call (decode steps) would capture / compile each time, so a shape
# is taken when first seen only for ``q_len == kv_len`` (prefill, video), otherwise when it
# repeats; at most ``_COMPILE_BUDGET`` keys. FLEXSPARSE_COMPILE=0 keeps everything eager.
_COMPILE_BUDGET = 8
#: Shapes remembered for the "seen twice" rule; the oldest is forgotten past this many
#: (a decode loop brings a new shape every step).
_SEEN_LIMIT = 64
_compiled = None
_seen: OrderedDict = OrderedDict()
_compiled_keys: set = set()
_failed = False
_graphs: OrderedDict = OrderedDict()
_graph_failed = False
#: Steps 3-4 of the captured predictor by the Triton kernels (True) or PyTorch's ops;
#: both give the same tiles (tests/gpu/test_meansim_gpu.py).
_GRAPH_TRITON_SELECT = True


def _want_compile(q: Tensor, k: Tensor, key) -> bool:
    global _failed
    flag = os.environ.get("FLEXSPARSE_COMPILE", "")
    if flag == "0" or _failed or not hasattr(torch, "compile"):
        return False
    if flag != "1" and q.device.type != "cuda":
        return False
    if torch.compiler.is_compiling():
        return False
    if q.is_cuda and _fast().available(q):
        return False  # the Triton kernels (opt-in) run eagerly
    if key in _compiled_keys:
        return True
    _seen[key] = _seen.pop(key, 0) + 1
    while len(_seen) > _SEEN_LIMIT:
        _seen.popitem(last=False)
    if len(_compiled_keys) >= _COMPILE_BUDGET:
        return False
    if q.shape[2] == k.shape[2] or _seen[key] >= 2:
        _compiled_keys.add(key)
        return True
    return False


def _use_graph(q: Tensor) -> bool:
    """The CUDA-graph predictor for ``q``: CUDA, Triton importable, not switched off
    (FLEXSPARSE_MEANSIM_GRAPH=0), not inside ``torch.compile`` or a graph capture."""
    return (
        not _graph_failed
        and os.environ.get("FLEXSPARSE_MEANSIM_GRAPH", "") != "0"
        and _fast().stats_ready(q)
        and not torch.cuda.is_current_stream_capturing()
    )


class _GraphPredictor:
    """The predictor for one shape on CUDA: static statistics buffers that the Triton
    stats kernel fills, per-head hyperparameter buffers, and steps 2-4 (``select_tiles``:
    PyTorch's score / softmax / cumsum, the Triton sort and selection) captured once in a
    CUDA graph. A call is two or three launches
    and one replay, and never waits for the device."""

    def __init__(self, q: Tensor, k: Tensor, mask: MeansimMask):
        dev, f32 = q.device, torch.float32
        b, hq, n_q, d = q.shape
        hkv, n_kv = k.shape[1], k.shape[2]
        self.offset = n_kv - n_q
        self.lead = self.offset % mask.block_q
        qb = -(-(self.lead + n_q) // mask.block_q)
        kb = -(-n_kv // mask.block_kv)
        self.inputs = {
            "pq": torch.zeros(b, hq, qb, d, dtype=f32, device=dev),
            "sq": torch.zeros(b, hq, qb, dtype=f32, device=dev),
            "pk": torch.zeros(b, hkv, kb, d, dtype=f32, device=dev),
            "sk": torch.zeros(b, hkv, kb, dtype=f32, device=dev),
            "sim1": torch.zeros(hq, dtype=f32, device=dev),
            "cdf": None if mask.cdfthreshd is None else torch.zeros(hq, dtype=f32, device=dev),
            "top": None if mask.topk is None else torch.zeros(hq, dtype=f32, device=dev),
        }
        self.hyper_key = None
        self.fill(q, k, mask)
        rep, q_off = hq // hkv, self.offset // mask.block_q
        opts = dict(block_q=mask.block_q, block_kv=mask.block_kv, causal=mask.causal,
                    attention_sink=mask.attention_sink, q_block_offset=q_off)

        def steps(pq, sq, pk, sk, sim1, cdf, top):
            if rep > 1:
                pk, sk = pk.repeat_interleave(rep, dim=1), sk.repeat_interleave(rep, dim=1)
            # Sorting and the tie rule by the Triton kernels: torch.sort alone took 175 us
            # of 550 on the CogVideoX-2b shape (H100 profile, benchmarks/meansim.py).
            return select_tiles(pq, sq, pk, sk, sim1, cdfthreshd=cdf, topk=top,
                                triton=_GRAPH_TRITON_SELECT, **opts)

        self.graph, self.out = _fast().capture(steps, self.inputs, dev)

    def fill(self, q: Tensor, k: Tensor, mask: MeansimMask) -> None:
        """The statistics of ``q, k`` and ``mask``'s hyperparameters into the inputs."""
        fast, inp = _fast(), self.inputs
        fast.block_stats_into(q, mask.block_q, self.lead, inp["pq"], inp["sq"])
        mean = torch.mean(k, dim=-2, dtype=torch.float32) if mask.smooth_k else None
        fast.block_stats_into(k, mask.block_kv, 0, inp["pk"], inp["sk"], mean)
        values = (("sim1", mask.simthreshd1), ("cdf", mask.cdfthreshd), ("top", mask.topk))
        key = tuple(_hyper_key(v) for _, v in values)
        if key == self.hyper_key:
            return  # the same hyperparameters as the last call (no launch)
        # Held so that a freed tensor's id cannot come back as another's in the key.
        self.hyper_refs = [v for _, v in values]
        for name, value in values:
            buf = inp[name]
            if buf is None:
                continue
            if isinstance(value, float):
                buf.fill_(value)
            else:
                dev_value = mask._on(value, buf.device)
                buf.copy_(_per_head(name, dev_value, buf.numel(), buf.device))
        self.hyper_key = key

    def __call__(self, q: Tensor, k: Tensor, mask: MeansimMask) -> Tensor:
        self.fill(q, k, mask)
        self.graph.replay()
        return self.out.clone()  # the next replay overwrites ``out``


def _hyper_key(value):
    """Identifies a hyperparameter's current value without reading a device tensor."""
    if value is None or isinstance(value, float):
        return value
    return (id(value), value._version)


def _graph_key(q: Tensor, k: Tensor, mask: MeansimMask):
    return ("graph", tuple(q.shape), k.shape[1], k.shape[2], str(q.device),
            mask.cdfthreshd is None, mask.block_q, mask.block_kv, mask.causal,
            mask.attention_sink)


def _warn_fallback(failed: str, err: Exception, instead: str, env: str, stacklevel: int):
    """Warn that ``failed`` raised ``err`` and ``instead`` runs (``env=0`` silences it);
    ``stacklevel`` counted from the caller."""
    warnings.warn(
        f"meansim: {failed} failed ({type(err).__name__}: {err}); using {instead}. "
        f"Set {env}=0 to silence.",
        stacklevel=stacklevel + 1,
    )


def _graph_predict(q: Tensor, k: Tensor, mask: MeansimMask) -> Tensor | None:
    """The tile map from this shape's ``_GraphPredictor`` (captured on first use), or None
    where the eager path must run (no capture under a sync-debug mode, which capturing
    would trip; capture failed)."""
    global _graph_failed
    key = _graph_key(q, k, mask)
    entry = _graphs.get(key)
    if entry is None:
        if torch.cuda.get_sync_debug_mode() != 0:
            return None
        try:
            entry = _GraphPredictor(q, k, mask)
        except Exception as err:  # pragma: no cover - depends on the toolchain
            _graph_failed = True
            _warn_fallback("CUDA graph capture", err, "the eager predictor",
                           "FLEXSPARSE_MEANSIM_GRAPH", stacklevel=4)
            return None
        _graphs[key] = entry
        while len(_graphs) > _COMPILE_BUDGET:
            _graphs.popitem(last=False)
    return entry(q, k, mask)


def _run_predict(mask: MeansimMask, q: Tensor, k: Tensor) -> Tensor:
    global _compiled, _failed
    args = (mask.block_q, mask.block_kv, mask.causal, mask.attention_sink, mask.smooth_k)
    graph = q.is_cuda and _use_graph(q)
    if graph:
        key = _graph_key(q, k, mask)
        if _want_compile(q, k, key):
            kept = _graph_predict(q, k, mask)
            if kept is not None:
                return kept
            graph = not _graph_failed  # a failed capture hands over to torch.compile
    heads, dev = q.shape[1], q.device
    sim1 = _per_head("simthreshd1", mask._on(mask.simthreshd1, dev), heads, dev)
    cdf = None if mask.cdfthreshd is None else _per_head(
        "cdfthreshd", mask._on(mask.cdfthreshd, dev), heads, dev)
    top = None if mask.topk is None else _per_head("topk", mask._on(mask.topk, dev), heads, dev)
    key = (tuple(q.shape), tuple(k.shape), q.stride(), k.stride(), q.dtype, k.dtype,
           str(q.device), cdf is None, args[3:])
    if not graph and _want_compile(q, k, key):
        if _compiled is None:
            _compiled = torch.compile(_predict, dynamic=False)
        try:
            return _compiled(q, k, sim1, cdf, top, *args)
        except Exception as err:  # pragma: no cover - depends on the toolchain
            _failed = True
            _warn_fallback("torch.compile", err, "eager", "FLEXSPARSE_COMPILE", stacklevel=3)
    return _predict(q, k, sim1, cdf, top, *args)


class MeansimMask(DynamicMask):
    """The meansim predictor as a ``DynamicMask`` (build it with ``masks.meansim``).

    ``predict(q, k)`` gives the bool tile map ``[B, H, Qb, KVb]`` at
    ``(block_q, block_kv)``; ``bind(q, k)`` wraps it in a block-granular ``Mask`` whose
    ``native_block_size`` is ``(block_q, block_kv)``, so ``attention`` builds the
    ``BlockMask`` at that size. The bound mask keeps whole tiles: with ``causal=True`` the
    diagonal tiles are kept in full, so compose with ``masks.causal()`` for exact causality
    (``fs.attention(q, k, v, mask=meansim(..., causal=True) & masks.causal())``).

    The predicted map stands in for dense attention (``approximates_dense``): where it
    would skip too few tiles to pay, ``attention(..., backend="auto")`` runs dense instead.
    """

    #: Its tiles approximate dense attention; ``auto`` may drop a map that saves nothing.
    approximates_dense = True

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
        self._check_qk(q, k)
        return _run_predict(self, q, k)

    def bind(self, q: Tensor, k: Tensor) -> Mask:
        """The block-granular ``Mask`` of this call (batch- and head-dependent)."""
        return self.bind_tiles(q, k)[0]

    def bind_tiles(self, q: Tensor, k: Tensor) -> tuple[Mask, Tensor]:
        """``(bind(q, k), predict(q, k))`` from one prediction: the bound mask and the
        bool tile map ``[B, H, Qb, KVb]`` it was built from (``attention`` decides from the
        map whether the prediction pays before any ``BlockMask`` is built)."""
        predicted = self.predict(q, k)
        kept = predicted
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
        return mask, predicted

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
