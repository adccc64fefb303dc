"""The RPAT regularizer: Robust Perception along the adversarial perturbation.

With Δ = x_adv − x and the interpolation rate a (the paper's α, default 0.5),

    R(x, Δ) = MSE( h(x + aΔ),  (1 − a)·h(x) + a·h(x + Δ) )

where h is the model's perception (its logits by default; see
``rpat.models.base.PROXIES``) and MSE is the mean over the batch and all
output dimensions. Gradients flow through all three forward passes.

Convention: ``a`` is measured from the benign image, ``x_mid = x + a·Δ``. The
authors' code writes the same point as ``r·x + (1 − r)·x_adv``, i.e. ``a = 1 − r``;
at the default 0.5 both agree.

BatchNorm: R reuses the base loss's train-mode passes (``Forwards``), so PGD-AT + RPAT runs
x_adv, x and x_mid once each per step (3 running-stat updates); the RPAT release runs x_adv
a second time for R (4 updates). The loss and its gradient are identical; only the running
statistics differ (``docs/bn_forwards.md``, ``tests/test_bn_forwards.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InputError
from ..models.base import PROXIES
from .base import Forwards


def check_proxy(proxy: str) -> None:
    """InputError unless ``proxy`` is one of ``rpat.models.base.PROXIES``."""
    if proxy not in PROXIES:
        raise InputError(f"unknown proxy {proxy!r}; valid: {', '.join(PROXIES)}")


def _check(alpha: float, proxy: str) -> None:
    if not 0.0 <= alpha <= 1.0:
        raise InputError(f"rpat alpha must be in [0, 1], got {alpha!r}")
    check_proxy(proxy)


def interpolate(x: torch.Tensor, x_adv: torch.Tensor, alpha: float) -> torch.Tensor:
    """``x + alpha·(x_adv − x)``: the point at rate ``alpha`` from x towards x_adv."""
    return torch.lerp(x, x_adv, alpha)


def perception_mse(h_mid: torch.Tensor, h_clean: torch.Tensor, h_adv: torch.Tensor, alpha: float) -> torch.Tensor:
    """``MSE(h_mid, (1 − alpha)·h_clean + alpha·h_adv)`` as a 0-dim tensor."""
    return F.mse_loss(h_mid, torch.lerp(h_clean, h_adv, alpha))


def robust_perception_loss(
    model: nn.Module,
    x: torch.Tensor,
    x_adv: torch.Tensor,
    alpha: float = 0.5,
    proxy: str = "logits",
) -> torch.Tensor:
    """The RPAT regularizer R(x, Δ) = MSE(h(x + aΔ), (1 − a)·h(x) + a·h(x + Δ)) (Wang and Liu, ICCV 2025),
    differentiable in the model's parameters.

    Args:
        model: an ``rpat`` model (inputs in [0, 1]). It is run in train mode
            (BatchNorm uses batch statistics, as in training); its previous mode
            is restored afterwards.
        x: benign images ``(B, C, H, W)`` in [0, 1].
        x_adv: adversarial images, same shape (usually from the training attack).
        alpha: interpolation rate a in [0, 1]; the middle point is ``x + a·(x_adv − x)``.
        proxy: ``"logits"``, ``"second_to_last"`` or ``"third_to_last"``.

    Returns:
        A 0-dim tensor: the mean squared error over batch and output dimensions.
        Three forward passes (benign, interpolated, adversarial), each with grad.
    """
    _check(alpha, proxy)
    was_training = model.training
    model.train()
    try:
        fw = Forwards(model, proxy)
        h_clean = fw.proxy("clean", x)
        h_mid = fw.proxy("mid", interpolate(x, x_adv, alpha))
        h_adv = fw.proxy("adv", x_adv)
        return perception_mse(h_mid, h_clean, h_adv, alpha)
    finally:
        model.train(was_training)


@dataclass(frozen=True)
class RPATTerm:
    """RPAT as a composable term: ``λ · R(x, Δ)`` added to any base objective.

    lam: weight λ >= 0 (paper: 1). alpha: interpolation rate a in [0, 1] (0.5).
    proxy: perception proxy. start_epoch: first (0-based) epoch where the term is on.
    ``label``: the term's name in run labels (``registry.method_label``).
    """

    label: ClassVar[str] = "RPAT"

    lam: float = 1.0
    alpha: float = 0.5
    proxy: str = "logits"
    start_epoch: int = 0

    def __post_init__(self) -> None:
        _check(self.alpha, self.proxy)
        if not self.lam >= 0:
            raise InputError(f"rpat lambda must be >= 0, got {self.lam!r}")
        if self.start_epoch < 0:
            raise InputError(f"rpat start_epoch must be >= 0, got {self.start_epoch!r}")

    def active(self, epoch: int) -> bool:
        return epoch >= self.start_epoch and self.lam > 0

    def __call__(
        self, fw: Forwards, x: torch.Tensor, x_adv: torch.Tensor, clean_key: str = "clean", adv_key: str = "adv"
    ) -> torch.Tensor:
        """R for one benign/adversarial pair; reuses the passes the base loss already made.

        ``clean_key``/``adv_key`` name the pair's ``Forwards`` entries; the middle
        point's key is ``"mid:" + adv_key`` (``"mid"`` for the default pair).
        """
        h_clean = fw.proxy(clean_key, x)
        h_adv = fw.proxy(adv_key, x_adv)
        h_mid = fw.proxy("mid" if adv_key == "adv" else f"mid:{adv_key}", interpolate(x, x_adv, self.alpha))
        return perception_mse(h_mid, h_clean, h_adv, self.alpha)
