"""Training objectives: base methods, with RPAT as a composable term.

Where is each loss?  PGD-AT: ``pgd_at.py``; the RPAT regularizer: ``rpat.py``;
the shared interface (and where RPAT is added): ``base.py``.
"""

from __future__ import annotations

from ..attacks.threat import ThreatModel
from ..errors import InputError
from .base import BaseMethod, Forwards, Objective
from .pgd_at import PGDAT
from .rpat import RPATTerm, interpolate, perception_mse, robust_perception_loss

METHODS: dict[str, type[BaseMethod]] = {"pgd_at": PGDAT}


def list_methods() -> list[str]:
    return sorted(METHODS)


def build_objective(method: str, threat: ThreatModel, rpat: RPATTerm | None = None) -> Objective:
    """``build_objective("pgd_at", threat, RPATTerm())`` -> PGD-AT + RPAT."""
    cls = METHODS.get(method)
    if cls is None:
        raise InputError(f"unknown method {method!r}; valid: {', '.join(list_methods())}")
    return Objective(cls(threat), rpat)


__all__ = [
    "METHODS", "BaseMethod", "Forwards", "Objective", "PGDAT", "RPATTerm", "build_objective",
    "interpolate", "list_methods", "perception_mse", "robust_perception_loss",
]
