"""Analyses of trained checkpoints: perception consistency (Figures 2/5), the theorems as measurements, ablations.

- :mod:`rpat.analysis.consistency` -- MSE(h(x), h(x_adv)) and along the path, defended vs failed examples;
- :mod:`rpat.analysis.smoothness` -- curvature along Δ (second difference and HVP), Jacobian drift,
  spectral norm and the Lipschitz estimate of Theorem 2;
(the λ × a ablation of Section 5.4 is an experiment: :mod:`rpat.experiments.ablation`; the ``rpat analyze``
command is :mod:`rpat.cli.analyze`).
"""

from .consistency import consistency_of_checkpoint, consistency_of_model, consistency_of_run, perception_distances
from .smoothness import (
    directional_second_derivative,
    jacobian_drift,
    second_difference,
    smoothness_of_checkpoint,
    smoothness_of_model,
    spectral_norm,
)

__all__ = [
    "consistency_of_checkpoint",
    "consistency_of_model",
    "consistency_of_run",
    "directional_second_derivative",
    "jacobian_drift",
    "perception_distances",
    "second_difference",
    "smoothness_of_checkpoint",
    "smoothness_of_model",
    "spectral_norm",
]
