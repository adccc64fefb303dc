"""PGD-AT (Madry et al.): cross-entropy on PGD adversarial examples (label-smoothed with
``method.label_smoothing``, ``losses.py``)."""

from __future__ import annotations

import torch
from torch import nn

from ..attacks.pgd import pgd
from .base import BaseMethod, Forwards
from .losses import cross_entropy


class PGDAT(BaseMethod):
    """``L_base = CE(f(x_adv), y)``; x_adv by PGD on CE from a uniform random start."""

    name = "pgd_at"
    label = "PGD-AT"

    def attack(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator | None
    ) -> torch.Tensor:
        return pgd(model, x, y, self.threat, start="uniform", generator=generator)

    def loss(
        self, fw: Forwards, x: torch.Tensor, y: torch.Tensor, x_adv: torch.Tensor,
        smoothing: float | torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        ce = cross_entropy(fw.logits("adv", x_adv), y, self.smoothing(smoothing))
        return ce, {"ce_adv": ce.detach()}
