"""Shared helpers of the analyses: load a checkpoint with its held-out images, attack them, stats."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..attacks.pgd import pgd
from ..attacks.threat import ThreatModel
from ..checkpoint import is_rpat_checkpoint, load_checkpoint, model_from_checkpoint
from ..config import config_from_dict
from ..data import evaluation_subset, load_dataset
from ..errors import InputError
from ..evaluation.checkpoint_eval import eval_threat_for


@dataclass
class HeldOut:
    """Held-out test images of a dataset: ``x`` ``(N, C, H, W)`` floats in [0, 1], ``y`` ``(N,)``."""

    dataset: str
    x: Tensor
    y: Tensor


_DATA_CACHE: dict[tuple[str, str, int], HeldOut] = {}


def held_out_images(dataset: str, root: str, n: int) -> HeldOut:
    """The first ``n`` test images in evaluation order (:func:`rpat.data.evaluation_subset`), cached."""
    if n < 1:
        raise InputError(f"the number of examples must be >= 1, got {n}")
    key = (dataset, str(root), n)
    if key not in _DATA_CACHE:
        test = load_dataset(dataset, root, "test", progress=False)
        sub = evaluation_subset(dataset, test, n)
        _DATA_CACHE[key] = HeldOut(dataset, sub.images.float().div_(255), sub.labels.clone())
    return _DATA_CACHE[key]


def load_for_analysis(
    path: str | Path, *, dataset: str | None = None, data_root: str | None = None, steps: int = 20
) -> tuple[nn.Module, dict[str, Any], ThreatModel, str, str]:
    """An rpat checkpoint's model (eval mode, CPU), its PGD-``steps`` threat, dataset name and root.

    The threat is the checkpoint's training threat model with ``steps`` steps
    (PGD-20 by default), as in ``rpat eval``.
    """
    raw = load_checkpoint(path)
    if not is_rpat_checkpoint(raw):
        raise InputError(f"{str(path)!r} is not an rpat checkpoint (the analyses need its config)")
    cfg = config_from_dict(raw["config"])
    model, ckpt = model_from_checkpoint(path)
    threat = eval_threat_for(ckpt, steps=steps)
    return model, ckpt, threat, dataset or cfg.data.dataset, data_root or cfg.data.root


def attack_batches(
    model: nn.Module, x: Tensor, y: Tensor, threat: ThreatModel, *, batch_size: int, device: torch.device,
    seed: int,
) -> tuple[Tensor, Tensor]:
    """PGD (uniform start, one generator seeded by ``seed``) on every batch.

    Returns ``(x_adv (N, C, H, W) on the CPU, defended (N,) bool)``; defended means
    the model still predicts ``y`` on ``x_adv``.
    """
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    advs, ok = [], []
    for i in range(0, x.shape[0], batch_size):
        xb, yb = x[i:i + batch_size].to(device), y[i:i + batch_size].to(device)
        xa = pgd(model, xb, yb, threat, start="uniform", generator=gen)
        with torch.no_grad():
            ok.append((model(xa).argmax(-1) == yb).cpu())
        advs.append(xa.cpu())
    return torch.cat(advs), torch.cat(ok)


def summarize(values: Tensor) -> dict[str, float | int | None]:
    """``{"mean", "std", "median", "count"}`` of a 1-D tensor (std unbiased; None when undefined)."""
    v = values.detach().double().flatten()
    n = int(v.numel())
    if n == 0:
        return {"mean": None, "std": None, "median": None, "count": 0}
    std = float(v.std()) if n > 1 else None
    return {"mean": float(v.mean()), "std": std, "median": float(v.quantile(0.5)), "count": n}


def finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None
