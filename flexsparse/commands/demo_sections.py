"""``flexsparse demo`` sections for the model-level parts of the library: self-ensemble on a
tiny random LLaMA, a patched tiny CogVideoX transformer, and meansim tuning.

Everything is built locally from random weights (no downloads) and sized to finish in a
few seconds on a small CPU. Registered in ``flexsparse.commands.demo.SECTIONS``.
"""

from __future__ import annotations

import math
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from ..tune.params import spargeattn_example_path
from .demo import DemoContext, SectionResult

#: SpargeAttn's tuned CogVideoX-2b parameters, shipped in the package (flexsparse/data).
SPARGE_FILE = spargeattn_example_path()


def _short(text: str, n: int = 28) -> str:
    text = " ".join(text.split())
    return text[:n] + ("..." if len(text) > n else "")


# -- self-ensemble -----------------------------------------------------------------------------
def ensemble_section(ctx: DemoContext) -> SectionResult:
    """Self-ensemble (flex / avg / per_prompt) on a tiny random LLaMA; flex's tokens on
    the "flex" and "sdpa" attention backends must agree; the packed prompt's mask."""
    title = "Self-ensemble: tiny random LLaMA, methods and backends"
    try:
        import transformers  # noqa: F401
    except ImportError as exc:
        return SectionResult(title, notes=[
            f"skipped: transformers is not available ({exc}); pip install -e '.[hf]'"])
    from .. import masks, viz
    from ..ensemble import SelfEnsemble
    from ..models import tiny

    res = SectionResult(
        title,
        columns=["question", "method", "tokens", "seconds", "token ids", "flex = sdpa tokens"],
    )
    questions = tiny.demo_questions()[: 2 if ctx.quick else 3]
    steps = 6 if ctx.quick else 12
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # no "Writing model shards" / "Loading weights" bars
    try:
        with tempfile.TemporaryDirectory(prefix="flexsparse-demo-") as tmp:
            path = tiny.save_tiny(Path(tmp) / "tiny-llama", "llama", chat_template=True,
                                  layers=2, hidden=64, heads=4, kv_heads=2)
            model, tok = tiny.load(path)
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    ens = {b: SelfEnsemble(model, tok, backend=b) for b in ("flex", "sdpa")}
    for e in ens.values():
        e.eos_ids = set()  # random weights: always generate `steps` tokens
    agree_all = True
    for q in questions:
        paras, prefix = q["paraphrases"], q.get("prefix", "")
        for method in ("flex", "avg", "per_prompt"):
            t0 = time.perf_counter()
            out = ens["flex"].generate(paras, prefix=prefix, max_new_tokens=steps,
                                       method=method)
            secs = time.perf_counter() - t0
            agree = "-"
            if method == "flex":
                other = ens["sdpa"].generate(paras, prefix=prefix, max_new_tokens=steps,
                                             method="flex")
                same = other.token_ids == out.token_ids
                agree_all &= same
                agree = "yes" if same else "NO"
            res.rows.append([q["id"], method, str(len(out.token_ids)), f"{secs:.2f}",
                             " ".join(map(str, out.token_ids)), agree])
    packed = ens["flex"].pack(questions[0]["paraphrases"], questions[0].get("prefix", ""))
    n = packed.layout.length
    labels = {name: f"{name}: {_short(text, 14)}" for name, text in packed.pieces
              if name != "template"}
    fig = ctx.out / "ensemble_packed_prompt.png"
    viz.plot_mask(masks.segments(packed.layout), n, n, layout=packed.layout, labels=labels,
                  path=fig, figsize=(10.0, 10.4),
                  title=f"packed prompt '{questions[0]['id']}', {n} tokens")
    res.figures.append(fig)
    cfg = model.config
    res.notes += [
        f"model: random LLaMA, {cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, "
        f"{cfg.num_attention_heads} heads / {cfg.num_key_value_heads} KV heads, vocab "
        f"{cfg.vocab_size}; greedy, EOS ignored, {steps} new tokens (random weights: the "
        "answers are noise, token ids shown).",
        f"flex vs sdpa backend: {'identical' if agree_all else 'DIFFERENT'} tokens for the "
        f"flex method on all {len(questions)} questions.",
        "packed prompt: " + ", ".join(f"{name} {e - s}" for name, s, e in packed.layout.spans())
        + f" tokens; {len(packed.layout.segments)} paraphrases isolated from each other.",
    ]
    return res


