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
