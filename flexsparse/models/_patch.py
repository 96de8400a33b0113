"""What the model integrations share: the handle a ``patch`` call leaves on the model.

Every ``patch`` (``llama.patch``, ``cogvideox.patch`` and the other diffusers adapters,
``flexsparse.models.patch``) stores a ``PatchHandle`` on the patched module as
``module._flexsparse_patch``. It records which layers are patched, with what, and lets
tools observe the attention inputs of every patched layer (calibration in
``flexsparse.tune`` registers an observer; nothing is observed otherwise). The state of a
diffusers video patch is the typed ``handle.state`` (``flexsparse.models._video.VideoState``);
``handle.extra`` holds the LLaMA integration's own state.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

#: ``observer(layer_idx, q, k, v)`` with q ``[B, Hq, Q, D]`` and k, v ``[B, Hkv, KV, D]``
#: exactly as the attention function receives them (after RoPE).
Observer = Callable[[int, Tensor, Tensor, Tensor], None]

ATTR = "_flexsparse_patch"


@dataclass
class PatchHandle:
    """State of one patched model.

    Attributes:
        kind: ``"llama"`` or ``"cogvideox"``.
        layers: indices of the patched attention layers.
        mask_for_layer: ``layer_idx -> Mask | DynamicMask | None`` (None = the layer's
            dense attention).
        backend: the ``flexsparse.attention`` backend the layers use.
        observers: called with every patched layer's ``(layer_idx, q, k, v)``.
        restore: undoes the patch.
        state: the typed state of a diffusers video patch (``_video.VideoState``: layout,
            step counter, trace, settings); None for LLaMA.
        extra: the LLaMA integration's state (string keys).
    """

    kind: str
    layers: list[int]
    mask_for_layer: Callable[[int], Any]
    backend: str = "auto"
    observers: list[Observer] = field(default_factory=list)
    restore: Callable[[], None] | None = None
    state: Any = None
    extra: dict = field(default_factory=dict)

    def notify(self, layer_idx: int, q: Tensor, k: Tensor, v: Tensor) -> None:
        for observer in self.observers:
            observer(layer_idx, q, k, v)

    @contextmanager
    def observing(self, observer: Observer):
        """Call ``observer`` on every patched attention call inside the block."""
        self.observers.append(observer)
        try:
            yield self
        finally:
            self.observers.remove(observer)


def get_handle(module) -> PatchHandle:
    """The ``PatchHandle`` of a patched model (or of a pipeline's patched ``.transformer``),
    or a ``ValueError`` saying how to patch."""
    handle = getattr(module, ATTR, None)
    if handle is None:
        inner = getattr(module, "transformer", None)
        handle = getattr(inner, ATTR, None) if inner is not None else None
    if handle is None:
        raise ValueError(
            f"{type(module).__name__} is not patched by flexsparse: call "
            "flexsparse.models.patch(model_or_pipeline, ...) first"
        )
    return handle
