"""GPU: the masks the video adapters compose (radial & text key padding) on every CUDA
backend, against the float64 reference. Padded keys carry huge values so that a partial
tile run as full would show at once."""

import pytest
import torch

import flexsparse as fs
from flexsparse import masks

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


def _rel_l2(out, ref):
    return float((out.double().cpu() - ref).norm() / ref.norm())


@pytest.mark.parametrize("backend", ["auto", "flex", "quant"])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_radial_with_text_padding_never_sees_padded_keys(backend, head_dim):
    from flexsparse.models.hunyuan_video import key_mask

    layout = fs.VideoLayout(frames=9, tokens_per_frame=96, text_tokens=100, text_position="end")
    n = layout.length
    valid = torch.ones(2, n, dtype=torch.bool)
    valid[0, n - 37:] = False  # row 0: 37 padded text tokens, row 1: none
    mask = masks.radial(layout, decay_factor=0.95, model="hunyuan") & key_mask(valid)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, n, head_dim, generator=g) for _ in range(3))
    v[0, :, n - 37:] = 100.0  # any leak of a padded key moves the output by ~100
    ref = fs.reference(q, k, v, mask)
    out = fs.attention(
        *(t.to("cuda", torch.bfloat16) for t in (q, k, v)), mask=mask, backend=backend
    )
    assert out.isfinite().all()
    assert _rel_l2(out, ref) < 3e-2
    assert float((out.double().cpu() - ref).abs().max()) < 0.5


def _to_cuda(x):
    if isinstance(x, torch.Tensor):
        return x.cuda()
    if isinstance(x, tuple):
        return tuple(_to_cuda(t) for t in x)
    return x


@pytest.mark.parametrize("token_granular", [False, True], ids=["whole tiles", "partial tiles"])
def test_fullgraph_compile_of_a_warm_patched_cogvideox_on_cuda(token_granular):
    """On CUDA the eager forward caches each map for our compiled FlexAttention
    (``noop=True``); ``torch.compile(model, fullgraph=True)`` (inductor) then traces the
    processors, which ask for the maps with their rule: a whole-tile map gets its rule put
    back, a map with partial tiles is the cached one. No build in the trace (which fails),
    the eager answer, and the tuned kernel options (not torch's defaults)."""
    pytest.importorskip("diffusers")
    from tests.test_cogvideox import CASE

    model = CASE.build().cuda()
    inputs = {name: _to_cuda(x) for name, x in CASE.inputs(CASE.grid).items()}
    # The radial map keeps whole tiles; and-ed with a token window it has partial ones.
    sparse = {"mask": CASE.radial(model) & masks.sliding_window(40)} if token_granular else {}
    CASE.module.patch(model, backend="flex", block_size=CASE.block_size, **CASE.video,
                      **sparse)
    timestep = torch.full((2,), 500, device="cuda")

    def run(m):
        with torch.no_grad():
            return m(**inputs, timestep=timestep, return_dict=False)[0]

    try:
        eager = run(model)
        torch._dynamo.reset()
        compiled = torch.compile(model, fullgraph=True)
        torch.testing.assert_close(run(compiled), eager, atol=2e-4, rtol=1e-3)
    finally:
        torch._dynamo.reset()
        CASE.module.unpatch(model)
