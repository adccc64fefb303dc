"""Accuracy under common corruptions (CIFAR-10-C, CIFAR-100-C, Tiny-ImageNet-C): per corruption and severity.

:func:`evaluate_corruptions` reads each corruption and severity with :func:`rpat.data.corruptions.corruption_split`
and measures rpat's clean accuracy on it (:func:`rpat.evaluation.robustness.accuracy`, images as floats in [0, 1]).
It reports, in percent:

- per corruption, the accuracy at each severity ``"1"``..``"5"`` and on all 5 together (``"all"``);
- ``corruption_acc``: the mean over corruptions and severities (RobustBench's corruption accuracy);
- ``mce``: the mean over corruptions of the error (100 - accuracy) on all 5 severities together, the
  ``test_mce`` of the CIFAR-C authors' release: *unnormalized* (not divided by AlexNet's errors, as
  ImageNet-C's mCE is). With equally many images per severity, ``mce == 100 - corruption_acc``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..data.corruptions import CORRUPTIONS, SEVERITIES, check_corruption_folder, corruption_set, corruption_split
from ..errors import InputError
from .robustness import accuracy
from .stages import Stages

__all__ = ["evaluate_corruptions"]

Log = Callable[[str], None]


#: The report keys of a corruption evaluation and their column heads: RobustBench's mean corruption
#: accuracy and the release's mCE (mean error over corruptions), in percent.
CORRUPTION_COLUMNS: dict[str, str] = {"corruption_acc": "Corruptions", "mce": "mCE"}


def evaluate_corruptions(
    model: nn.Module,
    root: str | Path,
    dataset: str,
    *,
    n_examples: int | None = None,
    batch_size: int = 500,
    device: str | torch.device = "cpu",
    corruptions: Sequence[str] | None = None,
    progress: bool = False,
    log: Log | None = None,
    stages: Stages | None = None,
) -> dict[str, Any]:
    """Accuracy of ``model`` on each corruption and severity of the set for ``dataset``.

    Args:
        model: classifier taking float images ``(B, 3, H, W)`` in [0, 1], already on ``device``.
        root: the set's folder (``CIFAR-10-C``) or the folder holding it.
        dataset: ``cifar10``, ``cifar100`` or ``tiny-imagenet`` (or ``cifar10-c`` ...).
        n_examples: images per severity (default all: 10,000 in the release); for CIFAR-C the first N.
        batch_size: images per forward pass.
        device: where the batches go.
        corruptions: which ones (default the 15 benchmark corruptions, ``CORRUPTIONS``; the extras
            ``speckle_noise``, ``gaussian_blur``, ``spatter``, ``saturate`` only when named).
        progress: a tqdm bar per corruption and severity (drawn as asked: the caller decides about terminals).
        log: called with one line per corruption (its accuracies) when given.
        stages: where finished stages are kept (:mod:`rpat.evaluation.stages`): each corruption is the
            stage ``corruption:<name>``, taken from it when finished (a killed run recomputes one corruption).

    Returns:
        A JSON-ready dict, accuracies in percent::

            {"corruption_set": "CIFAR-10-C", "folder": str,
             "corruptions": {name: {"1": acc, ..., "5": acc, "all": acc}},
             "corruption_acc": mean over corruptions and severities,
             "mce": mean over corruptions of 100 - acc["all"],
             "corruption_images": images per severity (int),
             "seconds": wall time}

    Raises:
        InputError: the folder lacks a file (all are checked before any evaluation), a file has the
            wrong shape, an unknown corruption, ``n_examples`` < 1.
    """
    if batch_size < 1:
        raise InputError(f"batch_size must be >= 1, got {batch_size}")
    if n_examples is not None and n_examples < 1:
        raise InputError(f"n_examples must be >= 1, got {n_examples}")
    s = corruption_set(dataset)
    names = list(CORRUPTIONS if corruptions is None else corruptions)
    folder = check_corruption_folder(root, dataset, corruptions)  # fail before hours of evaluation
    t0 = time.perf_counter()
    per: dict[str, dict[str, float]] = {}
    n_images: int | None = None
    stages = stages if stages is not None else Stages(None, {})
    for name in names:
        rec = stages.get(f"corruption:{name}")
        if rec is None:
            accs: dict[str, float] = {}
            correct = total = 0.0
            for sev in SEVERITIES:
                split = corruption_split(folder, dataset, name, sev, n_examples)
                n = len(split)
                if n_images is not None and n != n_images:
                    raise InputError(f"{folder}: {name} severity {sev} has {n} images but the others {n_images}; "
                                     f"every corruption and severity must hold the same test images")
                n_images = n
                acc = accuracy(model, split.images.float().div_(255), split.labels, batch_size=batch_size,
                               device=device, progress=progress)
                accs[str(sev)] = acc
                correct += acc * n
                total += n
            accs["all"] = correct / total
            stages.put(f"corruption:{name}", {"accuracy": accs, "images": n_images})
        else:
            accs = {k: float(v) for k, v in rec["accuracy"].items()}
            n_images = int(rec["images"])
            if log is not None:
                log(f"{name}: taken from the finished stage of the interrupted run")
        per[name] = accs
        if log is not None:
            log(f"{name}: " + ", ".join(f"{k} {v:.2f}%" for k, v in accs.items()))
    cells = [per[c][str(sev)] for c in names for sev in SEVERITIES]
    return {
        "corruption_set": s.folder,
        "folder": str(folder),
        "corruptions": per,
        "corruption_acc": sum(cells) / len(cells),
        "mce": sum(100.0 - per[c]["all"] for c in names) / len(names),
        "corruption_images": int(n_images or 0),
        "seconds": time.perf_counter() - t0,
    }
