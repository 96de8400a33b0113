"""The shared video adapter base (``flexsparse.models._video``) and the test helper every
video adapter runs on its own tiny model.

For an adapter's tests (tests/test_cogvideox.py is the example)::

    from tests.test_models_base import CHECKS, AdapterCase, loaded

    CASE = AdapterCase(module=wan, build=_tiny_wan, inputs=_inputs, grid=TokenGrid(5, 4, 4),
                       video=dict(num_frames=17, height=64, width=64), stock=WanAttnProcessor,
                       masked_stock=MaskedStock)

    @pytest.fixture
    def model(tmp_path_factory):
        return loaded(CASE, tmp_path_factory)

    @pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.__name__)
    def test_adapter_contract(CASE, model, check):
        check(CASE, model)

Each check takes ``(case, model)``: ``model`` a fresh, unpatched tiny transformer that was
saved with ``save_pretrained`` and loaded back. ``AdapterCase`` says what is model
specific; the checks assert values (fp32, ``case.atol``) against the stock processors.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import pytest
import torch

import flexsparse as fs
from flexsparse.models import _video
from flexsparse.models._patch import ATTR
from flexsparse.models._video import SparseProcessor, StepCounter, TokenGrid, video_grid


# -- the helper ---------------------------------------------------------------------------------
@dataclass
class AdapterCase:
    """What the adapter checks need to know about one model.

    Attributes:
        module: the adapter module (``ADAPTER``, ``patch``, ``unpatch``, ``recording``).
        build: a tiny random transformer (seeded); ``loaded`` saves it and loads it back.
        inputs: ``grid -> forward kwargs`` without ``timestep`` (batch 2, seeded; RoPE or
            position inputs built for that token grid).
        grid: the token grid of ``video``.
        video: ``patch`` keywords giving ``grid`` (num_frames, height, width).
        stock: a fresh stock processor (``stock()``).
        masked_stock: ``dense bool mask [N, N] -> processor``: the stock processor run with
            that mask as an additive float attention mask.
        block_size: tile size of the sparse patterns (small: the layout is tiny).
        atol: fp32 tolerance against the stock processors.
        pipeline: ``transformer -> pipeline`` around the model for the step trace (None:
            that check is skipped with the reason).
        pipeline_call: keywords of the pipeline call (3 denoising steps).
        pipeline_video: ``patch`` keywords for the pipeline's size (None: ``video``).
        timestep: ``(batch, t) -> timestep`` input of the transformer for an integer step
            value ``t`` in ``[0, 1000)`` (None: ``t`` itself, as an integer tensor).
    """

    module: ModuleType
    build: Callable[[], torch.nn.Module]
    inputs: Callable[[TokenGrid], dict]
    grid: TokenGrid
    video: dict
    stock: Callable[[], Any]
    masked_stock: Callable[[torch.Tensor], Any]
    block_size: int = 16
    atol: float = 1e-5
    pipeline: Callable[[torch.nn.Module], Any] | None = None
    pipeline_call: dict = field(default_factory=dict)
    pipeline_video: dict | None = None
    timestep: Callable[[int, int], torch.Tensor] | None = None

    @property
    def adapter(self) -> _video.Adapter:
        return self.module.ADAPTER

    def run(self, model, inputs: dict, t: int = 500, **extra) -> torch.Tensor:
        """The transformer's output for ``inputs`` at step value ``t`` (no grad)."""
        if self.timestep is None:
            return forward(model, inputs, t)
        batch = next(v for v in inputs.values() if isinstance(v, torch.Tensor)).shape[0]
        timestep = self.timestep(batch, t)
        if timestep.is_floating_point():  # HunyuanDiT embeds the timestep in its own dtype
            timestep = timestep.to(model.dtype)
        with torch.no_grad():
            return model(**inputs, **extra, timestep=timestep, return_dict=False)[0]

    def sparse_mask(self, model, video: dict | None = None) -> fs.Mask:
        """The static mask the checks patch with (video: the radial pattern at
        ``self.video``)."""
        return self.radial(model)

    def sparse_patch(self, model, video: dict | None = None) -> dict:
        """``patch`` keywords giving ``sparse_mask`` at ``video`` (default ``self.video``;
        video models: the default pattern)."""
        return {}

    def layout(self, model) -> fs.VideoLayout:
        return self.module.layout_for(model, **self.video)

    def radial(self, model) -> fs.Mask:
        return _video.build_mask(self.layout(model), "radial", model=self.adapter.radial_model,
                                 block_size=self.block_size)


