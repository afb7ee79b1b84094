"""Checks that config dataclasses run in ``__post_init__``; each error names field, value and what is allowed."""

from __future__ import annotations

import math
from collections.abc import Collection


def check_choice(name: str, value: object, allowed: Collection[str]) -> None:
    """Raise ValueError unless ``value`` is one of ``allowed``."""
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not allowed; choose one of {', '.join(map(repr, allowed))}")


def check_range(
    name: str,
    value: object,
    *,
    low: float | None = None,
    high: float | None = None,
    low_inclusive: bool = True,
    integer: bool = False,
) -> None:
    """Raise ValueError unless ``value`` is a finite number in the given range."""
    kind = "an integer" if integer else "a number"
    if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)):
        raise ValueError(f"{name}={value!r} must be {kind}")
    if not math.isfinite(value):
        raise ValueError(f"{name}={value!r} must be finite")
    if low is not None and (value < low or (value == low and not low_inclusive)):
        bound = ">=" if low_inclusive else ">"
        raise ValueError(f"{name}={value!r} must be {bound} {low}")
    if high is not None and value > high:
        raise ValueError(f"{name}={value!r} must be <= {high}")
