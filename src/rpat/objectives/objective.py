"""The composer: a base method (``base.py``) + the RPAT term (``rpat.py``) + the teacher term (``rebat.py``).

``Objective.loss`` is the one place where the terms are added to the base loss:

    L = L_base  [+ λ·R  when RPAT is on]  [+ β_e·KL(teacher ‖ student)  when the teacher term is on]

Everything epoch-dependent in that sum (is RPAT on, is the teacher term on, β_e) is
decided by ``rpat_on`` / ``teacher_on`` / ``teacher_beta``; ``Objective.phase`` returns
exactly those, so a key built from ``phase`` (e.g. the CUDA-graph re-capture key) cannot
disagree with what ``loss`` does at that epoch.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from .base import BaseMethod, Forwards
from .rebat import TeacherTerm
from .rpat import RPATTerm


class Objective:
    """A base method plus, optionally, the RPAT term: ``L = L_base + λ·R``.

    ``teacher`` (optional) adds ReBAT's BoAT / the RPAT++ term ``β_e·KL(teacher ‖ student)``
    towards the weight-averaged model (``rebat.py``); the trainer binds that model to it.
    """

    def __init__(self, method: BaseMethod, rpat: RPATTerm | None = None, teacher: TeacherTerm | None = None):
        self.method = method
        self.rpat = rpat
        self.teacher = teacher

    @property
    def name(self) -> str:
        return (self.method.name + ("+rpat" if self.rpat is not None else "")
                + (f"+{self.teacher.name}" if self.teacher is not None else ""))

    # ---- the epoch-dependent choices (used by both ``phase`` and ``loss``) ----------------
    def rpat_on(self, epoch: int) -> bool:
        """Whether ``loss`` adds ``λ·R`` at 0-based ``epoch``."""
        return self.rpat is not None and bool(self.rpat.active(epoch))

    def teacher_on(self, epoch: int) -> bool:
        """Whether ``loss`` adds the teacher term at 0-based ``epoch``."""
        return self.teacher is not None and bool(self.teacher.active(epoch))

    def teacher_beta(self, epoch: int) -> float:
        """The β ``loss`` multiplies the teacher KL by at ``epoch``; 0.0 when the term is off."""
        return float(self.teacher.weight(epoch)) if self.teacher_on(epoch) else 0.0

    def phase(self, epoch: int) -> tuple[bool, bool, float]:
        """Everything epoch-dependent this objective does, as a hashable key.

        ``(rpat on at epoch, teacher on at epoch, teacher β at epoch (0.0 when off))``;
        two epochs with equal keys compute the same loss function.
        """
        return (self.rpat_on(epoch), self.teacher_on(epoch), self.teacher_beta(epoch))

    # ---- the step ----------------------------------------------------------------------
    def step(
        self,
        model: nn.Module,
        x: torch.Tensor,
        y: torch.Tensor,
        epoch: int,
        generator: torch.Generator | None = None,
        after_attack: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], None] | None = None,
        smoothing: float | torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Attack and loss for one batch; the model must be in train mode.

        ``after_attack(x, y, x_adv)``, when given, runs between the two (AWP perturbs the weights
        there, ``rpat.training.awp``). ``smoothing``: label smoothing of the base loss's cross-entropy
        terms, a float or a per-example ``(B,)`` tensor (None: ``method.label_smoothing``; ``losses.py``).
        Returns the total loss (0-dim, with grad) and the detached loss terms.
        """
        x_adv = self.attack(model, x, y, generator)
        if after_attack is not None:
            after_attack(x, y, x_adv)
        return self.loss(model, x, y, x_adv, epoch, smoothing=smoothing)

    def attack(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
               generator: torch.Generator | None = None) -> torch.Tensor:
        """The method's training adversarial examples ``(B, C, H, W)`` in [0, 1] (input gradients only)."""
        return self.method.attack(model, x, y, generator)

    def loss(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, x_adv: torch.Tensor, epoch: int,
        smoothing: float | torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        use_rpat, use_teacher, beta = self.phase(epoch)
        fw = Forwards(model, self.rpat.proxy if use_rpat else "logits")
        total, terms = self.method.loss(fw, x, y, x_adv, smoothing=smoothing)
        if use_rpat:
            pairs = self.method.rpat_pairs(x, x_adv)
            r = sum(self.rpat(fw, xb, xa, kb, ka) for kb, xb, ka, xa in pairs) / len(pairs)
            total = total + self.rpat.lam * r
            terms["rpat"] = r.detach()
        if use_teacher:
            kl = self.teacher(fw, x, x_adv)
            total = total + beta * kl
            terms[self.teacher.name] = kl.detach()
        terms["loss"] = total.detach()
        return total, terms