def loaded(case: AdapterCase, tmp_path_factory) -> torch.nn.Module:
    """``case.build()`` saved with ``save_pretrained`` and loaded back, in eval mode."""
    model = case.build()
    path = tmp_path_factory.mktemp(case.adapter.kind) / "transformer"
    model.save_pretrained(path)
    return type(model).from_pretrained(path).eval()


def forward(model, inputs: dict, t: int = 500) -> torch.Tensor:
    """The transformer's output for ``inputs`` at timestep ``t`` (no grad)."""
    batch = next(v for v in inputs.values() if isinstance(v, torch.Tensor)).shape[0]
    with torch.no_grad():
        return model(**inputs, timestep=torch.full((batch,), t), return_dict=False)[0]


def reference(case: AdapterCase, model, inputs: dict, layer_masks: list, t: int = 500,
              **extra):
    """Output with the stock processors, layer i given ``layer_masks[i]`` (a ``Mask`` or a
    bool tensor) materialised as an additive float mask (None: stock dense); the model must
    be unpatched."""
    modules = case.adapter.attention_modules(model)
    saved = [m.processor for m in modules]
    for module, mask in zip(modules, layer_masks):
        dense = mask.to_dense() if isinstance(mask, fs.Mask) else mask
        module.set_processor(case.stock() if dense is None else case.masked_stock(dense))
    try:
        return case.run(model, inputs, t, **extra)
    finally:
        for module, proc in zip(modules, saved):
            module.set_processor(proc)


def _n_layers(case, model) -> int:
    return len(case.adapter.attention_modules(model))


def _other_grid(grid: TokenGrid) -> TokenGrid:
    """Same token count, other frames (the wrong-shape-same-count case)."""
    assert grid.frames != grid.height, "pick a case grid with frames != height"
    return TokenGrid(grid.height, grid.frames, grid.width)


def check_keep_all_equals_stock(case: AdapterCase, model) -> None:
    """A keep-all mask on every backend equals the unpatched model (<= atol)."""
    inputs = case.inputs(case.grid)
    stock = case.run(model, inputs)
    for backend in ("flex", "sdpa", "auto"):
        case.module.patch(model, fs.masks.full(), backend=backend, **case.video)
        torch.testing.assert_close(case.run(model, inputs), stock, atol=case.atol, rtol=0,
                                   msg=lambda m, b=backend: f"{b}: {m}")
        case.module.unpatch(model)


def check_unpatch_restores(case: AdapterCase, model) -> None:
    """``unpatch`` puts back the same processor objects, hooks and methods: bit for bit."""
    inputs = case.inputs(case.grid)
    modules = case.adapter.attention_modules(model)
    procs = [m.processor for m in modules]
    hooks, attrs = len(model._forward_pre_hooks), set(vars(model))
    stock = case.run(model, inputs)
    case.module.patch(model, block_size=case.block_size, **case.sparse_patch(model),
                      **case.video)
    assert all(isinstance(m.processor, SparseProcessor) for m in modules)
    assert not torch.equal(case.run(model, inputs), stock)  # the patch did something
    case.module.unpatch(model)
    assert [m.processor for m in modules] == procs
    assert len(model._forward_pre_hooks) == hooks and set(vars(model)) == attrs
    assert not hasattr(model, ATTR)
    assert torch.equal(case.run(model, inputs), stock)


