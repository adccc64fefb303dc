"""The objective interface shared by every training method.

A training step is: the method's attack makes ``x_adv`` (model in eval mode,
input gradients only), then the method's base loss is computed in train mode,
and, when RPAT is on, ``λ·R`` is added in one place (``Objective.loss``).
Forward passes go through ``Forwards``, which runs each distinct input once per
step, so the base loss and the RPAT term share e.g. ``f(x_adv)``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from ..attacks.threat import ThreatModel

if TYPE_CHECKING:
    from .rebat import TeacherTerm
    from .rpat import RPATTerm


class Forwards:
    """Memoizes the model's forward passes within one training step.

    ``proxy`` names the perception proxy the step needs besides the logits;
    when it is not ``"logits"`` each input is run once through
    ``forward_proxies`` (logits come from the same pass).
    """

    def __init__(self, model: nn.Module, proxy: str = "logits"):
        self.model = model
        self.proxy_name = proxy
        self._out: dict[str, dict[str, torch.Tensor]] = {}

    def __call__(self, key: str, x: torch.Tensor) -> dict[str, torch.Tensor]:
        out = self._out.get(key)
        if out is None:
            if self.proxy_name == "logits":
                out = {"logits": self.model(x)}
            else:
                out = self.model.forward_proxies(x)
            self._out[key] = out
        return out

    def logits(self, key: str, x: torch.Tensor) -> torch.Tensor:
        return self(key, x)["logits"]

    def proxy(self, key: str, x: torch.Tensor) -> torch.Tensor:
        return self(key, x)[self.proxy_name]


class BaseMethod:
    """A base adversarial-training method: its attack and its loss.

    Subclasses set ``name`` and implement ``attack`` and ``loss``. A method that
    trains on several augmented views of each image sets ``views`` (e.g. 2): the
    loader then yields ``x = cat([view_1, ..., view_V])`` ``(V·B, C, H, W)`` and
    ``y = cat([y] * V)``, and the method splits them itself (``x.chunk(V)``).
    ``rpat_pairs`` says which benign/adversarial pairs RPAT regularizes.
    """

    name: str = ""
    views: int = 1

    def rpat_pairs(self, x: torch.Tensor, x_adv: torch.Tensor) -> list[tuple[str, torch.Tensor, str, torch.Tensor]]:
        """``[(benign_key, x_b, adversarial_key, x_a), ...]``: the pairs R is averaged over.

        Keys are ``Forwards`` keys, so passes the base loss made are reused. Default:
        the whole batch, benign ``"clean"`` with its own adversarial example ``"adv"``
        (with several views stacked in the batch, R over all rows is the views' mean).
        """
        return [("clean", x, "adv", x_adv)]

    def __init__(self, threat: ThreatModel):
        self.threat = threat

    def attack(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator | None
    ) -> torch.Tensor:
        """Training adversarial examples ``(B, C, H, W)`` in [0, 1]."""
        raise NotImplementedError

    def loss(
        self, fw: Forwards, x: torch.Tensor, y: torch.Tensor, x_adv: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``(L_base, terms)``; terms are 0-dim tensors for logging (not synced)."""
        raise NotImplementedError


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

    def step(
        self,
        model: nn.Module,
        x: torch.Tensor,
        y: torch.Tensor,
        epoch: int,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Attack and loss for one batch; the model must be in train mode.

        Returns the total loss (0-dim, with grad) and the detached loss terms.
        """
        x_adv = self.method.attack(model, x, y, generator)
        return self.loss(model, x, y, x_adv, epoch)

    def loss(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, x_adv: torch.Tensor, epoch: int
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        use_rpat = self.rpat is not None and self.rpat.active(epoch)
        fw = Forwards(model, self.rpat.proxy if use_rpat else "logits")
        total, terms = self.method.loss(fw, x, y, x_adv)
        if use_rpat:
            pairs = self.method.rpat_pairs(x, x_adv)
            r = sum(self.rpat(fw, xb, xa, kb, ka) for kb, xb, ka, xa in pairs) / len(pairs)
            total = total + self.rpat.lam * r
            terms["rpat"] = r.detach()
        if self.teacher is not None and self.teacher.active(epoch):
            kl = self.teacher(fw, x, x_adv)
            total = total + self.teacher.weight(epoch) * kl
            terms[self.teacher.name] = kl.detach()
        terms["loss"] = total.detach()
        return total, terms
