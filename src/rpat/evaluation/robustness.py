"""Clean, PGD-20 and AutoAttack accuracy of a model, and the paper's Mean and NRR.

Accuracies are in percent (0..100). Images are ``(N, C, H, W)`` floats in
[0, 1], usually on the CPU; batches are moved to ``device``, where the model
must already be. Correct counts are accumulated on the device and read once
at the end. The model is evaluated in eval mode and each submodule's mode is
restored afterwards.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..attacks.autoattack import autoattack_plan, run_autoattack
from ..attacks.pgd import eval_mode, pgd
from ..attacks.threat import ThreatModel, format_budget
from ..errors import InputError
from .metrics import mean_score, nrr

Log = Callable[[str], None]


@dataclass
class RobustnessReport:
    """One model's evaluation. Accuracies in percent; ``aa``/``mean``/``nrr`` None without AA.

    ``threat`` is the PGD threat's ``describe()`` (AutoAttack uses its norm and
    ε); ``seconds`` the wall time of the whole evaluation; ``extras`` holds
    per-stage timings, the AutoAttack setup, the device and the seed.
    """

    clean: float
    pgd: float
    aa: float | None
    mean: float | None
    nrr: float | None
    n_examples: int
    threat: str
    pgd_steps: int
    seconds: float
    extras: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """All fields as a JSON-friendly dict (``extras`` copied)."""
        return dataclasses.asdict(self)

    def table(self, name: str = "") -> str:
        """A one-row aligned markdown table ``Clean | PGD-20 | AA | Mean | NRR`` (2 decimals).

        With a ``name``, a first ``model`` column holds it.
        """
        return _render([(name, self.to_dict())], with_name=bool(name))


def _same_device(a: torch.device, b: torch.device) -> bool:
    return a.type == b.type and (a.index is None or b.index is None or a.index == b.index)


def _check_model_device(model: nn.Module, device: torch.device) -> None:
    p = next(model.parameters(), None)
    if p is not None and not _same_device(p.device, device):
        raise InputError(
            f"the model is on {p.device} but device={str(device)!r}; move it with model.to(device)"
        )


def _check_data(x: Tensor, y: Tensor, batch_size: int) -> None:
    if x.dim() != 4 or y.dim() != 1 or x.shape[0] != y.shape[0]:
        raise InputError(
            f"expected images x (N, C, H, W) and labels y (N,), got {tuple(x.shape)} and "
            f"{tuple(y.shape)}"
        )
    if x.shape[0] == 0:
        raise InputError("no examples to evaluate")
    if not torch.is_floating_point(x):
        raise InputError(f"images must be floats in [0, 1], got dtype {x.dtype}")
    if batch_size < 1:
        raise InputError(f"batch_size must be >= 1, got {batch_size}")


def _count_correct(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    batch_size: int,
    device: torch.device,
    threat: ThreatModel | None = None,
    seed: int = 0,
    progress: bool = False,
    desc: str = "",
) -> tuple[int, int]:
    """Correct predictions on ``x`` (or on PGD examples when ``threat`` is given), and K.

    Returns ``(n_correct, num_classes)``; one host read at the end.
    """
    _check_data(x, y, batch_size)
    _check_model_device(model, device)
    generator = None
    if threat is not None:
        generator = torch.Generator(device=device)
        generator.manual_seed(seed)
    correct = torch.zeros((), dtype=torch.long, device=device)
    num_classes = 0
    n = x.shape[0]
    with eval_mode(model), tqdm(total=n, desc=desc, unit="img", disable=not progress,
                                leave=False) as bar:
        for i in range(0, n, batch_size):
            xb = x[i : i + batch_size].to(device)
            yb = y[i : i + batch_size].to(device)
            if threat is not None:
                xb = pgd(model, xb, yb, threat, start="uniform", generator=generator)
            with torch.no_grad():
                logits = model(xb)
            num_classes = int(logits.shape[-1])
            correct += (logits.argmax(dim=-1) == yb).sum()
            bar.update(xb.shape[0])
    return int(correct.item()), num_classes


def accuracy(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    batch_size: int = 500,
    device: str | torch.device = "cpu",
    *,
    progress: bool = False,
) -> float:
    """Clean accuracy (percent) on images ``x`` ``(N, C, H, W)`` in [0, 1], labels ``(N,)``."""
    n_correct, _ = _count_correct(model, x, y, batch_size=batch_size, device=torch.device(device),
                                  progress=progress, desc="clean")
    return 100.0 * n_correct / x.shape[0]


def pgd_accuracy(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    threat: ThreatModel,
    batch_size: int = 500,
    device: str | torch.device = "cpu",
    seed: int = 0,
    *,
    progress: bool = False,
) -> float:
    """Accuracy in percent under PGD (CE objective, uniform random start seeded by ``seed``).

    ``threat`` gives the norm, ε and step size (pixel units) and the steps
    (PGD-20: ℓ∞ 8/255, step 2/255, 20 steps). The random starts come from one
    generator on ``device`` seeded with ``seed``, so the result is reproducible.
    """
    if not isinstance(threat, ThreatModel):
        raise InputError(f"threat must be a ThreatModel, got {type(threat).__name__}")
    n_correct, _ = _count_correct(model, x, y, batch_size=batch_size, device=torch.device(device),
                                  threat=threat, seed=seed, progress=progress,
                                  desc=f"PGD-{threat.steps}")
    return 100.0 * n_correct / x.shape[0]


class _AABar:
    """A tqdm bar over AutoAttack's attacks, advanced by its log lines."""

    def __init__(self, total: int, enabled: bool):
        self.bar = tqdm(total=total, desc="AutoAttack", unit="attack", disable=not enabled,
                        leave=False)

    def __call__(self, msg: str) -> None:
        if msg.startswith("robust accuracy after "):
            self.bar.update(1)
            self.bar.set_postfix_str(msg.removeprefix("robust accuracy after ").split(" (")[0])

    def close(self) -> None:
        self.bar.close()


