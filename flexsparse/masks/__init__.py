"""The pattern library: every function returns a ``flexsparse.Mask`` (or a
``DynamicMask`` for data-dependent patterns)."""

from .basic import causal, document, full, kv_prefix, prefix_lm, sliding_window

__all__ = [
    "full",
    "causal",
    "sliding_window",
    "kv_prefix",
    "prefix_lm",
    "document",
]
