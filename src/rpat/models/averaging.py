"""Weight averaging (WA): an exponential moving average of a model's parameters and buffers.

After every optimizer step, for every floating-point tensor ``w`` of the model's
state (parameters *and* BatchNorm ``running_mean`` / ``running_var``)::

    w_wa ← decay · w_wa + (1 − decay) · w          (decay 0.999 by default)

Integer buffers (BatchNorm ``num_batches_tracked``) are copied. Before the
warm-up ends (0-based epochs ``< start_epoch``) the averaged model is a copy of
the online model after each step, so averaging starts from the weights the
warm-up reached, not from the random initialization.

Two options of the recipes trained on generated data (both off by default, keeping the above):

- ``warmup`` (``averaging.warmup``): the decay of the ``t``-th EMA step (t = 0, 1, ... counted from
  ``start_epoch``) is ``min(decay, (1 + t)/(10 + t))`` (0.1, 0.18, 0.25, ... up to ``decay``), the
  TF-style dynamic decay of DeepMind's ``adversarial_robustness`` (``jax/utils.py`` ``ema_update``,
  ``dynamic_decay=True``) and of DM-Improves-AT (``gowal21uncovering/utils/watrain.py``), which count
  ``t`` from the end of their EMA warm-up as ``start_epoch`` does here. ``t`` is a device tensor
  incremented in place (no host read, CUDA-graph capturable) and saved in :meth:`WeightAverage.state_dict`,
  so a resumed run continues the sequence exactly.
- ``bn`` (``averaging.bn``): ``average`` (default) averages the buffers like the weights; ``copy``
  averages the parameters only and copies the buffers (BatchNorm running statistics) from the online
  model after every step. Both published recipes use ``copy``: DeepMind's averages ``params`` only and
  evaluates the averaged weights with the online model's ``state`` (the batch statistics), and
  DM-Improves-AT's ``ema_update`` averages ``parameters()`` only and ``update_bn`` copies
  ``running_mean`` / ``running_var`` / ``num_batches_tracked`` from the online model.

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

#: ``averaging.bn``: the averaged model's buffers (BatchNorm statistics) are averaged, or copied from the online model
BN_MODES = ("average", "copy")
#: the key of the EMA step counter ``t`` in :meth:`WeightAverage.state_dict` (only with ``warmup``)
STEPS_KEY = "_wa_ema_steps"


class WeightAverage:
    """An EMA copy of ``model`` (parameters and buffers). ``wa.update(model, epoch)`` after each step.

    Args:
        model: the online model; it is deep-copied (its current weights are the start).
        decay: EMA decay in [0, 1); the averaged weights move ``1 − decay`` of the way
            to the online ones at each step.
        start_epoch: first 0-based epoch in which the EMA runs; in earlier epochs each
            update copies the online model.
        warmup: the decay of the t-th EMA step is ``min(decay, (1 + t)/(10 + t))`` (module docstring).
        bn: ``"average"`` (buffers averaged like the weights) or ``"copy"`` (buffers copied from the online model).
    """

    def __init__(self, model: nn.Module, decay: float = 0.999, start_epoch: int = 0, *, warmup: bool = False,
                 bn: str = "average"):
        check_averaging(decay, start_epoch)
        if bn not in BN_MODES:
            raise InputError(f"unknown averaging.bn {bn!r}; valid: {', '.join(BN_MODES)}")
        self.decay = float(decay)
        self.start_epoch = int(start_epoch)
        self.warmup = bool(warmup)
        self.bn = bn
        self.model = copy.deepcopy(model)
        self.model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        device = next(iter([*self.model.parameters(), *self.model.buffers()]), torch.empty(0)).device
        #: t, the number of EMA steps taken (float64 on the model's device, updated in place)
        self.steps = torch.zeros((), dtype=torch.float64, device=device)

    def _pairs(self, model: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor, bool]]:
        """(averaged, online, is a parameter) for every parameter and buffer, looked up afresh each call."""
        mine = [*self.model.parameters(), *self.model.buffers()]
        theirs = [*model.parameters(), *model.buffers()]
        if len(mine) != len(theirs):
            raise ValueError("WeightAverage.update: the model's tensors differ from the averaged copy's")
        n_params = len(list(self.model.parameters()))
        return [(a.data, b.data, i < n_params) for i, (a, b) in enumerate(zip(mine, theirs, strict=True))]

    def decay_now(self) -> torch.Tensor | float:
        """The decay the next EMA step applies: ``min(decay, (1 + t)/(10 + t))`` (a float64 device tensor)
        with ``warmup``, else the float ``decay``."""
        if not self.warmup:
            return self.decay
        return torch.clamp((1.0 + self.steps) / (10.0 + self.steps), max=self.decay)

    @torch.no_grad()
    def copy_from(self, model: nn.Module) -> None:
        """Set the averaged model to a copy of ``model`` (parameters and buffers)."""
        for avg, cur, _ in self._pairs(model):
            avg.copy_(cur)

    @torch.no_grad()
    def update(self, model: nn.Module, epoch: int) -> None:
        """Fold the online ``model`` in after an optimizer step of 0-based ``epoch`` (no host sync)."""
        if epoch < self.start_epoch:
            self.copy_from(model)
            return
        decay = self.decay_now()
        weights: dict[torch.dtype, torch.Tensor | float] = {}
        for avg, cur, is_param in self._pairs(model):
            if avg.is_floating_point() and (is_param or self.bn == "average"):
                if avg.dtype not in weights:
                    weights[avg.dtype] = (1.0 - decay).to(avg.dtype) if isinstance(decay, torch.Tensor) else 1.0 - decay
                avg.lerp_(cur, weights[avg.dtype])  # avg + w·(cur − avg) = decay·avg + (1 − decay)·cur
            else:
                avg.copy_(cur)
        self.steps += 1

    def state_dict(self) -> dict[str, Any]:
        """The averaged model's ``state_dict`` (tensors only: loads with ``weights_only``); with ``warmup``
        also the EMA step count t under ``STEPS_KEY``."""
        state = self.model.state_dict()
        if self.warmup:
            state[STEPS_KEY] = self.steps.clone()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        state = dict(state)
        steps = state.pop(STEPS_KEY, None)
        if self.warmup and steps is None:
            raise InputError("the saved averaged model has no EMA step count to resume averaging.warmup exactly")
        self.model.load_state_dict(state)
        if steps is not None:
            self.steps.copy_(steps)


def check_averaging(decay: float, start_epoch: int) -> None:
    """Raise InputError unless ``0 <= decay < 1`` and ``start_epoch`` is an integer >= 0."""
    if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0.0 <= decay < 1.0:
        raise InputError(f"averaging.decay must be a number in [0, 1), got {decay!r}")
    if isinstance(start_epoch, bool) or not isinstance(start_epoch, int) or start_epoch < 0:
        raise InputError(f"averaging.start_epoch must be an integer >= 0, got {start_epoch!r}")