def check_sparse_equals_masked_stock(case: AdapterCase, model) -> None:
    """The radial pattern equals the stock processor given the same mask as an additive
    float mask, on flex and sdpa; the two backends agree; the result is not dense's."""
    inputs = case.inputs(case.grid)
    mask = case.radial(model)
    assert 0.1 < mask.density() < 0.9, "the case must exercise a sparse mask"
    n = _n_layers(case, model)
    ref = reference(case, model, inputs, [mask] * n)
    dense = reference(case, model, inputs, [None] * n)
    outs = {}
    for backend in ("flex", "sdpa"):
        handle = case.module.patch(model, backend=backend, block_size=case.block_size,
                                   **case.video)
        assert torch.equal(handle.mask_for_layer(0).to_dense(), mask.to_dense())
        outs[backend] = case.run(model, inputs)
        torch.testing.assert_close(outs[backend], ref, atol=case.atol, rtol=0)
    case.module.unpatch(model)
    torch.testing.assert_close(outs["flex"], outs["sdpa"], atol=case.atol, rtol=0)
    assert (outs["sdpa"] - dense).abs().max() > 1e-3


def check_dense_layers_and_timesteps(case: AdapterCase, model) -> None:
    """``dense_layers=1, dense_timesteps=2`` over two generations of timesteps: the trace
    and the values (all dense at step 0; layer 0 dense, the rest sparse at step 2)."""
    inputs = case.inputs(case.grid)
    n = _n_layers(case, model)
    assert n >= 2, "the case needs 2 patched layers"
    mask = case.sparse_mask(model)
    stock_999 = reference(case, model, inputs, [None] * n, t=999)
    mixed_600 = reference(case, model, inputs, [None] + [mask] * (n - 1), t=600)
    case.module.patch(model, dense_layers=1, dense_timesteps=2, block_size=case.block_size,
                      **case.sparse_patch(model), **case.video)
    schedule, steps = [999, 999, 800, 600, 400, 999, 700], [0, 0, 1, 2, 3, 0, 1]
    with case.module.recording(model) as trace:
        outs = [case.run(model, inputs, t) for t in schedule]
    assert trace == [(s, i, "dense" if s < 2 or i == 0 else "sparse")
                     for s in steps for i in range(n)]
    torch.testing.assert_close(outs[0], stock_999, atol=case.atol, rtol=0)
    torch.testing.assert_close(outs[3], mixed_600, atol=case.atol, rtol=0)
    case.module.reset_steps(model)
    assert _video.video_state(model).steps.step == 0
    case.module.unpatch(model)


def check_pipeline_trace(case: AdapterCase, model) -> None:
    """A tiny pipeline, 3 steps, twice: ``dense_layers=1, dense_timesteps=1`` per step
    (a second call starts again at step 0: the progress bar resets the count)."""
    if case.pipeline is None:
        pytest.skip(f"{case.adapter.kind}: no tiny pipeline in this case")
    pipe = case.pipeline(model)
    n = _n_layers(case, model)
    case.module.patch(pipe, dense_layers=1, dense_timesteps=1, block_size=case.block_size,
                      **case.sparse_patch(pipe, case.pipeline_video),
                      **(case.pipeline_video or case.video))
    for _ in range(2):
        with case.module.recording(pipe) as trace:
            pipe(**case.pipeline_call)
        assert sorted({s for s, _, _ in trace}) == [0, 1, 2], trace
        assert {(s, i) for s, i, _ in trace} == {(s, i) for s in range(3) for i in range(n)}
        assert all(p == ("dense" if s < 1 or i < 1 else "sparse") for s, i, p in trace), trace
    case.module.unpatch(pipe)
    assert not hasattr(model, ATTR) and "progress_bar" not in vars(pipe)