# -- CogVideoX -------------------------------------------------------------------------------
def cogvideox_section(ctx: DemoContext) -> SectionResult:
    """A tiny random CogVideoXTransformer3DModel patched with the radial pattern, against
    the stock processor given the materialised mask (and against dense attention)."""
    title = "CogVideoX: tiny random transformer, radial patch vs stock"
    try:
        from diffusers import CogVideoXTransformer3DModel
        from diffusers.models.attention_processor import CogVideoXAttnProcessor2_0
        from diffusers.models.embeddings import get_3d_rotary_pos_embed
    except ImportError as exc:
        return SectionResult(title, notes=[
            f"skipped: diffusers is not available ({exc}); pip install -e '.[hf]'"])
    from ..models import cogvideox as cvx

    frames, hw, block = 25, 64, 16  # 7 latent frames x (4 x 4) patches + 8 text tokens
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = CogVideoXTransformer3DModel(
            num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
            time_embed_dim=8, text_embed_dim=16, num_layers=2, sample_width=8,
            sample_height=8, sample_frames=frames, patch_size=2, max_text_seq_length=8,
            use_rotary_positional_embeddings=True,
        ).eval()
    g = torch.Generator().manual_seed(1)
    latent_frames, lat_hw = (frames - 1) // 4 + 1, hw // 8
    x = torch.randn(2, latent_frames, 4, lat_hw, lat_hw, generator=g)
    text = torch.randn(2, 8, 16, generator=g)
    grid = lat_hw // 2
    rope = get_3d_rotary_pos_embed(16, ((0, 0), (grid, grid)), (grid, grid), latent_frames)

    def forward():
        with torch.no_grad():
            return model(x, text, torch.full((2,), 500), image_rotary_emb=rope,
                         return_dict=False)[0]

    layout = cvx.layout_for(model, frames, hw, hw)
    res = SectionResult(title, columns=VIDEO_COLUMNS)
    for row in compare_with_masked_stock(
            cvx, model, forward, CogVideoXAttnProcessor2_0,
            lambda d: _MaskedStock(d, CogVideoXAttnProcessor2_0()),
            dict(pattern="radial", num_frames=frames, height=hw, width=hw, block_size=block)):
        res.rows.append(row.video_row(layout.length))
    from .. import viz

    fig = ctx.out / "cogvideox_radial_tiny.png"
    viz.plot_mask(cvx.build_mask(layout, "radial", block_size=block), layout.length,
                  layout.length, layout=layout, path=fig,
                  title=f"radial mask of the tiny CogVideoX ({layout.length} tokens)")
    res.figures.append(fig)
    res.notes += [
        f"model: CogVideoXTransformer3DModel, 2 blocks, 2 heads x 16, random weights; input "
        f"{frames} frames at {hw}x{hw} -> {layout.frames} latent frames x "
        f"{layout.tokens_per_frame} tokens + {layout.text_tokens} text, batch 2, float32.",
        "masked stock: the stock CogVideoXAttnProcessor2_0 with the patch's mask materialised "
        "as an additive float attention_mask (should agree to ~1e-5); max diff vs dense: "
        "how far the sparse output is from unpatched dense attention.",
    ]
    return res


VIDEO_COLUMNS = ["backend", "tokens", "density", "max err vs masked stock",
                 "max diff vs dense", "ms / forward"]


@dataclass
class Comparison:
    """One backend's patched forward against the stock processors given the same masks.

    Attributes:
        backend: the ``flexsparse.attention`` backend of the patch.
        kept: fraction of (query, key) pairs the layers' masks kept (all layers).
        err: max |patched - masked stock|; diff: max |patched - unpatched dense|.
        ms: one patched forward after the warm-up, in milliseconds.
    """

    backend: str
    kept: float
    err: float
    diff: float
    ms: float

    def video_row(self, tokens: int) -> list[str]:
        """``VIDEO_COLUMNS``: density is the kept fraction."""
        return [self.backend, f"{tokens}", f"{self.kept:.3f}", f"{self.err:.1e}",
                f"{self.diff:.1e}", f"{self.ms:.1f}"]


def compare_with_masked_stock(module, model, forward: Callable[[], torch.Tensor],
                              stock: Callable[[], object],
                              masked: Callable[[torch.Tensor], object], patch: dict,
                              backends: tuple[str, ...] = ("flex", "sdpa")) -> list[Comparison]:
    """A tiny patched transformer against its stock processors given the masks the patch
    used, per backend (what every model section of the demo shows).

    Args:
        module: the adapter module (``ADAPTER``, ``patch``, ``unpatch``).
        model: the unpatched transformer; left unpatched with fresh ``stock()`` processors.
        forward: the model's forward on fixed inputs (no grad).
        stock: a fresh stock processor; masked: ``dense bool mask -> processor`` (the
            stock arithmetic with that mask as an additive float mask).
        patch: ``module.patch`` keywords (backend added per row).

    The masks are read while the patched forward runs (a data-dependent mask is bound to
    that layer's q, k), so static and predicted masks are compared alike.
    """
    modules = module.ADAPTER.attention_modules(model)
    dense_out = forward()
    rows = []
    for backend in backends:
        handle = module.patch(model, backend=backend, **patch)
        seen: list[torch.Tensor] = []

        def observe(i, q, k, v, handle=handle, seen=seen):
            mask = handle.mask_for_layer(i)
            seen.append((mask.bind(q, k) if mask.is_dynamic else mask).to_dense())

        try:
            with handle.observing(observe):
                forward()  # warm-up (builds the BlockMask) and the masks of the reference
            t0 = time.perf_counter()
            out = forward()
            ms = (time.perf_counter() - t0) * 1e3
        finally:
            module.unpatch(model)
        for attn, dense in zip(modules, seen):
            attn.set_processor(masked(dense))
        try:
            ref = forward()
        finally:
            for attn in modules:
                attn.set_processor(stock())
        rows.append(Comparison(backend, torch.stack(seen).float().mean().item(),
                               (out - ref).abs().max().item(),
                               (out - dense_out).abs().max().item(), ms))
    return rows