def evaluate_robustness(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    threat: ThreatModel,
    *,
    autoattack: bool = True,
    batch_size: int = 500,
    device: str | torch.device = "cpu",
    seed: int = 0,
    progress: bool = True,
    log: Log | None = None,
) -> RobustnessReport:
    """Clean, PGD and (optionally) AutoAttack accuracy, Mean and NRR of ``model``.

    Args:
        model: ``(B, C, H, W)`` images in [0, 1] -> logits; already on ``device``.
        x: ``(N, C, H, W)`` float images in [0, 1], usually on the CPU.
        y: ``(N,)`` integer labels.
        threat: the PGD threat (PGD-20: ℓ∞ 8/255, step 2/255, ``steps=20``);
            AutoAttack ``standard`` runs with its norm and ε.
        autoattack: run AutoAttack; without it ``aa``, ``mean``, ``nrr`` are None.
        batch_size: examples per batch for every stage.
        device: where the batches go (and where the model must be).
        seed: seeds the PGD random starts and AutoAttack.
        progress: tqdm bars per stage (on stderr).
        log: if given, receives one line per stage result and AutoAttack's
            progress lines.

    Mean and NRR are computed from Clean and AA (the paper's convention). The
    model runs in eval mode; each submodule's mode is restored afterwards.
    """
    if not isinstance(threat, ThreatModel):
        raise InputError(f"threat must be a ThreatModel, got {type(threat).__name__}")
    _check_data(x, y, batch_size)
    dev = torch.device(device)
    _check_model_device(model, dev)
    emit: Log = log if log is not None else (lambda _msg: None)
    n = int(x.shape[0])
    extras: dict[str, Any] = {"device": str(dev), "seed": seed}
    t_start = time.perf_counter()
    aa = mean = nrr_value = None
    with eval_mode(model):
        t = time.perf_counter()
        n_clean, num_classes = _count_correct(model, x, y, batch_size=batch_size, device=dev,
                                              progress=progress, desc="clean")
        clean = 100.0 * n_clean / n
        extras["clean_seconds"] = time.perf_counter() - t
        extras["num_classes"] = num_classes
        emit(f"clean: {clean:.2f}% ({n_clean}/{n})")

        t = time.perf_counter()
        n_pgd, _ = _count_correct(model, x, y, batch_size=batch_size, device=dev, threat=threat,
                                  seed=seed, progress=progress, desc=f"PGD-{threat.steps}")
        robust_pgd = 100.0 * n_pgd / n
        extras["pgd_seconds"] = time.perf_counter() - t
        emit(f"PGD-{threat.steps} ({threat.describe()}): {robust_pgd:.2f}% ({n_pgd}/{n})")

        if autoattack:
            plan = autoattack_plan(num_classes, threat.norm, "standard")
            extras.update(aa_version="standard",
                          aa_threat=f"{threat.norm} eps={format_budget(threat.eps)}",
                          aa_attacks=plan["attacks"], aa_n_target_classes=plan["n_target_classes"])
            bar = _AABar(len(plan["attacks"]), enabled=progress and log is None)
            t = time.perf_counter()
            try:
                _, robust = run_autoattack(model, x, y, threat, version="standard",
                                           batch_size=batch_size, device=dev, seed=seed,
                                           log=log if log is not None else bar)
            finally:
                bar.close()
            n_aa = int(robust.sum())
            aa = 100.0 * n_aa / n
            extras["aa_seconds"] = time.perf_counter() - t
            mean = mean_score(clean, aa)
            nrr_value = nrr(clean, aa)
            emit(f"AutoAttack: {aa:.2f}% ({n_aa}/{n}); Mean {mean:.2f}, NRR {nrr_value:.2f}")

    return RobustnessReport(
        clean=clean, pgd=robust_pgd, aa=aa, mean=mean, nrr=nrr_value, n_examples=n,
        threat=threat.describe(), pgd_steps=threat.steps,
        seconds=time.perf_counter() - t_start, extras=extras,
    )


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return f"{value:.2f}"
    return str(value)


