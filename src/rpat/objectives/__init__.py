"""Training objectives: base methods, with RPAT as a composable term.

Where is each loss?  PGD-AT: ``pgd_at.py``; TRADES: ``trades.py``; MART: ``mart.py``;
Consistency-AT: ``consistency.py``; their label-smoothed cross-entropy: ``losses.py``;
the RPAT regularizer: ``rpat.py``;
ReBAT's BoAT term and RPAT++'s teacher term (towards the weight-averaged model): ``rebat.py``.
The leaf interfaces (``Forwards``, ``BaseMethod``): ``base.py``; where the terms are added to
the base loss (``Objective.loss``, and its epoch key ``Objective.phase``): ``objective.py``;
the method registry (``METHODS``, ``build_objective``, the run label ``method_label``): ``registry.py``.

Imports go one way: ``base`` <- methods and terms <- ``objective`` <- ``registry`` <- this
package; no module below imports one above it.
"""

from __future__ import annotations

from .base import BaseMethod, Forwards
from .consistency import ConsistencyAT, js_divergence
from .mart import MART, boosted_ce
from .objective import Objective
from .pgd_at import PGDAT
from .rebat import TeacherTerm, kl_to_teacher, robust_perception_target
from .registry import METHODS, build_objective, list_methods, method_label
from .rpat import RPATTerm, interpolate, perception_mse, robust_perception_loss
from .trades import TRADES, kl_div

__all__ = [
    "MART", "METHODS", "TRADES", "BaseMethod", "ConsistencyAT", "Forwards", "Objective", "PGDAT", "RPATTerm",
    "TeacherTerm", "boosted_ce", "build_objective", "js_divergence", "kl_div", "kl_to_teacher",
    "robust_perception_target",
    "interpolate", "list_methods", "method_label", "perception_mse", "robust_perception_loss",
]
