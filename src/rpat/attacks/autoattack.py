"""AutoAttack (Croce & Hein, 2020) with the attacks of the ``pyautoattack`` package.

``pyautoattack.AutoAttack`` builds the attack objects (APGD-CE, APGD-T,
FAB-T, Square) with the version's settings; rpat runs them with its own loop
(:func:`autoattack`), which does what ``run_standard_evaluation`` does — the
clean pass, then each attack on the still-robust examples (in index order,
``batch_size`` at a time), clearing the robust flag where it succeeds — and
in addition:

- records robust accuracy (percent and count) and wall seconds after each
  attack (``AutoAttackResult.per_attack``);
- resumes: with ``state_path``, the state after the clean pass and after each
  attack is written atomically, and a rerun continues after the last finished
  attack, with the same result as an uninterrupted run;
- splits over processes: under ``torch.distributed`` (torchrun; gloo on the
  CPU, NCCL on GPUs) each rank runs every ``world``-th batch of each attack on
  the same global batching and the flags and adversarial images are merged
  after each attack, so every rank ends with the single-process result.

Resume and split are exact because each ``perturb`` call reseeds the RNG with
the seed: a batch's result depends only on the batch's images, and the
batches are the same however the work is cut (the split is at batch
granularity, never inside a batch).

As before, the model runs in eval mode and fp32 (autocast off) and each
submodule's mode is restored; the parameters' ``.grad`` are untouched (FAB
calls ``backward``, so the parameters are frozen with ``requires_grad=False``
during the run, which also spares the weight gradients); the global RNG state
is untouched (the attacks run in a forked RNG); the number of target classes
adapts to models with fewer than 10 classes (``adapt_to_classes``); the
``'auto-attack'`` logger's messages (pyautoattack's checks) go to ``log``.

This module is the loop over pyautoattack's attack objects; the resumable state
(fingerprint, state JSON and ``.pt`` files) is :mod:`rpat.attacks.autoattack_state`.
The split over processes (:func:`_merge`) stays here: it is half of the loop's batch striding.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..distributed import comm_device, world
from ..errors import InputError
from ..utils import progress_enabled
from .autoattack_state import State, fingerprint, load_state, save_state
from .pgd import eval_mode
from .threat import ThreatModel, format_budget

LOGGER_NAME = "auto-attack"
#: ``apgd``: APGD-CE + APGD-T with exactly the standard version's settings for those two
#: (AutoAttack's ``custom`` mode); its result is standard AA's after APGD-T.
VERSIONS: tuple[str, ...] = ("standard", "apgd", "plus", "rand")
#: The versions ``rpat eval`` / ``train --eval`` / ``sweep`` offer (``--autoattack``), "none" for no AutoAttack.
EVAL_VERSIONS: tuple[str, ...] = ("standard", "apgd", "plus", "rand", "none")
#: How tables label each version's robust accuracy (only "standard" is ever the AA column).
VERSION_LABELS: dict[str, str] = {"standard": "AA", "apgd": "AA(APGD)", "plus": "AA+", "rand": "AA-rand"}


def version_name(autoattack: bool | str | None, allowed: tuple[str, ...] = EVAL_VERSIONS) -> str:
    """The version name: ``True``/``"standard"`` -> ``"standard"``, ``False``/``None``/``"none"`` -> ``"none"``,
    otherwise one of ``allowed`` (an InputError lists them)."""
    if autoattack is True:
        return "standard"
    if autoattack is False or autoattack is None:
        return "none"
    if autoattack not in allowed:
        raise InputError(f"unknown AutoAttack version {autoattack!r}; valid: {', '.join(allowed)}")
    return str(autoattack)
#: How attacks are printed (the report's ``attack`` keys are pyautoattack's names).
ATTACK_LABELS = {"clean": "clean", "apgd-ce": "APGD-CE", "apgd-t": "APGD-T", "fab-t": "FAB-T",
                 "square": "Square", "apgd-dlr": "APGD-DLR", "fab": "FAB"}
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


def _check_version(version: str, norm: str) -> None:
    if version not in VERSIONS:
        raise InputError(f"unknown AutoAttack version {version!r}; valid: {', '.join(VERSIONS)}")
    if norm not in _NORMS:
        raise InputError(f"unknown norm {norm!r}; valid: {', '.join(_NORMS)}")


def _build(model: nn.Module, norm: str, eps: float, version: str, seed: int,
           device: torch.device | str) -> Any:
    """A ``pyautoattack.AutoAttack`` with the version's settings (``apgd``: the standard ones, two attacks)."""
    from pyautoattack import AutoAttack

    adversary = AutoAttack(model, norm=_NORMS[norm], eps=eps, seed=seed,
                           version="standard" if version == "apgd" else version, device=device)
    if version == "apgd":
        adversary.attacks_to_run = ["apgd-ce", "apgd-t"]
    return adversary


