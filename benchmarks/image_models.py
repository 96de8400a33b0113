"""Flux and HunyuanDiT at 1024 x 1024: meansim (SpargeAttn's default thresholds) through
flexsparse vs the stock SDPA processors, bf16, random weights at real width.

    python benchmarks/image_models.py [--quick] [-o FILE.md]

Models (random weights built on the GPU, no download):
- FLUX.1: 24 heads x 128 (hidden 3072), 19 dual-stream + 38 single-stream blocks; 512 T5
  tokens + 64 x 64 image tokens = 4,608 tokens; batch 1 (FLUX.1-dev is guidance-distilled).
- HunyuanDiT: 16 heads x 88 (hidden 1408), 40 blocks; 64 x 64 = 4,096 image tokens in
  ``attn1`` (77 + 256 text tokens in the untouched cross-attention); batch 2 (CFG).

Forward rows: ``transformer(x)`` of shallow copies at full width, stock processors vs
``flux.patch`` / ``hunyuan_dit.patch`` with ``pattern="meansim"`` (SpargeAttn's untuned
``spas_sage2_attn_meansim_cuda`` defaults: simthreshd1 0.6, cdfthreshd 0.98, smooth_k,
128 x 64 tiles) on every block. Per block time = difference of two depths / blocks added;
the full-depth forward is extrapolated as ``shallow + (blocks of the real model - blocks
timed) x per block``. HunyuanDiT's skip-connection blocks (the second half) are timed as
plain blocks.

Attention rows: one attention call at the model's shape: dense SDPA vs meansim + flex
(predict + BlockMask + compiled FlexAttention), with the fraction of 128 x 64 tiles skipped
and the relative L1 error ``sum|o - o_dense| / sum|o_dense|``, on two inputs: ``random``
(q, k, v of the first patched block of the random-weight model: attention is flat) and
``smooth`` (per head, q and k one smooth low-frequency field over the image grid plus
noise, text random, as benchmarks/meansim.py builds video inputs).
Times: median of CUDA-event timings after warm-up (compilation excluded).
"""

from __future__ import annotations

import argparse
import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import device_name, time_ms, write_table  # noqa: E402

FLUX = dict(patch_size=1, in_channels=64, attention_head_dim=128, num_attention_heads=24,
            joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
            axes_dims_rope=(16, 56, 56))
FLUX_DEPTH = (19, 38)
HUNYUAN = dict(num_attention_heads=16, attention_head_dim=88, in_channels=4, patch_size=2,
               sample_size=128, hidden_size=1408, mlp_ratio=4.3637, cross_attention_dim=1024,
               cross_attention_dim_t5=2048, pooled_projection_dim=1024, text_len=77,
               text_len_t5=256)
HUNYUAN_DEPTH = 40
SIDE, TEXT = 64, 512  # 1024 px / 16 px per token; FluxPipeline's max_sequence_length


def flux_model(dual: int, single: int):
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    with torch.device("cuda"):
        model = FluxTransformer2DModel(num_layers=dual, num_single_layers=single, **FLUX)
    return model.to(torch.bfloat16).eval()


def flux_inputs() -> dict:
    g = torch.Generator(device="cuda").manual_seed(1)
    ids = torch.zeros(SIDE, SIDE, 3, device="cuda")
    ids[..., 1] = torch.arange(SIDE, device="cuda")[:, None]
    ids[..., 2] = torch.arange(SIDE, device="cuda")[None, :]
    bf = dict(device="cuda", dtype=torch.bfloat16, generator=g)
    return dict(hidden_states=torch.randn(1, SIDE * SIDE, 64, **bf),
                encoder_hidden_states=torch.randn(1, TEXT, 4096, **bf),
                pooled_projections=torch.randn(1, 768, **bf),
                timestep=torch.full((1,), 0.5, device="cuda"),
                guidance=torch.full((1,), 3.5, device="cuda"),
                img_ids=ids.reshape(-1, 3), txt_ids=torch.zeros(TEXT, 3, device="cuda"))


def hunyuan_model(layers: int):
    from diffusers import HunyuanDiT2DModel

    torch.manual_seed(0)
    with torch.device("cuda"):
        model = HunyuanDiT2DModel(num_layers=layers, **HUNYUAN)
    return model.to(torch.bfloat16).eval()


