"""Summary scores of the accuracy-robustness trade-off (accuracies in percent, 0..100)."""

from __future__ import annotations

import math

from ..errors import InputError


def _as_accuracy(name: str, value: float) -> float:
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise InputError(f"{name} accuracy must be a number, got {value!r}") from None
    if isinstance(value, bool) or math.isnan(out) or out < 0:
        raise InputError(f"{name} accuracy must be a number >= 0, got {value!r}")
    return out


def mean_score(clean: float, robust: float) -> float:
    """The arithmetic mean ``(clean + robust) / 2`` of clean and robust (AA) accuracy."""
    return (_as_accuracy("clean", clean) + _as_accuracy("robust", robust)) / 2


def nrr(clean: float, robust: float) -> float:
    """Natural-robust ratio, the harmonic mean ``2·clean·robust / (clean + robust)``.

    0 when both are 0.
    """
    c, r = _as_accuracy("clean", clean), _as_accuracy("robust", robust)
    if c + r == 0:
        return 0.0
    return 2 * c * r / (c + r)
