"""AutoAttack (Croce & Hein, 2020) through the ``pyautoattack`` package.

``run_autoattack`` wraps ``pyautoattack.AutoAttack`` so that it:
- runs the model in eval mode, in fp32 (autocast off), and restores each
  submodule's mode afterwards;
- leaves the parameters' ``.grad`` untouched (FAB calls ``backward``, so the
  parameters are frozen with ``requires_grad=False`` during the run) and the
  global RNG state untouched (the attacks reseed it: they run in a forked RNG);
- adapts the number of target classes to models with fewer than 10 classes
  (see ``adapt_to_classes``);
- routes the ``'auto-attack'`` logger's messages to an optional callback.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from ..errors import InputError
from .pgd import eval_mode
from .threat import ThreatModel, format_budget

LOGGER_NAME = "auto-attack"
VERSIONS: tuple[str, ...] = ("standard", "plus", "rand")
_NORMS = {"linf": "Linf", "l2": "L2"}

#: The targeted attacks of the standard version aim at the 9 most likely wrong classes.
MAX_TARGET_CLASSES = 9


class _CallbackHandler(logging.Handler):
    """Sends each log record's message to ``log`` (warnings prefixed ``warning:``)."""

    def __init__(self, log: Callable[[str], None]):
        super().__init__(level=logging.DEBUG)
        self._log = log

    def emit(self, record: logging.LogRecord) -> None:
        msg = record.getMessage()
        if record.levelno >= logging.WARNING:
            msg = f"warning: {msg}"
        self._log(msg)


@contextmanager
def _route_log(log: Callable[[str], None] | None) -> Iterator[None]:
    """While active, the 'auto-attack' logger's DEBUG+ messages go to ``log`` only."""
    if log is None:
        yield
        return
    logger = logging.getLogger(LOGGER_NAME)
    handler = _CallbackHandler(log)
    old_level, old_propagate = logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
        logger.propagate = old_propagate


@contextmanager
def _frozen_parameters(model: nn.Module) -> Iterator[None]:
    """Temporarily set ``requires_grad=False`` on the parameters that require grad."""
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


@contextmanager
def _keep_trace() -> Iterator[None]:
    """pyautoattack's dynamic-defense check calls ``sys.settrace(None)``; restore the tracer."""
    old = sys.gettrace()
    try:
        yield
    finally:
        sys.settrace(old)


def _rng_devices(device: torch.device) -> list[int]:
    if device.type == "cuda":
        return [device.index if device.index is not None else torch.cuda.current_device()]
    return []


def adapt_to_classes(adversary: object, num_classes: int) -> list[str]:
    """Fit a ``pyautoattack.AutoAttack`` to a model with ``num_classes`` outputs, in place.

    The targeted attacks (APGD-T, FAB-T) of the standard version use 9 target
    classes, which needs >= 10 classes. With fewer, both use all
    ``num_classes - 1`` wrong classes (``min(9, num_classes - 1)``). APGD-T's
    targeted DLR loss reads the 4th largest logit, so it is dropped below 4
    classes (3 classes: APGD-CE, FAB-T, Square); the untargeted DLR loss
    (``plus``/``rand``) reads the 3rd largest, so APGD-DLR is dropped below 3.
    Returns the attacks that will run.
    """
    if num_classes < 2:
        raise InputError(f"AutoAttack needs a model with >= 2 classes, got {num_classes}")
    k = min(MAX_TARGET_CLASSES, num_classes - 1)
    adversary.apgd_targeted.n_target_classes = min(adversary.apgd_targeted.n_target_classes, k)
    adversary.fab.n_target_classes = min(adversary.fab.n_target_classes, k)
    attacks = list(adversary.attacks_to_run)
    if num_classes < 4:
        attacks = [a for a in attacks if a != "apgd-t"]
    if num_classes < 3:
        attacks = [a for a in attacks if a != "apgd-dlr"]
    adversary.attacks_to_run = attacks
    return attacks


def autoattack_plan(num_classes: int, norm: str = "linf", version: str = "standard") -> dict:
    """What ``run_autoattack`` will run on a ``num_classes`` model, without running it.

    Returns ``{"attacks": [...], "n_target_classes": k}`` (see ``adapt_to_classes``).
    """
    if version not in VERSIONS:
        raise InputError(f"unknown AutoAttack version {version!r}; valid: {', '.join(VERSIONS)}")
    if norm not in _NORMS:
        raise InputError(f"unknown norm {norm!r}; valid: {', '.join(_NORMS)}")
    from pyautoattack import AutoAttack

    adversary = AutoAttack(nn.Identity(), norm=_NORMS[norm], eps=1.0, version=version)
    attacks = adapt_to_classes(adversary, num_classes)
    return {"attacks": attacks, "n_target_classes": adversary.apgd_targeted.n_target_classes}


