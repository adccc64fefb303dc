"""Weight averaging (WA): an exponential moving average of a model's parameters and buffers.

After every optimizer step, for every floating-point tensor ``w`` of the model's
state (parameters *and* BatchNorm ``running_mean`` / ``running_var``)::

    w_wa ← decay · w_wa + (1 − decay) · w          (decay 0.999 by default)

Integer buffers (BatchNorm ``num_batches_tracked``) are copied. Before the
warm-up ends (0-based epochs ``< start_epoch``) the averaged model is a copy of
the online model after each step, so averaging starts from the weights the
warm-up reached, not from the random initialization.

The averaged model is a separate module, always in eval mode, with no
gradients; it is the teacher of ReBAT / RPAT++ (``rpat.objectives.rebat``) and,
when averaging is on, the model the trainer evaluates, selects and saves as
``best.pt`` / ``final.pt``.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from ..errors import InputError


class WeightAverage:
    """An EMA copy of ``model`` (parameters and buffers). ``wa.update(model, epoch)`` after each step.

    Args:
        model: the online model; it is deep-copied (its current weights are the start).
        decay: EMA decay in [0, 1); the averaged weights move ``1 − decay`` of the way
            to the online ones at each step.
        start_epoch: first 0-based epoch in which the EMA runs; in earlier epochs each
            update copies the online model.
    """

    def __init__(self, model: nn.Module, decay: float = 0.999, start_epoch: int = 0):
        check_averaging(decay, start_epoch)
        self.decay = float(decay)
        self.start_epoch = int(start_epoch)
        self.model = copy.deepcopy(model)
        self.model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)

    def _pairs(self, model: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(averaged, online) pairs of parameters and buffers, looked up afresh each call."""
        mine = [*self.model.parameters(), *self.model.buffers()]
        theirs = [*model.parameters(), *model.buffers()]
        if len(mine) != len(theirs):
            raise ValueError("WeightAverage.update: the model's tensors differ from the averaged copy's")
        return [(a.data, b.data) for a, b in zip(mine, theirs, strict=True)]

    @torch.no_grad()
    def copy_from(self, model: nn.Module) -> None:
        """Set the averaged model to a copy of ``model`` (parameters and buffers)."""
        for avg, cur in self._pairs(model):
            avg.copy_(cur)

    @torch.no_grad()
    def update(self, model: nn.Module, epoch: int) -> None:
        """Fold the online ``model`` in after an optimizer step of 0-based ``epoch`` (no host sync)."""
        if epoch < self.start_epoch:
            self.copy_from(model)
            return
        w = 1.0 - self.decay
        for avg, cur in self._pairs(model):
            if avg.is_floating_point():
                avg.lerp_(cur, w)  # avg + w·(cur − avg) = decay·avg + (1 − decay)·cur
            else:
                avg.copy_(cur)

    def state_dict(self) -> dict[str, Any]:
        """The averaged model's ``state_dict`` (tensors only: loads with ``weights_only``)."""
        return self.model.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state)


def check_averaging(decay: float, start_epoch: int) -> None:
    """Raise InputError unless ``0 <= decay < 1`` and ``start_epoch`` is an integer >= 0."""
    if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0.0 <= decay < 1.0:
        raise InputError(f"averaging.decay must be a number in [0, 1), got {decay!r}")
    if isinstance(start_epoch, bool) or not isinstance(start_epoch, int) or start_epoch < 0:
        raise InputError(f"averaging.start_epoch must be an integer >= 0, got {start_epoch!r}")
