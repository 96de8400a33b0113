"""LLaMA-3.2-1B shapes (random weights, bf16): prefill and per-token decode latency of the
unpatched SDPA model vs the model patched with ``masks.causal()`` (backend auto and flex).

    python benchmarks/llama.py [--quick]

Goals (issue 5): prefill <= 1.1x SDPA, decode step <= 1.2x SDPA. Without CUDA the script
runs tiny shapes on the CPU (a smoke test of the code path, not a measurement).
Writes ``$OUT/llama.json`` when OUT is set.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import cuda_ms, header, save, table, wall_ms  # noqa: E402

from flexsparse import masks
from flexsparse.models import llama


def build(cuda: bool):
    from transformers import LlamaConfig, LlamaForCausalLM

    if cuda:
        cfg = LlamaConfig(
            vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
            num_attention_heads=32, num_key_value_heads=8, head_dim=64,
            max_position_embeddings=131072, rope_theta=500000.0, tie_word_embeddings=True,
        )
    else:
        cfg = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128,
                          num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    cfg._attn_implementation = "sdpa"
    device = "cuda" if cuda else "cpu"
    dtype = torch.bfloat16 if cuda else torch.float32
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(dtype).eval()
    return model


def timer(cuda: bool):
    """``measure(fn, reps)``: median ms of ``reps`` calls (callers warm up themselves)."""
    if cuda:
        return lambda fn, reps: cuda_ms(fn, warmup=0, reps=reps)
    return lambda fn, reps: wall_ms(fn, reps=reps)


def cache_kw(model):
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else \
        "past_key_values"


def new_cache(model):
    from transformers import DynamicCache

    try:
        return DynamicCache(config=model.config)
    except TypeError:
        return DynamicCache()


@torch.no_grad()
def prefill_ms(model, n, measure, reps):
    x = torch.randint(0, model.config.vocab_size, (1, n), device=model.device)
    for _ in range(2):  # warm-up (compiles flex for this shape)
        model.model(x)
    return measure(lambda: model.model(x), reps)


@torch.no_grad()
def decode_ms(model, context, steps, measure):
    """Median per-token latency of ``steps`` cached greedy steps after a ``context`` prefill."""
    kw = cache_kw(model)
    x = torch.randint(0, model.config.vocab_size, (1, context), device=model.device)

    def run(n_steps, times=None):
        cache = new_cache(model)
        logits = model(x, use_cache=True, logits_to_keep=1, **{kw: cache}).logits
        tok = logits[:, -1:].argmax(-1)
        for _ in range(n_steps):
            def step():
                nonlocal tok
                tok = model(tok, use_cache=True, logits_to_keep=1, **{kw: cache}).logits.argmax(-1)
            if times is None:
                step()
            else:
                times.append(measure(step, 1))

    run(8)  # warm-up
    times = []
    run(steps, times)
    return statistics.median(times)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="fewer repetitions and steps")
    args = ap.parse_args()
    cuda = torch.cuda.is_available()
    model = build(cuda)
    measure = timer(cuda)
    reps = 3 if args.quick else 10
    steps = 50 if args.quick else 200
    lengths = (2048, 8192) if cuda else (64, 128)
    variants = [("sdpa (unpatched)", None), ("causal, auto", "auto"), ("causal, flex", "flex")]
    rows = []
    for name, backend in variants:
        if backend is not None:
            llama.patch(model, masks.causal(), backend=backend)
        for n in lengths:
            rows.append({"phase": "prefill", "tokens": n, "variant": name,
                         "ms": prefill_ms(model, n, measure, reps)})
        for n in lengths[:1] + lengths[-1:]:
            rows.append({"phase": "decode step", "tokens": n, "variant": name,
                         "ms": decode_ms(model, n, steps, measure)})
        if backend is not None:
            llama.unpatch(model)
        print(f"done: {name}", file=sys.stderr)
    base = {(r["phase"], r["tokens"]): r["ms"] for r in rows if r["variant"].startswith("sdpa")}
    for r in rows:
        r["vs_sdpa"] = r["ms"] / base[(r["phase"], r["tokens"])]
    for r in rows:
        r["vs SDPA"] = f"{r.pop('vs_sdpa'):.2f}x"
    text = header("LLaMA-3.2-1B shapes, bf16, random weights, batch 1; goals prefill <= 1.1x, "
                  "decode <= 1.2x") + "\n" + table(rows, ["phase", "tokens", "variant", "ms",
                                                          "vs SDPA"])
    print(text)
    save("llama", rows, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
