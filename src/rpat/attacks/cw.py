"""The Carlini-Wagner margin loss and PGD on it (CW∞ / CW2, as robustness papers report "CW-20").

The margin of an example with logits ``z`` ``(K,)`` and label ``y`` is
``max_{j≠y} z_j − z_y``: negative while the model is right, positive once a
wrong class wins. CW-PGD *maximizes* it with exactly rpat's PGD (same ε-ball,
step, projection to the ball and clip to [0, 1], random start), only the loss
differs from the cross-entropy. ε and step sizes in [0, 1] pixel units.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..errors import InputError
from .pgd import pgd
from .threat import ThreatModel


def cw_margin(logits: Tensor, y: Tensor) -> Tensor:
    """Per-example margin ``max_{j≠y} z_j − z_y`` of ``logits`` ``(B, K)`` and labels ``(B,)`` -> ``(B,)``.

    Logit units; > 0 exactly when some wrong class has a larger logit than the true one.
    """
    if logits.dim() != 2 or logits.shape[1] < 2:
        raise InputError(f"the CW margin needs logits (B, K) with K >= 2, got shape {tuple(logits.shape)}")
    true = logits.gather(1, y.view(-1, 1)).squeeze(1)
    others = logits.masked_fill(torch.nn.functional.one_hot(y, logits.shape[1]).bool(), float("-inf"))
    return others.max(dim=1).values - true


def cw_margin_sum(logits: Tensor, y: Tensor) -> Tensor:
    """The margin summed over the batch: CW-PGD's objective (a sum, like PGD's cross-entropy)."""
    return cw_margin(logits, y).sum()


def cw_pgd(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    threat: ThreatModel,
    *,
    start: str = "uniform",
    generator: torch.Generator | None = None,
) -> Tensor:
    """PGD maximizing the CW margin: ``(B, C, H, W)`` images in [0, 1] -> adversarial images, same shape.

    ``threat`` as for :func:`rpat.attacks.pgd.pgd` (CW-20: the PGD-20 threat); ``start`` and
    ``generator`` as there (``"none"`` makes it deterministic).
    """
    return pgd(model, x, y, threat, loss_fn=cw_margin_sum, start=start, generator=generator)
