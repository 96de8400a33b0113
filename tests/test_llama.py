"""flexsparse.models.llama: patched transformers models against unpatched references.

Tiny random models (2 layers, hidden 64, 4 q heads, 2 kv heads: GQA) saved with
``save_pretrained`` and loaded back. Tolerances: fp32 logits 2e-5 absolute (same math,
different summation order); bf16/fp16 5e-2 against the unpatched model in the same dtype.
"""

from __future__ import annotations

import pytest
import torch

import flexsparse as fs
from flexsparse import masks
from flexsparse.ensemble import _cache_kwarg
from flexsparse.models import llama, tiny

transformers = pytest.importorskip("transformers")

ATOL = 2e-5


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny.save_tiny(tmp_path_factory.mktemp("tiny") / "llama", "llama")


def load(model_dir, impl="sdpa", dtype=torch.float32):
    model, tok = tiny.load(model_dir, attn_implementation=impl, dtype=dtype)
    return model, tok


def seg_dense(layout: fs.SegmentLayout, n: int) -> torch.Tensor:
    """Segment isolation written out: causal, and a token sees the prefix, its own
    segment, or everything when it is in the suffix / generated part."""
    ids = layout.segment_ids(n)
    q, kv = ids[:, None], ids[None, :]
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    return causal & ((kv == 0) | (q == kv) | (q == layout.suffix_id))


def seg_mask(layout: fs.SegmentLayout) -> fs.Mask:
    """A flexsparse Mask of ``seg_dense`` without a fixed length (generated tokens join
    the suffix), built from a lookup as the library's masks are."""
    ids = layout.segment_ids(layout.length + 1)
    last, suffix = layout.length, layout.suffix_id

    def mask_mod(b, h, q_idx, kv_idx):
        sq = ids[torch.clamp(q_idx, 0, last)]
        sk = ids[torch.clamp(kv_idx, 0, last)]
        return (kv_idx <= q_idx) & ((sk == 0) | (sq == sk) | (sq == suffix))

    return fs.Mask(mask_mod, name="segments")


def additive(dense: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """Explicit 4-D mask for an eager reference: 0 kept, finfo.min dropped (a boolean
    mask would be *added* as 0/1 by eager attention)."""
    out = torch.zeros(dense.shape, dtype=dtype)
    out = out.masked_fill(~dense, torch.finfo(dtype).min)
    while out.dim() < 4:
        out = out.unsqueeze(0)
    return out


def ids_of(n, seed=1, vocab=400, batch=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(4, vocab, (batch, n), generator=g)


LAYOUT = fs.SegmentLayout(prefix=5, segments=[7, 4, 6], suffix=3)


def test_causal_every_layer_matches_unpatched(model_dir):
    model, _ = load(model_dir)
    x = ids_of(24)
    with torch.no_grad():
        ref = model(x).logits
        handle = llama.patch(model, masks.causal())
        assert model._flexsparse_patch is handle and handle.layers == [0, 1]
        out = model(x).logits
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=0)


def test_causal_generate_identical_tokens_batched_left_padding(model_dir):
    model, tok = load(model_dir)
    batch = tok(["Paris is the capital of", "How many legs"], return_tensors="pt",
                padding=True)
    assert (batch["attention_mask"][1] == 0).any()  # really left padded
    kw = dict(max_new_tokens=8, do_sample=False, use_cache=True, pad_token_id=0)
    ref = model.generate(**batch, **kw)
    llama.patch(model, masks.causal(), backend="flex")  # flex prefill, SDPA-row decode
    out = model.generate(**batch, **kw)
    assert torch.equal(out, ref)


def test_segment_mask_matches_eager_explicit_mask(model_dir):
    n = LAYOUT.length
    x = ids_of(n, seed=2)
    pos = LAYOUT.position_ids("aligned")[None]
    ref_model, _ = load(model_dir, impl="eager")
    with torch.no_grad():
        ref = ref_model(x, attention_mask=additive(seg_dense(LAYOUT, n)), position_ids=pos).logits
        model, _ = load(model_dir)
        llama.patch(model, seg_mask(LAYOUT))
        out = model(x, position_ids=pos).logits
        # a patch on an eager model goes through "flexsparse_eager"
        llama.patch(ref_model, seg_mask(LAYOUT), backend="flex")
        out_eager = ref_model(x, position_ids=pos).logits
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=0)
    torch.testing.assert_close(out_eager, ref, atol=ATOL, rtol=0)
    # isolation is real: the result differs from plain causal attention
    with torch.no_grad(), llama.masked(model, masks.causal()):
        causal_out = model(x, position_ids=pos).logits
    assert (causal_out - out).abs().max() > 1e-3


def test_cached_decoding_equals_recomputing(model_dir):
    model, _ = load(model_dir)
    llama.patch(model, seg_mask(LAYOUT))
    x = ids_of(LAYOUT.length, seed=3)
    steps = 5
    with torch.no_grad():
        cache = transformers.DynamicCache()
        out = model(x, use_cache=True, **{_cache_kwarg(model): cache})
        seq = x
        for _ in range(steps):
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            full = model(torch.cat([seq, nxt], 1)).logits[:, -1]  # no cache: recompute
            out = model(nxt, use_cache=True, **{_cache_kwarg(model): cache})
            torch.testing.assert_close(out.logits[:, -1], full, atol=ATOL, rtol=0)
            seq = torch.cat([seq, nxt], 1)


