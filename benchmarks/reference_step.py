"""A training step built the way the authors' release builds it (PyTorch 1.11, fp32), for timing.

This is the baseline the benchmark compares ``rpat``'s step against. It computes
the same losses (PGD-AT, optionally + RPAT) from the same inputs and attack
start, but with the release's cost structure:

- the PGD attack calls ``loss.backward()`` on a ``requires_grad`` input, so each
  of its steps also computes (and accumulates into ``.grad``) the gradients of
  every parameter, which are thrown away when the optimizer zeroes them;
- the training forward passes run separately, all in fp32: one for
  ``CE(f(x_adv), y)`` and three more for RPAT's ``h(x)``, ``h(x + aΔ)`` and
  ``h(x_adv)`` (so ``f(x_adv)`` runs twice);
- every loss term is read back with ``.item()`` each batch (a host sync) for logging.

Only the cost structure is the release's: the arithmetic of each PGD iterate
(``x + clamp(x_adv + step·sign(g) − x, −ε, ε)``, clipped to [0, 1]) is the one
``rpat.attacks.pgd`` uses, so that both steps give the same numbers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from rpat.attacks.pgd import random_start
from rpat.attacks.threat import ThreatModel
from rpat.objectives import RPATTerm


def _perception(model: nn.Module, x: torch.Tensor, proxy: str) -> torch.Tensor:
    """h(x): the logits ``(B, K)`` or a proxy embedding of the model (one forward pass)."""
    if proxy == "logits":
        return model(x)
    return model.forward_proxies(x)[proxy]


def reference_attack(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, threat: ThreatModel, x_start: torch.Tensor
) -> torch.Tensor:
    """ℓ∞/ℓ2 PGD from ``x_start`` with ``loss.backward()``: parameter ``.grad`` accumulate.

    ``x``, ``x_start``: ``(B, C, H, W)`` in [0, 1]; ε and step in the same pixel
    units. Runs the model in eval mode and puts it back in train mode (as the
    release's training loop does). Returns the detached ``x_adv``.
    """
    model.eval()
    x_adv = x_start.detach().clone()
    for _ in range(threat.steps):
        x_adv.requires_grad_(True)
        loss = F.cross_entropy(model(x_adv), y, reduction="sum")
        loss.backward()  # parameter gradients too, as a library attack built on backward() does
        grad = x_adv.grad.detach()
        if threat.norm == "linf":
            step = grad.sign()
        else:
            norms = grad.flatten(1).norm(p=2, dim=1).clamp_min(1e-12).view(-1, *([1] * (x.dim() - 1)))
            step = grad / norms
        delta = x_adv.detach() + threat.step_size * step - x
        if threat.norm == "linf":
            delta = delta.clamp(-threat.eps, threat.eps)
        else:
            n = delta.flatten(1).norm(p=2, dim=1).view(-1, *([1] * (x.dim() - 1)))
            delta = delta * (threat.eps / n.clamp_min(1e-12)).clamp(max=1.0)
        x_adv = (x + delta).clamp(0.0, 1.0)
    model.train()
    return x_adv.detach()


def reference_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    threat: ThreatModel,
    rpat: RPATTerm | None,
    generator: torch.Generator | None = None,
) -> dict[str, float]:
    """One release-style PGD-AT (+ RPAT) update; returns the loss terms as Python floats.

    Args:
        model: an ``rpat`` model in train mode.
        optimizer: its optimizer; ``zero_grad`` runs after the attack (grads kept as zeros).
        x: ``(B, C, H, W)`` images in [0, 1]; y: ``(B,)`` labels.
        threat: the training threat model (ε, step in [0, 1] pixel units).
        rpat: the RPAT term, or None for plain PGD-AT.
        generator: draws the uniform attack start exactly as ``rpat``'s PGD-AT does,
            so the same generator state gives the same start as ``Objective.step``.

    Returns:
        ``{"ce_adv", "rpat" (if on), "loss"}``, read back with ``.item()``.
    """
    x_start = random_start(x, threat, "uniform", generator)
    x_adv = reference_attack(model, x, y, threat, x_start)
    optimizer.zero_grad(set_to_none=False)  # PyTorch 1.11's default: zero the accumulated grads
    ce = F.cross_entropy(model(x_adv), y)
    loss = ce
    out: dict[str, torch.Tensor] = {"ce_adv": ce}
    if rpat is not None:
        h_clean = _perception(model, x, rpat.proxy)
        h_mid = _perception(model, torch.lerp(x, x_adv, rpat.alpha), rpat.proxy)
        h_adv = _perception(model, x_adv, rpat.proxy)  # f(x_adv) again, separately
        r = F.mse_loss(h_mid, torch.lerp(h_clean, h_adv, rpat.alpha))
        loss = ce + rpat.lam * r
        out["rpat"] = r
    out["loss"] = loss
    loss.backward()
    optimizer.step()
    return {k: v.item() for k, v in out.items()}  # per-batch host syncs for logging
