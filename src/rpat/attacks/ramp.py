"""A linearly ramped training budget (``attack.eps_ramp_epochs``): ε and the step size grow to their targets.

Over the first ``N`` epochs the training threat of 0-based epoch ``e`` is the target threat with
ε and the step size scaled by ``(e + 1)/N`` (``1/N`` of the target in the first epoch, the full
target from epoch ``N − 1`` on), as DAJAT (Addepalli et al., NeurIPS 2022) and OA-AT (Addepalli et
al., ECCV 2022) ramp ε over their first epochs. The number of attack steps is unchanged. The budget
is constant within an epoch, so it is a pure function of the epoch (a resumed run trains against
the same budgets) and each epoch's threat is one CUDA-graph phase (it is part of
``rpat.training.cuda_graph.phase_key``).
"""

from __future__ import annotations

from dataclasses import replace

from .threat import ThreatModel


def ramp_factor(epoch: int, ramp_epochs: int) -> float:
    """``min(1, (epoch + 1)/ramp_epochs)`` for 0-based ``epoch``; 1.0 when ``ramp_epochs`` is 0 (no ramp)."""
    if ramp_epochs <= 0 or epoch + 1 >= ramp_epochs:
        return 1.0
    return (epoch + 1) / ramp_epochs


def ramped_threat(threat: ThreatModel, epoch: int, ramp_epochs: int) -> ThreatModel:
    """``threat`` with ε and the step size × :func:`ramp_factor` (the same object when the factor is 1)."""
    f = ramp_factor(epoch, ramp_epochs)
    if f == 1.0:
        return threat
    return replace(threat, eps=threat.eps * f, step_size=threat.step_size * f)