def check_layout_mismatch(case: AdapterCase, model) -> None:
    """A call of another shape with the same token count raises naming both layouts; so
    do a mask of another length and a layout in the wrong token order."""
    other = _other_grid(case.grid)
    assert other.tokens == case.grid.tokens
    case.module.patch(model, block_size=case.block_size, **case.video)
    with pytest.raises(ValueError) as err:
        case.run(model, case.inputs(other))
    assert str(case.grid) in str(err.value) and str(other) in str(err.value), err.value
    layout = case.layout(model)
    small = fs.VideoLayout(frames=1, tokens_per_frame=layout.tokens_per_frame,
                           text_tokens=layout.text_tokens, text_position=layout.text_position)
    with pytest.raises(ValueError, match=f"built for {small.length:,} tokens"):
        case.module.patch(model, fs.masks.radial(small, block_size=case.block_size),
                          **case.video)
    position = case.adapter.text_position
    if position is not None:
        flipped = fs.VideoLayout(frames=layout.frames, tokens_per_frame=layout.tokens_per_frame,
                                 text_tokens=layout.text_tokens,
                                 text_position="end" if position == "start" else "start")
        with pytest.raises(ValueError, match="text_position"):
            case.module.patch(model, layout=flipped)
    case.module.unpatch(model)


def check_deepcopy_independent(case: AdapterCase, model) -> None:
    """A deep copy counts steps, records and unpatches on its own."""
    inputs = case.inputs(case.grid)
    stock = case.run(model, inputs)
    case.module.patch(model, dense_timesteps=1, block_size=case.block_size,
                      **case.sparse_patch(model), **case.video)
    twin = copy.deepcopy(model)
    state, twin_state = _video.video_state(model), _video.video_state(twin)
    assert twin_state is not state and twin_state.steps is not state.steps
    assert all(m.processor.handle is getattr(twin, ATTR)
               for m in case.adapter.attention_modules(twin))
    with case.module.recording(model) as trace, case.module.recording(twin) as twin_trace:
        case.run(model, inputs, 999)
        sparse = case.run(model, inputs, 800)
        case.run(twin, inputs, 999)
    assert (state.steps.step, twin_state.steps.step) == (1, 0)
    n = _n_layers(case, model)
    assert len(trace) == 2 * n and len(twin_trace) == n
    case.module.unpatch(twin)
    assert torch.equal(case.run(twin, inputs), stock)
    assert isinstance(case.adapter.attention_modules(model)[0].processor, SparseProcessor)
    torch.testing.assert_close(case.run(model, inputs, 800), sparse, atol=case.atol, rtol=0)
    case.module.unpatch(model)


def check_fuse_keeps_patch(case: AdapterCase, model) -> None:
    """``fuse_qkv_projections()`` on a patched model keeps the patch with the same output,
    ``unfuse`` too; unpatched while fused, a later ``unfuse`` gives the stock processors."""
    inputs = case.inputs(case.grid)
    stock = case.run(model, inputs)
    case.module.patch(model, backend="sdpa", block_size=case.block_size,
                      **case.sparse_patch(model), **case.video)
    unfused = case.run(model, inputs)
    modules = case.adapter.attention_modules(model)
    for fuse in (True, False):
        getattr(model, "fuse_qkv_projections" if fuse else "unfuse_qkv_projections")()
        assert all(isinstance(m.processor, SparseProcessor) for m in modules)
        assert all(getattr(m, "fused_projections", False) for m in modules) or not fuse
        torch.testing.assert_close(case.run(model, inputs), unfused, atol=case.atol, rtol=0)
    model.fuse_qkv_projections()
    case.module.unpatch(model)
    model.unfuse_qkv_projections()  # must not bring the patch back
    assert not any(isinstance(m.processor, SparseProcessor) for m in modules)
    torch.testing.assert_close(case.run(model, inputs), stock, atol=case.atol, rtol=0)


