"""MART (Wang et al., 2020): boosted CE on x_adv plus a misclassification-aware KL term.

``L_base = BCE(f(x_adv), y) + β·mean_i[ KL(p(x_i) ‖ p(x_adv_i)) · (1 − p_y(x_i)) ]``, β = 6,
with ``BCE = CE(f(x_adv), y) − mean_i log(1 − max_{k≠y} p_k(x_adv_i))``; p = softmax.
Gradients flow through both p(x) and p(x_adv). x_adv: PGD on CE from
``x + 0.001·N(0, I)``. f(x) (train mode) is shared with RPAT's h(x).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..attacks.pgd import pgd
from ..attacks.threat import ThreatModel
from .base import BaseMethod, Forwards
from .trades import kl_div

#: Keeps ``log(1 − max_{k≠y} p_k)`` finite when the wrong class takes all the mass.
_EPS = 1e-12


def boosted_ce(logits_adv: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """MART's BCE: ``CE(logits, y) − mean_i log(1 − max_{k≠y} p_k)`` for ``(B, K)`` logits; 0-dim."""
    probs = F.softmax(logits_adv, dim=1)
    wrong = probs.masked_fill(F.one_hot(y, probs.shape[1]).bool(), float("-inf")).amax(dim=1)
    return F.cross_entropy(logits_adv, y) - torch.log((1.0 - wrong).clamp_min(_EPS)).mean()


class MART(BaseMethod):
    """MART with weight ``beta`` (paper: 6) on the weighted KL term."""

    name = "mart"

    def __init__(self, threat: ThreatModel, beta: float = 6.0):
        super().__init__(threat)
        self.beta = float(beta)

    def attack(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator | None
    ) -> torch.Tensor:
        return pgd(model, x, y, self.threat, start="normal", generator=generator)

    def loss(
        self, fw: Forwards, x: torch.Tensor, y: torch.Tensor, x_adv: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        clean = fw.logits("clean", x)
        adv = fw.logits("adv", x_adv)
        bce = boosted_ce(adv, y)
        p_true = F.softmax(clean, dim=1).gather(1, y[:, None]).squeeze(1)  # (B,)
        kl = (kl_div(clean, adv, reduction="none") * (1.0 - p_true)).mean()
        return bce + self.beta * kl, {"bce_adv": bce.detach(), "kl_weighted": kl.detach()}
