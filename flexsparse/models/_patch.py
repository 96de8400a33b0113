"""What the model integrations share: the handle a ``patch`` call leaves on the model.

``llama.patch`` and ``cogvideox.patch`` store a ``PatchHandle`` on the patched module as
``module._flexsparse_patch``. It records which layers are patched, with what, and lets
tools observe the attention inputs of every patched layer (calibration in
``flexsparse.tune`` registers an observer; nothing is observed otherwise).
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
        extra: integration-specific state.
    """

    kind: str
    layers: list[int]
    mask_for_layer: Callable[[int], Any]
    backend: str = "auto"
    observers: list[Observer] = field(default_factory=list)
    restore: Callable[[], None] | None = None
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
    """The ``PatchHandle`` of a patched model, or a ``ValueError`` saying how to patch."""
    handle = getattr(module, ATTR, None)
    if handle is None:
        raise ValueError(
            f"{type(module).__name__} is not patched by flexsparse: call "
            "flexsparse.models.llama.patch(model, ...) or flexsparse.models.cogvideox.patch(...)"
        )
    return handle
