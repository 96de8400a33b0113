"""Per-head calibration of the meansim predictor (SpargeAttn's tuning, on our predictor).

For one attention layer and each head: for every ``simthreshd1`` on a grid over [-1, 1),
binary-search the smallest ``cdfthreshd`` whose sparse output stays within the error
bound of dense attention, the error accumulated over all calibration samples (e.g. the
relative L1 ``sum |O - O_ref| / sum |O_ref|`` over every sample, batch row, token and
channel of the head); keep the setting with the highest sparsity. Heads with no setting
inside the bound, or whose best sparsity is below ``min_sparsity``, stay dense.

How the search stays cheap: per sample and head the attention is decomposed by key
block once, ``num[i, j] = sum_{k in block j} exp(s_ik - m_i) v_k`` and
``den[i, j] = sum_{k in block j} exp(s_ik - m_i)``; the output of any tile map ``M`` is then
``sum_j M[i, j] num[i, j] / sum_j M[i, j] den[i, j]``, exactly the block-sparse attention,
at ``1 / block_kv`` of the cost of recomputing it. Memory: about
``B * Nq * Nk * 4 * (2 + D / block_kv)`` bytes per head and sample (heads are processed in
chunks that fit ``max_bytes``).

``MeansimTuner`` collects ``(q, k, v)`` of patched models' attention calls (through the
``PatchHandle`` observers) and runs ``tune_heads`` per layer, the layers spread over all
visible GPUs (one worker thread per GPU, layers assigned round-robin).
"""

from __future__ import annotations

import math
import random
import threading
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor

from .._checks import check_choice, check_float, check_int
from ..mask import Mask
from ..masks.meansim import MeansimMask
from .params import PV_OFF, TunedParams

METRICS = ("l1", "cosine", "rmse")
#: SpargeAttn's grid: simthreshd1 in {-1, -15/16, ..., 15/16}.
DEFAULT_GRID = tuple(i / 16 for i in range(-16, 16))


@dataclass
class HeadResult:
    """Calibration result of one layer, per head (all ``[H]``, on the CPU).

    ``error`` is the accumulated metric at the chosen setting (0 for dense heads)."""

    simthreshd1: Tensor
    cdfthreshd: Tensor
    is_sparse: Tensor
    sparsity: Tensor
    error: Tensor


def _bounds(metric: str, bound: float) -> tuple[str, float]:
    check_choice("metric", metric, METRICS)
    if metric == "cosine":
        return metric, check_float("bound", bound, low=-1.0, high=1.0)
    return metric, check_float("bound", bound, low=0.0)