def test_layers_subset_leaves_other_layers_bit_identical(model_dir):
    model, _ = load(model_dir)
    x = ids_of(20, seed=4)
    with torch.no_grad():
        ref = model(x, output_hidden_states=True).hidden_states
        llama.patch(model, masks.causal() & masks.sliding_window(4), layers=[1])
        out = model(x, output_hidden_states=True).hidden_states
    assert torch.equal(out[1], ref[1])  # after layer 0: untouched
    assert (out[2] - ref[2]).abs().max() > 1e-4  # layer 1 really uses the window


def test_left_padding_uses_unpadded_positions(model_dir):
    """A layout-bound mask means the same tokens in a padded row as in the row alone."""
    model, _ = load(model_dir)
    n, pad = LAYOUT.length, 4
    x = ids_of(n, seed=5)
    pos = LAYOUT.position_ids("aligned")[None]
    llama.patch(model, seg_mask(LAYOUT))
    with torch.no_grad():
        alone = model(x, position_ids=pos).logits
        xp = torch.cat([torch.zeros(1, pad, dtype=torch.long), x], 1)
        am = torch.cat([torch.zeros(1, pad), torch.ones(1, n)], 1).long()
        pp = torch.cat([torch.ones(1, pad, dtype=torch.long), pos], 1)
        other = ids_of(n + pad, seed=6)
        batch = torch.cat([xp, other], 0)
        am2 = torch.cat([am, torch.ones_like(am)], 0)
        pos2 = torch.cat([pp, torch.arange(n + pad)[None]], 0)
        padded = model(batch, attention_mask=am2, position_ids=pos2).logits
    torch.testing.assert_close(padded[0, pad:], alone[0], atol=ATOL, rtol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_gqa(model_dir, dtype):
    model, _ = load(model_dir, dtype=dtype)
    x = ids_of(40, seed=7)
    with torch.no_grad():
        ref = model(x).logits.float()
        llama.patch(model, masks.causal(), backend="flex")
        out = model(x).logits.float()
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    torch.testing.assert_close(out, ref, atol=5e-2, rtol=5e-2)


@pytest.mark.parametrize("arch", ["mistral", "qwen2", "qwen3"])
def test_other_architectures(tmp_path, arch):
    path = tiny.save_tiny(tmp_path / arch, arch)
    model, _ = tiny.load(path)
    x = ids_of(16, seed=8)
    with torch.no_grad():
        ref = model(x).logits
        llama.patch(model, masks.causal(), backend="flex")
        out = model(x).logits
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=0)


def test_unpatch_and_masked_restore(model_dir):
    model, _ = load(model_dir)
    x = ids_of(12, seed=9)
    with torch.no_grad():
        ref = model(x).logits
        with llama.masked(model, masks.causal() & masks.sliding_window(2)) as handle:
            assert llama.is_patched(model) and handle.kind == "llama"
            windowed = model(x).logits
        assert not llama.is_patched(model)
        assert model.config._attn_implementation == "sdpa"
        assert torch.equal(model(x).logits, ref)
        llama.patch(model, masks.causal())
        with llama.masked(model, masks.causal() & masks.sliding_window(2)):
            again = model(x).logits
        torch.testing.assert_close(again, windowed, atol=ATOL, rtol=0)
        torch.testing.assert_close(model(x).logits, ref, atol=ATOL, rtol=0)
        llama.unpatch(model)
    assert not hasattr(model.model.layers[0].self_attn, "_flexsparse_handle")
    with pytest.raises(ValueError, match="not patched"):
        llama.unpatch(model)


def test_per_layer_callable_and_observer(model_dir):
    model, _ = load(model_dir)
    x = ids_of(12, seed=10)
    seen = []
    with torch.no_grad():
        ref = model(x).logits
        handle = llama.patch(model, lambda i: masks.causal() if i == 0 else None)
        with handle.observing(lambda i, q, k, v: seen.append((i, q.shape, k.shape))):
            out = model(x).logits
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=0)
    assert seen == [(0, (1, 4, 12, 16), (1, 2, 12, 16))]  # only the masked layer, GQA heads


def test_errors(model_dir, tmp_path):
    model, _ = load(model_dir)
    with pytest.raises(ValueError, match=r"layer index 5 out of range.*0\.\.1"):
        llama.patch(model, masks.causal(), layers=[5])
    with pytest.raises(TypeError, match="mask must be"):
        llama.patch(model, "causal")
    with pytest.raises(ValueError, match="backend"):
        llama.patch(model, masks.causal(), backend="nope")
    llama.patch(model, masks.document([3, 3]))
    with pytest.raises(ValueError, match="built for sequences of 6 tokens.*got 9"):
        model(ids_of(9))
    llama.unpatch(model)
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2))
    with pytest.raises(ValueError, match="supported architectures: llama, mistral, qwen2"):
        llama.patch(gpt2, masks.causal())
