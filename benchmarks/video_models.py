"""HunyuanVideo and Wan2.1-14B transformers at real width: stock SDPA forward vs radial
attention through flexsparse, a few blocks timed per block and extrapolated to full depth.

    python benchmarks/video_models.py [--quick] [--models hunyuan wan] [--scale 1 2]

Models (random weights built on the GPU in bf16, no download; batch 1):
- HunyuanVideo: ``HunyuanVideoTransformer3DModel``, 24 heads x 128 (hidden 3072), 1 dual-
  stream + 1 single-stream block timed; full depth 20 dual + 40 single. 117 x 768 x 1280:
  30 latent frames x 3,840 tokens + 256 text tokens (40 of them valid: a short prompt
  padded to the pipeline's 256, the key mask the stock forward passes every block) =
  115,456 tokens; radial decay 0.95.
- Wan2.1-14B: ``WanTransformer3DModel``, 40 heads x 128 (hidden 5120, ffn 13,824), 2
  blocks timed; full depth 40. 81 x 720 x 1280: 21 x 3,600 = 75,600 tokens (512 text
  tokens in cross-attention); radial decay 0.2.
``--scale 2`` doubles the latent frames (HunyuanVideo 237 frames = 60 x 3,840 + 256 =
230,656 tokens; Wan 165 frames = 42 x 3,600 = 151,200 tokens).

``--variants stock/nomask``: the stock processor with the key mask dropped (HunyuanVideo:
SDPA's unmasked kernels, ignoring the text padding; a lower bound for dense attention).

Per block, from CUDA events recorded by forward hooks around each block and each block's
attention module inside one timed forward (median of the timed forwards): the block time,
the attention module's time (projections, norms, RoPE and the attention itself) and the
rest of the forward (embeddings, output). Full-depth time = rest + depth x block time per
block kind; speedup = stock full-depth time / radial full-depth time. Radial rows: no
dense layers or steps (the steady-state step; dense warm-up steps run at stock speed).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import device_name, write_table  # noqa: E402

HUNYUAN = dict(in_channels=16, out_channels=16, num_attention_heads=24, attention_head_dim=128,
               num_layers=1, num_single_layers=1, num_refiner_layers=1, mlp_ratio=4.0,
               patch_size=2, patch_size_t=1, text_embed_dim=4096, pooled_projection_dim=768,
               rope_axes_dim=(16, 56, 56), guidance_embeds=True)
WAN14B = dict(patch_size=(1, 2, 2), num_attention_heads=40, attention_head_dim=128,
              in_channels=16, out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=13824,
              num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads")
#: model -> (frames, height, width, decay, {block kind: full depth})
SETUPS = {
    "hunyuan": (117, 768, 1280, 0.95, {"dual": 20, "single": 40}),
    "wan": (81, 720, 1280, 0.2, {"block": 40}),
}
TEXT_VALID = 40


def build(name: str):
    if name == "hunyuan":
        from diffusers import HunyuanVideoTransformer3DModel as cls

        cfg = HUNYUAN
    else:
        from diffusers import WanTransformer3DModel as cls

        cfg = WAN14B
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = cls(**cfg)
    return model.to(torch.bfloat16).eval()


def frames_at(frames: int, scale: int) -> int:
    """Pixel frames giving ``scale`` x the latent frames of ``frames``."""
    return ((frames - 1) // 4 + 1) * scale * 4 - 3


def inputs_for(name: str, frames: int, height: int, width: int) -> dict:
    g = torch.Generator(device="cuda").manual_seed(1)
    lat = (1, 16, (frames - 1) // 4 + 1, height // 8, width // 8)
    x = torch.randn(lat, generator=g, device="cuda", dtype=torch.bfloat16)
    t = torch.full((1,), 500.0, device="cuda")
    if name == "hunyuan":
        mask = (torch.arange(256, device="cuda") < TEXT_VALID).long()[None]
        return dict(hidden_states=x, timestep=t, encoder_attention_mask=mask,
                    encoder_hidden_states=torch.randn(1, 256, 4096, device="cuda",
                                                      dtype=torch.bfloat16, generator=g),
                    pooled_projections=torch.randn(1, 768, device="cuda", dtype=torch.bfloat16,
                                                   generator=g),
                    guidance=torch.full((1,), 6000.0, device="cuda", dtype=torch.bfloat16))
    return dict(hidden_states=x, timestep=t,
                encoder_hidden_states=torch.randn(1, 512, 4096, device="cuda",
                                                  dtype=torch.bfloat16, generator=g))


def blocks_of(name: str, model) -> list[tuple[str, torch.nn.Module, torch.nn.Module]]:
    """``(kind, block, attention module)`` in forward order."""
    if name == "hunyuan":
        return ([("dual", b, b.attn) for b in model.transformer_blocks]
                + [("single", b, b.attn) for b in model.single_transformer_blocks])
    return [("block", b, b.attn1) for b in model.blocks]


class Events:
    """CUDA events around modules (forward pre / post hooks), read after a forward."""

    def __init__(self, modules: dict[str, torch.nn.Module]):
        self.pairs: dict[str, list] = {}
        self.handles = []
        for key, module in modules.items():
            self.handles.append(module.register_forward_pre_hook(self._mark(key, 0)))
            self.handles.append(module.register_forward_hook(self._mark(key, 1)))

    def _mark(self, key: str, end: int):
        def hook(*_):
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.pairs.setdefault(key, [None, None])[end] = event
        return hook

    def read(self) -> dict[str, float]:
        return {k: a.elapsed_time(b) for k, (a, b) in self.pairs.items()}

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def measure(name: str, model, inputs: dict, warmup: int, reps: int) -> dict:
    """Median ms of the whole forward, of each block kind and of its attention module."""
    blocks = blocks_of(name, model)
    keys = {"forward": model}
    for i, (kind, block, attn) in enumerate(blocks):
        keys[f"{kind}.{i}"], keys[f"{kind}.{i}.attn"] = block, attn
    events = Events(keys)
    samples: dict[str, list[float]] = {}
    try:
        with torch.no_grad():
            for rep in range(warmup + reps):
                model(**inputs, return_dict=False)
                torch.cuda.synchronize()
                if rep >= warmup:
                    for key, ms in events.read().items():
                        samples.setdefault(key, []).append(ms)
    finally:
        events.remove()
    med = {k: statistics.median(v) for k, v in samples.items()}
    out = {"forward": med["forward"]}
    for kind in dict.fromkeys(k for k, _, _ in blocks):
        idx = [i for i, (k, _, _) in enumerate(blocks) if k == kind]
        out[kind] = statistics.mean(med[f"{kind}.{i}"] for i in idx)
        out[f"{kind}.attn"] = statistics.mean(med[f"{kind}.{i}.attn"] for i in idx)
    out["rest"] = med["forward"] - sum(med[f"{k}.{i}"] for i, (k, _, _) in enumerate(blocks))
    return out


class _NoKeyMask:
    """The stock processor called without the block's key mask (SDPA's unmasked kernels)."""

    def __init__(self, stock):
        self.stock = stock

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 rotary_emb=None):
        return self.stock(attn, hidden_states, encoder_hidden_states, None, rotary_emb)


def drop_key_mask(name: str, model) -> list:
    """Give every timed attention module ``_NoKeyMask``; returns the processors replaced."""
    saved = []
    for _, _, attn in blocks_of(name, model):
        saved.append(attn.processor)
        attn.set_processor(_NoKeyMask(attn.processor))
    return saved


def describe_mask(name: str, mask, layout, variant: str) -> dict:
    """Density of the layer mask as run (HunyuanVideo: with the text padding) and the
    backend ``auto`` picks for it."""
    from flexsparse.attention import explain
    from flexsparse.models.hunyuan_video import key_mask

    n = layout.length
    if name == "hunyuan":
        mask = mask & key_mask(torch.arange(n) < layout.video_tokens + TEXT_VALID)
    out = {"density": mask.density(device="cuda")}
    if variant.endswith("auto"):
        q = torch.empty(1, 1, n, 128, device="cuda", dtype=torch.bfloat16)
        try:
            out["auto picks"] = explain(q, q, q, mask).backend
        except Exception as exc:  # noqa: BLE001 - reported in the table, not fatal
            out["auto picks"] = f"explain failed: {type(exc).__name__}"
    return out


def run(name: str, scale: int, variants: list[str], warmup: int, reps: int) -> list[dict]:
    from flexsparse.models import hunyuan_video, wan

    module = hunyuan_video if name == "hunyuan" else wan
    frames, height, width, decay, depth = SETUPS[name]
    frames = frames_at(frames, scale)
    model = build(name)
    inputs = inputs_for(name, frames, height, width)
    layout = module.layout_for(model, frames, height, width)
    rows, stock, unmasked = [], None, None
    for variant in variants:
        t0 = time.perf_counter()
        handle, saved = None, None
        if variant == "stock/nomask":
            saved = drop_key_mask(name, model)
        elif variant != "stock":
            handle = module.patch(model, num_frames=frames, height=height, width=width,
                                  decay_factor=decay, backend=variant.split("/")[1])
        try:
            m = measure(name, model, inputs, warmup, reps)
        except torch.OutOfMemoryError as exc:
            rows.append(dict(model=name, variant=variant, note=f"out of memory: {exc}"[:80]))
            torch.cuda.empty_cache()
            continue
        finally:
            if handle is not None:
                module.unpatch(model)
            for (_, _, attn), proc in zip(blocks_of(name, model), saved or ()):
                attn.set_processor(proc)
        full = m["rest"] + sum(n * m[k] for k, n in depth.items())
        attn = sum(n * m[f"{k}.attn"] for k, n in depth.items())
        row = dict(model=name, frames=frames, tokens=f"{layout.length:,}", variant=variant,
                   **{f"{k} ms": m[k] for k in depth}, **{f"{k} attn ms": m[f"{k}.attn"]
                                                         for k in depth},
                   full_s=full / 1e3, attn_share=attn / full,
                   seconds=time.perf_counter() - t0)
        if handle is not None:
            row.update(describe_mask(name, handle.mask_for_layer(0), layout, variant))
        if unmasked is not None:
            row["x vs nomask"] = unmasked["full_s"] / row["full_s"]
        if variant == "stock/nomask":
            unmasked = row
        if variant == "stock":
            stock = row
        elif stock is not None:
            row["speedup"] = stock["full_s"] / row["full_s"]
            for k in depth:
                row[f"{k} x"] = stock[f"{k} ms"] / row[f"{k} ms"]
        rows.append(row)
        print(row, flush=True)
    del model
    torch.cuda.empty_cache()
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["hunyuan", "wan"], choices=list(SETUPS))
    p.add_argument("--scale", nargs="+", type=int, default=[1, 2])
    p.add_argument("--variants", nargs="+", default=["stock", "radial/auto", "radial/flex"])
    p.add_argument("--quick", action="store_true", help="1 warm-up, 2 timed forwards")
    p.add_argument("--out", default=None, help="append the tables to this markdown file")
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/video_models.py needs a CUDA device")
    warmup, reps = (1, 2) if args.quick else (1, 3)
    for name in args.models:
        depth = SETUPS[name][4]
        rows = []
        for scale in args.scale:
            try:
                rows += run(name, scale, args.variants, warmup, reps)
            except Exception:  # noqa: BLE001 - keep the other tables
                import traceback

                traceback.print_exc()
                rows.append(dict(frames=scale, note="failed: see the log"))
        cols = (["frames", "tokens", "variant", "density", "auto picks"]
                + [f"{k} ms" for k in depth] + [f"{k} x" for k in depth]
                + [f"{k} attn ms" for k in depth]
                + ["attn_share", "full_s", "speedup", "x vs nomask", "note"])
        depth_text = " + ".join(f"{n} {k}" for k, n in depth.items())
        write_table(args.out, rows, cols, f"{name}: radial vs stock forward, bf16",
                    notes=[
                        f"device {device_name()}; {depth_text} blocks at full depth, "
                        "extrapolated from the timed blocks (see the script's docstring)",
                        "<kind> ms: median block time; <kind> x: stock / radial per block; "
                        "attn ms: the block's attention module (projections, norms, RoPE, "
                        "attention); attn_share: attention modules' share of the full-depth "
                        "forward; full_s: extrapolated seconds per transformer forward; "
                        "speedup: stock full_s / radial full_s; x vs nomask: the same against "
                        "stock/nomask (when run).",
                    ])


if __name__ == "__main__":
    main()
