"""Cheap sanity checks that an evaluation is not silently lying.

``rpat eval`` runs them on a small subset (200 images by default) after the
main evaluation and records the result under ``"sanity"`` in its JSON; a failed
check prints one warning line. The checks:

``eval_mode``
    Every submodule is in eval mode while the model is evaluated (a module
    whose ``train()`` keeps e.g. dropout on would make the numbers random).
``deterministic``
    Two forward passes on the same batch give the same logits.
``eps0_equals_clean``
    PGD with ε = 0 gives exactly the clean accuracy (the attack pipeline does
    not change images it must not change).
``ordering``
    AA ≤ PGD ≤ Clean (percent, up to a noise tolerance of ``max(0.5, 200/n)``
    points on the ``n`` images evaluated).
``large_eps``
    PGD from the clean image (no random start) with an ε covering the whole
    image cube (ℓ∞ 1, ℓ2 √(C·H·W)) drives the accuracy below half of chance
    (``50/K`` percent). A model that stays accurate there masks its gradients
    (e.g. quantizes its input or has a non-differentiable step).
``more_steps``
    PGD with twice the steps (another random start) is not more than the
    noise tolerance ``max(1, 300/n)`` points *above* PGD with the usual steps;
    a stronger attack scoring higher is a gradient-masking sign.
``late_attacks``
    AutoAttack's black-box and boundary attacks (FAB-T, Square) break no more
    images that APGD-CE and APGD-T missed than noise explains. It fails only
    when they break at least ``LATE_MIN_IMAGES`` (3) images *and* at least
    ``LATE_MIN_PERCENT`` (1%) of the evaluated images (``masking_drop`` of the
    per-attack record, in points, is that share); fewer is a warning with the
    counts, and the check passes. Why: Square is a random search and FAB-T a
    boundary attack, so even on a model with honest gradients they find the
    odd image APGD missed (typically a few tenths of a point at most), while a
    model that masks its gradients loses several points to them. The count
    floor keeps one or two lucky images from failing a small evaluation (one
    image of 100 is already 1%), the rate floor keeps a large evaluation's
    handful (10 of 10,000 is 0.1%) from failing it. Needs the evaluation's
    per-attack record (standard AutoAttack); skipped otherwise.
``cw_vs_pgd``
    CW-PGD (``--cw``) is not above PGD-20 on the same images beyond noise,
    ``2·√(SE_CW² + SE_PGD²)`` (:func:`rpat.evaluation.metrics.accuracy_se` on the
    evaluated images): PGD on the margin loss scoring clearly higher than PGD on
    the cross-entropy suggests the cross-entropy's gradients mislead (masking).
    Skipped without a CW evaluation. Free: it reads the report's numbers.
``transfer_vs_whitebox``
    Transfer from another model (``--transfer-from``) is not *below* white-box
    PGD beyond the same noise: a black-box attack beating the white-box one is
    a classic sign of gradient masking. Skipped without a transfer evaluation.

When the evaluation's PGD accuracy is already at most 1%, ``large_eps`` and
``more_steps`` cannot inform (the gradient attack works) and are skipped, which
saves most of the cost. All accuracies are in percent; ε in [0, 1] pixel
units. Costs about ``5 × steps`` attack iterations on the subset (``2 × steps``
when the two are skipped); ``seconds`` in the result, per check too.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from ..attacks.pgd import eval_mode, pgd
from ..attacks.threat import ThreatModel, format_budget
from ..errors import InputError
from .metrics import accuracy_se
from .robustness import masking_drop

Log = Callable[[str], None]

SANITY_CHECKS = ("eval_mode", "deterministic", "eps0_equals_clean", "ordering", "large_eps", "more_steps",
                 "late_attacks", "cw_vs_pgd", "transfer_vs_whitebox")
#: PGD accuracy (percent) at or below which ``large_eps`` and ``more_steps`` are skipped.
SKIP_BELOW_PGD = 1.0
#: ``late_attacks`` fails only when FAB-T/Square break at least this many images APGD missed...
LATE_MIN_IMAGES = 3
#: ... and at least this percentage of the evaluated images (see the module doc for why).
LATE_MIN_PERCENT = 1.0


def _correct(model: nn.Module, x: Tensor, y: Tensor, device: torch.device, batch_size: int,
             threat: ThreatModel | None = None, seed: int = 0, start: str = "uniform") -> int:
    """Number of images (or PGD images under ``threat``) classified correctly; one host read."""
    gen = None
    if threat is not None:
        gen = torch.Generator(device=device)
        gen.manual_seed(seed)
    correct = torch.zeros((), dtype=torch.long, device=device)
    for i in range(0, x.shape[0], batch_size):
        xb, yb = x[i:i + batch_size].to(device), y[i:i + batch_size].to(device)
        if threat is not None:
            xb = pgd(model, xb, yb, threat, start=start, generator=gen)
        with torch.no_grad():
            correct += (model(xb).argmax(-1) == yb).sum()
    return int(correct.item())


def _large_eps(threat: ThreatModel, x: Tensor) -> ThreatModel:
    """A threat whose ε covers the whole image cube: ℓ∞ 1, ℓ2 √(C·H·W); step ε/4, ≥ 20 steps."""
    eps = 1.0 if threat.norm == "linf" else math.sqrt(x[0].numel())
    return ThreatModel(threat.norm, eps, eps / 4, max(threat.steps, 20))


def late_attacks_check(report: dict[str, Any] | None) -> dict[str, Any]:
    """The ``late_attacks`` verdict on an evaluation's numbers (``RobustnessReport.to_dict()``).

    Returns ``{"passed", "detail"}`` plus, when FAB-T/Square ran, ``"drop"`` (points of
    robust accuracy they took after APGD, :func:`masking_drop`), ``"broken"`` (images) and
    ``"n_examples"``; ``"warning": True`` when they broke images but fewer than
    ``LATE_MIN_IMAGES`` or less than ``LATE_MIN_PERCENT`` % of them (within noise: passed);
    ``"skipped": True`` without a standard-AutoAttack per-attack record.
    """
    drop = masking_drop(report) if report else None
    if drop is None:
        return {"passed": True, "skipped": True,
                "detail": "skipped: no per-attack AutoAttack record with FAB-T/Square (standard AutoAttack only)"}
    n = report.get("n_examples")
    records = (report.get("extras") or {}).get("aa_per_attack") or []
    gradient = [r for r in records if r["attack"].startswith("apgd")]
    if "n_robust" in gradient[-1] and "n_robust" in records[-1]:
        broken = int(gradient[-1]["n_robust"]) - int(records[-1]["n_robust"])
    else:
        broken = round(drop * n / 100.0) if n else None
    out: dict[str, Any] = {"drop": drop, "broken": broken, "n_examples": n}
    if drop <= 0:
        return {"passed": True, **out, "detail": "FAB-T/Square found nothing APGD-CE/APGD-T missed"}
    of = f"{broken} of {n} images" if broken is not None and n else f"{drop:.2f}% of the images"
    what = f"FAB-T/Square broke {of} that APGD missed ({drop:.2f}%)"
    rule = f"at least {LATE_MIN_IMAGES} images and {LATE_MIN_PERCENT:g}% of them"
    if (broken is None or broken >= LATE_MIN_IMAGES) and drop >= LATE_MIN_PERCENT:
        return {"passed": False, **out, "detail": f"{what}, {rule}: a possible sign of gradient masking"}
    return {"passed": True, "warning": True, **out,
            "detail": f"warning: {what}; within noise (gradient masking is flagged from {rule})"}


def _beyond_noise(report: dict[str, Any], higher: str, lower: str) -> tuple[float, float]:
    """``(report[higher] - report[lower], 2·√(SE_higher² + SE_lower²))`` in points on ``n_examples`` images."""
    n = int(report.get("n_examples") or 0)
    a, b = float(report[higher]), float(report[lower])
    noise = 2.0 * math.hypot(accuracy_se(a, n), accuracy_se(b, n)) if n > 0 else 0.0
    return a - b, noise


def cw_vs_pgd_check(report: dict[str, Any] | None) -> dict[str, Any]:
    """The ``cw_vs_pgd`` verdict: CW-PGD accuracy (``cw``) not above PGD (``pgd``) beyond
    ``2·√(SE_CW² + SE_PGD²)`` points; ``{"passed", "detail", "gap", "noise"}``, skipped without ``cw``."""
    if not report or report.get("cw") is None or report.get("pgd") is None:
        return {"passed": True, "skipped": True, "detail": "skipped: no CW evaluation (--cw)"}
    gap, noise = _beyond_noise(report, "cw", "pgd")
    steps = (report.get("extras") or {}).get("cw_steps")
    cw, pgd_head = f"CW-{steps}" if steps else "CW", f"PGD-{report.get('pgd_steps') or ''}".rstrip("-")
    detail = (f"{cw} {report['cw']:.2f}% vs {pgd_head} {report['pgd']:.2f}% (may exceed it by at most "
              f"{noise:.2f} points, 2 standard errors)")
    if gap > noise:
        detail += (": PGD on the cross-entropy is clearly weaker than on the CW margin, a possible sign of "
                   "gradient masking")
    return {"passed": gap <= noise, "gap": gap, "noise": noise, "detail": detail}


def transfer_vs_whitebox_check(report: dict[str, Any] | None) -> dict[str, Any]:
    """The ``transfer_vs_whitebox`` verdict: transfer accuracy (``transfer``) not below white-box PGD
    (``pgd``) beyond ``2·√(SE² + SE²)`` points; ``{"passed", "detail", "gap", "noise"}``, skipped without it."""
    if not report or report.get("transfer") is None or report.get("pgd") is None:
        return {"passed": True, "skipped": True, "detail": "skipped: no transfer evaluation (--transfer-from)"}
    gap, noise = _beyond_noise(report, "pgd", "transfer")
    detail = (f"transfer {report['transfer']:.2f}% vs white-box PGD {report['pgd']:.2f}% (may be below it by at "
              f"most {noise:.2f} points, 2 standard errors)")
    if gap > noise:
        detail += ": a black-box attack beats the white-box one, a possible sign of gradient masking"
    return {"passed": gap <= noise, "gap": gap, "noise": noise, "detail": detail}


def run_sanity_checks(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    threat: ThreatModel,
    *,
    report: dict[str, Any] | None = None,
    n_examples: int = 200,
    batch_size: int = 200,
    device: str | torch.device = "cpu",
    seed: int = 0,
    warn: Log | None = None,
    log: Log | None = None,
) -> dict[str, Any]:
    """Run the checks of this module on the first ``n_examples`` of ``x`` ``(N, C, H, W)`` in [0, 1].

    Args:
        model: logits model, already on ``device``; its train/eval modes are restored afterwards.
        x, y: the evaluated images and labels (``(N,)``), usually on the CPU.
        threat: the PGD threat of the evaluation (norm, ε, step size, steps).
        report: the evaluation's numbers (``clean``, ``pgd``, ``aa`` in percent, ``n_examples``,
            ``extras.aa_per_attack``, ``cw``, ``transfer``), e.g. ``RobustnessReport.to_dict()``; without
            it the ordering uses the subset's clean and PGD accuracy and ``late_attacks``, ``cw_vs_pgd``
            and ``transfer_vs_whitebox`` are skipped.
        n_examples: subset size (the first images).
        warn: called with one line per failed check, and one per check that passed with a
            warning (``late_attacks`` below its threshold).
        log: called with one line per check as it finishes (result and seconds).

    Returns:
        ``{"passed": bool, "failed": [names], "skipped": [names], "warnings": [names], "n_examples": n,
        "seconds": s, "checks": {name: {"passed": bool, "detail": str, "seconds": s, ...numbers}}}``;
        a skipped check has ``"skipped": True``, one that passed with a warning ``"warning": True``;
        both count as passed.
    """
    if not isinstance(threat, ThreatModel):
        raise InputError(f"threat must be a ThreatModel, got {type(threat).__name__}")
    if n_examples < 1 or batch_size < 1:
        raise InputError(f"n_examples and batch_size must be >= 1, got {n_examples} and {batch_size}")
    dev = torch.device(device)
    t0 = time.perf_counter()
    n = min(int(n_examples), int(x.shape[0]))
    xs, ys = x[:n], y[:n]
    checks: dict[str, dict[str, Any]] = {}
    clock = [time.perf_counter()]

    def done(name: str, result: dict[str, Any]) -> None:
        now = time.perf_counter()
        result["passed"] = bool(result["passed"])
        result["seconds"] = now - clock[0]
        clock[0] = now
        checks[name] = result
        if log is not None:
            state = "" if result.get("skipped") or result.get("warning") else ("ok " if result["passed"] else "FAILED ")
            log(f"sanity {name}: {state}({result['seconds']:.1f} s): {result['detail']}")

    def pct(count: int) -> float:
        return 100.0 * count / n

    rep_pgd = report.get("pgd") if report else None
    hopeless = rep_pgd is not None and rep_pgd <= SKIP_BELOW_PGD
    why_skip = (f"skipped: PGD accuracy is already {rep_pgd:.2f}% <= {SKIP_BELOW_PGD:g}%, "
                "so a stronger attack cannot inform" if hopeless else "")

    with eval_mode(model):
        training = [name or "<model>" for name, m in model.named_modules() if m.training]
        done("eval_mode", {
            "passed": not training,
            "detail": ("all modules in eval mode" if not training else
                       f"{len(training)} module(s) stay in train mode during evaluation: "
                       f"{', '.join(training[:3])}{'...' if len(training) > 3 else ''}"),
        })

        xb = xs[:batch_size].to(dev)
        with torch.no_grad():
            a, b = model(xb), model(xb)
        diff = float((a - b).abs().max()) if a.numel() else 0.0
        scale = float(a.abs().max()) if a.numel() else 0.0
        num_classes = int(a.shape[-1])
        done("deterministic", {
            "passed": diff <= 1e-5 * (1.0 + scale), "max_abs_diff": diff,
            "detail": f"two forward passes differ by at most {diff:.3g} (logit scale {scale:.3g})",
        })

        clean = pct(_correct(model, xs, ys, dev, batch_size))
        zero = ThreatModel(threat.norm, 0.0, threat.step_size, max(1, min(threat.steps, 2)))
        acc0 = pct(_correct(model, xs, ys, dev, batch_size, zero, seed))
        done("eps0_equals_clean", {
            "passed": acc0 == clean, "clean": clean, "eps0": acc0,
            "detail": f"PGD with eps=0: {acc0:.2f}% vs clean {clean:.2f}%",
        })

        need_pgd = not hopeless or not report
        pgd_k = pct(_correct(model, xs, ys, dev, batch_size, threat, seed)) if need_pgd else None

        rep_n = int(report.get("n_examples") or n) if report else n
        tol = max(0.5, 200.0 / rep_n)
        r_clean = report.get("clean") if report else clean
        r_pgd = rep_pgd if report else pgd_k
        r_aa = report.get("aa") if report else None
        ok = r_pgd is None or r_clean is None or r_pgd <= r_clean + tol
        ok = ok and (r_aa is None or r_pgd is None or r_aa <= r_pgd + tol)
        shown = f"AA {r_aa:.2f} <= " if r_aa is not None else ""
        done("ordering", {
            "passed": bool(ok), "clean": r_clean, "pgd": r_pgd, "aa": r_aa, "tolerance": tol,
            "detail": f"{shown}PGD {r_pgd:.2f} <= Clean {r_clean:.2f} (tolerance {tol:.2f} points)",
        })

        big = _large_eps(threat, xs)
        limit = 50.0 / max(num_classes, 1)
        if hopeless:
            done("large_eps", {"passed": True, "skipped": True, "detail": why_skip})
        else:
            acc_big = pct(_correct(model, xs, ys, dev, batch_size, big, seed, start="none"))
            done("large_eps", {
                "passed": acc_big <= limit, "accuracy": acc_big, "limit": limit, "eps": big.eps,
                "detail": (f"PGD-{big.steps} with {big.norm} eps={format_budget(big.eps)} (whole image range): "
                           f"{acc_big:.2f}% (must be <= {limit:.2f}%)"),
            })

        strong = threat.with_steps(2 * max(threat.steps, 1))
        tol_s = max(1.0, 300.0 / n)
        if hopeless:
            done("more_steps", {"passed": True, "skipped": True, "detail": why_skip})
        else:
            acc_strong = pct(_correct(model, xs, ys, dev, batch_size, strong, seed + 1))
            done("more_steps", {
                "passed": acc_strong <= pgd_k + tol_s, "pgd": pgd_k, "pgd_more_steps": acc_strong,
                "tolerance": tol_s,
                "detail": (f"PGD-{strong.steps} {acc_strong:.2f}% vs PGD-{threat.steps} {pgd_k:.2f}% "
                           f"(may exceed it by at most {tol_s:.2f} points)"),
            })

        done("late_attacks", late_attacks_check(report))
        done("cw_vs_pgd", cw_vs_pgd_check(report))
        done("transfer_vs_whitebox", transfer_vs_whitebox_check(report))

    failed = [k for k, v in checks.items() if not v["passed"]]
    skipped = [k for k, v in checks.items() if v.get("skipped")]
    warned = [k for k, v in checks.items() if v["passed"] and v.get("warning")]
    if warn is not None:
        for k in failed:
            warn(f"rpat: warning: sanity check {k} failed: {checks[k]['detail']}")
        for k in warned:
            warn(f"rpat: warning: sanity check {k}: {checks[k]['detail'].removeprefix('warning: ')}")
    return {"passed": not failed, "failed": failed, "skipped": skipped, "warnings": warned, "n_examples": n,
            "seconds": time.perf_counter() - t0, "checks": checks}


def summarize(result: dict[str, Any]) -> str:
    """One line: what the sanity checks found and what they cost."""
    skipped = result.get("skipped", [])  # reports written before skipping existed lack the key
    ran = len(result["checks"]) - len(skipped)
    head = f"sanity checks on {result['n_examples']} images, {result['seconds']:.1f} s: "
    if result["failed"]:
        head += f"{len(result['failed'])} of {ran} FAILED ({', '.join(result['failed'])})"
    else:
        head += f"all {ran} passed"
    warned = result.get("warnings", [])
    if warned:
        head += f"; {len(warned)} warning{'s' if len(warned) > 1 else ''} ({', '.join(warned)})"
    if skipped:
        head += f"; skipped {', '.join(skipped)}"
    return head
