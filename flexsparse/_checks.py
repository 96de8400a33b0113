"""Argument validation that names the argument, the value received and what is allowed."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any


def check_int(name: str, value: Any, *, minimum: int | None = 0) -> int:
    """Return ``value`` as an int, or raise naming ``name`` if it is not an int >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int):
        try:
            import numpy as np

            if isinstance(value, np.integer):
                value = int(value)
            else:
                raise TypeError
        except TypeError:
            raise TypeError(
                f"{name} must be an int, got {value!r} ({type(value).__name__})"
            ) from None
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def check_bool(name: str, value: Any) -> bool:
    """Return ``value`` if it is a bool (numpy's included), else raise naming ``name``."""
    try:
        import numpy as np

        if isinstance(value, np.bool_):
            value = bool(value)
    except ImportError:  # numpy is optional for this check
        pass
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r} ({type(value).__name__})")
    return value


def check_float(
    name: str, value: Any, *, low: float | None = None, high: float | None = None
) -> float:
    """Return ``value`` as a float within [low, high], or raise naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {value!r} ({type(value).__name__})")
    value = float(value)
    if value != value:
        raise ValueError(f"{name} must not be NaN")
    if low is not None and value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")
    if high is not None and value > high:
        raise ValueError(f"{name} must be <= {high}, got {value}")
    return value


def check_choice(name: str, value: Any, allowed: Iterable[str]) -> str:
    """Return ``value`` if it is one of ``allowed``, else raise naming the choices."""
    allowed = tuple(allowed)
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, allowed))}; got {value!r}")
    return value


def block_pair(name: str, block_size: int | tuple[int, int]) -> tuple[int, int]:
    """Normalise ``block_size`` (an int or a (query, key) pair) to a pair of positive ints."""
    if isinstance(block_size, (tuple, list)):
        if len(block_size) != 2:
            raise ValueError(f"{name} must be an int or a (q, kv) pair, got {block_size!r}")
        bq, bk = block_size
    else:
        bq = bk = block_size
    return check_int(name, bq, minimum=1), check_int(name, bk, minimum=1)