def check_training_matches_stock(case: AdapterCase, model) -> None:
    """Backward through a patched model with gradient checkpointing gives the stock model's
    loss and gradients (found by diffusers' own ``test_gradient_checkpointing_equivalence``
    run on patched models); ``backend="flex"`` is left out: FlexAttention has no backward on
    the CPU."""
    inputs = case.inputs(case.grid)

    def grads(patched: bool) -> dict[str, torch.Tensor]:
        twin = copy.deepcopy(model).train()
        if patched:
            case.module.patch(twin, fs.masks.full(), backend="auto", **case.video)
            if twin._supports_gradient_checkpointing:  # HunyuanDiT has none
                twin.enable_gradient_checkpointing()
        batch = next(v for v in inputs.values() if isinstance(v, torch.Tensor)).shape[0]
        timestep = (case.timestep(batch, 500) if case.timestep is not None
                    else torch.full((batch,), 500))
        out = twin(**inputs, timestep=timestep.to(twin.dtype) if timestep.is_floating_point()
                   else timestep, return_dict=False)[0]
        out.square().mean().backward()
        return {n: p.grad for n, p in twin.named_parameters() if p.grad is not None}

    stock, patched = grads(False), grads(True)
    assert stock.keys() == patched.keys() and stock
    for name, grad in stock.items():
        torch.testing.assert_close(patched[name], grad, atol=1e-5, rtol=1e-4,
                                   msg=lambda m, n=name: f"{n}: {m}")


def check_fullgraph_compile_when_warm(case: AdapterCase, model) -> None:
    """``torch.compile(model, fullgraph=True)`` traces the patched processors once the
    masks' caches are warm (one eager forward builds the BlockMasks; building one inside a
    trace is not traceable) and FlexAttention runs them: the eager answer, and a second call
    that compiles nothing new. Not for HunyuanVideo (its text padding mask is read on the
    host) nor Flux (its token grid is read from ``img_ids``)."""
    case.module.patch(model, backend="flex", block_size=case.block_size, **case.video,
                      **case.sparse_patch(model))
    inputs = case.inputs(case.grid)
    eager = case.run(model, inputs)
    torch._dynamo.reset()
    try:
        compiled = torch.compile(model, backend="eager", fullgraph=True)
        torch.testing.assert_close(case.run(compiled, inputs), eager, atol=1e-6, rtol=0)
        with torch._dynamo.config.patch(error_on_recompile=True):
            torch.testing.assert_close(case.run(compiled, inputs), eager, atol=1e-6, rtol=0)
    finally:
        torch._dynamo.reset()
        case.module.unpatch(model)


#: Every adapter runs all of these (``check(case, model)``).
CHECKS = (
    check_keep_all_equals_stock,
    check_unpatch_restores,
    check_sparse_equals_masked_stock,
    check_dense_layers_and_timesteps,
    check_pipeline_trace,
    check_layout_mismatch,
    check_deepcopy_independent,
    check_fuse_keeps_patch,
    check_training_matches_stock,
)


# -- image models -------------------------------------------------------------------------------
#: meansim at the tiny models' scale: every full block self-similar, keep key blocks up to
#: half of the pooled probability (sparse, never empty); 8 x 8 tiles.
TINY_MEANSIM = dict(simthreshd1=-1.0, cdfthreshd=0.5, block_q=8, block_kv=8, smooth_k=True)


@dataclass
class ImageCase(AdapterCase):
    """``AdapterCase`` for image models (``_image.ImageAdapter``): a seeded sparse tile
    mask instead of radial, passed as ``mask=``; ``masked_stock`` receives bool ``[N, N]``
    or ``[B, H, N, N]``; ``timestep`` is the model's rule."""

    def sparse_mask(self, model, video: dict | None = None) -> fs.Mask:
        return tile_mask(self, model, video=video)

    def sparse_patch(self, model, video: dict | None = None) -> dict:
        return {"mask": tile_mask(self, model, video=video)}


