"""Argument checks shared by the public entry points; each raises a specific error."""

from __future__ import annotations

import math
import numbers

import torch


def _real(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    try:
        value = float(value)
    except OverflowError:  # an int beyond float's range
        raise ValueError(f"{name} must be finite, got an int of {value.bit_length()} bits") \
            from None
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


def positive(name: str, value: object) -> float:
    """A finite number > 0."""
    value = _real(name, value)
    if value <= 0:
        raise ValueError(f"{name} must be > 0, got {value}")
    return value


def non_negative(name: str, value: object) -> float:
    """A finite number >= 0."""
    value = _real(name, value)
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    return value


def integer(name: str, value: object, minimum: int, maximum: int | None = None) -> int:
    """An int in [minimum, maximum] (no upper bound for None; bools refused)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name} must be an int <= {maximum}, got {value}")
    return int(value)


def rate(name: str, value: object) -> float:
    """A probability in (0, 1]."""
    value = _real(name, value)
    if not 0 < value <= 1:
        raise ValueError(f"{name} must be in (0, 1], got {value}")
    return value


def choice(name: str, value: object, allowed: tuple) -> object:
    """One of ``allowed`` (a named option such as an engine or accountant)."""
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
    return value


def flag(name: str, value: object) -> bool:
    """A bool (an on/off option; 0 and 1 refused)."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return value


def delta(value: object) -> float:
    """δ of (ε, δ)-DP: in (0, 1)."""
    value = _real("delta", value)
    if not 0 < value < 1:
        raise ValueError(f"delta must be in (0, 1), got {value}")
    return value


def generator(value: object) -> torch.Generator | None:
    """A ``torch.Generator`` or None."""
    if value is not None and not isinstance(value, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got "
                        f"{type(value).__name__}")
    return value