def autoattack_plan(num_classes: int, norm: str = "linf", version: str = "standard") -> dict:
    """What ``run_autoattack`` will run on a ``num_classes`` model, without running it.

    Returns ``{"attacks": [...], "n_target_classes": k}`` (see ``adapt_to_classes``).
    """
    _check_version(version, norm)
    adversary = _build(nn.Identity(), norm, 1.0, version, 0, "cpu")
    attacks = adapt_to_classes(adversary, num_classes)
    return {"attacks": attacks, "n_target_classes": adversary.apgd_targeted.n_target_classes}


def _perturb(adversary: Any, attack: str, x: Tensor, y: Tensor, seed: int) -> Tensor:
    """One batch of one attack, with the settings ``run_standard_evaluation`` uses."""
    if attack in ("apgd-ce", "apgd-dlr"):
        adversary.apgd.loss = "ce" if attack == "apgd-ce" else "dlr"
        adversary.apgd.seed = seed
        return adversary.apgd.perturb(x, y)
    if attack == "apgd-t":
        adversary.apgd_targeted.seed = seed
        return adversary.apgd_targeted.perturb(x, y)
    if attack in ("fab", "fab-t"):
        adversary.fab.targeted = attack == "fab-t"
        if attack == "fab-t":
            adversary.fab.n_restarts = 1
        adversary.fab.seed = seed
        return adversary.fab.perturb(x, y)
    if attack == "square":
        adversary.square.seed = seed
        return adversary.square.perturb(x, y)
    raise ValueError(f"unknown attack {attack!r}")


# --- split over processes ---------------------------------------------------------------


def _merge(robust: Tensor, cleared: Tensor, x_adv: Tensor | None, seconds: float,
           device: torch.device) -> float:
    """Apply every rank's ``cleared`` (N,) flags to ``robust`` (and copy their ``x_adv`` rows), in place.

    The ranks attacked disjoint batches, so each example is cleared by at most
    one rank: its adversarial image is summed with zeros from the others, which
    is exact. Returns the stage's seconds, the slowest rank's. In the loop's module, not its own:
    it is the other half of the loop's batch striding (``batches[rank::n_ranks]``), useless apart.
    """
    rank, n_ranks = world()
    if n_ranks > 1:
        dev = comm_device(device)
        flags = cleared.to(dev, torch.int32)
        dist.all_reduce(flags)
        union = flags.cpu() > 0
        if x_adv is not None:
            idx = union.nonzero().flatten()
            if idx.numel():
                rows = torch.where(cleared[idx].view(-1, *[1] * (x_adv.dim() - 1)), x_adv[idx], 0.0).to(dev)
                dist.all_reduce(rows)
                x_adv[idx] = rows.cpu()
        cleared = union
        t = torch.tensor([seconds], dtype=torch.float64, device=dev)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        seconds = float(t.item())
    robust &= ~cleared
    return seconds


# --- the loop ---------------------------------------------------------------------------


@dataclass
class AutoAttackResult:
    """One AutoAttack run.

    ``x_adv``: ``(N, C, H, W)`` fp32 on the CPU (the clean image where no attack
    succeeded); ``robust``: ``(N,)`` bool on the CPU; ``per_attack``: one record
    per stage, ``{"attack": "clean" | "apgd-ce" | "apgd-t" | "fab-t" | "square",
    "robust": percent, "n_robust": count, "seconds": wall seconds}`` (an attack
    that found no robust example left has 0 seconds); ``attacks``: the attacks
    of the plan; ``resumed``: whether a saved state was continued.
    """

    x_adv: Tensor
    robust: Tensor
    per_attack: list[dict[str, Any]]
    attacks: list[str]
    n_target_classes: int
    resumed: bool = False


def _record(stage: str, robust: Tensor, seconds: float) -> dict[str, Any]:
    n_robust = int(robust.sum())
    return {"attack": stage, "robust": 100.0 * n_robust / robust.numel(), "n_robust": n_robust,
            "seconds": seconds}