def hunyuan_inputs() -> dict:
    from diffusers.models.embeddings import get_2d_rotary_pos_embed

    g = torch.Generator(device="cuda").manual_seed(1)
    bf = dict(device="cuda", dtype=torch.bfloat16, generator=g)
    rope = get_2d_rotary_pos_embed(88, ((0, 0), (SIDE, SIDE)), (SIDE, SIDE), device="cuda")
    return dict(hidden_states=torch.randn(2, 4, 2 * SIDE, 2 * SIDE, **bf),
                timestep=torch.full((2,), 500.0, device="cuda", dtype=torch.bfloat16),
                encoder_hidden_states=torch.randn(2, 77, 1024, **bf),
                text_embedding_mask=torch.ones(2, 77, device="cuda", dtype=torch.long),
                encoder_hidden_states_t5=torch.randn(2, 256, 2048, **bf),
                text_embedding_mask_t5=torch.ones(2, 256, device="cuda", dtype=torch.long),
                image_meta_size=torch.tensor([[1024.0, 1024, 1024, 1024, 0, 0]] * 2,
                                             device="cuda", dtype=torch.bfloat16),
                style=torch.zeros(2, device="cuda", dtype=torch.long),
                image_rotary_emb=rope)


def stock_ms(model, inputs, warmup, reps) -> float:
    """Milliseconds of one forward with the stock processors."""
    def run():
        with torch.no_grad():
            return model(**inputs, return_dict=False)[0]

    return time_ms(run, warmup, reps)


def forward_ms(model, inputs, module, kw, warmup, reps) -> tuple[float, float, list]:
    """(stock ms, meansim ms, [(q, k, v) of patched layer 0]) of one forward."""
    def run():
        with torch.no_grad():
            return model(**inputs, return_dict=False)[0]

    stock = stock_ms(model, inputs, warmup, reps)
    handle = module.patch(model, pattern="meansim", backend="flex", **kw)
    seen = []
    with handle.observing(lambda i, q, k, v: seen.append((q, k, v)) if i == 0 and not seen
                          else None):
        run()
    sparse = time_ms(run, warmup, reps)
    module.unpatch(model)
    return stock, sparse, seen


