"""Facts about CUDA devices that do not change while a process runs, asked once."""

from __future__ import annotations

import functools

import torch


@functools.cache
def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def cuda_capability(device: torch.device) -> tuple[int, int]:
    """``(major, minor)`` of a CUDA ``device`` (index None: the current one), cached per
    device: ``torch.cuda.get_device_capability`` costs ~10 us of host time per call."""
    index = torch.cuda.current_device() if device.index is None else device.index
    return _capability(index)
