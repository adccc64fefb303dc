"""Robustness evaluation: clean, PGD-20 and AutoAttack accuracy, Mean and NRR; CW-20, noise, transfer."""

from .extra import ExtraEvals, run_extra_evals
from .metrics import mean_score, nrr
from .robustness import (
    RobustnessReport,
    accuracy,
    evaluate_robustness,
    format_per_attack,
    format_table,
    masking_drop,
    pgd_accuracy,
)

__all__ = [
    "ExtraEvals",
    "RobustnessReport",
    "accuracy",
    "evaluate_robustness",
    "format_per_attack",
    "format_table",
    "masking_drop",
    "mean_score",
    "nrr",
    "pgd_accuracy",
    "run_extra_evals",
]
