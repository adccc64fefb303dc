"""Evaluate a checkpoint on its dataset's test images (:func:`evaluate_checkpoint`), and describe the
evaluation's settings so that an existing report made with the same ones can be reused
(:func:`eval_settings`, :func:`reusable_report`)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from ..attacks.autoattack import version_name
from ..attacks.threat import ThreatModel, default_threat, parse_budget
from ..checkpoint import (
    extract_state_dict,
    is_rpat_checkpoint,
    load_checkpoint,
    model_from_checkpoint,
    plain_state_dict_arch,
)
from ..config import config_from_dict
from ..data import evaluation_subset, get_spec, load_dataset
from ..data.corruptions import check_corruption_folder, corruption_set
from ..distributed import world
from ..errors import InputError
from ..models import resolve_model_name
from ..models.normalization import add_normalization, parse_normalize
from ..run_dir import read_report
from ..utils import file_identity, resolve_device
from .corruptions import evaluate_corruptions
from .extra import ExtraEvals, require_art, run_extra_evals
from .robustness import RobustnessReport, evaluate_robustness
from .sanity import run_sanity_checks
from .stages import Stages


def eval_threat_for(
    ckpt: dict[str, Any],
    norm: str | None = None,
    eps: str | float | None = None,
    step_size: str | float | None = None,
    steps: int = 20,
) -> ThreatModel:
    """The PGD-20 threat: the checkpoint's training threat model (or the paper default), overridable."""
    if is_rpat_checkpoint(ckpt) and norm is None:
        base = config_from_dict(ckpt["config"]).eval_threat()
    else:
        base = default_threat(norm or "linf")
    if norm is not None and norm != base.norm:
        base = default_threat(norm)
    e = base.eps if eps is None else parse_budget(eps, "--eps")
    s = base.step_size if step_size is None else parse_budget(step_size, "--step-size")
    return ThreatModel(base.norm, e, s, steps)


def aa_version(autoattack: bool | str | None) -> str:
    """The ``--autoattack`` version name (``rpat.attacks.autoattack.version_name``)."""
    return version_name(autoattack)


def checkpoint_identity(path: str | Path) -> dict[str, Any]:
    """``{"sha256", "size"}`` of a checkpoint file: the same weights file gives the same identity."""
    return file_identity(path)


