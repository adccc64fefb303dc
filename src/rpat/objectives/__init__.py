"""Training objectives: base methods, with RPAT as a composable term.

Where is each loss?  PGD-AT: ``pgd_at.py``; TRADES: ``trades.py``; MART: ``mart.py``;
Consistency-AT: ``consistency.py``; the RPAT regularizer: ``rpat.py``;
ReBAT's BoAT term and RPAT++'s teacher term (towards the weight-averaged model): ``rebat.py``;
the shared interface (and where RPAT is added): ``base.py``.
"""

from __future__ import annotations

from ..attacks.threat import ThreatModel
from ..errors import InputError
from .base import BaseMethod, Forwards, Objective
from .consistency import ConsistencyAT, js_divergence
from .mart import MART, boosted_ce
from .pgd_at import PGDAT
from .rebat import TeacherTerm, kl_to_teacher, robust_perception_target
from .rpat import RPATTerm, interpolate, perception_mse, robust_perception_loss
from .trades import TRADES, kl_div

METHODS: dict[str, type[BaseMethod]] = {
    "pgd_at": PGDAT, "trades": TRADES, "mart": MART, "consistency_at": ConsistencyAT,
}


def list_methods() -> list[str]:
    return sorted(METHODS)


def build_objective(method: str, threat: ThreatModel, rpat: RPATTerm | None = None,
                    teacher: TeacherTerm | None = None, **options: object) -> Objective:
    """``build_objective("pgd_at", threat, RPATTerm())`` -> PGD-AT + RPAT; ``teacher``: ReBAT / RPAT++ term.

    ``options`` go to the method's constructor (``Config.method_options()``, e.g. MART's ``exact``).
    """
    cls = METHODS.get(method)
    if cls is None:
        raise InputError(f"unknown method {method!r}; valid: {', '.join(list_methods())}")
    return Objective(cls(threat, **options), rpat, teacher)


__all__ = [
    "MART", "METHODS", "TRADES", "BaseMethod", "ConsistencyAT", "Forwards", "Objective", "PGDAT", "RPATTerm",
    "TeacherTerm", "boosted_ce", "build_objective", "js_divergence", "kl_div", "kl_to_teacher",
    "robust_perception_target",
    "interpolate", "list_methods", "perception_mse", "robust_perception_loss",
]
