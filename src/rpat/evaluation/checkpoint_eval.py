"""``rpat eval``: evaluate a checkpoint on its dataset's test images.

Besides :func:`evaluate_checkpoint`, the helpers here decide where a report goes
(:func:`report_path_for`), whether an existing report can be reused
(:func:`eval_settings`, :func:`reusable_report`) and where AutoAttack keeps its
resume state (:func:`aa_state_path`, removed by :func:`remove_aa_state` once the
report is written).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import torch

from ..attacks.threat import ThreatModel, default_threat, parse_budget
from ..checkpoint import is_rpat_checkpoint, model_from_checkpoint
from ..config import config_from_dict
from ..data import evaluation_subset, get_spec, load_dataset
from ..errors import InputError
from ..models.normalization import add_normalization, parse_normalize
from ..utils import resolve_device
from .robustness import RobustnessReport, evaluate_robustness


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


#: ``--autoattack`` choices: the paper's standard AutoAttack, the cheaper APGD-CE + APGD-T, or none.
AA_VERSIONS: tuple[str, ...] = ("standard", "apgd", "none")
#: Files in a folder that make it a run directory (``rpat train`` writes both).
RUN_DIR_MARKERS: tuple[str, ...] = ("config.yaml", "meta.json")


def aa_version(autoattack: bool | str | None) -> str:
    """The version name: ``True``/``"standard"`` -> ``"standard"``, ``"apgd"``, ``False``/``None`` -> ``"none"``."""
    if autoattack is True:
        return "standard"
    if autoattack is False or autoattack is None:
        return "none"
    if autoattack not in AA_VERSIONS:
        raise InputError(f"unknown AutoAttack version {autoattack!r}; valid: {', '.join(AA_VERSIONS)}")
    return str(autoattack)


def checkpoint_identity(path: str | Path) -> dict[str, Any]:
    """``{"sha256", "size"}`` of a checkpoint file: the same weights file gives the same identity."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return {"sha256": h.hexdigest(), "size": Path(path).stat().st_size}


def is_run_dir(folder: str | Path) -> bool:
    """A folder ``rpat train`` made (it holds ``config.yaml`` or ``meta.json``)."""
    return any((Path(folder) / m).is_file() for m in RUN_DIR_MARKERS)


def report_path_for(checkpoint: str | Path, out: str | Path | None = None, cwd: str | Path | None = None) -> Path:
    """Where ``rpat eval`` writes a checkpoint's report.

    ``out`` if given; else ``<checkpoint>.eval.json`` next to the checkpoint when its
    folder is a run directory (:func:`is_run_dir`) and writable; else
    ``<checkpoint stem>.eval.json`` in ``cwd`` (default: the working directory), so a
    checkpoint inside site-packages or a read-only share never gets files written
    beside it.
    """
    if out is not None:
        return Path(out)
    ckpt = Path(checkpoint)
    folder = ckpt.parent
    if is_run_dir(folder) and os.access(folder, os.W_OK):
        return ckpt.with_suffix(".eval.json")
    return Path(cwd if cwd is not None else Path.cwd()) / ckpt.with_suffix(".eval.json").name


def aa_state_path(report_path: str | Path) -> Path:
    """AutoAttack's resume state for a report: ``<report without .json>.aa-state.json`` beside it."""
    p = Path(report_path)
    return p.with_name(p.name.removesuffix(".json") + ".aa-state.json")