def smooth_qkv(batch: int, heads: int, d: int, text: int, seed: int = 0):
    """q, k, v ``[B, H, text + 64*64, d]`` bf16: per head one smooth field over (y, x)
    shared by q and k, plus noise; text tokens and v random."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    axis = torch.linspace(0, 1, SIDE, device="cuda")
    grid = torch.stack(torch.meshgrid(axis, axis, indexing="ij"), -1).reshape(-1, 2)
    modes = 6
    freq = torch.randint(0, 4, (heads, modes, 2), generator=g, device="cuda").float() * math.pi
    phase = torch.rand(heads, modes, 1, generator=g, device="cuda") * 2 * math.pi
    amp = torch.randn(heads, modes, d, generator=g, device="cuda")
    waves = torch.cos(torch.einsum("vc,hmc->hmv", grid, freq) + phase)
    field = (torch.einsum("hmv,hmd->hvd", waves, amp) * (3.0 / math.sqrt(modes)))[None]

    def noisy():
        x = field.expand(batch, -1, -1, -1)
        x = x + 0.5 * torch.randn(x.shape, generator=g, device="cuda")
        t = torch.randn(batch, heads, text, d, generator=g, device="cuda")
        return torch.cat([t, x], dim=2).to(torch.bfloat16)

    q, k = noisy(), noisy()
    v = torch.randn(q.shape, generator=g, device="cuda", dtype=torch.bfloat16)
    return q, k, v


def attention_rows(model_name, q, k, v, inputs_name, warmup, reps) -> list[dict]:
    import flexsparse as fs
    from flexsparse.models.flux import SPARGE_DEFAULTS

    dyn = fs.masks.meansim(**SPARGE_DEFAULTS)
    dense = fs.attention(q, k, v, None, backend="sdpa")
    kept = dyn.predict(q, k).float().mean().item()
    sdpa = time_ms(lambda: fs.attention(q, k, v, None, backend="sdpa"), warmup, reps)
    rows = [dict(model=model_name, inputs=inputs_name, row="attention sdpa (dense)",
                 ms=sdpa, speedup=1.0, **{"tiles skipped": 0.0, "rel L1": 0.0})]
    for backend in ("flex", "auto"):
        try:
            out = fs.attention(q, k, v, dyn, backend=backend)
            ms = time_ms(lambda b=backend: fs.attention(q, k, v, dyn, backend=b), warmup, reps)
        except Exception as exc:  # report what the kernels refuse (head dim 88)
            rows.append(dict(model=model_name, inputs=inputs_name,
                             row=f"attention meansim/{backend}", ms=float("nan"),
                             note=f"{type(exc).__name__}: {str(exc)[:120]}"))
            continue
        err = ((out.float() - dense.float()).abs().sum() / dense.float().abs().sum()).item()
        rows.append(dict(model=model_name, inputs=inputs_name,
                         row=f"attention meansim/{backend}", ms=ms, speedup=sdpa / ms,
                         **{"tiles skipped": 1 - kept, "rel L1": err}))
    return rows


def forward_rows(name, timings, depth_note, full) -> list[dict]:
    """``timings``: {label: (stock, sparse)}; ``full``: (stock, sparse) extrapolated."""
    rows = [dict(model=name, inputs="random", row=f"forward stock, {label}", ms=s)
            for label, (s, _) in timings.items()]
    rows += [dict(model=name, inputs="random", row=f"forward meansim, {label}", ms=p,
                  speedup=timings[label][0] / p) for label, (_, p) in timings.items()]
    rows.append(dict(model=name, inputs="random", row=f"forward stock, {depth_note}",
                     ms=full[0]))
    rows.append(dict(model=name, inputs="random", row=f"forward meansim, {depth_note}",
                     ms=full[1], speedup=full[0] / full[1]))
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("-o", "--output", default=None)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("needs CUDA")
        return 1
    from flexsparse.models import flux, hunyuan_dit

    warmup, reps = (2, 5) if args.quick else (3, 10)
    rows: list[dict] = []

    # Flux: (2 dual, 0 single), (0 dual, 2 single), (0, 0) -> per block of each kind
    kw = dict(height=1024, width=1024, text_tokens=TEXT)
    times, seen = {}, None
    for dual, single in ((0, 0), (2, 0), (0, 2)):
        model, inputs = flux_model(dual, single), flux_inputs()
        if dual + single:
            s, p, qkv = forward_ms(model, inputs, flux, kw, warmup, reps)
            seen = seen or qkv
        else:
            s = p = stock_ms(model, inputs, warmup, reps)
        times[f"{dual} dual + {single} single blocks"] = (s, p)
        del model
        torch.cuda.empty_cache()
    (s0, p0), (s2d, p2d), (s2s, p2s) = times.values()
    per_dual = ((s2d - s0) / 2, (p2d - p0) / 2)
    per_single = ((s2s - s0) / 2, (p2s - p0) / 2)
    full = tuple(b + FLUX_DEPTH[0] * d + FLUX_DEPTH[1] * s
                 for b, d, s in zip((s0, p0), per_dual, per_single))
    times["per dual block"], times["per single block"] = per_dual, per_single
    rows += forward_rows("Flux", times, "19 + 38 blocks (extrapolated)", full)
    q, k, v = seen[0]
    rows += attention_rows("Flux", q, k, v, "random", warmup, reps)
    rows += attention_rows("Flux", *smooth_qkv(1, 24, 128, TEXT), "smooth", warmup, reps)
    del q, k, v, seen
    torch.cuda.empty_cache()

    # HunyuanDiT: 2 and 4 blocks -> per block
    kw = dict(height=1024, width=1024)
    times, seen = {}, None
    for layers in (2, 4):
        model, inputs = hunyuan_model(layers), hunyuan_inputs()
        try:
            s, p, qkv = forward_ms(model, inputs, hunyuan_dit, kw, warmup, reps)
        except Exception as exc:
            print(f"HunyuanDiT meansim forward failed: {type(exc).__name__}: {exc}")
            raise
        seen = seen or qkv
        times[f"{layers} blocks"] = (s, p)
        del model
        torch.cuda.empty_cache()
    (s2, p2), (s4, p4) = times.values()
    per = ((s4 - s2) / 2, (p4 - p2) / 2)
    full = (s2 + (HUNYUAN_DEPTH - 2) * per[0], p2 + (HUNYUAN_DEPTH - 2) * per[1])
    times["per block"] = per
    rows += forward_rows("HunyuanDiT", times, "40 blocks (extrapolated)", full)
    q, k, v = seen[0]
    rows += attention_rows("HunyuanDiT", q, k, v, "random", warmup, reps)
    rows += attention_rows("HunyuanDiT", *smooth_qkv(2, 16, 88, 0), "smooth", warmup, reps)

    write_table(args.output, rows,
                ["model", "inputs", "row", "ms", "speedup", "tiles skipped", "rel L1", "note"],
                f"Flux / HunyuanDiT 1024x1024: meansim (SpargeAttn defaults) vs stock, "
                f"{device_name()}",
                notes=["bf16, random weights at real width; speedup against the stock / "
                       "SDPA row of the same model; tiles skipped: fraction of 128 x 64 "
                       "tiles meansim drops; rel L1 vs dense SDPA of the same call."])
    return 0


if __name__ == "__main__":
    sys.exit(main())