def tile_mask(case: AdapterCase, model, seed: int = 0, video: dict | None = None) -> fs.Mask:
    """A seeded sparse tile mask over the whole sequence of ``model`` (a transformer or a
    pipeline) at ``video`` (default ``case.video``; diagonal tiles kept)."""
    n = case.module.layout_for(model, **(video or case.video)).length
    nb = -(-n // case.block_size)
    g = torch.Generator().manual_seed(seed)
    keep = (torch.rand(nb, nb, generator=g) < 0.5) | torch.eye(nb, dtype=torch.bool)
    return fs.Mask.from_tiles(keep, case.block_size, length=n, name="tiles")


def additive(dense: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """bool keep ``[N, N]`` / ``[B, H, N, N]`` -> additive float mask of ``like``'s dtype."""
    add = torch.zeros(dense.shape, dtype=like.dtype, device=like.device)
    return add.masked_fill(~dense.to(like.device), torch.finfo(like.dtype).min)


def check_image_sparse_equals_masked_stock(case: ImageCase, model) -> None:
    """A sparse tile mask equals the stock processor given it as an additive float mask,
    on flex and sdpa; the backends agree; the result is not dense's."""
    inputs = case.inputs(case.grid)
    mask = tile_mask(case, model)
    assert 0.2 < mask.density() < 0.9, "the case must exercise a sparse mask"
    n = _n_layers(case, model)
    ref = reference(case, model, inputs, [mask] * n)
    dense = reference(case, model, inputs, [None] * n)
    outs = {}
    for backend in ("flex", "sdpa"):
        handle = case.module.patch(model, mask, backend=backend, block_size=case.block_size,
                                   **case.video)
        assert handle.mask_for_layer(n - 1) is mask
        outs[backend] = case.run(model, inputs)
        torch.testing.assert_close(outs[backend], ref, atol=case.atol, rtol=0)
    case.module.unpatch(model)
    torch.testing.assert_close(outs["flex"], outs["sdpa"], atol=case.atol, rtol=0)
    assert (outs["sdpa"] - dense).abs().max() > 1e-3


def check_meansim_equals_reference(case: ImageCase, model) -> None:
    """float64: the meansim patch equals the stock processors given, per layer, the
    materialised mask meansim predicted from that layer's q, k (``to_dense`` of the bound
    mask, batch- and head-dependent); flex and sdpa alike; some tiles skipped."""
    inputs = {k: v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v
              for k, v in case.inputs(case.grid).items()}
    model = model.double()
    n = _n_layers(case, model)
    for backend in ("flex", "sdpa"):
        handle = case.module.patch(model, pattern="meansim", meansim=TINY_MEANSIM,
                                   backend=backend, **case.video)
        predicted = []

        def observe(i, q, k, v, predicted=predicted, handle=handle):
            predicted.append(handle.mask_for_layer(i).bind(q, k).to_dense())

        with handle.observing(observe):
            out = case.run(model, inputs)
        case.module.unpatch(model)
        assert len(predicted) == n and predicted[0].dim() == 4
        kept = torch.stack(predicted).float().mean().item()
        assert 0.1 < kept < 0.95, f"meansim kept {kept:.2f} of the pairs"
        ref = reference(case, model, inputs, predicted)
        assert out.dtype == torch.float64
        torch.testing.assert_close(out, ref, atol=1e-9, rtol=0, msg=lambda m, b=backend: b + m)
    model.float()


def check_image_layout_mismatch(case: ImageCase, model) -> None:
    """An image of another shape with the same token count raises naming both grids; so
    does a mask built for another length."""
    from flexsparse.models._image import ImageGrid

    grid = case.grid
    other = ImageGrid(1, grid.width, grid.height)
    case.module.patch(model, pattern="dense", **case.video)
    with pytest.raises(ValueError) as err:
        case.run(model, case.inputs(other))
    assert str(grid) in str(err.value) and str(other) in str(err.value), err.value
    n = case.module.layout_for(model, **case.video).length
    with pytest.raises(ValueError, match=f"built for {n + 1:,} tokens"):
        case.module.patch(model, fs.Mask.from_tiles(torch.ones(1, 1, dtype=torch.bool), n + 1,
                                                    length=n + 1), **case.video)
    case.module.unpatch(model)


def check_dispatch(case: AdapterCase, model) -> None:
    """``flexsparse.models.patch`` finds this adapter from the transformer's class."""
    from flexsparse import models

    assert models.adapter_for(model) is case.module
    handle = models.patch(model, pattern="dense", **case.video)
    assert handle.kind == case.adapter.kind
    models.unpatch(model)
    assert not hasattr(model, ATTR)


def check_tuned_file(case: ImageCase, model, tmp_path) -> None:
    """``tuned=`` a flexsparse parameter file: layer i runs the file's per-head meansim
    (layer 0 all dense heads -> stock); a file of another shape raises on first use."""
    from flexsparse.tune import TunedParams

    n, heads = _n_layers(case, model), case.adapter.heads(model)
    shape = (n, heads)
    sparse = torch.ones(shape, dtype=torch.bool)
    sparse[0] = False
    params = TunedParams(torch.full(shape, -1.0), torch.full(shape, 0.5),
                         torch.full(shape, 50.0), sparse, torch.zeros(shape),
                         block_q=case.block_size, block_kv=case.block_size, smooth_k=True)
    path = params.save(tmp_path / "tuned.safetensors")
    handle = case.module.patch(model, tuned=str(path), **case.video)
    assert handle.mask_for_layer(0) is None
    layer1 = handle.mask_for_layer(1)
    assert torch.equal(layer1.cdfthreshd, torch.full((heads,), 0.5))
    inputs = case.inputs(case.grid)
    predicted = []
    with handle.observing(lambda i, q, k, v: predicted.append(
            None if i == 0 else handle.mask_for_layer(i).bind(q, k).to_dense())):
        out = case.run(model, inputs)
    case.module.unpatch(model)
    torch.testing.assert_close(out, reference(case, model, inputs, predicted),
                               atol=case.atol, rtol=0)
    wrong = TunedParams(*(t[:, :1] for t in (params.simthreshd1, params.cdfthreshd,
                                               params.pvthreshd, params.is_sparse,
                                               params.sparsity)))
    bad = wrong.save(tmp_path / "wrong.safetensors")
    case.module.patch(model, tuned=str(bad), **case.video)
    with pytest.raises(ValueError, match=f"1 heads but the patched model has {n} attention "
                                         f"layers x {heads} heads"):
        case.run(model, inputs)
    case.module.unpatch(model)


def check_image_bad_arguments(case: ImageCase, model) -> None:
    kw = case.video
    with pytest.raises(ValueError, match="pattern"):
        case.module.patch(model, pattern="radial", **kw)
    with pytest.raises(ValueError, match="pattern='dense'"):
        case.module.patch(model, fs.masks.full(), pattern="dense", **kw)
    with pytest.raises(ValueError, match="tuned"):
        case.module.patch(model, pattern="meansim", tuned="x.pt", **kw)
    with pytest.raises(TypeError, match="mask must be"):
        case.module.patch(model, torch.ones(3, 3, dtype=torch.bool), **kw)
    with pytest.raises(TypeError, match="meansim must be"):
        case.module.patch(model, meansim=0.5, **kw)
    with pytest.raises(ValueError, match="height must be a multiple of"):
        case.module.patch(model, height=kw["height"] + 1, width=kw["width"])
    with pytest.raises(ValueError, match="backend"):
        case.module.patch(model, backend="cuda", **kw)
    with pytest.raises(TypeError, match="pipe_or_transformer"):
        case.module.patch(torch.nn.Linear(2, 2), **kw)
    assert not hasattr(model, ATTR)


#: Every image adapter runs these (``check(case, model)``; ``check_tuned_file`` also gets
#: ``tmp_path``): the shared checks with ``ImageCase``'s tile mask, and the image ones.
IMAGE_CHECKS = (
    check_keep_all_equals_stock, check_unpatch_restores, check_image_sparse_equals_masked_stock,
    check_meansim_equals_reference, check_dense_layers_and_timesteps, check_pipeline_trace,
    check_image_layout_mismatch, check_deepcopy_independent, check_fuse_keeps_patch,
    check_training_matches_stock,
    check_dispatch, check_image_bad_arguments,
)


# -- the base's own pieces (no model) -------------------------------------------------------------
def test_video_grid_follows_the_pipeline_rule():
    # CogVideoX-2b: 49 x 480 x 720 -> 13 x 30 x 45; 8 and 24 frames are valid (floor rule)
    kw = dict(temporal=4, spatial=8, patch=2)
    assert video_grid(49, 480, 720, **kw) == TokenGrid(13, 30, 45)
    assert video_grid(8, 480, 720, **kw).frames == 2
    assert video_grid(24, 480, 720, **kw).frames == 6
    # CogVideoX 1.5: 81 frames -> 21 latent, padded to 22, 11 temporal patches
    assert video_grid(81, 768, 1360, patch_t=2, **kw) == TokenGrid(11, 48, 85)
    with pytest.raises(ValueError, match="height must be a multiple of 16.*got 60"):
        video_grid(49, 60, 720, **kw)
    with pytest.raises(ValueError, match="num_frames"):
        video_grid(0, 480, 720, **kw)


def test_same_token_count_other_shape_is_told_apart():
    a = video_grid(49, 480, 720, temporal=4, spatial=8, patch=2)
    b = video_grid(33, 480, 1040, temporal=4, spatial=8, patch=2)
    la, lb = (g.layout(text_tokens=226) for g in (a, b))
    assert la.length == lb.length == 17_776 and a != b
    settings = _video.VideoSettings(layout=la, grid=a, video="49 frames at 480x720",
                                    mask=None, layer_masks=_video.LayerMasks(None, None, 0))
    with pytest.raises(ValueError) as err:
        _video._check_grid("cogvideox", settings, b)
    text = str(err.value)
    assert "13 frames x 30x45 tokens" in text and "9 frames x 30x65 tokens" in text
    _video._check_grid("cogvideox", settings, a)  # the right shape passes


def test_step_counter():
    steps = StepCounter()
    seen = []
    for t in [999, 999, 800, 600, None, 999, 500]:
        steps.see(None if t is None else torch.tensor([t, t]))
        seen.append(steps.step)
    assert seen == [0, 0, 1, 2, 2, 0, 1]
    steps.reset()
    assert (steps.step, steps.last) == (0, None)


def test_dispatch_names_unknown_class():
    from flexsparse import models

    with pytest.raises(TypeError, match="does not know Linear.*CogVideoXTransformer3DModel"):
        models.patch(torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match="does not know Linear"):
        models.adapter_for(torch.nn.Linear(2, 2))
    models.unpatch(torch.nn.Linear(2, 2))  # not patched: nothing to undo


def test_dispatch_llama_by_model_type():
    pytest.importorskip("transformers")
    from flexsparse import models
    from flexsparse.models import llama, tiny

    model = tiny.build_model(tiny.build_config("llama", layers=1, hidden=32, heads=2,
                                               kv_heads=1))
    assert models.adapter_for(model) is llama
    ids = torch.randint(4, 300, (1, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        stock = model(ids).logits
    handle = models.patch(model, fs.masks.causal(), backend="sdpa")
    assert handle.kind == "llama"
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, stock, atol=1e-5, rtol=0)
    models.unpatch(model)
    assert not hasattr(model, ATTR)
