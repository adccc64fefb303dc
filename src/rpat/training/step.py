"""The one training step, per batch: attack + loss, backward, update, guard, weight averaging, loss sums.

The eager trainer calls it per batch, the CUDA-graph path (:mod:`rpat.training.cuda_graph`) records
the same call once and replays it, and ``benchmarks/train_step.py`` times it. The one seam between
the eager and the captured step is the ``update`` (``optimizer.step()``, or the tensor-lr SGD update
of the graph) and the autocast cache flag (no cast cache across a capture).

Every state change is in place and nothing reads a value back to the host, so the step can be
captured: the loss sums, the count of good steps and the non-finite guard's flags stay on the
device until the trainer reads them once per log interval.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from ..models.averaging import WeightAverage
from ..objectives import Objective
from .awp import WeightPerturbation
from .nonfinite import NonFiniteGuard


class TrainStep:
    """``step(x, y, i)``: one training step on ``x`` ``(B, C, H, W)`` in [0, 1], labels ``y`` ``(B,)``.

    Owns what lives across steps: the attack's generator (re-seeded per epoch by
    :meth:`start_epoch`), the non-finite guard, and the loss-term sums (each term × batch size) with
    the number of images of good steps (``nonfinite=skip``), all device tensors updated in place.
    ``update`` defaults to ``optimizer.step``. ``awp`` (optional): the weight perturbation of
    :mod:`rpat.training.awp`, applied after the attack and removed after the update.
    """

    def __init__(self, *, model: nn.Module, step_model: nn.Module, objective: Objective,
                 optimizer: torch.optim.Optimizer, averager: WeightAverage | None, nonfinite: str,
                 device: torch.device, amp: bool = False, channels_last: bool = False,
                 update: Callable[[], None] | None = None, cast_cache: bool = True,
                 awp: WeightPerturbation | None = None):
        self.model, self.step_model, self.objective = model, step_model, objective
        self.awp = awp  #: adversarial weight perturbation (rpat.training.awp), None when off
        #: per-row label smoothing ``(B,)`` of a batch from its labels' row count (data.extra_label_smoothing:
        #: rpat.data.mixed.MixedLoader.row_smoothing); None: the method's own label_smoothing
        self.row_smoothing: Callable[[int], Tensor] | None = None
        self.optimizer, self.averager, self.device = optimizer, averager, device
        self.amp, self.channels_last = amp, channels_last
        self.update = update if update is not None else optimizer.step
        self.cast_cache = cast_cache
        self.generator = torch.Generator(device=device)
        self.guard = NonFiniteGuard(model, optimizer, nonfinite, device)
        self.sums: dict[str, Tensor] = {}
        self.keys: list[str] = []  # the loss terms of the current phase, in the order the step made them
        self.n_good = torch.zeros((), device=device)
        #: the detached loss terms of the last step (device tensors; under a captured graph, its outputs,
        #: rewritten by every replay)
        self.terms: dict[str, Tensor] = {}
        self.epoch = 0

    def start_epoch(self, epoch: int, seed: int) -> None:
        """Reset the sums and the guard in place and re-seed the attack generator for 0-based ``epoch``."""
        self.epoch = int(epoch)
        self.generator.manual_seed(seed)
        for v in self.sums.values():
            v.zero_()
        self.n_good.zero_()
        self.guard.reset()

    def set_lr(self, lr: float) -> None:
        """The learning rate of the next update (what the checkpoint's optimizer state records)."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def prepare(self, x: Tensor) -> Tensor:
        """The batch in the memory format the step runs in (a no-op when it already is)."""
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def __call__(self, x: Tensor, y: Tensor, step: int | Tensor) -> None:
        guard, opt = self.guard, self.optimizer
        x = self.prepare(x)
        guard.snapshot()
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp,
                            cache_enabled=self.cast_cache):  # fp32 master weights
            awp = self.awp if self.awp is not None and self.awp.active(self.epoch) else None
            smoothing = None if self.row_smoothing is None else self.row_smoothing(y.shape[0])
            loss, terms = self.objective.step(  # AWP: weights at w + γ·v between the attack and the loss
                self.step_model, x, y, self.epoch, self.generator,
                after_attack=None if awp is None else (
                    lambda xb, yb, xa: awp.perturb(xb, yb, xa, self.epoch, smoothing=smoothing)),
                smoothing=smoothing)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        ok = guard.observe(step, loss, terms)  # on-device flag, no sync
        self.update()
        if awp is not None:
            awp.restore()  # back to w - (the update), before a skipped step is undone
        guard.restore_if_bad(ok)  # nonfinite=skip: undo a bad step (torch.where, no sync)
        if self.averager is not None:
            self.averager.update(self.model, self.epoch)
        b = y.shape[0]
        for k, v in terms.items():
            if guard.skip:
                v = torch.where(ok, v, torch.zeros_like(v))
            if k in self.sums:
                self.sums[k] += v * b
            else:  # first step of a phase: never inside a capture (the warm-up comes first)
                self.sums[k] = v * b
        if guard.skip:
            self.n_good += ok * b
        self.keys = list(terms)
        self.terms = terms

    def sums_now(self) -> dict[str, Tensor]:
        """This epoch's loss-term sums (each ``term · batch size``), for the current phase's terms."""
        return {k: self.sums[k] for k in self.keys}
