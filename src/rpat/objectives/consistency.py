"""Consistency-AT (Tack et al., 2022): PGD-AT on two augmented views plus a JS consistency term.

The method asks for two views (``views = 2``): the loader yields each batch as
``x = cat([view1, view2])`` ``(2B, C, H, W)`` (two independent crops/flips of the
same images) and ``y = cat([y, y])`` ``(2B,)``. PGD on CE attacks both views.

``L_base = CE(f(x_adv), y) + λ·JS(f(x_adv¹), f(x_adv²))``, the CE averaged over
all 2B adversarial examples (the mean of the two views' CEs), λ = 1, and JS
taken between the softmaxes at temperature T = 0.5 (see ``js_divergence``).

With RPAT each benign view is paired with its own adversarial example; R over the
2B rows is the average of the two views' R (the default ``rpat_pairs``). Both
views go through the model in one batch, as one forward pass.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..attacks.pgd import pgd
from ..attacks.threat import ThreatModel
from .base import BaseMethod, Forwards
from .losses import cross_entropy

#: Floor of the mixture's probabilities inside the log.
_EPS = 1e-8


def js_divergence(logits1: torch.Tensor, logits2: torch.Tensor, temperature: float = 0.5) -> torch.Tensor:
    """Jensen–Shannon divergence of ``softmax(logits/T)`` for ``(B, K)`` logits; 0-dim.

    ``JS = ½·KL(p1 ‖ m) + ½·KL(p2 ‖ m)`` with ``m = (p1 + p2)/2``, each KL summed
    over classes and averaged over the batch. Symmetric; 0 iff p1 = p2.
    """
    p1 = F.softmax(logits1 / temperature, dim=1)
    p2 = F.softmax(logits2 / temperature, dim=1)
    log_m = (0.5 * (p1 + p2)).clamp_min(_EPS).log()

    def kl_to_m(p: torch.Tensor) -> torch.Tensor:
        return (p * (p.clamp_min(_EPS).log() - log_m)).sum(dim=1).mean()

    return 0.5 * (kl_to_m(p1) + kl_to_m(p2))


class ConsistencyAT(BaseMethod):
    """Consistency-AT: weight ``lam`` (paper: 1) on JS at temperature ``temperature`` (0.5)."""

    name = "consistency_at"
    label = "Consistency-AT"
    views = 2

    def __init__(self, threat: ThreatModel, lam: float = 1.0, temperature: float = 0.5,
                 label_smoothing: float = 0.0):
        super().__init__(threat, label_smoothing)
        self.lam = float(lam)
        self.temperature = float(temperature)

    def attack(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator | None
    ) -> torch.Tensor:
        """PGD on CE from a uniform start, on both views ``(2B, C, H, W)`` at once."""
        return pgd(model, x, y, self.threat, start="uniform", generator=generator)

    def loss(
        self, fw: Forwards, x: torch.Tensor, y: torch.Tensor, x_adv: torch.Tensor,
        smoothing: float | torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        adv = fw.logits("adv", x_adv)
        ce = cross_entropy(adv, y, self.smoothing(smoothing))  # smoothing: float or (2B,), one per row
        adv1, adv2 = adv.chunk(2, dim=0)
        js = js_divergence(adv1, adv2, self.temperature)
        return ce + self.lam * js, {"ce_adv": ce.detach(), "js": js.detach()}
