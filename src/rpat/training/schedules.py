"""Learning-rate schedules as pure functions of training progress.

The learning rate of step ``i`` of epoch ``e`` is ``lr_at(cfg, e, i / steps_per_epoch)``:
nothing but the epoch and step determines it, so a resumed run follows exactly
the schedule of an uninterrupted one with no scheduler state to save.
"""

from __future__ import annotations

import math
from collections.abc import Sequence


def piecewise_lr(base_lr: float, epoch: int, milestones: Sequence[int], gamma: float) -> float:
    """``base_lr · gamma^k`` where k = number of milestones <= epoch (0-based epochs).

    The paper's benchmark schedule is milestones (100, 105) of 110 epochs: epochs
    0..99 use 0.1, 100..104 use 0.01, 105..109 use 0.001.
    """
    k = sum(1 for m in milestones if epoch >= m)
    return base_lr * gamma**k


def cosine_lr(base_lr: float, progress: float, total_epochs: int) -> float:
    """Cosine annealing from ``base_lr`` at progress 0 to 0 at ``total_epochs`` (progress in epochs)."""
    return 0.5 * base_lr * (1.0 + math.cos(math.pi * min(progress / total_epochs, 1.0)))


def lr_at(
    schedule: str,
    base_lr: float,
    epoch: int,
    fraction: float,
    total_epochs: int,
    milestones: Sequence[int] = (),
    gamma: float = 0.1,
) -> float:
    """Learning rate at ``epoch + fraction`` (fraction in [0, 1) of the epoch done)."""
    if schedule == "piecewise":
        return piecewise_lr(base_lr, epoch, milestones, gamma)
    if schedule == "cosine":
        return cosine_lr(base_lr, epoch + fraction, total_epochs)
    if schedule == "constant":
        return base_lr
    raise ValueError(f"unknown schedule {schedule!r}")