class _MaskedStock:
    """The stock processor with a dense bool mask passed as an additive float mask."""

    def __init__(self, dense: torch.Tensor, stock):
        self.dense, self.stock = dense, stock

    def __call__(self, attn, hidden_states, encoder_hidden_states, attention_mask=None,
                 image_rotary_emb=None):
        lowest = torch.finfo(hidden_states.dtype).min
        add = torch.zeros(self.dense.shape, dtype=hidden_states.dtype)
        add = add.masked_fill(~self.dense, lowest).expand(hidden_states.shape[0],
                                                           *self.dense.shape[-2:])
        return self.stock(attn, hidden_states, encoder_hidden_states, add, image_rotary_emb)


# -- tuning ----------------------------------------------------------------------------------
_BQ, _BK, _D = 32, 16, 32


def block_structured_qkv(seed: int):
    """One synthetic layer at the demo's tiles (see ``tune.block_structured_qkv``)."""
    from ..tune import block_structured_qkv as make

    return make(seed, block_q=_BQ, block_kv=_BK, head_dim=_D)


def tuning_section(ctx: DemoContext) -> SectionResult:
    """Per-head meansim calibration on synthetic samples, checked on held-out inputs; and
    the SpargeAttn CogVideoX-2b parameter file (when present) as a layers x heads map."""
    import flexsparse as fs

    from .. import masks, tune, viz

    bound = 0.06
    grid = (-0.5, 0.0, 0.5, 0.9)
    calib = [block_structured_qkv(s) for s in range(2)]
    t0 = time.perf_counter()
    result = tune.tune_heads(calib, l1=bound, block_q=_BQ, block_kv=_BK, simthreshd1_grid=grid)
    tune_s = time.perf_counter() - t0
    mask = masks.meansim(torch.where(result.is_sparse, result.simthreshd1, math.inf),
                         cdfthreshd=result.cdfthreshd, block_q=_BQ, block_kv=_BK)
    held = [block_structured_qkv(s) for s in (100, 101)]
    errs = []
    for q, k, v in held:
        out = fs.attention(q, k, v, mask=mask, backend="flex").double()
        ref = fs.reference(q, k, v)
        errs.append((out - ref).abs().sum((0, 2, 3)) / ref.abs().sum((0, 2, 3)))
    held_err = torch.stack(errs).max(0).values
    res = SectionResult(
        "Tuning: per-head meansim calibration (synthetic layer) and SpargeAttn parameters",
        columns=["head", "sparse", "simthreshd1", "cdfthreshd", "sparsity", "calib L1",
                 "held-out L1", "bound", "ok"],
    )
    for h in range(result.simthreshd1.numel()):
        ok = held_err[h].item() < bound
        res.rows.append([
            str(h), "yes" if result.is_sparse[h] else "no (dense)",
            f"{result.simthreshd1[h].item():.3g}", f"{result.cdfthreshd[h].item():.4f}",
            f"{result.sparsity[h].item():.1%}", f"{result.error[h].item():.4f}",
            f"{held_err[h].item():.4f}", f"< {bound}", "yes" if ok else "NO",
        ])
    q0 = calib[0][0]
    res.notes.append(
        f"samples: {len(calib)} calibration + {len(held)} held-out, q/k/v "
        f"{list(q0.shape)}; head 0 block-structured, head 1 random; tiles {_BQ} x {_BK}, "
        f"simthreshd1 grid {list(grid)}; tune_heads took {tune_s:.1f} s. held-out L1: worst "
        "relative L1 of flex attention with the tuned mask vs the float64 dense reference.")
    if SPARGE_FILE.exists():
        params = tune.load_params(SPARGE_FILE)
        fig = ctx.out / "spargeattn_params.png"
        viz.plot_tuned(params, path=fig)
        res.figures.append(fig)
        cdf = params.cdfthreshd[params.is_sparse]
        span = f"{cdf.min().item():.3f} - {cdf.max().item():.3f}" if cdf.numel() else "-"
        res.notes.append(
            f"SpargeAttn file {SPARGE_FILE.name}: {params!r}; sparse heads "
            f"{int(params.is_sparse.sum())}/{params.is_sparse.numel()}, cdfthreshd {span}.")
    else:
        res.notes.append(f"SpargeAttn file: skipped, {SPARGE_FILE.resolve()} not found.")
    return res
