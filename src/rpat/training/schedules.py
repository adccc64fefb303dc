"""Learning-rate schedules as pure functions of training progress.

The learning rate of step ``i`` of epoch ``e`` is ``lr_at(cfg, e, i / steps_per_epoch)``:
nothing but the epoch and step determines it, so a resumed run follows exactly
the schedule of an uninterrupted one with no scheduler state to save.

Two options in front of any schedule (DeepMind's ``adversarial_robustness`` recipe: cosine, 10
warm-up epochs, lr = 0.1·B/256):

- ``optim.warmup_epochs`` = W: over progress ``p = epoch + fraction < W`` the lr rises linearly from
  0, ``lr = target·p/W``, where ``target`` is the schedule's lr at epoch W (the base lr, or a
  piecewise value if a milestone falls inside the warm-up); after it the schedule runs as
  before, except that a cosine curve then spans the remaining ``[W, epochs]`` (as optax's
  ``join_schedules`` of DeepMind's ``get_cosine_schedule``): it starts at the base lr right after
  the warm-up and reaches 0 at the end. Piecewise milestones keep their absolute epochs.
- ``optim.lr_scaling=linear``: the base lr is ``optim.lr·batch_size/256`` (the linear scaling rule of
  Goyal et al., 2017), so ``optim.lr`` is the lr at batch 256 (:func:`scaled_lr`). DeepMind's code
  uses ``0.1·max(B/256, 1)``; both agree for batches of 256 and more.
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
    warmup_epochs: int = 0,
) -> float:
    """Learning rate at ``epoch + fraction`` (fraction in [0, 1) of the epoch done), after a linear
    warm-up from 0 over the first ``warmup_epochs`` epochs (module docstring)."""
    progress = epoch + fraction
    if warmup_epochs > 0 and progress < warmup_epochs:
        target = lr_at(schedule, base_lr, warmup_epochs, 0.0, total_epochs, milestones, gamma, warmup_epochs)
        return target * progress / warmup_epochs
    if schedule == "piecewise":
        return piecewise_lr(base_lr, epoch, milestones, gamma)
    if schedule == "cosine":
        return cosine_lr(base_lr, progress - warmup_epochs, total_epochs - warmup_epochs)
    if schedule == "constant":
        return base_lr
    raise ValueError(f"unknown schedule {schedule!r}")


def scaled_lr(lr: float, batch_size: int, rule: str = "none") -> float:
    """The base lr of a run: ``lr`` (rule ``none``) or ``lr·batch_size/256`` (rule ``linear``);
    ``batch_size`` is the global batch (all processes together)."""
    if rule == "none":
        return lr
    if rule == "linear":
        return lr * batch_size / 256
    raise ValueError(f"unknown lr scaling rule {rule!r}")


def lr_scaling_line(lr: float, batch_size: int, rule: str) -> str | None:
    """The one log line saying what the scaling rule chose (None for rule ``none``)."""
    if rule == "none":
        return None
    return (f"lr scaling {rule}: base lr {scaled_lr(lr, batch_size, rule):.6g} = optim.lr {lr:g} x batch "
            f"{batch_size}/256 (optim.lr is the lr at batch 256)")
