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
