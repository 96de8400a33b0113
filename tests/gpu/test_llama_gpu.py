"""flexsparse.models.llama and the self-ensemble on CUDA (skipped without it)."""

from __future__ import annotations

import pytest
import torch

from flexsparse import masks
from flexsparse.models import llama, tiny

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny.save_tiny(tmp_path_factory.mktemp("gpu") / "m", "llama", chat_template=True,
                          hidden=256, heads=8, kv_heads=2, layers=2)


@pytest.mark.parametrize("backend", ["auto", "flex"])
@pytest.mark.parametrize("dtype,atol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_causal_prefill_and_generate_cuda(model_dir, backend, dtype, atol):
    model, tok = tiny.load(model_dir, dtype=dtype, device="cuda")
    x = torch.randint(4, 400, (2, 300), device="cuda")
    batch = tok(["Paris is the capital of", "How many"], return_tensors="pt", padding=True)
    batch = {k: v.cuda() for k, v in batch.items()}
    kw = dict(max_new_tokens=10, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        ref = model(x).logits.float()
        ref_gen = model.generate(**batch, **kw)
        llama.patch(model, masks.causal(), backend=backend)
        out = model(x).logits.float()
        gen = model.generate(**batch, **kw)
    # bf16 logits through two layers differ by rounding in a few elements; compare norms
    err = ((out - ref).norm() / ref.norm()).item()
    assert err < atol, err
    if dtype == torch.float32:
        assert torch.equal(gen, ref_gen)


def test_ensemble_flex_matches_cpu(model_dir):
    from flexsparse.ensemble import SelfEnsemble

    qs = [["What is the capital of France?", "Name the French capital."],
          ["How many legs does a spider have?", "Spider legs?", "A spider has how many legs?"]]
    outs = []
    for device in ("cpu", "cuda"):
        model, tok = tiny.load(model_dir, device=device)
        ens = SelfEnsemble(model, tok, backend="flex")
        ens.eos_ids = set()
        outs.append([r.token_ids for r in ens.generate_batch(qs, max_new_tokens=6)])
    assert outs[0] == outs[1]


SPARSE = masks.causal() & masks.sliding_window(5)


def _generate(model, batch, cache, **kw):
    out = model.generate(**batch, max_new_tokens=8, min_new_tokens=8, do_sample=False,
                         pad_token_id=0, cache_implementation=cache, output_scores=True,
                         return_dict_in_generate=True, **kw)
    return out.sequences, torch.stack(out.scores)


@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_static_and_dynamic_cache_equal_stock_cuda(model_dir, cache):
    """Issue 15: a static cache gave other tokens than the stock model. fp32, left-padded
    batch; uncompiled (``disable_compile``), every backend, causal mask."""
    model, tok = tiny.load(model_dir, device="cuda")
    batch = tok(["Paris is the capital of", "How many"], return_tensors="pt", padding=True)
    batch = {k: v.cuda() for k, v in batch.items()}
    with torch.no_grad():
        ref_seq, ref_scores = _generate(model, batch, cache, disable_compile=True)
        for backend in ("auto", "flex", "sdpa"):
            llama.patch(model, masks.causal(), backend=backend)
            seq, scores = _generate(model, batch, cache, disable_compile=True)
            llama.unpatch(model)
            assert torch.equal(seq, ref_seq), backend
            torch.testing.assert_close(scores, ref_scores, atol=1e-4, rtol=0)


def test_compiled_generate_static_cache_cuda(model_dir):
    """generate() with a static cache compiles the decode step (inductor, CUDA graphs):
    causal patch = stock tokens; a sparse mask = the uncompiled patched model's tokens."""
    model, tok = tiny.load(model_dir, device="cuda")
    batch = tok(["Paris is the capital of", "How many"], return_tensors="pt", padding=True)
    batch = {k: v.cuda() for k, v in batch.items()}
    with torch.no_grad():
        ref_seq, ref_scores = _generate(model, batch, "static")
        llama.patch(model, masks.causal())
        seq, scores = _generate(model, batch, "static")
        assert torch.equal(seq, ref_seq)
        torch.testing.assert_close(scores, ref_scores, atol=1e-4, rtol=0)
        llama.patch(model, SPARSE)
        want_seq, want_scores = _generate(model, batch, "dynamic")
        seq, scores = _generate(model, batch, "static")
    assert torch.equal(seq, want_seq)
    torch.testing.assert_close(scores, want_scores, atol=1e-4, rtol=0)
    assert not torch.equal(want_seq, ref_seq)  # the window changes the answer


def test_torch_compile_model_cuda(model_dir):
    """``torch.compile(model)`` (inductor) with a sparse mask: prefill and a decode step
    equal the uncompiled patched model."""
    from transformers import DynamicCache

    from flexsparse.ensemble import _cache_kwarg

    model, _ = tiny.load(model_dir, device="cuda")
    llama.patch(model, SPARSE)
    x = torch.randint(4, 400, (2, 40), device="cuda")
    name = _cache_kwarg(model)
    compiled = torch.compile(model)
    with torch.no_grad():
        outs = []
        for fwd in (model, compiled):
            cache = DynamicCache()
            first = fwd(input_ids=x, use_cache=True, **{name: cache}).logits
            nxt = first[:, -1:].argmax(-1)
            second = fwd(input_ids=nxt, use_cache=True, **{name: cache}).logits
            outs.append((first, second))
    torch.testing.assert_close(outs[1][0], outs[0][0], atol=1e-4, rtol=0)
    torch.testing.assert_close(outs[1][1], outs[0][1], atol=1e-4, rtol=0)