def _run_checks(adversary: Any, version: str, model: nn.Module, x: Tensor, y: Tensor,
                attacks: list[str]) -> None:
    """pyautoattack's checks on the first batch (randomized, probability outputs, dynamic, classes)."""
    from pyautoattack import checks

    logger = adversary.logger
    if version != "rand":
        checks.check_randomized(model, x, y, bs=x.shape[0], logger=logger)
    n_cls = checks.check_range_output(model, x, logger=logger)
    checks.check_dynamic(model, x, False, logger=logger)
    checks.check_n_classes(n_cls, attacks, adversary.apgd_targeted.n_target_classes,
                           adversary.fab.n_target_classes, logger=logger)


def autoattack(
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
    progress: bool = False,
    state_path: str | Path | None = None,
) -> AutoAttackResult:
    """Run AutoAttack with the threat's norm and ε, recording each attack; see the module docstring.

    Args:
        model: maps ``(B, C, H, W)`` images in [0, 1] to logits ``(B, K)``,
            already on ``device``, fp32.
        x: ``(N, C, H, W)`` clean images in [0, 1] (any device; cast to fp32),
            the same on every rank under ``torch.distributed``.
        y: ``(N,)`` integer labels.
        threat: only ``norm`` and ``eps`` (pixel units of [0, 1] images) are used.
        version: ``standard``, ``apgd`` (APGD-CE + APGD-T with the standard
            settings), ``plus`` or ``rand``.
        batch_size: examples per attack batch (the unit of the split and of the
            per-batch reseeding: a different ``batch_size`` gives a different,
            equally valid, result).
        device: where the model lives; batches are moved there.
        seed: the attacks' seed (the caller's global RNG state is not changed).
        log: receives one line per stage (robust accuracy, seconds) and
            pyautoattack's warnings (rank 0 only).
        progress: a tqdm bar per attack over the images it attacks (rank 0's share; rank 0,
            on a terminal).
        state_path: a JSON file for the resumable state (with ``<name>.<k>.pt``
            beside it for the adversarial images). If it exists and matches the
            settings (version, norm, ε, seed, batch size, images, labels and
            model weights), the run continues after its last finished stage;
            if it was written for other settings, InputError. Written by rank 0.

    Under ``torch.distributed`` every rank must call this with the same
    arguments; each attacks every ``world``-th batch and all return the same
    result (equal to one process's).
    """
    if not isinstance(threat, ThreatModel):
        raise InputError(f"threat must be a ThreatModel, got {type(threat).__name__}")
    _check_version(version, threat.norm)
    if x.dim() != 4 or y.dim() != 1 or x.shape[0] != y.shape[0]:
        raise InputError(
            f"AutoAttack needs x (N, C, H, W) and y (N,), got {tuple(x.shape)} and {tuple(y.shape)}"
        )
    if batch_size < 1:
        raise InputError(f"batch_size must be >= 1, got {batch_size}")
    for p in model.parameters():
        if p.is_floating_point() and p.dtype != torch.float32:
            raise InputError(f"AutoAttack runs in fp32, but the model has {p.dtype} parameters")
    dev = torch.device(device)
    x_cpu = x.detach().to("cpu", torch.float32)
    y_cpu = y.detach().to("cpu", torch.long)
    n = int(x_cpu.shape[0])
    if n == 0:
        return AutoAttackResult(x_cpu.clone(), torch.zeros(0, dtype=torch.bool), [], [], 0)
    rank, n_ranks = world()
    emit = log if (log is not None and rank == 0) else (lambda _msg: None)
    bars = progress_enabled(progress) and rank == 0
    path = Path(state_path) if state_path is not None else None

    with (
        eval_mode(model),
        _frozen_parameters(model),
        _route_log(log if rank == 0 else (lambda _msg: None)),
        _keep_trace(),
        torch.random.fork_rng(devices=_rng_devices(dev)),
        torch.autocast(device_type=dev.type, enabled=False),
        torch.no_grad(),
    ):
        num_classes = int(model(x_cpu[:1].to(dev)).shape[-1])
        adversary = _build(model, threat.norm, float(threat.eps), version, seed, dev)
        attacks = adapt_to_classes(adversary, num_classes)
        n_targets = adversary.apgd_targeted.n_target_classes
        if threat.eps == 0:
            attacks = []  # nothing to attack: the ball is the clean image (APGD divides by ε)
        settings = (fingerprint(model, x_cpu, y_cpu, threat, version, seed, batch_size, attacks, n_targets)
                    if path is not None else {})
        loaded = load_state(path, settings, x_cpu) if path is not None else None
        state, robust, x_adv = loaded if loaded is not None else (State(), None, x_cpu.clone())
        resumed = loaded is not None
        if n_ranks > 1 and path is not None:
            dist.barrier()  # every rank has read the state before rank 0 writes the next one
        emit(f"AutoAttack {version} {threat.norm} eps={format_budget(threat.eps)} on {n} examples, "
             f"{num_classes} classes: {', '.join(attacks) or 'none'} ({n_targets} target classes)"
             + (f"; resumed from {path} after {', '.join(state.done)}" if resumed else ""))

        def save() -> None:
            if path is not None and rank == 0:
                save_state(path, settings, state, robust, x_adv, x_cpu)

        if "clean" not in state.done:
            if attacks and rank == 0:
                _run_checks(adversary, version, model, x_cpu[:batch_size].to(dev),
                            y_cpu[:batch_size].to(dev), attacks)
            t = time.perf_counter()
            robust = torch.ones(n, dtype=torch.bool)
            wrong = torch.zeros(n, dtype=torch.bool)
            for b in range(rank, math.ceil(n / batch_size), n_ranks):
                sl = slice(b * batch_size, (b + 1) * batch_size)
                pred = model(x_cpu[sl].to(dev)).max(dim=1)[1]
                wrong[sl] = (pred != y_cpu[sl].to(dev)).cpu()
            seconds = _merge(robust, wrong, None, time.perf_counter() - t, dev)
            state.done.append("clean")
            state.per_attack.append(_record("clean", robust, seconds))
            emit(f"clean accuracy: {state.per_attack[-1]['robust']:.2f}% ({int(robust.sum())}/{n})")
            save()

        for attack in attacks:
            if attack in state.done:
                continue
            t = time.perf_counter()
            idx = robust.nonzero().flatten()
            batches = list(idx.split(batch_size))
            cleared = torch.zeros(n, dtype=torch.bool)
            mine = batches[rank::n_ranks]
            label = ATTACK_LABELS.get(attack, attack)
            with tqdm(total=sum(len(b) for b in mine), desc=f"AutoAttack {label}", unit="img",
                      disable=not bars, leave=False) as bar:
                for bidx in mine:
                    xb, yb = x_cpu[bidx].to(dev), y_cpu[bidx].to(dev)
                    adv = _perturb(adversary, attack, xb, yb, seed)
                    fooled = (model(adv).max(dim=1)[1] != yb).cpu()
                    cleared[bidx[fooled]] = True
                    x_adv[bidx[fooled]] = adv[fooled.to(adv.device)].detach().cpu()
                    bar.update(len(bidx))
            seconds = _merge(robust, cleared, x_adv, time.perf_counter() - t, dev)
            state.done.append(attack)
            state.per_attack.append(_record(attack, robust, seconds))
            rec = state.per_attack[-1]
            emit(f"robust accuracy after {attack.upper()}: {rec['robust']:.2f}% ({rec['n_robust']}/{n}) "
                 f"in {seconds:.1f} s")
            save()

        if attacks and rank == 0:
            from pyautoattack import checks

            checks.check_square_sr({r["attack"]: r["robust"] / 100.0 for r in state.per_attack},
                                   logger=adversary.logger)
            diff = (x_adv - x_cpu).flatten(1)
            size = diff.abs().max(1)[0] if threat.norm == "linf" else diff.norm(dim=1)
            emit(f"AutoAttack done: robust accuracy {state.per_attack[-1]['robust']:.2f}%, "
                 f"max {threat.norm} perturbation {size.max().item():.5f}")
    return AutoAttackResult(x_adv, robust, state.per_attack, attacks, n_targets, resumed)


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
    state_path: str | Path | None = None,
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
        version: ``"standard"`` (APGD-CE, APGD-T, FAB-T, Square), ``"apgd"``
            (APGD-CE, APGD-T), ``"plus"`` or ``"rand"``. With fewer than 10
            classes the targeted attacks use ``min(9, K - 1)`` target classes;
            see ``adapt_to_classes``.
        batch_size: examples per attack batch.
        device: where the model lives; batches are moved there.
        seed: the attacks' seed (the caller's global RNG state is not changed).
        log: if given, receives the progress lines (one per attack with its
            robust accuracy and seconds) and pyautoattack's warnings.
        state_path: resumable state file; see :func:`autoattack`.

    Returns:
        ``x_adv``: ``(N, C, H, W)`` fp32 on the CPU, in the ε-ball around ``x``
        and in [0, 1] (the clean image where no attack succeeded);
        ``robust``: ``(N,)`` bool on the CPU, True where the model still
        predicts ``y`` on ``x_adv`` (False where it was wrong on ``x``).
    """
    result = autoattack(model, x, y, threat, version=version, batch_size=batch_size, device=device,
                        seed=seed, log=log, state_path=state_path)
    return result.x_adv, result.robust