def run_autoattack(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    threat: ThreatModel,
    *,
    version: str = "standard",
    batch_size: int = 500,
    device: str | torch.device = "cpu",
    seed: int = 0,
    log: Callable[[str], None] | None = None,
) -> tuple[Tensor, Tensor]:
    """Run AutoAttack with the threat's norm and ε; return ``(x_adv, robust)`` on the CPU.

    Args:
        model: maps ``(B, C, H, W)`` images in [0, 1] to logits ``(B, K)``,
            already on ``device``, fp32. It is evaluated in eval mode; each
            submodule's mode and every parameter's ``.grad`` are as before after
            the call.
        x: ``(N, C, H, W)`` clean images in [0, 1] (any device; cast to fp32).
        y: ``(N,)`` integer labels.
        threat: only ``norm`` (``linf`` -> ``'Linf'``, ``l2`` -> ``'L2'``) and
            ``eps`` (pixel units of [0, 1] images) are used; step size and
            steps are AutoAttack's own.
        version: ``"standard"`` (APGD-CE, APGD-T, FAB-T, Square), ``"plus"`` or
            ``"rand"``. With fewer than 10 classes the targeted attacks use
            ``min(9, K - 1)`` target classes; see ``adapt_to_classes``.
        batch_size: examples per attack batch.
        device: where the model lives; batches are moved there.
        seed: the attacks' seed (the caller's global RNG state is not changed).
        log: if given, receives pyautoattack's progress lines (one string per
            message: per-attack progress and robust accuracy, warnings).

    Returns:
        ``x_adv``: ``(N, C, H, W)`` fp32 on the CPU, in the ε-ball around ``x``
        and in [0, 1] (the clean image where no attack succeeded);
        ``robust``: ``(N,)`` bool on the CPU, True where the model still
        predicts ``y`` on ``x_adv`` (False where it was wrong on ``x``).
    """
    if not isinstance(threat, ThreatModel):
        raise InputError(f"threat must be a ThreatModel, got {type(threat).__name__}")
    if version not in VERSIONS:
        raise InputError(f"unknown AutoAttack version {version!r}; valid: {', '.join(VERSIONS)}")
    if x.dim() != 4 or y.dim() != 1 or x.shape[0] != y.shape[0]:
        raise InputError(
            f"AutoAttack needs x (N, C, H, W) and y (N,), got {tuple(x.shape)} and {tuple(y.shape)}"
        )
    if batch_size < 1:
        raise InputError(f"batch_size must be >= 1, got {batch_size}")
    for p in model.parameters():
        if p.is_floating_point() and p.dtype != torch.float32:
            raise InputError(f"AutoAttack runs in fp32, but the model has {p.dtype} parameters")
    from pyautoattack import AutoAttack

    dev = torch.device(device)
    x_cpu = x.detach().to("cpu", torch.float32)
    y_cpu = y.detach().to("cpu", torch.long)
    if x_cpu.shape[0] == 0:
        return x_cpu.clone(), torch.zeros(0, dtype=torch.bool)

    with (
        eval_mode(model),
        _frozen_parameters(model),
        _route_log(log),
        _keep_trace(),
        torch.random.fork_rng(devices=_rng_devices(dev)),
        torch.autocast(device_type=dev.type, enabled=False),
    ):
        with torch.no_grad():
            num_classes = int(model(x_cpu[:1].to(dev)).shape[-1])
        if threat.eps == 0:
            # Nothing to attack: the ball is the clean image. (APGD divides by ε.)
            with torch.no_grad():
                preds = torch.cat([model(x_cpu[i : i + batch_size].to(dev)).argmax(1).cpu()
                                   for i in range(0, x_cpu.shape[0], batch_size)])
            return x_cpu.clone(), preds == y_cpu
        adversary = AutoAttack(model, norm=_NORMS[threat.norm], eps=float(threat.eps), seed=seed,
                               version=version, device=dev)
        attacks = adapt_to_classes(adversary, num_classes)
        if log is not None:
            log(f"AutoAttack {version} {threat.norm} eps={format_budget(threat.eps)} "
                f"on {x_cpu.shape[0]} examples, {num_classes} classes: {', '.join(attacks)} "
                f"({adversary.apgd_targeted.n_target_classes} target classes)")
        x_adv, y_adv = adversary.run_standard_evaluation(x_cpu, y_cpu, batch_size=batch_size)
    return x_adv.detach().cpu(), y_adv.cpu() == y_cpu