def remove_aa_state(report_path: str | Path) -> list[Path]:
    """Delete the AutoAttack state of a report (the state file and its tensor files); returns what went."""
    state = aa_state_path(report_path)
    stem = state.name.removesuffix(".json")
    gone = [f for f in state.parent.glob(f"{stem}*") if f.is_file()] if state.parent.is_dir() else []
    for f in gone:
        f.unlink(missing_ok=True)
    return gone


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
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Check the arguments and describe the evaluation, without touching the dataset.

    Loads the checkpoint only (a plain state_dict without ``arch`` fails here,
    before any dataset is read). Returns ``(checkpoint dict, settings)``; two
    evaluations with equal settings give the same numbers, so
    :func:`reusable_report` may reuse one. The batch size is a setting:
    AutoAttack seeds per batch, so another batch size gives another (equally
    valid) result.
    """
    if n_examples is not None and n_examples < 1:
        raise InputError(f"--n-examples must be >= 1, got {n_examples}")
    if steps < 1 or batch_size < 1:
        raise InputError(f"--steps and --batch-size must be >= 1, got {steps} and {batch_size}")
    version = aa_version(autoattack)
    from ..checkpoint import load_checkpoint
    from ..models import resolve_model_name

    raw = load_checkpoint(path)
    stored = config_from_dict(raw["config"]) if is_rpat_checkpoint(raw) else None
    if stored is None and arch is None:
        raise InputError(f"{str(path)!r} is a plain state_dict: name its architecture with --arch "
                         "(see `rpat list models`)")
    arch_name = raw["arch"] if stored is not None else resolve_model_name(arch)
    ds_name = get_spec(dataset or (stored.data.dataset if stored else "cifar10")).name
    threat = eval_threat_for(raw, norm, eps, step_size, steps)
    stats = parse_normalize(normalize) if normalize else None
    settings = {
        "checkpoint": checkpoint_identity(path), "arch": arch_name, "dataset": ds_name,
        "n_examples": n_examples, "threat": {"norm": threat.norm, "eps": threat.eps,
                                             "step_size": threat.step_size, "steps": threat.steps},
        "seed": seed, "autoattack": version, "batch_size": batch_size,
        "normalize": {"mean": list(stats[0]), "std": list(stats[1])} if stats else None,
    }
    return raw, settings


def reusable_report(report_path: str | Path, settings: dict[str, Any], sanity: bool = False) -> dict[str, Any] | None:
    """The report at ``report_path`` if it was made with exactly ``settings`` (and has the sanity
    checks when ``sanity``); None when it is missing, unreadable or made otherwise."""
    import json

    p = Path(report_path)
    if not p.is_file():
        return None
    try:
        rep = json.loads(p.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if not isinstance(rep, dict) or rep.get("settings") != settings:
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
    line per failed check, ``log`` one line per check.
    """
    raw, settings = eval_settings(path, arch=arch, dataset=dataset, n_examples=n_examples, autoattack=autoattack,
                                  norm=norm, eps=eps, step_size=step_size, steps=steps, seed=seed,
                                  normalize=normalize, batch_size=batch_size)
    version = settings["autoattack"]
    stored = config_from_dict(raw["config"]) if is_rpat_checkpoint(raw) else None
    ds_name = settings["dataset"]
    root = data_root or (stored.data.root if stored else "data")
    spec = get_spec(ds_name)
    test = load_dataset(ds_name, root, "test")
    num_classes = len(test.classes)
    model, ckpt = model_from_checkpoint(path, arch=arch, num_classes=num_classes,
                                        in_chans=int(test.images.shape[1]))
    if model.num_classes != num_classes:
        raise InputError(f"the model has {model.num_classes} classes but {ds_name} has {num_classes}")
    if settings["normalize"] is not None:
        model = add_normalization(model, settings["normalize"]["mean"], settings["normalize"]["std"])
    dev = device if isinstance(device, torch.device) else resolve_device(device)
    model.to(dev)
    n = len(test) if n_examples is None else min(n_examples, len(test))
    sub = evaluation_subset(ds_name, test, n)
    x = sub.images.float().div_(255)
    y = sub.labels
    threat = eval_threat_for(ckpt, norm, eps, step_size, steps)
    report = evaluate_robustness(model, x, y, threat, autoattack=version, batch_size=batch_size,
                                 device=dev, seed=seed, progress=progress, log=log, aa_state=aa_state)
    info = {"checkpoint": str(path), "arch": ckpt.get("arch", settings["arch"]), "dataset": spec.name,
            "epoch": ckpt.get("epoch"), "n_examples": n, "device": str(dev),
            "torch": torch.__version__, "autoattack": version, "normalize": settings["normalize"],
            "settings": settings}
    per_attack = report.extras.get("aa_per_attack")
    if per_attack is not None:
        info["aa_per_attack"] = per_attack
    if sanity:
        from .sanity import run_sanity_checks

        info["sanity"] = run_sanity_checks(model, x, y, threat, report=report.to_dict(),
                                           batch_size=min(batch_size, 200), device=dev, seed=seed, warn=warn,
                                           log=log)
    return report, info


#: How the AutoAttack engine words a saved state that belongs to other settings.
STALE_STATE = "written for other settings"


def evaluate_for_report(path: str | Path, report_path: str | Path, *, say=None,
                        **kwargs: Any) -> tuple[RobustnessReport, dict[str, Any]]:
    """:func:`evaluate_checkpoint` with AutoAttack's resume state beside ``report_path`` (one process).

    A state saved by an interrupted run with the same settings is continued; one
    saved with other settings is deleted (``say`` is told) and the run starts over,
    since the new report replaces the one that state was for. The caller writes the
    report, then calls :func:`remove_aa_state`.
    """
    state = aa_state_path(report_path) if aa_version(kwargs.get("autoattack", True)) != "none" else None
    try:
        return evaluate_checkpoint(path, aa_state=state, **kwargs)
    except InputError as e:
        if state is None or STALE_STATE not in str(e):
            raise
        if say is not None:
            say(f"discarding {state}: it was saved by an evaluation with other settings")
        remove_aa_state(report_path)
        return evaluate_checkpoint(path, aa_state=state, **kwargs)
