"""Projected gradient descent (PGD, Madry et al.) in the ℓ∞ and ℓ2 balls.

Conventions:
- images ``x`` are ``(B, C, H, W)`` floats in [0, 1] (any ``(B, ...)`` shape
  works); ε and the step size are in the same pixel units (``8/255``...);
- the attack *maximizes* ``loss_fn(model(x_adv), y)``; only the input gets
  gradients (``torch.autograd.grad``), parameters' ``.grad`` are never touched;
- the model runs in eval mode (BatchNorm statistics frozen and not updated)
  during the attack; each submodule's train/eval mode is restored afterwards;
- every iterate, the random start included, is projected to the ε-ball around
  ``x`` and clipped to [0, 1].
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import InputError
from .threat import ThreatModel

LossFn = Callable[[Tensor, Tensor], Tensor]

STARTS: tuple[str, ...] = ("uniform", "normal", "none")

#: Standard deviation of the ``"normal"`` start (TRADES / MART): ``x + 0.001·N(0, I)``.
NORMAL_START_STD = 1e-3

#: Guards the division by a per-example ℓ2 norm (gradient or perturbation).
_TINY = 1e-12


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put every submodule of ``model`` in eval mode; restore each one's mode on exit.

    The mode of *each* submodule is recorded (a model may be in train mode with
    some layers frozen in eval mode), and restored even if the body raises.
    """
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, training in modes:
            m.training = training


def cross_entropy_sum(logits: Tensor, y: Tensor) -> Tensor:
    """Cross-entropy summed over the batch: the default PGD objective.

    A sum, not a mean, so a sign step (ℓ∞) or a per-example normalized step
    (ℓ2) does not depend on the batch size, and tiny gradients do not vanish.
    """
    return F.cross_entropy(logits, y, reduction="sum")


def _per_example(v: Tensor, like: Tensor) -> Tensor:
    """Reshape a ``(B,)`` vector to ``(B, 1, 1, ...)`` to broadcast against ``like``."""
    return v.view(-1, *([1] * (like.dim() - 1)))


def _l2_norms(v: Tensor) -> Tensor:
    """Per-example ℓ2 norms of ``v`` ``(B, ...)`` as ``(B, 1, ..., 1)``."""
    return _per_example(v.flatten(1).norm(p=2, dim=1), v)


def project(x_adv: Tensor, x: Tensor, threat: ThreatModel) -> Tensor:
    """Project ``x_adv`` to the threat's ε-ball around ``x``, then clip to [0, 1].

    Both ``(B, ...)``; ``x`` must be in [0, 1]. Clipping after the projection
    keeps the point in the ball, since it moves every pixel towards [0, 1] ∋ x.
    """
    delta = x_adv - x
    if threat.norm == "linf":
        delta = delta.clamp(-threat.eps, threat.eps)
    else:
        norms = _l2_norms(delta)
        delta = delta * (threat.eps / norms.clamp_min(_TINY)).clamp(max=1.0)
    return (x + delta).clamp(0.0, 1.0)


def _rand(
    shape: torch.Size, like: Tensor, generator: torch.Generator | None, normal: bool
) -> Tensor:
    """``U(0, 1)`` or ``N(0, 1)`` noise of ``shape`` and ``like``'s dtype.

    Drawn on the generator's device (``like``'s without one), moved to ``like``'s.
    """
    device = generator.device if generator is not None else like.device
    fn = torch.randn if normal else torch.rand
    out = fn(shape, generator=generator, device=device, dtype=like.dtype)
    return out.to(like.device)


def random_start(
    x: Tensor, threat: ThreatModel, start: str = "uniform", generator: torch.Generator | None = None
) -> Tensor:
    """The attack's starting point for ``x`` ``(B, ...)`` in [0, 1]; same shape, in ball and [0, 1].

    - ``"uniform"``: ℓ∞: ``x + U(-ε, ε)`` per pixel; ℓ2: ``x + δ`` with ``δ``
      uniformly distributed in the ℓ2 ball of radius ε (a uniform direction,
      radius ``ε·u^(1/d)`` with ``u ~ U(0, 1)`` and ``d`` the pixels per example,
      so in high dimension the radius is close to ε);
    - ``"normal"``: ``x + 0.001·N(0, I)`` (the TRADES / MART start);
    - ``"none"``: ``x`` itself.

    The result is projected to the ε-ball (a no-op for "uniform", and for
    "normal" unless ε is below ~0.005) and clipped to [0, 1].
    """
    if start not in STARTS:
        raise InputError(f"unknown PGD start {start!r}; valid: {', '.join(STARTS)}")
    if start == "none":
        return x.clamp(0.0, 1.0)
    if start == "normal":
        x0 = x + NORMAL_START_STD * _rand(x.shape, x, generator, normal=True)
    elif threat.norm == "linf":
        x0 = x + threat.eps * (2.0 * _rand(x.shape, x, generator, normal=False) - 1.0)
    else:
        direction = _rand(x.shape, x, generator, normal=True)
        direction = direction / _l2_norms(direction).clamp_min(_TINY)
        d = x[0].numel() if x.shape[0] else 1
        u = _rand(torch.Size([x.shape[0]]), x, generator, normal=False)
        radius = threat.eps * u.pow(1.0 / d)
        x0 = x + _per_example(radius, x) * direction
    return project(x0, x, threat)


