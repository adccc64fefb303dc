"""MART (Wang et al., 2020): boosted CE on x_adv plus a misclassification-aware KL term.

``L_base = BCE(f(x_adv), y) + β·mean_i[ KL(p(x_i) ‖ p(x_adv_i)) · w_i ]``, β = 6, p = softmax.
Gradients flow through both p(x) and p(x_adv). x_adv: PGD on CE from
``x + 0.001·N(0, I)``. f(x) (train mode) is shared with RPAT's h(x).

Two formulas (``method.mart_exact``):

- **official** (default, ``mart_exact=false``), the constants of the authors' released code:
  ``BCE = CE(f(x_adv), y) − mean_i log(1.0001 − max_{k≠y} p_k(x_adv_i) + 1e-12)``,
  ``w_i = 1.0000001 − p_y(x_i)`` and ``KL(p ‖ q) = Σ_k p_k·(log p_k − log(q_k + 1e-12))``.
- **exact** (``mart_exact=true``), the paper's formula:
  ``BCE = CE − mean_i log(1 − max_{k≠y} p_k)`` (the argument clamped at 1e-12),
  ``w_i = 1 − p_y(x_i)`` and the KL from log-softmaxes.

The two agree to ~1e-4 nats while ``max_{k≠y} p_k`` stays well below 1, but on a confident
wrong prediction (``max_{k≠y} p_k → 1``) the official margin term saturates at
``−log(1e-4) ≈ 9.2`` nats, where the exact one grows to ``−log(1e-12) ≈ 27.6``.

BatchNorm: rpat forwards x and x_adv once each per step (two running-stat updates); so does
the official MART code. Losses and gradients do not depend on this.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..attacks.pgd import pgd
from ..attacks.threat import ThreatModel
from .base import BaseMethod, Forwards
from .losses import cross_entropy, require_hard
from .trades import kl_div

#: exact formula: keeps ``log(1 − max_{k≠y} p_k)`` finite when the wrong class takes all the mass.
_EPS = 1e-12
#: the official code's constants: ``log(1.0001 − p + 1e-12)``, weight ``1.0000001 − p_true``,
#: KL with ``log(q + 1e-12)``
OFFICIAL_MARGIN = 1.0001
OFFICIAL_WEIGHT = 1.0000001
OFFICIAL_LOG_EPS = 1e-12


def boosted_ce(logits_adv: torch.Tensor, y: torch.Tensor, exact: bool = False,
               smoothing: float | torch.Tensor = 0.0) -> torch.Tensor:
    """MART's BCE for ``(B, K)`` logits and ``(B,)`` labels; 0-dim.

    ``CE(logits, y) − mean_i log(1.0001 − max_{k≠y} p_k + 1e-12)`` (official code), or with
    ``exact`` ``CE − mean_i log(max(1 − max_{k≠y} p_k, 1e-12))``. ``smoothing`` (a float or a
    per-example ``(B,)`` tensor) label-smooths the CE part only (``losses.cross_entropy``).
    """
    probs = F.softmax(logits_adv, dim=1)
    wrong = probs.masked_fill(F.one_hot(y, probs.shape[1]).bool(), float("-inf")).amax(dim=1)
    if exact:
        margin = torch.log((1.0 - wrong).clamp_min(_EPS))
    else:
        margin = torch.log(OFFICIAL_MARGIN - wrong + OFFICIAL_LOG_EPS)
    return cross_entropy(logits_adv, y, smoothing) - margin.mean()


def _kl_official(logits_p: torch.Tensor, logits_q: torch.Tensor) -> torch.Tensor:
    """Per-example ``Σ_k p_k·(log p_k − log(q_k + 1e-12))`` ``(B,)``, as the official code computes it."""
    logp = F.log_softmax(logits_p, dim=1)
    q = F.softmax(logits_q, dim=1)
    return (logp.exp() * (logp - torch.log(q + OFFICIAL_LOG_EPS))).sum(dim=1)


class MART(BaseMethod):
    """MART with weight ``beta`` (paper: 6) on the weighted KL term; ``exact``: the paper's formula
    instead of the official code's constants (see the module docstring)."""

    name = "mart"
    label = "MART"

    def __init__(self, threat: ThreatModel, beta: float = 6.0, exact: bool = False, label_smoothing: float = 0.0):
        super().__init__(threat, label_smoothing)
        self.beta = float(beta)
        self.exact = bool(exact)

    def attack(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator | None
    ) -> torch.Tensor:
        return pgd(model, x, y, self.threat, start="normal", generator=generator)

    def loss(
        self, fw: Forwards, x: torch.Tensor, y: torch.Tensor, x_adv: torch.Tensor,
        smoothing: float | torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        require_hard(y, "MART")  # its margin and weight need the true class
        clean = fw.logits("clean", x)
        adv = fw.logits("adv", x_adv)
        bce = boosted_ce(adv, y, self.exact, self.smoothing(smoothing))
        p_true = F.softmax(clean, dim=1).gather(1, y[:, None]).squeeze(1)  # (B,)
        if self.exact:
            per = kl_div(clean, adv, reduction="none") * (1.0 - p_true)
        else:
            per = _kl_official(clean, adv) * (OFFICIAL_WEIGHT - p_true)
        kl = per.mean()
        return bce + self.beta * kl, {"bce_adv": bce.detach(), "kl_weighted": kl.detach()}
