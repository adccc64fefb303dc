"""The extra evaluations papers and RobustBench report beside PGD-20: CW-20, random noise, transfer, ART's CW.

Accuracies in percent (0..100); images ``(N, C, H, W)`` floats in [0, 1]; ε, step and σ in [0, 1]
pixel units. Each evaluation is opt-in (:class:`ExtraEvals`) and costs, per image:

- ``cw``: CW-PGD (:func:`rpat.attacks.cw.cw_pgd`), the PGD-20 threat with ``cw_steps`` steps and a
  uniform random start: ``cw_steps`` forward + backward passes (the cost of PGD-20 at 20 steps);
- ``noise``: one forward pass on a noisy copy. ``"uniform"``: uniform in the ε-ball, exactly
  PGD's random start (ℓ∞: ``U(-ε, ε)`` per pixel; ℓ2: a uniform direction at radius ``ε·u^(1/d)``,
  ``u ~ U(0, 1)``, ``d`` pixels per image); ``"gaussian"``: ``x + N(0, σ²)`` per pixel (not
  projected to any ball). Both clipped to [0, 1], drawn from a generator seeded with the seed;
- ``transfer``: PGD-20 (CE, uniform start, same seed as the white-box PGD) on a *source* model,
  scored on the evaluated model: 20 forward + backward passes of the source, one forward of the
  target;
- ``cw_art``: ART's ``CarliniLInfMethod`` (ℓ∞) or ``CarliniL2Method`` (ℓ2) with ART's defaults
  (only ``batch_size`` set to ours, ``verbose`` off) through ``PyTorchClassifier(clip_values=(0, 1))``.
  Both search a *minimal* perturbation (ART ≥ 1.17 takes no ε), so an adversarial image farther than
  ε from ``x`` (in the threat's norm) counts as failed and ``x`` is scored instead. ART's defaults
  (10 iterations, and for ℓ2 10 binary-search steps) make tens to hundreds of passes per image.
  Needs ``pip install 'rpat[art]'``.

Under ``torch.distributed`` every stage but ``cw_art`` is split over the ranks like PGD (each
rank draws the random numbers of the batches it skips, so the sums equal one process's);
``cw_art`` runs all of its batches on every rank.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ..attacks.cw import cw_pgd
from ..attacks.pgd import eval_mode, pgd, random_start
from ..attacks.threat import ThreatModel, format_budget, parse_budget
from ..data.corruptions import check_corruption_folder
from ..errors import InputError
from ..utils import progress_enabled
from .robustness import _count_correct
from .stages import Stages

Log = Callable[[str], None]

NOISE_KINDS: tuple[str, ...] = ("uniform", "gaussian")

#: The one line ``--cw-art`` gives when ART is not installed.
ART_MISSING = "--cw-art needs the ART extra: pip install 'rpat[art]'"


@dataclass(frozen=True)
class ExtraEvals:
    """Which extra evaluations to run (all off by default).

    cw_steps: CW-PGD steps (None: no CW). noise: ``"uniform"`` / ``"gaussian"`` (None: no noise);
    noise_sigma: the Gaussian's σ in pixel units (a number or ``"8/255"``). transfer_from: the
    source checkpoint (rpat's or a plain state_dict); transfer_arch: its architecture (default:
    inferred). cw_art: ART's Carlini-Wagner.
    """

    cw_steps: int | None = None
    noise: str | None = None
    noise_sigma: str | float | None = None
    transfer_from: str | None = None
    transfer_arch: str | None = None
    cw_art: bool = False

    def __post_init__(self) -> None:
        if self.cw_steps is not None and (isinstance(self.cw_steps, bool) or self.cw_steps < 1):
            raise InputError(f"--cw-steps must be >= 1, got {self.cw_steps}")
        if self.noise is not None and self.noise not in NOISE_KINDS:
            raise InputError(f"unknown noise kind {self.noise!r}; valid: {', '.join(NOISE_KINDS)}")
        if self.noise == "gaussian" and self.noise_sigma is None:
            raise InputError("--noise-kind gaussian needs --noise-sigma S (pixel units, e.g. 8/255)")
        if self.noise_sigma is not None and self.noise != "gaussian":
            raise InputError("--noise-sigma is the Gaussian's σ: give it with --noise-kind gaussian")
        if self.transfer_arch is not None and self.transfer_from is None:
            raise InputError("--transfer-arch names the --transfer-from model's architecture: give --transfer-from")

    @property
    def sigma(self) -> float | None:
        """σ of the Gaussian noise in pixel units (None for uniform noise or no noise)."""
        return None if self.noise_sigma is None else parse_budget(self.noise_sigma, "--noise-sigma")

    def any(self) -> bool:
        """Whether any extra evaluation is asked for."""
        return bool(self.cw_steps or self.noise or self.transfer_from or self.cw_art)

    def settings(self) -> dict[str, Any]:
        """The settings that decide the numbers (without the transfer source's identity, which the caller adds)."""
        return {"cw_steps": self.cw_steps, "noise": self.noise, "noise_sigma": self.sigma,
                "transfer": self.transfer_from is not None, "cw_art": self.cw_art}


def uniform_noise(x: Tensor, threat: ThreatModel, generator: torch.Generator | None = None) -> Tensor:
    """``x`` ``(B, ...)`` in [0, 1] plus noise uniform in the threat's ε-ball, clipped to [0, 1] (PGD's start)."""
    return random_start(x, threat, "uniform", generator)


def gaussian_noise(x: Tensor, sigma: float, generator: torch.Generator | None = None) -> Tensor:
    """``x`` ``(B, ...)`` in [0, 1] plus ``N(0, σ²)`` per pixel (σ in pixel units), clipped to [0, 1]."""
    device = generator.device if generator is not None else x.device
    noise = torch.randn(x.shape, generator=generator, device=device, dtype=x.dtype).to(x.device)
    return (x + sigma * noise).clamp(0.0, 1.0)


def _draw_gaussian(xb: Tensor, g: torch.Generator) -> None:
    gaussian_noise(xb, 0.0, g)


def require_art() -> None:
    """InputError (:data:`ART_MISSING`, one line) unless the ART extra imports."""
    try:
        import art  # noqa: F401  (optional heavy dependency: imported only when asked for)
    except ImportError:
        raise InputError(ART_MISSING) from None


def art_cw_adversarial(model: nn.Module, x: Tensor, threat: ThreatModel, num_classes: int) -> Tensor:
    """ART's Carlini-Wagner on ``x`` ``(B, C, H, W)`` in [0, 1] -> adversarial images, same shape and device.

    ℓ∞: ``CarliniLInfMethod``, ℓ2: ``CarliniL2Method``, with ART's defaults (``batch_size`` = B,
    ``verbose`` off) through ``PyTorchClassifier(clip_values=(0, 1))``. Perturbations beyond ε in the
    threat's norm are replaced by ``x`` (the attack failed within the budget). InputError
    (:data:`ART_MISSING`) without ART.
    """
    try:
        from art.attacks.evasion import CarliniL2Method, CarliniLInfMethod
        from art.estimators.classification import PyTorchClassifier
    except ImportError:
        raise InputError(ART_MISSING) from None
    dev = x.device
    classifier = PyTorchClassifier(model=model, loss=nn.CrossEntropyLoss(), input_shape=tuple(x.shape[1:]),
                                   nb_classes=num_classes, clip_values=(0.0, 1.0),
                                   device_type="gpu" if dev.type == "cuda" else "cpu")
    method = CarliniLInfMethod if threat.norm == "linf" else CarliniL2Method
    attack = method(classifier, batch_size=int(x.shape[0]), verbose=False)
    x_np = x.detach().cpu().numpy().astype(np.float32)
    adv = torch.from_numpy(np.asarray(attack.generate(x=x_np), dtype=np.float32)).to(dev, x.dtype)
    delta = (adv - x).flatten(1)
    size = delta.abs().amax(dim=1) if threat.norm == "linf" else delta.norm(dim=1)
    too_far = size > threat.eps + 1e-6
    adv[too_far] = x[too_far]
    return adv


def run_extra_evals(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    threat: ThreatModel,
    evals: ExtraEvals,
    *,
    source: nn.Module | None = None,
    batch_size: int = 500,
    device: str | torch.device = "cpu",
    seed: int = 0,
    progress: bool = True,
    log: Log | None = None,
    stages: Stages | None = None,
) -> tuple[dict[str, float], dict[str, Any]]:
    """Run the extra evaluations ``evals`` asks for on ``model`` (already on ``device``).

    Args:
        x, y: ``(N, C, H, W)`` images in [0, 1] and ``(N,)`` labels, usually on the CPU.
        threat: the PGD-20 threat (CW uses its norm, ε and step with ``evals.cw_steps`` steps,
            uniform noise its ε-ball, transfer the threat itself).
        source: the transfer source model on ``device`` (needed when ``evals.transfer_from``).
        seed: seeds CW's start, the noise and the transfer PGD (the same generator seeding as PGD-20,
            so transfer from the model itself equals its white-box PGD accuracy).
        stages: where finished stages are kept (:mod:`rpat.evaluation.stages`): each evaluation is the
            stage of its key (``cw``, ``noise``, ``transfer``, ``cw_art``), taken from it when finished,
            so a killed run recomputes only the evaluation it was in.

    Returns:
        ``(values, extras)``: ``values`` maps ``cw``/``noise``/``transfer``/``cw_art`` to accuracies
        (percent) of what ran; ``extras`` their settings and seconds (``cw_steps``, ``cw_threat``,
        ``noise_kind``, ``noise_eps`` or ``noise_sigma``, ``transfer_from``, ``*_seconds``).
    """
    dev = torch.device(device)
    n = int(x.shape[0])
    bars = progress_enabled(progress)
    emit: Log = log or (lambda _m: None)
    values: dict[str, float] = {}
    extras: dict[str, Any] = {}
    common = {"batch_size": batch_size, "device": dev, "seed": seed, "progress": bars, "split": True}
    stages = stages if stages is not None else Stages(None, {})

    def staged(key: str, compute: Callable[[], tuple[int, dict[str, Any], str]]) -> None:
        """Run (or take from ``stages``) one evaluation: ``compute() -> (n correct, extras, what)``."""
        rec = stages.get(key)
        if rec is None:
            t = time.perf_counter()
            k, more, what = compute()
            rec = {"correct": k, "extras": {**more, f"{key}_seconds": time.perf_counter() - t}, "what": what}
            stages.put(key, rec)
        else:
            emit(f"{key}: taken from the finished stage of the interrupted run")
        k = int(rec["correct"])
        values[key] = 100.0 * k / n
        extras.update(rec["extras"])
        emit(f"{rec['what']}: {values[key]:.2f}% ({k}/{n})")

    def cw() -> tuple[int, dict[str, Any], str]:
        cw_threat = threat.with_steps(evals.cw_steps)
        k, _ = _count_correct(model, x, y, threat=cw_threat, desc=f"CW-{cw_threat.steps}",
                              attack=lambda xb, yb, g: cw_pgd(model, xb, yb, cw_threat, generator=g), **common)
        return k, {"cw_steps": cw_threat.steps, "cw_threat": cw_threat.describe()}, \
            f"CW-{cw_threat.steps} ({cw_threat.describe()})"

    def noise() -> tuple[int, dict[str, Any], str]:
        sigma = evals.sigma
        if evals.noise == "uniform":
            k, _ = _count_correct(model, x, y, threat=threat, desc="noise",
                                  attack=lambda xb, yb, g: uniform_noise(xb, threat, g), **common)
            return k, {"noise_kind": "uniform", "noise_eps": threat.eps}, \
                f"noise (uniform in the {threat.norm} ball eps={format_budget(threat.eps)})"
        k, _ = _count_correct(model, x, y, desc="noise", skip=_draw_gaussian,
                              attack=lambda xb, yb, g: gaussian_noise(xb, sigma, g), **common)
        return k, {"noise_kind": "gaussian", "noise_sigma": sigma}, f"noise (gaussian sigma={format_budget(sigma)})"

    def transfer() -> tuple[int, dict[str, Any], str]:
        if source is None:
            raise InputError("transfer needs the source model")
        with eval_mode(source):
            k, _ = _count_correct(model, x, y, threat=threat, desc="transfer",
                                  attack=lambda xb, yb, g: pgd(source, xb, yb, threat, start="uniform",
                                                               generator=g), **common)
        return k, {"transfer_from": str(evals.transfer_from)}, \
            f"transfer (PGD-{threat.steps} on {evals.transfer_from})"

    def cw_art() -> tuple[int, dict[str, Any], str]:
        with torch.no_grad():
            num_classes = int(model(x[:1].to(dev)).shape[-1])
        k, _ = _count_correct(model, x, y, batch_size=batch_size, device=dev, progress=bars, desc="CW (ART)",
                              attack=lambda xb, yb, g: art_cw_adversarial(model, xb, threat, num_classes))
        method = "CarliniLInfMethod" if threat.norm == "linf" else "CarliniL2Method"
        return k, {"cw_art_method": method}, f"CW (ART {method})"

    with eval_mode(model):
        for key, wanted, compute in (("cw", evals.cw_steps, cw), ("noise", evals.noise, noise),
                                     ("transfer", evals.transfer_from, transfer), ("cw_art", evals.cw_art, cw_art)):
            if wanted:
                staged(key, compute)
    return values, extras


#: The items of an ``--extra-evals`` list (``rpat train --eval``, ``rpat sweep``), with what each takes.
EXTRA_EVAL_ITEMS: dict[str, str] = {
    "cw": "cw or cw=STEPS (CW-PGD, default 20 steps)",
    "noise": "noise (uniform in the eps-ball) or noise=gaussian:SIGMA (e.g. noise=gaussian:8/255)",
    "transfer": "transfer=SRC.pt (PGD-20 on SRC, scored on the model)",
    "transfer_arch": "transfer_arch=ARCH (the architecture of a plain-state_dict SRC)",
    "cw_art": "cw_art (ART's Carlini-Wagner; needs rpat[art])",
    "corruptions": "corruptions=DIR (CIFAR-10-C / CIFAR-100-C / Tiny-ImageNet-C folder)",
}


def parse_extra_evals(spec: str | None) -> tuple[ExtraEvals, str | None]:
    """``"cw,noise,transfer=SRC.pt,corruptions=DIR"`` -> ``(ExtraEvals, corruption folder or None)``.

    The comma-separated items of :data:`EXTRA_EVAL_ITEMS` (the same evaluations as ``rpat eval``'s
    ``--cw``, ``--noise``, ``--transfer-from``, ``--cw-art`` and ``--corruptions``). An empty or None
    ``spec`` asks for none. InputError (one line) for an unknown item or a malformed value.
    """
    kw: dict[str, Any] = {}
    corruptions: str | None = None
    for item in (spec or "").split(","):
        item = item.strip()
        if not item:
            continue
        key, _, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if key not in EXTRA_EVAL_ITEMS:
            raise InputError(f"--extra-evals: unknown item {item!r}; valid: " + "; ".join(EXTRA_EVAL_ITEMS.values()))
        needs_value = key in ("transfer", "transfer_arch", "corruptions")
        if needs_value and not value:
            raise InputError(f"--extra-evals: {key} needs a value: {EXTRA_EVAL_ITEMS[key]}")
        if key == "cw":
            if value and not value.isdigit():
                raise InputError(f"--extra-evals: cw=STEPS takes a whole number of steps, got {value!r}")
            kw["cw_steps"] = int(value) if value else 20
        elif key == "noise":
            if not value or value == "uniform":
                kw["noise"] = "uniform"
            elif value.startswith("gaussian:") and value.removeprefix("gaussian:"):
                kw["noise"], kw["noise_sigma"] = "gaussian", value.removeprefix("gaussian:")
                parse_budget(kw["noise_sigma"], "--extra-evals noise sigma")
            else:
                raise InputError(f"--extra-evals: noise takes uniform or gaussian:SIGMA, got {value!r}")
        elif key == "transfer":
            kw["transfer_from"] = value
        elif key == "transfer_arch":
            kw["transfer_arch"] = value
        elif key == "cw_art":
            if value:
                raise InputError(f"--extra-evals: cw_art takes no value, got {item!r}")
            kw["cw_art"] = True
        else:
            corruptions = value
    return ExtraEvals(**kw), corruptions


def check_extra_evals(spec: str | None, dataset: str) -> tuple[ExtraEvals, str | None]:
    """:func:`parse_extra_evals`, then what can be checked before any training: the transfer source exists,
    ART imports for ``cw_art``, and the corruption folder holds every file for ``dataset``."""
    evals, corruptions = parse_extra_evals(spec)
    if evals.transfer_from is not None and not Path(evals.transfer_from).is_file():
        raise InputError(f"--extra-evals transfer={evals.transfer_from}: no such file")
    if evals.cw_art:
        require_art()
    if corruptions is not None:
        check_corruption_folder(corruptions, dataset)
    return evals, corruptions
