"""Threat models and attacks: PGD (training and PGD-20 evaluation) and AutoAttack.

All budgets (ε, step size) are in pixel units of images in [0, 1].
"""

from .autoattack import run_autoattack
from .cw import cw_margin, cw_pgd
from .pgd import PGD, eval_mode, pgd
from .threat import ThreatModel, default_threat, format_budget, parse_budget

__all__ = [
    "PGD",
    "ThreatModel",
    "cw_margin",
    "cw_pgd",
    "default_threat",
    "eval_mode",
    "format_budget",
    "parse_budget",
    "pgd",
    "run_autoattack",
]
