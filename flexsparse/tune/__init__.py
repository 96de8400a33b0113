"""Calibration of data-dependent (meansim) sparsity and tuned-parameter files.

>>> from flexsparse import tune
>>> params = tune.load_params("spargeattn_cogvideox-2b_l1-0.06_pv-0.07.pt")  # or ours
>>> params.sparsity.shape, params.layer_mask(3)          # [L, H], a DynamicMask or None
>>> result = tune.tune_heads([(q, k, v)], l1=0.06)        # one layer, model-free
>>> tuner = tune.MeansimTuner(l1=0.06)                    # on a patched model
"""

from .calibrate import DEFAULT_GRID, METRICS, HeadResult, MeansimTuner, tune_heads
from .params import (
    TunedParams,
    file_format,
    load_params,
    load_spargeattn,
    plot_params,
    spargeattn_example_path,
)
from .synthetic import block_structured_qkv

__all__ = [
    "MeansimTuner",
    "tune_heads",
    "HeadResult",
    "TunedParams",
    "load_params",
    "load_spargeattn",
    "plot_params",
    "spargeattn_example_path",
    "file_format",
    "DEFAULT_GRID",
    "METRICS",
    "block_structured_qkv",
]
