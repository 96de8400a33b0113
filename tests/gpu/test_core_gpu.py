"""Core on CUDA: compiled FlexAttention with fast BlockMasks vs the float64 reference."""

import pytest
import torch

import flexsparse as fs
from flexsparse import masks

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def gpu_masks(layout):
    n = layout.length
    return [
        masks.causal() & masks.sliding_window(300),
        masks.document([n // 3, n - n // 3]),
        masks.frame_window(layout, 1),
        ~masks.frame_window(layout, 2, text="none"),
    ]


@pytest.mark.parametrize("n_frames", [3, 5])
def test_compiled_flex_matches_reference(n_frames):
    layout = fs.VideoLayout(frames=n_frames, tokens_per_frame=300, text_tokens=37)
    n = layout.length
    q, k, v = (torch.randn(2, 4, n, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    k, v = k[:, :2], v[:, :2]  # GQA
    for mask in gpu_masks(layout):
        out = fs.attention(q, k, v, mask, backend="flex")
        ref = fs.reference(q, k, v, mask)
        err = (out.double().cpu() - ref).norm() / ref.norm()
        assert err < 1e-2, (mask.name, err)
        assert not out.isnan().any()


def test_block_masks_equal_on_cpu_and_cuda():
    layout = fs.VideoLayout(frames=7, tokens_per_frame=555, text_tokens=226)
    n = layout.length
    for mask in gpu_masks(layout):
        a = mask.tile_states(n, n, 128, device="cuda").cpu()
        b = mask.tile_states(n, n, 128, device="cpu")
        assert torch.equal(a, b), mask.name


def test_decode_rows_on_cuda():
    n = 1000
    q, k, v = (torch.randn(1, 2, n, 64, device="cuda", dtype=torch.float16) for _ in range(3))
    mask = masks.causal() & masks.sliding_window(128)
    for backend in ("flex", "sdpa", "auto"):
        out = fs.attention(q[:, :, -4:], k, v, mask, backend=backend)
        ref = fs.reference(q, k, v, mask)[:, :, -4:]
        assert (out.double().cpu() - ref).abs().max() < 5e-3, backend