def _render(rows: Sequence[tuple[str, dict[str, Any]]], with_name: bool = True) -> str:
    steps = {d.get("pgd_steps") for _, d in rows}
    pgd_head = f"PGD-{steps.pop()}" if len(steps) == 1 and None not in steps else "PGD"
    header = (["model"] if with_name else []) + ["Clean", pgd_head, "AA", "Mean", "NRR"]
    body = [
        ([str(name)] if with_name else [])
        + [_cell(d.get(k)) for k in ("clean", "pgd", "aa", "mean", "nrr")]
        for name, d in rows
    ]
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]
    left = 1 if with_name else 0  # the name column is left-aligned, numbers right-aligned

    def line(cells: list[str]) -> str:
        parts = [c.ljust(w) if i < left else c.rjust(w)
                 for i, (c, w) in enumerate(zip(cells, widths, strict=True))]
        return "| " + " | ".join(parts) + " |"

    rule = "|" + "|".join(
        (":" + "-" * (w + 1)) if i < left else ("-" * (w + 1) + ":") for i, w in enumerate(widths)
    ) + "|"
    return "\n".join([line(header), rule, *(line(r) for r in body)])


def format_table(rows: list[tuple[str, dict[str, Any]]]) -> str:
    """A markdown table ``name | Clean | PGD-20 | AA | Mean | NRR`` of several reports (2 decimals).

    ``rows`` are ``(name, report.to_dict())`` pairs (a ``RobustnessReport`` is
    accepted in place of its dict); missing values print as ``-``.
    """
    dicts = [(name, d.to_dict() if isinstance(d, RobustnessReport) else dict(d))
             for name, d in rows]
    return _render(dicts, with_name=True)