class _Prepared:
    """One sample of one head chunk, decomposed by key block (see the module docstring)."""

    def __init__(self, pred: MeansimMask, q, k, v, base: Mask | None, scale, heads: slice):
        # q, k, v: the chunk's heads, k and v already repeated to the query heads (GQA).
        q, k, v = q.float(), k.float(), v.float()
        self.stats = pred.stats(q, k)
        b, h, nq, d = q.shape
        nk = k.shape[2]
        bk = pred.block_kv
        kvb = -(-nk // bk)
        scale = d**-0.5 if scale is None else scale
        s = (q @ k.transpose(-1, -2)) * scale  # [B, H, Nq, Nk]
        if base is not None:
            dense = base.to_dense(nq, nk, device=q.device)
            if dense.dim() == 3:
                dense = dense[heads]
            s = s.masked_fill(~dense, -math.inf)
            allowed = dense.to(torch.float32)
        else:
            allowed = torch.ones(nq, nk, device=q.device)
        m = s.amax(-1, keepdim=True)
        m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
        e = torch.exp(s - m)
        pad = kvb * bk - nk
        e = torch.nn.functional.pad(e, (0, pad)).view(b, h, nq, kvb, bk)
        vb = torch.nn.functional.pad(v, (0, 0, 0, pad)).view(b, h, kvb, bk, d)
        self.den = e.sum(-1)  # [B, H, Nq, KVb]
        self.num = torch.einsum("bhqkj,bhkjd->bhqkd", e, vb)  # [B, H, Nq, KVb, D]
        tot = self.den.sum(-1, keepdim=True)
        self.ref = torch.where(tot > 0, self.num.sum(-2) / tot.clamp(min=1e-30), 0.0)
        allowed = torch.nn.functional.pad(allowed, (0, pad)).unflatten(-1, (kvb, bk))
        self.pairs = allowed.sum(-1)  # [(H), Nq, KVb]: kept pairs of the base mask per tile
        lead = (nk - nq) % pred.block_q
        self.row_block = (torch.arange(nq, device=q.device) + lead) // pred.block_q

    def evaluate(self, kept: Tensor) -> tuple[Tensor, ...]:
        """Per-head sums for the metrics and the sparsity of tile map ``kept``."""
        rows = kept[:, :, self.row_block].to(torch.float32)  # [B, H, Nq, KVb]
        den = (rows * self.den).sum(-1, keepdim=True)
        out = torch.einsum("bhqk,bhqkd->bhqd", rows, self.num)
        out = torch.where(den > 0, out / den.clamp(min=1e-30), 0.0)
        ref = self.ref
        diff = out - ref
        red = (0, 2, 3)
        sums = (
            diff.abs().sum(red), ref.abs().sum(red), (out * ref).sum(red),
            out.square().sum(red), ref.square().sum(red), diff.square().sum(red),
            torch.full((out.shape[1],), float(out[:, 0].numel()), device=out.device),
        )
        pairs = self.pairs if self.pairs.dim() == 3 else self.pairs.unsqueeze(0)
        computed = (rows * pairs).sum((0, 2, 3))
        total = pairs.sum((-2, -1)).expand(out.shape[1]) * out.shape[0]
        return sums + (computed, total)


def _error(metric: str, acc: Sequence[Tensor]) -> Tensor:
    l1n, l1d, dot, oo, rr, sq, cnt = acc[:7]
    if metric == "l1":
        return l1n / l1d.clamp(min=1e-30)
    if metric == "cosine":
        return dot / (oo * rr).sqrt().clamp(min=1e-30)
    return (sq / cnt.clamp(min=1)).sqrt()


def _meets(metric: str, err: Tensor, bound: float) -> Tensor:
    return err > bound if metric == "cosine" else err < bound


def tune_heads(
    samples: Iterable[tuple[Tensor, Tensor, Tensor]],
    *,
    l1: float = 0.06,
    metric: str = "l1",
    bound: float | None = None,
    simthreshd1_grid: Sequence[float] = DEFAULT_GRID,
    cdf_tol: float = 1e-3,
    min_sparsity: float = 0.1,
    block_q: int = 128,
    block_kv: int = 64,
    causal: bool = False,
    attention_sink: bool = False,
    smooth_k: bool = False,
    base_mask: Mask | None = None,
    scale: float | None = None,
    device=None,
    max_bytes: int = 4 << 30,
) -> HeadResult:
    """Tune the meansim hyperparameters of one attention layer, per head.

    Args:
        samples: ``(q [B, Hq, Nq, D], k [B, Hkv, Nk, D], v)`` calibration inputs of the
            layer (shapes may differ between samples; ``Hq`` a multiple of ``Hkv``).
        l1: relative-L1 bound (used when ``metric="l1"`` and ``bound`` is None).
        metric: ``"l1"`` (error < bound), ``"cosine"`` (similarity > bound) or ``"rmse"``
            (< bound), accumulated over all samples.
        bound: bound of ``metric`` (default: ``l1`` for "l1", 0.98 cosine, 0.07 rmse).
        simthreshd1_grid: values of simthreshd1 tried.
        cdf_tol: binary-search resolution of cdfthreshd.
        min_sparsity: a head whose best sparsity is not above this stays dense.
        block_q, block_kv, causal, attention_sink, smooth_k: predictor settings.
        base_mask: the layer's own mask (e.g. ``masks.causal()`` for LLMs): the dense
            reference and the sparse output are both restricted to it, and sparsity is the
            fraction of its pairs skipped.
        scale: softmax scale (default ``D ** -0.5``).
        device: where to compute (default: that of the first sample).
        max_bytes: memory budget of the decomposed samples; heads are chunked to fit.

    Returns:
        ``HeadResult`` with ``[Hq]`` tensors. Dense heads have ``simthreshd1 = cdfthreshd
        = 1`` (SpargeAttn's convention) and sparsity 0.
    """
    if bound is None:
        bound = {"l1": l1, "cosine": 0.98, "rmse": 0.07}.get(metric, l1)
    metric, bound = _bounds(metric, bound)
    cdf_tol = check_float("cdf_tol", cdf_tol, low=1e-6, high=0.5)
    min_sparsity = check_float("min_sparsity", min_sparsity, low=0.0, high=1.0)
    grid = [check_float("simthreshd1_grid", float(x)) for x in simthreshd1_grid]
    if not grid:
        raise ValueError("simthreshd1_grid must hold at least one value")
    samples = list(samples)
    if not samples:
        raise ValueError("samples is empty: pass at least one (q, k, v)")
    heads = _check_samples(samples)
    device = torch.device(device) if device is not None else samples[0][0].device
    pred = MeansimMask(0.0, 1.0, None, block_q, block_kv, causal, attention_sink,
                       smooth_k=smooth_k)
    chunk = _head_chunk(samples, heads, block_kv, max_bytes)
    parts = [
        _tune_chunk(samples, slice(h0, min(h0 + chunk, heads)), pred, base_mask, scale,
                    device, grid, metric, bound, cdf_tol, min_sparsity)
        for h0 in range(0, heads, chunk)
    ]
    return HeadResult(*(torch.cat([getattr(p, f) for p in parts]) for f in (
        "simthreshd1", "cdfthreshd", "is_sparse", "sparsity", "error")))


def _check_samples(samples) -> int:
    heads = None
    for i, sample in enumerate(samples):
        if not (isinstance(sample, (tuple, list)) and len(sample) == 3):
            raise TypeError(f"samples[{i}] must be a (q, k, v) tuple, got {type(sample).__name__}")
        q, k, v = sample
        for name, t in (("q", q), ("k", k), ("v", v)):
            if not isinstance(t, Tensor) or t.dim() != 4:
                raise ValueError(f"samples[{i}]: {name} must be a [B, H, N, D] tensor")
        if k.shape != v.shape or q.shape[1] % k.shape[1] or q.shape[2] > k.shape[2]:
            raise ValueError(
                f"samples[{i}]: shapes q {tuple(q.shape)}, k {tuple(k.shape)}, v "
                f"{tuple(v.shape)} are not a valid attention call"
            )
        if heads is not None and q.shape[1] != heads:
            raise ValueError(f"samples[{i}] has {q.shape[1]} heads, samples[0] has {heads}")
        heads = q.shape[1]
    return heads


def _head_chunk(samples, heads: int, block_kv: int, max_bytes: int) -> int:
    per_head = 0
    for q, k, _ in samples:
        b, _, nq, d = q.shape
        nk = k.shape[2]
        per_head += b * nq * nk * 4 * (3 + d / block_kv)
    return max(1, min(heads, int(max_bytes // max(per_head, 1))))


def _tune_chunk(samples, heads: slice, pred, base, scale, device, grid, metric, bound, tol,
                min_sparsity) -> HeadResult:
    prepared = []
    for q, k, v in samples:
        q, k, v = (t.to(device) for t in (q, k, v))
        rep = q.shape[1] // k.shape[1]
        if rep > 1:
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        prepared.append(
            _Prepared(pred, q[:, heads], k[:, heads], v[:, heads], base, scale, heads)
        )
    h = heads.stop - heads.start

    def evaluate(sim1: Tensor, cdf: Tensor):
        acc = None
        for prep in prepared:
            kept = pred.decide(prep.stats, simthreshd1=sim1, cdfthreshd=cdf)
            got = prep.evaluate(kept)
            acc = got if acc is None else tuple(a + g for a, g in zip(acc, got))
        err = _error(metric, acc)
        sparsity = 1.0 - acc[7] / acc[8].clamp(min=1)
        return _meets(metric, err, bound), sparsity, err

    best_sp = torch.full((h,), -1.0, device=device)
    best_sim = torch.ones(h, device=device)
    best_cdf = torch.ones(h, device=device)
    best_err = torch.zeros(h, device=device)
    steps = math.ceil(math.log2(1.0 / tol))
    with torch.no_grad():
        for s in grid:
            sim1 = torch.full((h,), s, device=device)
            lo, hi = torch.zeros(h, device=device), torch.ones(h, device=device)
            feasible, hi_sp, hi_err = evaluate(sim1, hi)
            for _ in range(steps):
                mid = (lo + hi) / 2
                ok, sp, err = evaluate(sim1, mid)
                hi, lo = torch.where(ok, mid, hi), torch.where(ok, lo, mid)
                hi_sp, hi_err = torch.where(ok, sp, hi_sp), torch.where(ok, err, hi_err)
            better = feasible & (hi_sp > best_sp)
            best_sp = torch.where(better, hi_sp, best_sp)
            best_sim = torch.where(better, sim1, best_sim)
            best_cdf = torch.where(better, hi, best_cdf)
            best_err = torch.where(better, hi_err, best_err)
    sparse = best_sp > min_sparsity
    one = torch.ones_like(best_sim)
    return HeadResult(
        torch.where(sparse, best_sim, one).cpu(),
        torch.where(sparse, best_cdf, one).cpu(),
        sparse.cpu(),
        torch.where(sparse, best_sp, torch.zeros_like(best_sp)).cpu(),
        torch.where(sparse, best_err, torch.zeros_like(best_err)).cpu(),
    )


class MeansimTuner:
    """Calibrate meansim per layer and head on a patched model's own attention calls.

    >>> from flexsparse import masks
    >>> from flexsparse.models import llama
    >>> llama.patch(model, masks.causal())          # dense, but observable
    >>> tuner = MeansimTuner(l1=0.06, block_q=64, block_kv=64)
    >>> with tuner.attach(model):
    ...     for batch in calibration: model(**batch)
    >>> params = tuner.tune(model_name="tiny-llama")   # TunedParams
    >>> params.save("params.safetensors")

    Args:
        l1, pv_l1: error bounds (relative L1); ``pv_l1`` is recorded for kernels with
            SpargeAttn's PV-skip stage (FlexAttention has none; pvthreshd is saved "off").
        metric: ``"l1" | "cosine" | "rmse"``; cosine / rmse: their bounds.
        simthreshd1_grid, cdf_tol, min_sparsity, block_q, block_kv, attention_sink,
            smooth_k, max_bytes: see ``tune_heads``.
        causal: predict causally; None = from the patched model (True for ``"llama"``).
        base_mask: the layers' own mask; "auto" = ``masks.causal()`` when causal.
        max_samples: calls kept per layer (a uniform reservoir sample over all calls).
        store: where kept samples wait until ``tune`` (``"cpu"`` saves GPU memory, or
            ``"same"`` to keep them where they were).

    Patch the model with dense attention while calibrating (each layer then sees the
    inputs it sees in the dense model); calls are recorded by ``observe`` (an observer
    ``(layer_idx, q, k, v)`` that you may also call yourself).
    """

    def __init__(
        self,
        l1: float = 0.06,
        pv_l1: float = 0.07,
        metric: str = "l1",
        *,
        cosine: float = 0.98,
        rmse: float = 0.07,
        simthreshd1_grid: Sequence[float] = DEFAULT_GRID,
        cdf_tol: float = 1e-3,
        min_sparsity: float = 0.1,
        block_q: int = 128,
        block_kv: int = 64,
        causal: bool | None = None,
        attention_sink: bool = False,
        smooth_k: bool = False,
        base_mask: Mask | None | str = "auto",
        max_samples: int = 4,
        store: str = "cpu",
        max_bytes: int = 4 << 30,
        seed: int = 0,
    ):
        self.l1 = check_float("l1", l1, low=0.0)
        self.pv_l1 = check_float("pv_l1", pv_l1, low=0.0)
        if self.pv_l1 < self.l1:
            raise ValueError(f"pv_l1 ({pv_l1}) must be >= l1 ({l1})")
        self.metric = check_choice("metric", metric, METRICS)
        self.bound = {"l1": self.l1, "cosine": cosine, "rmse": rmse}[metric]
        _bounds(metric, self.bound)
        self.grid = tuple(float(x) for x in simthreshd1_grid)
        self.cdf_tol, self.min_sparsity = cdf_tol, min_sparsity
        self.block_q = check_int("block_q", block_q, minimum=1)
        self.block_kv = check_int("block_kv", block_kv, minimum=1)
        self.causal, self.attention_sink, self.smooth_k = causal, attention_sink, smooth_k
        if not (base_mask is None or base_mask == "auto" or isinstance(base_mask, Mask)):
            raise TypeError(f"base_mask must be a Mask, None or 'auto', got {base_mask!r}")
        self.base_mask = base_mask
        self.max_samples = check_int("max_samples", max_samples, minimum=1)
        self.store = check_choice("store", store, ("cpu", "same"))
        self.max_bytes = check_int("max_bytes", max_bytes, minimum=1)
        self.samples: dict[int, list[tuple[Tensor, Tensor, Tensor]]] = {}
        self.calls: dict[int, int] = {}
        self.kind: str | None = None
        self._rng = random.Random(seed)
        self._lock = threading.Lock()

    # -- collecting -----------------------------------------------------------------------
    def observe(self, layer_idx: int, q: Tensor, k: Tensor, v: Tensor) -> None:
        """Record one attention call of layer ``layer_idx`` (reservoir of ``max_samples``)."""
        def keep(t: Tensor) -> Tensor:
            t = t.detach()
            return t.to("cpu", copy=True) if self.store == "cpu" else t.clone()

        with self._lock:
            n = self.calls.get(layer_idx, 0)
            self.calls[layer_idx] = n + 1
            kept = self.samples.setdefault(layer_idx, [])
            if n < self.max_samples:
                kept.append((keep(q), keep(k), keep(v)))
            else:
                j = self._rng.randint(0, n)
                if j < self.max_samples:
                    kept[j] = (keep(q), keep(k), keep(v))

    @contextmanager
    def attach(self, model):
        """Observe every patched attention call of ``model`` (or a diffusers pipeline with
        a patched ``.transformer``) inside the block."""
        from ..models._patch import ATTR, get_handle

        target = model
        if getattr(model, ATTR, None) is None and getattr(model, "transformer", None) is not None:
            target = model.transformer
        handle = get_handle(target)
        self.kind = handle.kind
        with handle.observing(self.observe):
            yield self

    # -- tuning ---------------------------------------------------------------------------
    def _settings(self) -> tuple[bool, Mask | None]:
        causal = self.causal if self.causal is not None else self.kind == "llama"
        base = self.base_mask
        if base == "auto":
            from ..masks import causal as causal_mask

            base = causal_mask() if causal else None
        return causal, base

    def tune(
        self,
        *,
        model_name: str = "",
        num_layers: int | None = None,
        devices: Sequence | None = None,
        progress: bool = True,
    ) -> TunedParams:
        """Tune every observed layer; returns ``TunedParams`` with ``num_layers`` rows
        (default: highest observed layer + 1; unobserved layers are dense).

        Args:
            devices: where layers are tuned, round-robin, one worker thread per device.
                Default: every visible GPU (``torch.cuda.device_count()``), else the CPU.
        """
        if not self.samples:
            raise ValueError(
                "no attention calls were observed: run the model inside tuner.attach(model) "
                "(patch it first, e.g. llama.patch(model, masks.causal()))"
            )
        layers = sorted(self.samples)
        n_layers = layers[-1] + 1 if num_layers is None else check_int(
            "num_layers", num_layers, minimum=layers[-1] + 1)
        if devices is None:
            count = torch.cuda.device_count() if torch.cuda.is_available() else 0
            devices = [f"cuda:{i}" for i in range(count)] or ["cpu"]
        devices = [torch.device(d) for d in devices]
        causal, base = self._settings()
        results: dict[int, HeadResult] = {}

        from tqdm.auto import tqdm

        bar = tqdm(total=len(layers), desc="meansim tuning", unit="layer", disable=not progress)

        def work(device, todo):
            for layer in todo:
                results[layer] = tune_heads(
                    self.samples[layer], metric=self.metric, bound=self.bound,
                    simthreshd1_grid=self.grid, cdf_tol=self.cdf_tol,
                    min_sparsity=self.min_sparsity, block_q=self.block_q,
                    block_kv=self.block_kv, causal=causal, attention_sink=self.attention_sink,
                    smooth_k=self.smooth_k, base_mask=base, device=device,
                    max_bytes=self.max_bytes,
                )
                with self._lock:
                    mean = float(results[layer].sparsity.mean())
                    bar.set_postfix(layer=layer, sparsity=f"{mean:.2f}")
                    bar.update(1)

        plan = [layers[i::len(devices)] for i in range(len(devices))]
        try:
            if len(devices) == 1:
                work(devices[0], layers)
            else:
                with ThreadPoolExecutor(len(devices)) as pool:
                    for fut in [pool.submit(work, d, todo) for d, todo in zip(devices, plan)]:
                        fut.result()
        finally:
            bar.close()
        heads = {r.sparsity.numel() for r in results.values()}
        if len(heads) != 1:
            raise ValueError(f"layers have different head counts {sorted(heads)}")
        (h,) = heads
        sim = torch.ones(n_layers, h)
        cdf = torch.ones(n_layers, h)
        sparse = torch.zeros(n_layers, h, dtype=torch.bool)
        sp = torch.zeros(n_layers, h)
        err = torch.zeros(n_layers, h)
        for layer, r in results.items():
            sim[layer], cdf[layer], sparse[layer] = r.simthreshd1, r.cdfthreshd, r.is_sparse
            sp[layer], err[layer] = r.sparsity, r.error
        return TunedParams(
            sim, cdf, torch.full((n_layers, h), PV_OFF), sparse, sp, model=model_name,
            l1=self.l1, pv_l1=self.pv_l1, metric=self.metric, bound=self.bound,
            block_q=self.block_q, block_kv=self.block_kv, causal=causal,
            attention_sink=self.attention_sink, smooth_k=self.smooth_k,
            extra={"calls": {str(k): v for k, v in sorted(self.calls.items())},
                   "samples_per_layer": self.max_samples,
                   "error": err.tolist()},
        )
