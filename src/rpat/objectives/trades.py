"""TRADES (Zhang et al., 2019): clean cross-entropy plus β·KL(p(x) ‖ p(x_adv)).

``L_base = CE(f(x), y) + β·KL(p(x) ‖ p(x_adv))`` with p = softmax, the KL summed
over classes and averaged over the batch, β = 6. The training attack maximizes
``KL(p(x) ‖ p(x'))`` (p(x) from the eval-mode model, fixed during the attack),
started at ``x + 0.001·N(0, I)``. The loss's f(x) runs in train mode and is the
same forward pass RPAT uses as h(x) (``Forwards`` key ``"clean"``). ``method.label_smoothing``
smooths the CE only (``losses.py``), never the KL.

BatchNorm: rpat runs x and x_adv once each in train mode per step (2 running-stat updates);
the official TRADES code runs x a second time for the KL target (3 updates). The loss and
its gradient are identical (a train-mode BatchNorm uses the batch's own statistics); only
the running statistics, used by the eval-mode attack and by evaluation, differ
(``docs/bn_forwards.md``, ``tests/test_bn_forwards.py``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..attacks.pgd import eval_mode, pgd
from ..attacks.threat import ThreatModel
from .base import BaseMethod, Forwards
from .losses import cross_entropy


def kl_div(logits_p: torch.Tensor, logits_q: torch.Tensor, reduction: str = "batchmean") -> torch.Tensor:
    """``KL(softmax(logits_p) ‖ softmax(logits_q))`` for ``(B, K)`` logits.

    ``reduction``: ``"batchmean"`` (sum over classes, mean over the batch; 0-dim),
    ``"sum"`` (0-dim) or ``"none"`` (per example, ``(B,)``).
    """
    logp = F.log_softmax(logits_p, dim=1)
    per = (logp.exp() * (logp - F.log_softmax(logits_q, dim=1))).sum(dim=1)
    if reduction == "batchmean":
        return per.mean()
    if reduction == "sum":
        return per.sum()
    return per


class TRADES(BaseMethod):
    """TRADES with weight ``beta`` (paper: 6) on the KL term."""

    name = "trades"
    label = "TRADES"

    def __init__(self, threat: ThreatModel, beta: float = 6.0, label_smoothing: float = 0.0):
        super().__init__(threat, label_smoothing)
        self.beta = float(beta)

    def attack(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator | None
    ) -> torch.Tensor:
        """x_adv maximizing ``Σ_i KL(p(x_i) ‖ p(x'_i))`` (eval mode) from ``x + 0.001·N(0, I)``."""
        with eval_mode(model), torch.no_grad():
            clean_logits = model(x).detach()  # (B, K), the fixed target of the attack
        return pgd(model, x, clean_logits, self.threat, start="normal", generator=generator,
                   loss_fn=lambda logits_adv, target: kl_div(target, logits_adv, reduction="sum"))

    def loss(
        self, fw: Forwards, x: torch.Tensor, y: torch.Tensor, x_adv: torch.Tensor,
        smoothing: float | torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        clean = fw.logits("clean", x)
        ce = cross_entropy(clean, y, self.smoothing(smoothing))  # label smoothing on the CE only, not the KL
        kl = kl_div(clean, fw.logits("adv", x_adv))
        return ce + self.beta * kl, {"ce_clean": ce.detach(), "kl": kl.detach()}
