"""Clean, PGD-20 and AutoAttack accuracy of a model, and the paper's Mean and NRR.

Accuracies are in percent (0..100). Images are ``(N, C, H, W)`` floats in
[0, 1], usually on the CPU; batches are moved to ``device``, where the model
must already be. Correct counts are accumulated on the device and read once
at the end. The model is evaluated in eval mode and each submodule's mode is
restored afterwards.

AutoAttack runs through :func:`rpat.attacks.autoattack.autoattack`: the report
records robust accuracy and seconds after each attack (``extras["aa_per_attack"]``),
the run can resume from a state file (``aa_state``), and under
``torch.distributed`` (torchrun) every stage is split over the processes at
batch granularity and merged exactly (see :func:`evaluate_robustness`).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..attacks.autoattack import ATTACK_LABELS, EVAL_VERSIONS, VERSION_LABELS, version_name
from ..attacks.autoattack import autoattack as run_aa
from ..attacks.pgd import eval_mode, pgd, random_start
from ..attacks.threat import ThreatModel, format_budget
from ..distributed import comm_device, world
from ..errors import InputError
from ..utils import progress_enabled
from .metrics import accuracy_se, format_pm, mean_score, mean_se, nrr
from .stages import Stages

Log = Callable[[str], None]
#: ``attack(xb, yb, generator) -> xb_adv``: one batch ``(B, C, H, W)`` in [0, 1] to the images to score.
BatchAttack = Callable[[Tensor, Tensor, "torch.Generator"], Tensor]
#: ``skip(xb, generator)``: draw (and discard) what ``attack`` would draw for a batch this rank skips.
SkipDraw = Callable[[Tensor, "torch.Generator"], None]

#: The extra evaluations' report keys, as tables head them (``cw``'s head carries its steps: ``CW-20``).
EXTRA_COLUMNS: dict[str, str] = {"cw": "CW", "noise": "Noise", "transfer": "Transfer", "cw_art": "CW(ART)"}

#: The AutoAttack versions ``evaluate_robustness`` runs, and how tables label their accuracy.
AA_LABELS = {v: VERSION_LABELS[v] for v in EVAL_VERSIONS if v != "none"}


def aa_group_labels(version: str) -> tuple[str, str, str]:
    """The column heads of an AutoAttack version's robust accuracy, Mean and NRR: ``("AA", "Mean", "NRR")``
    for standard AutoAttack, ``("AA(APGD)", "Mean(APGD)", "NRR(APGD)")``, ``("AA+", "Mean(PLUS)", ...)``
    for the others (never the AA columns)."""
    if version == "standard":
        return "AA", "Mean", "NRR"
    return AA_LABELS[version], f"Mean({version.upper()})", f"NRR({version.upper()})"


@dataclass
class RobustnessReport:
    """One model's evaluation. Accuracies in percent; ``aa``/``mean``/``nrr`` None without AA.

    ``threat`` is the PGD threat's ``describe()`` (AutoAttack uses its norm and
    ε); ``seconds`` the wall time of the whole evaluation; ``extras`` holds
    per-stage timings, the AutoAttack setup, the device and the seed. ``cw`` (CW-PGD),
    ``noise`` (random noise), ``transfer`` (black-box transfer) and ``cw_art`` (ART's CW)
    are the extra evaluations' accuracies (:mod:`rpat.evaluation.extra`), None when not run
    (``extras["cw_steps"]`` etc. say how they ran). With
    AutoAttack, ``extras`` has ``aa_version`` (``standard`` or ``apgd``: then
    ``aa`` is the accuracy after APGD-CE + APGD-T only, labeled ``AA(APGD)``),
    ``aa_per_attack`` (``[{"attack", "robust" (%), "n_robust", "seconds"}, ...]``,
    first ``clean``), ``aa_seconds`` and ``aa_resumed``.
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
    cw: float | None = None
    noise: float | None = None
    transfer: float | None = None
    cw_art: float | None = None

    @property
    def aa_label(self) -> str:
        """``"AA"`` for standard AutoAttack, ``"AA(APGD)"`` for the APGD-CE + APGD-T variant."""
        return _aa_label(self.to_dict())

    def to_dict(self) -> dict[str, Any]:
        """All fields as a JSON-friendly dict (``extras`` copied)."""
        return dataclasses.asdict(self)

    def table(self, name: str = "") -> str:
        """A one-row aligned markdown table ``Clean | PGD-20 | AA | Mean | NRR`` (2 decimals).

        With a ``name``, a first ``model`` column holds it. The AA column is
        ``AA(APGD)`` (and Mean/NRR ``Mean(APGD)``/``NRR(APGD)``) for the apgd version.
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
    split: bool = False,
    attack: BatchAttack | None = None,
    skip: SkipDraw | None = None,
) -> tuple[int, int]:
    """Correct predictions on ``x`` (or on PGD examples when ``threat`` is given), and K.

    ``attack`` replaces PGD: each batch is scored on ``attack(xb, yb, generator)`` (the
    generator seeded with ``seed``); ``skip`` draws what it would draw for a batch another
    rank evaluates (default: a uniform start of ``threat``, what PGD draws; nothing without
    a threat).

    Returns ``(n_correct, num_classes)``; one host read at the end. The
    ``progress`` bar counts images (of this rank), so it moves, with a rate and
    an ETA, however few batches there are. With
    ``split`` under ``torch.distributed``, rank ``r`` evaluates batches
    ``r, r + W, ...`` and the counts are summed over ranks (every rank must
    call it). The PGD random starts come from one generator in batch order;
    a rank draws (and discards) the starts of the batches it skips, so each
    batch gets the same start as in one process and the sum is exact.
    """
    _check_data(x, y, batch_size)
    _check_model_device(model, device)
    generator = None
    if attack is None and threat is not None:
        pgd_threat = threat

        def attack(xb: Tensor, yb: Tensor, g: torch.Generator) -> Tensor:
            return pgd(model, xb, yb, pgd_threat, start="uniform", generator=g)
    if skip is None and threat is not None:
        start_threat = threat

        def skip(xb: Tensor, g: torch.Generator) -> None:
            random_start(xb, start_threat, "uniform", g)
    if attack is not None:
        generator = torch.Generator(device=device)
        generator.manual_seed(seed)
    rank, n_ranks = world() if split else (0, 1)
    correct = torch.zeros((), dtype=torch.long, device=device)
    num_classes = 0
    n = x.shape[0]
    mine = sum(min(batch_size, n - i) for b, i in enumerate(range(0, n, batch_size)) if b % n_ranks == rank)
    with eval_mode(model), tqdm(total=mine, desc=desc, unit="img",
                                disable=not progress or rank != 0, leave=False) as bar:
        for b, i in enumerate(range(0, n, batch_size)):
            if b % n_ranks != rank:
                if generator is not None and skip is not None:  # keep the generator where one process has it
                    skip(torch.zeros((min(batch_size, n - i), *x.shape[1:]), device=device, dtype=x.dtype),
                         generator)
                continue
            xb = x[i : i + batch_size].to(device)
            yb = y[i : i + batch_size].to(device)
            if attack is not None:
                xb = attack(xb, yb, generator)
            with torch.no_grad():
                logits = model(xb)
            num_classes = int(logits.shape[-1])
            correct += (logits.argmax(dim=-1) == yb).sum()
            bar.update(int(yb.shape[0]))
    if n_ranks > 1:
        cdev = comm_device(device)
        correct = correct.to(cdev).reshape(1)
        classes = torch.tensor([num_classes], device=cdev)
        dist.all_reduce(correct)
        dist.all_reduce(classes, op=dist.ReduceOp.MAX)
        num_classes = int(classes.item())
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
    """Clean accuracy (percent) on images ``x`` ``(N, C, H, W)`` in [0, 1], labels ``(N,)``.

    ``progress``: a tqdm bar over the images (drawn as asked: the caller decides about terminals).
    """
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
    ``progress``: a tqdm bar over the images (a batch counts once all its steps are done).
    """
    if not isinstance(threat, ThreatModel):
        raise InputError(f"threat must be a ThreatModel, got {type(threat).__name__}")
    n_correct, _ = _count_correct(model, x, y, batch_size=batch_size, device=torch.device(device),
                                  threat=threat, seed=seed, progress=progress,
                                  desc=f"PGD-{threat.steps}")
    return 100.0 * n_correct / x.shape[0]


def _aa_version(autoattack: bool | str | None) -> str | None:
    """``True``/``"standard"`` -> standard, ``"apgd"`` -> apgd, ``False``/``None``/``"none"`` -> None."""
    name = version_name(autoattack)
    return None if name == "none" else name


def evaluate_robustness(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    threat: ThreatModel,
    *,
    autoattack: bool | str | None = True,
    batch_size: int = 500,
    device: str | torch.device = "cpu",
    seed: int = 0,
    progress: bool = True,
    log: Log | None = None,
    aa_state: str | Path | None = None,
    stages: Stages | None = None,
) -> RobustnessReport:
    """Clean, PGD and (optionally) AutoAttack accuracy, Mean and NRR of ``model``.

    Args:
        model: ``(B, C, H, W)`` images in [0, 1] -> logits; already on ``device``.
        x: ``(N, C, H, W)`` float images in [0, 1], usually on the CPU.
        y: ``(N,)`` integer labels.
        threat: the PGD threat (PGD-20: ℓ∞ 8/255, step 2/255, ``steps=20``);
            AutoAttack runs with its norm and ε.
        autoattack: ``True``/``"standard"`` (APGD-CE, APGD-T, FAB-T, Square;
            the default), ``"apgd"`` (APGD-CE + APGD-T with the standard
            settings: a cheaper upper bound, reported as ``AA(APGD)``), or
            ``False``/``None``/``"none"`` (``aa``, ``mean``, ``nrr`` are None).
        batch_size: examples per batch for every stage.
        device: where the batches go (and where the model must be).
        seed: seeds the PGD random starts and AutoAttack.
        progress: tqdm bars per stage and per attack, counting images (on a
            terminal only, see :func:`rpat.utils.progress_enabled`).
        log: if given, receives one line per stage result (per attack: robust
            accuracy and seconds) and AutoAttack's warnings.
        aa_state: AutoAttack's resumable state file (JSON, with a ``.pt`` of the
            adversarial images beside it): written after the clean pass and
            each attack; an existing state for the same settings is continued
            after its last finished attack (same numbers as an uninterrupted
            run); one for other settings is an InputError.
        stages: where finished stages are kept (:mod:`rpat.evaluation.stages`): Clean and PGD are
            the stage ``clean_pgd``, taken from it when finished (None: computed).

    Mean and NRR are computed from Clean and AA (the paper's convention). The
    model runs in eval mode; each submodule's mode is restored afterwards.

    Under ``torch.distributed`` (e.g. ``torchrun``; gloo on the CPU, NCCL on
    GPUs) every rank calls this with the full ``x``/``y``; each stage gives
    rank ``r`` the batches ``r, r + W, ...`` of the same batching as one
    process and merges counts (clean, PGD) or robust flags and adversarial
    images (AutoAttack, after each attack), so every rank returns the same
    report with the single-process numbers (times: the slowest rank's).
    """
    if not isinstance(threat, ThreatModel):
        raise InputError(f"threat must be a ThreatModel, got {type(threat).__name__}")
    version = _aa_version(autoattack)
    _check_data(x, y, batch_size)
    dev = torch.device(device)
    _check_model_device(model, dev)
    rank, n_ranks = world()
    emit: Log = log if (log is not None and rank == 0) else (lambda _msg: None)
    bars = progress_enabled(progress)
    n = int(x.shape[0])
    extras: dict[str, Any] = {"device": str(dev), "seed": seed}
    if n_ranks > 1:
        extras["processes"] = n_ranks
    t_start = time.perf_counter()
    aa = mean = nrr_value = None
    stages = stages if stages is not None else Stages(None, {})
    with eval_mode(model):
        done = stages.get("clean_pgd")
        if done is None:
            t = time.perf_counter()
            n_clean, num_classes = _count_correct(model, x, y, batch_size=batch_size, device=dev,
                                                  progress=bars, desc="clean", split=True)
            clean_seconds = time.perf_counter() - t
            t = time.perf_counter()
            n_pgd, _ = _count_correct(model, x, y, batch_size=batch_size, device=dev, threat=threat,
                                      seed=seed, progress=bars, desc=f"PGD-{threat.steps}", split=True)
            done = {"n_clean": n_clean, "num_classes": num_classes, "clean_seconds": clean_seconds,
                    "n_pgd": n_pgd, "pgd_seconds": time.perf_counter() - t}
            stages.put("clean_pgd", done)
        else:
            emit("clean and PGD: taken from the finished stage of the interrupted run")
        n_clean, n_pgd = int(done["n_clean"]), int(done["n_pgd"])
        clean = 100.0 * n_clean / n
        extras.update(clean_seconds=done["clean_seconds"], num_classes=int(done["num_classes"]))
        emit(f"clean: {clean:.2f}% ({n_clean}/{n})")
        robust_pgd = 100.0 * n_pgd / n
        extras["pgd_seconds"] = done["pgd_seconds"]
        emit(f"PGD-{threat.steps} ({threat.describe()}): {robust_pgd:.2f}% ({n_pgd}/{n})")

        if version is not None:
            t = time.perf_counter()
            result = run_aa(model, x, y, threat, version=version, batch_size=batch_size, device=dev,
                                seed=seed, log=log, progress=bars, state_path=aa_state)
            extras.update(aa_version=version, aa_threat=f"{threat.norm} eps={format_budget(threat.eps)}",
                          aa_attacks=result.attacks, aa_n_target_classes=result.n_target_classes,
                          aa_per_attack=result.per_attack, aa_resumed=result.resumed,
                          aa_seconds=time.perf_counter() - t)
            n_aa = int(result.robust.sum())
            aa = 100.0 * n_aa / n
            mean = mean_score(clean, aa)
            nrr_value = nrr(clean, aa)
            label = AA_LABELS[version]
            emit(f"{label}: {aa:.2f}% ({n_aa}/{n}); Mean {mean:.2f}, NRR {nrr_value:.2f}")
            line = format_per_attack({"aa": aa, "extras": extras})
            if line:
                emit(line)

    seconds = time.perf_counter() - t_start
    if n_ranks > 1:  # one report on every rank: the slowest rank's times
        keys = [k for k in ("clean_seconds", "pgd_seconds", "aa_seconds") if k in extras]
        times = torch.tensor([seconds, *(extras[k] for k in keys)], dtype=torch.float64, device=comm_device(dev))
        dist.all_reduce(times, op=dist.ReduceOp.MAX)
        seconds, *rest = times.tolist()
        extras.update(zip(keys, rest, strict=True))
    return RobustnessReport(
        clean=clean, pgd=robust_pgd, aa=aa, mean=mean, nrr=nrr_value, n_examples=n,
        threat=threat.describe(), pgd_steps=threat.steps, seconds=seconds, extras=extras,
    )


def _aa_label(d: dict[str, Any]) -> str:
    return AA_LABELS.get((d.get("extras") or {}).get("aa_version", "standard"), "AA")


def _as_dict(report: dict[str, Any] | RobustnessReport) -> dict[str, Any]:
    return report.to_dict() if isinstance(report, RobustnessReport) else dict(report)


def _duration(seconds: float) -> str:
    return f"{seconds:.1f} s" if seconds < 60 else f"{seconds / 60:.1f} min"


def format_per_attack(report: dict[str, Any] | RobustnessReport) -> str:
    """One line: robust accuracy after each AutoAttack stage and each attack's seconds.

    ``AutoAttack per attack (robust %, seconds): clean 52.00 | APGD-CE 30.10 (4.0 s) | APGD-T 28.00
    (58.1 s) | FAB-T 28.00 (6.6 min) | Square 28.00 (8.7 min)`` from a report (or its dict);
    ``AutoAttack (APGD) per attack ...`` for the apgd version (``AutoAttack+``, ``AutoAttack (rand)``
    for plus and rand); ``""`` without per-attack records.
    """
    d = _as_dict(report)
    records = (d.get("extras") or {}).get("aa_per_attack") or []
    if not records:
        return ""
    parts = []
    for r in records:
        cell = f"{ATTACK_LABELS.get(r['attack'], r['attack'])} {r['robust']:.2f}"
        if r["attack"] != "clean":
            cell += f" ({_duration(r['seconds'])})"
        parts.append(cell)
    version = (d.get("extras") or {}).get("aa_version", "standard")
    name = {"apgd": "AutoAttack (APGD)", "plus": "AutoAttack+", "rand": "AutoAttack (rand)"}.get(version, "AutoAttack")
    return f"{name} per attack (robust %, seconds): " + " | ".join(parts)


def masking_drop(report: dict[str, Any] | RobustnessReport) -> float | None:
    """Robust % after the gradient attacks (APGD-T, or APGD-CE without it) minus the final robust %.

    > 0 means FAB-T or Square found adversarial examples that APGD missed. A few
    such images are noise (Square is a random search); a possible sign of gradient
    masking only beyond :data:`rpat.evaluation.sanity.LATE_MIN_IMAGES` images and
    :data:`~rpat.evaluation.sanity.LATE_MIN_PERCENT` points (the ``late_attacks``
    check, :func:`rpat.evaluation.sanity.late_attacks_check`). With ``n_examples``
    it is computed from the image counts (exactly ``100 * images / n``). None for
    the apgd version, without AutoAttack or without per-attack records.
    """
    d = _as_dict(report)
    extras = d.get("extras") or {}
    records = extras.get("aa_per_attack") or []
    if d.get("aa") is None or extras.get("aa_version", "standard") != "standard" or not records:
        return None
    gradient = [r for r in records if r["attack"].startswith("apgd")]
    if not gradient:
        return None
    n = d.get("n_examples")
    if n:
        return 100.0 * (gradient[-1]["n_robust"] - records[-1]["n_robust"]) / n
    return gradient[-1]["robust"] - records[-1]["robust"]


def _cell(value: Any, se: float | None = None) -> str:
    """``"72.30 ± 1.42"`` (``"72.30"`` without a standard error); ``-`` for a missing value."""
    if value is None:
        return "-"
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return format_pm(float(value), se)
    return str(value)


def _standard_errors(d: dict[str, Any]) -> dict[str, float | None]:
    """Each accuracy's standard error on the report's ``n_examples`` images (:func:`accuracy_se`); Mean gets
    the bound :func:`mean_se`, NRR none. All None when the report does not say how many images it used."""
    n = d.get("n_examples")
    ok = isinstance(n, int) and not isinstance(n, bool) and n > 0
    se: dict[str, float | None] = {k: (accuracy_se(d[k], n) if ok and d.get(k) is not None else None)
                                   for k in ("clean", "pgd", "aa", *EXTRA_COLUMNS)}
    c, a = se["clean"], se["aa"]
    se["mean"] = mean_se(c, a) if c is not None and a is not None and d.get("mean") is not None else None
    se["nrr"] = None
    return se


def _aa_groups(rows: Sequence[tuple[str, dict[str, Any]]]) -> list[str]:
    """The AutoAttack versions that get columns: those present (standard when none ran)."""
    present = {(d.get("extras") or {}).get("aa_version", "standard") for _, d in rows if d.get("aa") is not None}
    return [v for v in AA_LABELS if v in present] or ["standard"]


def _extra_head(key: str, rows: Sequence[tuple[str, dict[str, Any]]]) -> str:
    """An extra evaluation's column head; CW's carries its steps (``CW-20``) when all rows agree."""
    if key != "cw":
        return EXTRA_COLUMNS[key]
    steps = {(d.get("extras") or {}).get("cw_steps") for _, d in rows if d.get("cw") is not None}
    return f"CW-{steps.pop()}" if len(steps) == 1 and None not in steps else "CW"


def _render(rows: Sequence[tuple[str, dict[str, Any]]], with_name: bool = True) -> str:
    steps = {d.get("pgd_steps") for _, d in rows}
    pgd_head = f"PGD-{steps.pop()}" if len(steps) == 1 and None not in steps else "PGD"
    groups = _aa_groups(rows)
    extra = [k for k in EXTRA_COLUMNS if any(d.get(k) is not None for _, d in rows)]
    header = (["model"] if with_name else []) + ["Clean", pgd_head] + [_extra_head(k, rows) for k in extra]
    for v in groups:  # standard and apgd values never share a column
        header += list(aa_group_labels(v))
    body = []
    for name, d in rows:
        version = (d.get("extras") or {}).get("aa_version", "standard")
        se = _standard_errors(d)
        cells = ([str(name)] if with_name else []) + [_cell(d.get(k), se[k]) for k in ("clean", "pgd", *extra)]
        for v in groups:
            cells += [_cell(d.get(k), se[k]) if v == version else _cell(None) for k in ("aa", "mean", "nrr")]
        body.append(cells)
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

    Each accuracy shows its standard error on the report's ``n_examples`` images,
    ``72.30 ± 1.42`` (:func:`rpat.evaluation.metrics.accuracy_se`); Mean the conservative
    bound ``(SE_Clean + SE_AA) / 2`` (:func:`~rpat.evaluation.metrics.mean_se`); NRR is
    shown without ``±``, and so is every value of a report that does not give ``n_examples``.
    ``rows`` are ``(name, report.to_dict())`` pairs (a ``RobustnessReport`` is
    accepted in place of its dict); missing values print as ``-``. Reports of
    the apgd version go to ``AA(APGD) | Mean(APGD) | NRR(APGD)`` columns (plus: ``AA+``,
    rand: ``AA-rand``); a table with several versions has each one's group of columns.
    The extra evaluations (``CW-20``, ``Noise``, ``Transfer``, ``CW(ART)``, with ± SE) get a
    column after PGD only when some row has them.
    """
    dicts = [(name, _as_dict(d)) for name, d in rows]
    return _render(dicts, with_name=True)
