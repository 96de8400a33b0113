"""Model integrations: ``patch(obj, **kw)`` / ``unpatch(obj)`` for any supported model.

>>> from flexsparse import models
>>> handle = models.patch(pipe, num_frames=49, height=480, width=720)  # doctest: +SKIP
>>> models.unpatch(pipe)                                                 # doctest: +SKIP

``patch`` finds the transformer (a pipeline's ``.transformer``, or the model itself) and
dispatches on its class to the adapter module, imported only then (transformers and
diffusers are imported inside ``flexsparse.models`` only). LLaMA-family models
(``config.model_type`` in ``llama.SUPPORTED``) go to ``flexsparse.models.llama``.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from ._patch import ATTR, PatchHandle

#: Transformer class name -> adapter module (``flexsparse.models.<name>``).
ADAPTERS: dict[str, str] = {
    "CogVideoXTransformer3DModel": "cogvideox",
    "HunyuanVideoTransformer3DModel": "hunyuan_video",
    "WanTransformer3DModel": "wan",
    "FluxTransformer2DModel": "flux",
    "HunyuanDiT2DModel": "hunyuan_dit",
}
#: ``config.model_type`` values of the LLaMA integration (``llama.SUPPORTED``).
LLM_TYPES = ("llama", "mistral", "qwen2", "qwen3")


def _target(obj):
    """The module that carries the patch: a pipeline's transformer, else ``obj``."""
    import torch

    inner = getattr(obj, "transformer", None)
    return inner if isinstance(inner, torch.nn.Module) else obj


def adapter_for(obj) -> ModuleType:
    """The adapter module for ``obj`` (a model or a pipeline), or a ``TypeError`` naming
    the class and the supported ones."""
    target = _target(obj)
    for cls in type(target).__mro__:
        name = ADAPTERS.get(cls.__name__)
        if name is not None:
            try:
                return importlib.import_module(f"{__name__}.{name}")
            except ModuleNotFoundError as exc:
                if exc.name != f"{__name__}.{name}":
                    raise
                raise TypeError(f"{cls.__name__} is supported by flexsparse.models.{name}, "
                                "which this installation does not have") from None
    model_type = getattr(getattr(target, "config", None), "model_type", None)
    if model_type in LLM_TYPES:
        return importlib.import_module(f"{__name__}.llama")
    raise TypeError(
        f"flexsparse.models.patch does not know {type(target).__name__}"
        + (f" (model_type={model_type!r})" if model_type is not None else "")
        + f"; supported: {', '.join(ADAPTERS)} and transformers models of model_type "
        f"{', '.join(LLM_TYPES)}"
    )


def patch(obj, mask=None, **kwargs) -> PatchHandle:
    """Patch ``obj`` (a pipeline, a diffusers transformer or a transformers LLM) with the
    adapter of its class; ``kwargs`` are that adapter's ``patch`` options (video models:
    pattern, num_frames / height / width or layout, decay_factor, dense_layers,
    dense_timesteps, scenes, backend, tuned, block_size)."""
    return adapter_for(obj).patch(obj, mask, **kwargs)


def unpatch(obj) -> None:
    """Undo ``patch`` on ``obj``; a model that is not patched is left as it is."""
    if getattr(_target(obj), ATTR, None) is None and getattr(obj, ATTR, None) is None:
        return
    module = adapter_for(obj)
    module.unpatch(obj)


__all__ = ["ADAPTERS", "LLM_TYPES", "adapter_for", "patch", "unpatch"]
