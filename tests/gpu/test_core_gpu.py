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


def test_block_masks_built_on_cuda_equal_cpu_and_torch():
    from torch.nn.attention.flex_attention import BlockMask, noop_mask

    layout = fs.VideoLayout(frames=6, tokens_per_frame=300, text_tokens=37)
    n = layout.length
    for mask, binary in [(masks.radial(layout, 1.0, "cogvideox"), True),
                         (masks.frame_window(layout, 1), False)]:
        gpu = mask.block_mask(n, device="cuda", noop=True)
        cpu = mask.block_mask(n, noop=True)
        assert (gpu.mask_mod is noop_mask) == binary
        ref = BlockMask.from_kv_blocks(gpu.kv_num_blocks, gpu.kv_indices,
                                       gpu.full_kv_num_blocks, gpu.full_kv_indices)
        for name in ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices",
                     "q_num_blocks", "q_indices", "full_q_num_blocks", "full_q_indices"):
            got = getattr(gpu, name)
            assert torch.equal(got.cpu(), getattr(cpu, name)), name
            if binary and name in ("kv_indices", "q_indices", "q_num_blocks"):
                continue  # never read past zero counts
            assert torch.equal(got, getattr(ref, name)), name


def test_noop_block_mask_forward_and_backward_match_reference():
    """A block-granular map runs with noop_mask; compiled forward and backward (which reads
    the query-side indices) equal dense attention with the materialised mask."""
    layout = fs.VideoLayout(frames=5, tokens_per_frame=256, text_tokens=77, text_position="end")
    n = layout.length
    mask = masks.radial(layout, 0.5, "hunyuan")
    assert mask.block_mask(n, device="cuda", noop=True).mask_mod.__name__ == "noop_mask"
    q, k, v = (torch.randn(1, 2, n, 64, device="cuda", requires_grad=True) for _ in range(3))
    out = fs.attention(q, k, v, mask, backend="flex")
    grads = torch.autograd.grad(out.square().sum(), (q, k, v))
    dense = mask.to_dense(n, device="cuda")
    qr, kr, vr = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = torch.nn.functional.scaled_dot_product_attention(qr, kr, vr, attn_mask=dense)
    ref_grads = torch.autograd.grad(ref.square().sum(), (qr, kr, vr))
    assert (out.double() - ref).abs().max() < 1e-3
    for g, r in zip(grads, ref_grads):
        assert (g.double() - r).norm() / r.norm() < 1e-3


def test_eager_flex_on_cuda_keeps_the_rule_of_a_block_granular_map():
    """Eager FlexAttention ignores the tile lists: a ``noop_mask`` BlockMask would run dense.
    ``compile=False`` on CUDA must still give the masked answer."""
    layout = fs.VideoLayout(frames=5, tokens_per_frame=256, text_tokens=77, text_position="end")
    n = layout.length
    mask = masks.radial(layout, 0.5, "hunyuan")
    assert mask.block_mask(n, device="cuda").mask_mod.__name__ != "noop_mask"
    q, k, v = (torch.randn(1, 2, n, 64, device="cuda") for _ in range(3))
    ref = fs.reference(q, k, v, mask)
    for compile in (False, True):
        out = fs.attention(q, k, v, mask, backend="flex", compile=compile)
        assert (out.double().cpu() - ref).abs().max() < 1e-3, compile


def test_flex_gradients_use_the_query_side_lists():
    """A call that needs gradients gets a BlockMask with the query-side lists (an inference
    call's has none), and compiled FlexAttention's backward on it matches SDPA's gradients
    on the dense mask."""
    layout = fs.VideoLayout(frames=3, tokens_per_frame=300, text_tokens=37)
    n = layout.length
    q, k, v = (torch.randn(1, 2, n, 64, device="cuda", dtype=torch.float32) for _ in range(3))
    grad_out = torch.randn_like(q)
    # (not the inverted window: SDPA gives NaN on its fully masked rows)
    for mask in gpu_masks(layout)[:3]:
        with torch.no_grad():
            fs.attention(q, k, v, mask, backend="flex")
        assert mask.block_mask(n, n, device="cuda", block_size=128, noop=True,
                               backward=False).q_num_blocks is None
        leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
        (fs.attention(*leaves, mask, backend="flex") * grad_out).sum().backward()
        got = [t.grad for t in leaves]
        assert mask.block_mask(n, n, device="cuda", block_size=128, noop=True,
                               backward=True).q_num_blocks is not None
        ref_leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
        dense = mask.to_dense(n, n, device="cuda")
        ref = torch.nn.functional.scaled_dot_product_attention(*ref_leaves, attn_mask=dense)
        (ref * grad_out).sum().backward()
        for name, a, b in zip("qkv", got, (t.grad for t in ref_leaves)):
            err = (a - b).norm() / b.norm()
            assert err < 1e-2, (mask.name, name, err.item())