def eval_settings(
    path: str | Path,
    *,
    arch: str | None = None,
    dataset: str | None = None,
    n_examples: int | None = None,
    autoattack: bool | str = True,
    norm: str | None = None,
    eps: str | float | None = None,
    step_size: str | float | None = None,
    steps: int = 20,
    seed: int = 0,
    normalize: str | None = None,
    batch_size: int = 500,
    extra_evals: ExtraEvals | None = None,
    corruptions: str | Path | None = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Check the arguments and describe the evaluation, without touching the dataset.

    Loads the checkpoint only: a plain state_dict without ``arch`` gets the one
    architecture its weights fit for the dataset's classes and channels
    (:func:`rpat.checkpoint.plain_state_dict_arch`), and fails here, before any
    dataset is read, when none or several fit. Returns ``(checkpoint dict, settings)``; two
    evaluations with equal settings give the same numbers, so
    :func:`reusable_report` may reuse one. The batch size is a setting:
    AutoAttack seeds per batch, so another batch size gives another (equally
    valid) result. The extra evaluations (``extra_evals``: CW, noise, transfer, ART's CW) are a
    setting under ``"extra"`` when any is asked for (a report without them has no such key, so
    neither is reused for the other); a transfer source is identified by its weights' digest
    and architecture, checked here (:func:`transfer_source_arch`).
    """
    if n_examples is not None and n_examples < 1:
        raise InputError(f"--n-examples must be >= 1, got {n_examples}")
    if steps < 1 or batch_size < 1:
        raise InputError(f"--steps and --batch-size must be >= 1, got {steps} and {batch_size}")
    version = aa_version(autoattack)
    raw = load_checkpoint(path)
    stored = config_from_dict(raw["config"]) if is_rpat_checkpoint(raw) else None
    spec = get_spec(dataset or (stored.data.dataset if stored else "cifar10"))
    ds_name = spec.name
    if stored is not None:
        arch_name = raw["arch"]
    elif arch is not None:
        arch_name = resolve_model_name(arch)
    else:  # inferred from the weights, for the dataset's classes and channels (imagefolder: classes unknown yet)
        arch_name = plain_state_dict_arch(path, extract_state_dict(raw), num_classes=spec.num_classes or None,
                                          in_chans=spec.in_chans)
    threat = eval_threat_for(raw, norm, eps, step_size, steps)
    stats = parse_normalize(normalize) if normalize else None
    settings = {
        "checkpoint": checkpoint_identity(path), "arch": arch_name, "dataset": ds_name,
        "n_examples": n_examples, "threat": {"norm": threat.norm, "eps": threat.eps,
                                             "step_size": threat.step_size, "steps": threat.steps},
        "seed": seed, "autoattack": version, "batch_size": batch_size,
        "normalize": {"mean": list(stats[0]), "std": list(stats[1])} if stats else None,
    }
    if corruptions is not None:  # checked now, before any image is read; part of the settings
        folder = check_corruption_folder(corruptions, ds_name)
        settings["corruptions"] = {"folder": str(folder.resolve()), "set": corruption_set(ds_name).name}
    if extra_evals is not None and extra_evals.any():
        if extra_evals.cw_art:
            require_art()
        extra = extra_evals.settings()
        if extra_evals.transfer_from is not None:
            extra["transfer"] = {**checkpoint_identity(extra_evals.transfer_from),
                                 "arch": transfer_source_arch(extra_evals.transfer_from, extra_evals.transfer_arch,
                                                              spec.num_classes or None, spec.in_chans)}
        settings["extra"] = extra
    return raw, settings


def transfer_source_arch(path: str | Path, arch: str | None, num_classes: int | None, in_chans: int) -> str:
    """The architecture of the transfer source ``path``: an rpat checkpoint's own, else ``arch``
    (checked against the weights) or the one the weights fit. A mismatch with ``arch`` is one InputError
    line naming both."""
    if not Path(path).is_file():
        raise InputError(f"--transfer-from {str(path)!r}: no such file")
    raw = load_checkpoint(path)
    wanted = resolve_model_name(arch) if arch is not None else None
    if is_rpat_checkpoint(raw):
        found = raw["arch"]
    else:
        try:
            found = plain_state_dict_arch(path, extract_state_dict(raw), num_classes=num_classes,
                                          in_chans=in_chans)
        except InputError:
            if wanted is None:
                raise
            found = None
    if wanted is not None and found != wanted:
        holds = f"holds a {found}" if found else "fits none of rpat's architectures"
        raise InputError(f"--transfer-from {str(path)!r} {holds}, not the --transfer-arch {wanted}")
    return found


def reusable_report(report_path: str | Path, settings: dict[str, Any], sanity: bool = False) -> dict[str, Any] | None:
    """The report at ``report_path`` if it was made with exactly ``settings`` (and has the sanity
    checks when ``sanity``); None when it is missing, unreadable or made otherwise."""
    rep = read_report(Path(report_path))
    if rep is None or rep.get("settings") != settings:
        return None
    if sanity and "sanity" not in rep:
        return None
    return rep


def evaluate_checkpoint(
    path: str | Path,
    *,
    arch: str | None = None,
    dataset: str | None = None,
    data_root: str | None = None,
    n_examples: int | None = None,
    autoattack: bool | str = True,
    norm: str | None = None,
    eps: str | float | None = None,
    step_size: str | float | None = None,
    steps: int = 20,
    batch_size: int = 500,
    device: str | torch.device = "auto",
    seed: int = 0,
    progress: bool = True,
    log=None,
    sanity: bool = False,
    warn=None,
    normalize: str | None = None,
    aa_state: str | Path | None = None,
    download: bool = False,
    extra_evals: ExtraEvals | None = None,
    corruptions: str | Path | None = None,
    stage_state: str | Path | None = None,
) -> tuple[RobustnessReport, dict[str, Any]]:
    """Clean, PGD-20, AutoAttack, Mean and NRR of a checkpoint on ``n_examples`` test images.

    Which images: :func:`rpat.data.evaluation_indices` (the first N for CIFAR, a fixed
    class-mixed subset for class-sorted image folders).

    Dataset and root default to those recorded in an rpat checkpoint (cifar10 and
    ``data`` for a plain state_dict). ``autoattack``: ``"standard"`` (or True),
    ``"apgd"`` (APGD-CE + APGD-T, reported as AA(APGD)) or ``"none"`` (or False).
    ``normalize``: ``"MEAN/STD"`` or a preset name (:mod:`rpat.models.normalization`)
    for checkpoints that expect normalized inputs; the model is wrapped so that the
    attacks still work on images in [0, 1]. ``aa_state``: where AutoAttack keeps its
    resume state (a killed run given the same path continues from the last finished
    attack). Returns the report and a dict describing what was evaluated (for the
    JSON output: ``settings``, ``aa_per_attack``, and ``sanity`` when asked).

    With ``sanity``, :func:`rpat.evaluation.sanity.run_sanity_checks` runs on the
    first 200 images and its result goes to ``info["sanity"]``; ``warn`` gets one
    line per failed check, ``log`` one line per check. ``log`` also gets the lines of
    :func:`rpat.checkpoint.model_from_checkpoint` (architecture inferred from the
    weights, unverified weights); without ``log`` they are UserWarnings.

    ``extra_evals``: the extra evaluations (:func:`rpat.evaluation.extra.run_extra_evals`) after
    AutoAttack; their accuracies go to the report's ``cw``/``noise``/``transfer``/``cw_art``. The
    transfer source is loaded like the checkpoint (its architecture from ``transfer_arch`` or
    inferred) but never wrapped by ``normalize``.

    ``stage_state``: where the finished stages are kept (:mod:`rpat.evaluation.stages`: Clean + PGD,
    each extra evaluation, each corruption); a killed run given the same path and settings recomputes
    only the stage it was in (AutoAttack resumes per attack through ``aa_state``).
    """
    raw, settings = eval_settings(path, arch=arch, dataset=dataset, n_examples=n_examples, autoattack=autoattack,
                                  norm=norm, eps=eps, step_size=step_size, steps=steps, seed=seed,
                                  normalize=normalize, batch_size=batch_size, extra_evals=extra_evals,
                                  corruptions=corruptions)
    version = settings["autoattack"]
    stored = config_from_dict(raw["config"]) if is_rpat_checkpoint(raw) else None
    ds_name = settings["dataset"]
    root = data_root or (stored.data.root if stored else "data")
    spec = get_spec(ds_name)
    test = load_dataset(ds_name, root, "test", download=download, progress=progress)
    num_classes = len(test.classes)
    model, ckpt = model_from_checkpoint(path, arch=arch, num_classes=num_classes,
                                        in_chans=int(test.images.shape[1]), log=log)
    if model.num_classes != num_classes:
        raise InputError(f"the model has {model.num_classes} classes but {ds_name} has {num_classes}")
    if settings["normalize"] is not None:
        model = add_normalization(model, settings["normalize"]["mean"], settings["normalize"]["std"])
    dev = device if isinstance(device, torch.device) else resolve_device(device)
    model.to(dev)
    n = len(test) if n_examples is None else min(n_examples, len(test))
    if n_examples is not None and n_examples > len(test):
        (log or print)(f"note: --n-examples {n_examples} is more than the {len(test)} test images of {ds_name}: "
                       f"evaluating all {len(test)}")
    sub = evaluation_subset(ds_name, test, n)
    x = sub.images.float().div_(255)
    y = sub.labels
    threat = eval_threat_for(ckpt, norm, eps, step_size, steps)
    stages = Stages(stage_state, settings, write=world()[0] == 0)
    report = evaluate_robustness(model, x, y, threat, autoattack=version, batch_size=batch_size,
                                 device=dev, seed=seed, progress=progress, log=log, aa_state=aa_state,
                                 stages=stages)
    if extra_evals is not None and extra_evals.any():
        t_extra = time.perf_counter()
        source = None
        if extra_evals.transfer_from is not None:
            source, _ = model_from_checkpoint(extra_evals.transfer_from, arch=settings["extra"]["transfer"]["arch"],
                                              num_classes=num_classes, in_chans=int(test.images.shape[1]), log=log)
            source.to(dev)
        values, more = run_extra_evals(model, x, y, threat, extra_evals, source=source, batch_size=batch_size,
                                       device=dev, seed=seed, progress=progress, log=log, stages=stages)
        for key, value in values.items():
            setattr(report, key, value)
        report.extras.update(more)
        report.seconds += time.perf_counter() - t_extra  # the whole evaluation's wall time
    info = {"checkpoint": str(path), "arch": ckpt.get("arch", settings["arch"]), "dataset": spec.name,
            "epoch": ckpt.get("epoch"), "n_examples": n, "device": str(dev),
            "torch": torch.__version__, "autoattack": version, "normalize": settings["normalize"],
            "settings": settings}
    if corruptions is not None:  # accuracy per corruption and severity, corruption_acc, mce (JSON keys)
        info.update(evaluate_corruptions(model, corruptions, ds_name, n_examples=n_examples, batch_size=batch_size,
                                         device=dev, progress=progress, log=log, stages=stages))
    if stages.resumed:
        report.extras["stages_resumed"] = list(stages.resumed)
    per_attack = report.extras.get("aa_per_attack")
    if per_attack is not None:
        info["aa_per_attack"] = per_attack
    if sanity:
        info["sanity"] = run_sanity_checks(model, x, y, threat, report=report.to_dict(),
                                           batch_size=min(batch_size, 200), device=dev, seed=seed, warn=warn,
                                           log=log)
    return report, info


