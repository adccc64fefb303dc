"""``rpat eval``: evaluate a checkpoint on its dataset's test images."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..attacks.threat import ThreatModel, default_threat, parse_budget
from ..checkpoint import is_rpat_checkpoint, model_from_checkpoint
from ..config import config_from_dict
from ..data import evaluation_subset, get_spec, load_dataset
from ..errors import InputError
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


def evaluate_checkpoint(
    path: str | Path,
    *,
    arch: str | None = None,
    dataset: str | None = None,
    data_root: str | None = None,
    n_examples: int | None = None,
    autoattack: bool = True,
    norm: str | None = None,
    eps: str | float | None = None,
    step_size: str | float | None = None,
    steps: int = 20,
    batch_size: int = 500,
    device: str = "auto",
    seed: int = 0,
    progress: bool = True,
    log=None,
    sanity: bool = False,
    warn=None,
) -> tuple[RobustnessReport, dict[str, Any]]:
    """Clean, PGD-20, AutoAttack, Mean and NRR of a checkpoint on ``n_examples`` test images.

    Which images: :func:`rpat.data.evaluation_indices` (the first N for CIFAR, a fixed
    class-mixed subset for class-sorted image folders).

    Dataset and root default to those recorded in an rpat checkpoint (cifar10 and
    ``data`` for a plain state_dict). Returns the report and a dict describing
    what was evaluated (for the JSON output).

    With ``sanity``, :func:`rpat.evaluation.sanity.run_sanity_checks` runs on the
    first 200 images and its result goes to ``info["sanity"]``; ``warn`` gets one
    line per failed check.
    """
    if n_examples is not None and n_examples < 1:
        raise InputError(f"--n-examples must be >= 1, got {n_examples}")
    from ..checkpoint import load_checkpoint

    raw = load_checkpoint(path)
    stored = config_from_dict(raw["config"]) if is_rpat_checkpoint(raw) else None
    ds_name = dataset or (stored.data.dataset if stored else "cifar10")
    root = data_root or (stored.data.root if stored else "data")
    spec = get_spec(ds_name)
    test = load_dataset(ds_name, root, "test")
    num_classes = len(test.classes)
    model, ckpt = model_from_checkpoint(path, arch=arch, num_classes=num_classes,
                                        in_chans=int(test.images.shape[1]))
    if model.num_classes != num_classes:
        raise InputError(f"the model has {model.num_classes} classes but {ds_name} has {num_classes}")
    dev = resolve_device(device)
    model.to(dev)
    n = len(test) if n_examples is None else min(n_examples, len(test))
    sub = evaluation_subset(ds_name, test, n)
    x = sub.images.float().div_(255)
    y = sub.labels
    threat = eval_threat_for(ckpt, norm, eps, step_size, steps)
    report = evaluate_robustness(model, x, y, threat, autoattack=autoattack, batch_size=batch_size,
                                 device=dev, seed=seed, progress=progress, log=log)
    info = {"checkpoint": str(path), "arch": ckpt.get("arch", arch), "dataset": spec.name,
            "epoch": ckpt.get("epoch"), "n_examples": n, "device": str(dev),
            "torch": torch.__version__}
    if sanity:
        from .sanity import run_sanity_checks

        info["sanity"] = run_sanity_checks(model, x, y, threat, report=report.to_dict(),
                                           batch_size=min(batch_size, 200), device=dev, seed=seed, warn=warn)
    return report, info
