"""LLaMA-3.2-1B shapes (random weights, bf16): decode latency per token in ``generate()``,
stock model vs the patched model with the same cache.

    python benchmarks/llama.py [--quick] [--compiled] [--loop]

Per token = (time of ``generate`` with N2 new tokens - time with N1) / (N2 - N1): the
prefill and generate's set-up cancel out. Variants: stock SDPA model; patched with
``masks.causal()`` (decode runs the model's own SDPA call); patched with
``causal & sliding_window(1024)`` (decode materialises the mask rows). Caches:

- ``dynamic``: ``DynamicCache``, uncompiled.
- ``static``: a ``StaticCache`` of ``context + N2`` slots, uncompiled (``disable_compile``).
- ``--compiled``: the same static cache with generate's own compilation of the decode step
  (``torch.compile``, mode ``reduce-overhead``: CUDA graphs). One compile per variant: every
  context shares one cache length (the longest context + N2), so decode attends over that
  many slots whatever the context, as a static cache does.
- ``--loop``: the earlier benchmark's loop (``model(token, cache)`` per step, each step timed
  with CUDA events), to compare with the figures it reported.

``ms/token``: median of 3 repetitions; ``first call``: the first pair of generate calls of
a cell, which meets every key length for the first time (and compiles): the warm-up,
excluded from the median, shown to tell one-time costs from per-token costs.

Without CUDA the script runs tiny shapes on the CPU (a smoke test, not a measurement).
Writes ``$OUT/llama.json`` / ``llama.md`` when OUT is set.
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

VARIANTS = {
    "stock": None,
    "causal": masks.causal(),
    "window 1024": masks.causal() & masks.sliding_window(1024),
}


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
    model.generation_config.eos_token_id = None  # random weights: never stop early
    model.generation_config.pad_token_id = 0
    return model


def cache_kw(model) -> str:
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else \
        "past_key_values"


def static_cache(model, length: int):
    from transformers import StaticCache

    return StaticCache(config=model.config, max_cache_len=length)


@torch.no_grad()
def generate_ms(model, x, new: int, cache: str, cache_len: int, compiled: bool) -> float:
    kw = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False)
    if cache == "static":
        kw[cache_kw(model)] = static_cache(model, cache_len)
        kw["disable_compile"] = not compiled
    return wall_ms(lambda: model.generate(x, **kw))


def per_token_ms(model, context: int, cache: str, cache_len: int, compiled: bool,
                 n1: int, n2: int, reps: int) -> tuple[float, float]:
    """``(median over reps, first pair)`` ms per token. The first pair (generate with n1 then
    n2 new tokens) doubles as the warm-up: it meets every key length (and compiles) for the
    first time; the measured repetitions meet none for the first time."""
    x = torch.randint(4, model.config.vocab_size, (1, context), device=model.device)

    def pair() -> float:
        t1 = generate_ms(model, x, n1, cache, cache_len, compiled)
        t2 = generate_ms(model, x, n2, cache, cache_len, compiled)
        return (t2 - t1) / (n2 - n1)

    first = pair()
    return statistics.median(pair() for _ in range(reps)), first


@torch.no_grad()
def loop_step_ms(model, context: int, steps: int) -> float:
    """The earlier benchmark's measurement: median over ``steps`` cached greedy steps, each
    ``model(token, cache)`` timed alone with CUDA events (after 8 warm-up steps)."""
    from transformers import DynamicCache

    x = torch.randint(0, model.config.vocab_size, (1, context), device=model.device)
    name = cache_kw(model)
    times = []
    for n_steps, record in ((8, False), (steps, True)):
        cache = DynamicCache(config=model.config)
        tok = model(x, use_cache=True, logits_to_keep=1, **{name: cache}).logits[:, -1:].argmax(-1)
        for _ in range(n_steps):
            def step(cache=cache):
                nonlocal tok
                tok = model(tok, use_cache=True, logits_to_keep=1,
                            **{name: cache}).logits.argmax(-1)
            if record:
                times.append(cuda_ms(step, warmup=0, reps=1) if model.device.type == "cuda"
                             else wall_ms(step))
            else:
                step()
    return statistics.median(times)


def patched(model, mask):
    if llama.is_patched(model):
        llama.unpatch(model)
    if mask is not None:
        llama.patch(model, mask)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="fewer new tokens (4 and 36)")
    ap.add_argument("--compiled", action="store_true", help="also static cache, compiled")
    ap.add_argument("--eager", action=argparse.BooleanOptionalAction, default=True,
                    help="the uncompiled dynamic / static rows (default on)")
    ap.add_argument("--loop", action="store_true", help="also the earlier per-step loop")
    ap.add_argument("--compiled-variants", default=",".join(VARIANTS),
                    help="comma-separated variants measured --compiled (default all)")
    ap.add_argument("--compiled-contexts", default=None,
                    help="comma-separated contexts measured --compiled (default all)")
    args = ap.parse_args()
    cuda = torch.cuda.is_available()
    model = build(cuda)
    contexts = (2048, 8192) if cuda else (64, 128)
    n1, n2 = (4, 36) if args.quick else (16, 112)
    reps = 3
    compiled_variants = args.compiled_variants.split(",")
    compiled_contexts = contexts if args.compiled_contexts is None else tuple(
        int(c) for c in args.compiled_contexts.split(","))
    rows = []

    def add(**row):
        rows.append(row)
        print(row, file=sys.stderr, flush=True)  # partial results survive a time limit

    for name, mask in VARIANTS.items():
        patched(model, mask)
        if args.eager:
            for cache in ("dynamic", "static"):
                for ctx in contexts:
                    ms, first = per_token_ms(model, ctx, cache, ctx + n2, False, n1, n2, reps)
                    add(cache=cache, context=ctx, variant=name, **{"ms/token": ms,
                                                                   "first call": first})
        if args.loop and name != "window 1024":
            add(cache="dynamic, earlier loop", context=contexts[0], variant=name,
                **{"ms/token": loop_step_ms(model, contexts[0], 50)})
        if args.compiled and name in compiled_variants:
            length = max(contexts) + n2
            for ctx in compiled_contexts:
                ms, first = per_token_ms(model, ctx, "static", length, True, n1, n2, reps)
                add(cache=f"static compiled ({length} slots)", context=ctx, variant=name,
                    **{"ms/token": ms, "first call": first})
        print(f"done: {name}", file=sys.stderr, flush=True)
    patched(model, None)
    base = {(r["cache"], r["context"]): r["ms/token"] for r in rows if r["variant"] == "stock"}
    for r in rows:
        ref = base.get((r["cache"], r["context"]))
        r["vs stock"] = "" if ref is None else f"{r['ms/token'] / ref:.2f}x"
    text = header(
        "LLaMA-3.2-1B shapes, bf16, random weights, batch 1: decode ms per token in generate()"
    ) + "\n" + table(rows, ["cache", "context", "variant", "ms/token", "vs stock",
                                   "first call"])
    print(text)
    save("llama", rows, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