def pgd(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    threat: ThreatModel,
    *,
    loss_fn: LossFn | None = None,
    start: str = "uniform",
    generator: torch.Generator | None = None,
) -> Tensor:
    """Run PGD on ``model`` and return the adversarial images (detached).

    Args:
        model: maps ``(B, C, H, W)`` images in [0, 1] to logits ``(B, K)``. It
            runs in eval mode during the attack; every submodule's mode is
            restored afterwards (also on an exception). Parameters' ``.grad``
            are left exactly as they were.
        x: ``(B, C, H, W)`` clean images, floats in [0, 1].
        y: ``(B,)`` labels (or whatever ``loss_fn`` takes as its 2nd argument).
        threat: norm (``"linf"``/``"l2"``), ε, step size (pixel units of [0, 1]
            images) and the number of steps; ``steps=0`` returns the start.
        loss_fn: ``loss_fn(logits_adv, y) -> scalar`` to *maximize*; default the
            cross-entropy summed over the batch. TRADES-style objectives pass a
            closure (e.g. the KL divergence to the clean prediction).
        start: ``"uniform"``, ``"normal"`` or ``"none"`` (see ``random_start``).
        generator: optional generator for the random start (same state, same
            ``x_adv``); it may live on another device than ``x``.

    Each step is ``x_adv += step·sign(g)`` (ℓ∞) or ``x_adv += step·g/‖g‖₂``
    (ℓ2, per example), then the projection to the ε-ball and the clip to
    [0, 1]. The loop makes no host synchronization.

    Returns:
        ``(B, C, H, W)`` tensor, same dtype and device as ``x``, within the
        ε-ball around ``x`` and in [0, 1], with ``requires_grad=False``.
    """
    if not isinstance(threat, ThreatModel):
        raise InputError(f"threat must be a ThreatModel, got {type(threat).__name__}")
    if not torch.is_floating_point(x):
        raise InputError(f"pgd needs float images in [0, 1], got dtype {x.dtype}")
    if x.dim() < 2:
        raise InputError(f"pgd needs a batch of images (B, C, H, W), got shape {tuple(x.shape)}")
    if len(y) != x.shape[0]:
        raise InputError(f"x has {x.shape[0]} examples but y has {len(y)}")
    if loss_fn is None:
        loss_fn = cross_entropy_sum
    x = x.detach()
    y = y.detach() if isinstance(y, Tensor) else y
    with eval_mode(model), torch.enable_grad():
        x_adv = random_start(x, threat, start, generator)
        for _ in range(threat.steps):
            x_adv = x_adv.detach().requires_grad_(True)
            loss = loss_fn(model(x_adv), y)
            (grad,) = torch.autograd.grad(loss, [x_adv])
            if threat.norm == "linf":
                step = grad.sign()
            else:
                step = grad / _l2_norms(grad).clamp_min(_TINY)
            x_adv = project(x_adv.detach() + threat.step_size * step, x, threat)
    return x_adv.detach()


class PGD:
    """A callable holding a threat model, objective and start (torchattacks style).

    ``PGD(threat)(model, x, y)`` is ``pgd(model, x, y, threat)``; see ``pgd``.
    """

    def __init__(
        self,
        threat: ThreatModel,
        *,
        loss_fn: LossFn | None = None,
        start: str = "uniform",
        generator: torch.Generator | None = None,
    ):
        if start not in STARTS:
            raise InputError(f"unknown PGD start {start!r}; valid: {', '.join(STARTS)}")
        self.threat = threat
        self.loss_fn = loss_fn
        self.start = start
        self.generator = generator

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        """``(B, C, H, W)`` images in [0, 1] and ``(B,)`` labels -> adversarial images."""
        return pgd(model, x, y, self.threat, loss_fn=self.loss_fn, start=self.start,
                   generator=self.generator)

    def __repr__(self) -> str:
        return f"PGD({self.threat.describe()}, start={self.start})"
