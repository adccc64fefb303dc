"""Perception consistency of defended and failed examples (the paper's Figures 2 and 5).

For held-out images ``x`` ``(N, C, H, W)`` in [0, 1], attack each with PGD-20
under the checkpoint's threat model (Δ = x_adv − x), split them into

- **defended**: the model still predicts the label on ``x_adv``;
- **failed**: it does not,

and measure, per example, the mean squared difference over the output
dimensions of a perception proxy ``h`` (logits, second_to_last, third_to_last):

- ``clean_adv`` = MSE(h(x), h(x_adv))
- ``clean_mid`` = MSE(h(x), h(x_mid))
- ``mid_adv``   = MSE(h(x_mid), h(x_adv)),  with x_mid = x + Δ/2.

Each group's mean, std, median and count are reported. Smaller means more
consistent perception; the paper finds the failed group *more* consistent
than the defended one. The model is in eval mode for every measurement
(BatchNorm running statistics), so examples do not interact.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .. import run_dir as rd
from ..attacks.pgd import eval_mode
from ..attacks.threat import ThreatModel
from ..errors import InputError
from ..models.base import PROXIES
from ..utils import resolve_device
from .common import attack_batches, held_out_images, load_for_analysis, summarize

METRICS: tuple[str, ...] = ("clean_adv", "clean_mid", "mid_adv")
GROUPS: tuple[str, ...] = ("defended", "failed", "all")
EPOCH_FILE = re.compile(r"^epoch_(\d+)\.pt$")


def check_proxies(proxies: Sequence[str]) -> list[str]:
    out = list(dict.fromkeys(proxies))
    if not out:
        raise InputError("give at least one proxy")
    for p in out:
        if p not in PROXIES:
            raise InputError(f"unknown proxy {p!r}; valid: {', '.join(PROXIES)}")
    return out


def per_example_mse(a: Tensor, b: Tensor) -> Tensor:
    """``(B, ...)`` and ``(B, ...)`` -> ``(B,)``: mean squared difference over all output dims."""
    return (a - b).pow(2).flatten(1).mean(1)


def perception_distances(
    model: nn.Module, x: Tensor, x_adv: Tensor, proxies: Sequence[str] = ("logits",), *,
    batch_size: int = 250, device: str | torch.device = "cpu",
) -> dict[str, dict[str, Tensor]]:
    """Per-example ``clean_adv``, ``clean_mid``, ``mid_adv`` MSEs of each proxy.

    Args:
        model: an rpat model (``forward_proxies``), already on ``device``.
        x, x_adv: ``(N, C, H, W)`` images in [0, 1]; x_mid = (x + x_adv) / 2.
    Returns:
        ``{proxy: {metric: (N,) float64 CPU tensor}}``.
    """
    proxies = check_proxies(proxies)
    if x.shape != x_adv.shape:
        raise InputError(f"x and x_adv differ in shape: {tuple(x.shape)} vs {tuple(x_adv.shape)}")
    dev = torch.device(device)
    parts: dict[str, dict[str, list[Tensor]]] = {p: {m: [] for m in METRICS} for p in proxies}
    with eval_mode(model), torch.no_grad():
        for i in range(0, x.shape[0], batch_size):
            xb, ab = x[i:i + batch_size].to(dev), x_adv[i:i + batch_size].to(dev)
            mb = xb + 0.5 * (ab - xb)
            b = xb.shape[0]
            h = model.forward_proxies(torch.cat([xb, mb, ab]))  # eval mode: no cross-example coupling
            for p in proxies:
                hc, hm, ha = h[p][:b], h[p][b:2 * b], h[p][2 * b:]
                parts[p]["clean_adv"].append(per_example_mse(hc, ha).double().cpu())
                parts[p]["clean_mid"].append(per_example_mse(hc, hm).double().cpu())
                parts[p]["mid_adv"].append(per_example_mse(hm, ha).double().cpu())
    return {p: {m: torch.cat(v) for m, v in d.items()} for p, d in parts.items()}


def group_statistics(dist: dict[str, dict[str, Tensor]], defended: Tensor) -> dict[str, Any]:
    """``{proxy: {group: {metric: {mean, std, median, count}}}}`` for defended / failed / all."""
    masks = {"defended": defended, "failed": ~defended, "all": torch.ones_like(defended)}
    return {p: {g: {m: summarize(v[mask]) for m, v in d.items()} for g, mask in masks.items()}
            for p, d in dist.items()}


def consistency_of_model(
    model: nn.Module, x: Tensor, y: Tensor, threat: ThreatModel, proxies: Sequence[str] = ("logits",), *,
    batch_size: int = 250, device: str | torch.device = "cpu", seed: int = 0, keep_values: bool = False,
) -> dict[str, Any]:
    """Attack ``x`` ``(N, C, H, W)`` with PGD under ``threat``, split, and measure (see module doc).

    Returns a JSON-friendly dict with ``n_examples``, ``n_defended``, ``n_failed``,
    ``clean_accuracy`` and ``robust_accuracy`` (percent), the ``threat``, and
    ``stats`` (see :func:`group_statistics`). With ``keep_values``, ``values``
    holds the per-example lists ``{proxy: {metric: [...]}}`` and ``defended``
    the per-example flags (for figures).
    """
    proxies = check_proxies(proxies)
    dev = torch.device(device)
    with eval_mode(model):
        x_adv, defended = attack_batches(model, x, y, threat, batch_size=batch_size, device=dev, seed=seed)
        with torch.no_grad():
            clean_ok = torch.cat([(model(x[i:i + batch_size].to(dev)).argmax(-1) == y[i:i + batch_size].to(dev))
                                  .cpu() for i in range(0, x.shape[0], batch_size)])
        dist = perception_distances(model, x, x_adv, proxies, batch_size=batch_size, device=dev)
    n = int(x.shape[0])
    n_def = int(defended.sum())
    out: dict[str, Any] = {
        "n_examples": n, "n_defended": n_def, "n_failed": n - n_def,
        "clean_accuracy": 100.0 * float(clean_ok.double().mean()), "robust_accuracy": 100.0 * n_def / n,
        "threat": threat.describe(), "seed": seed, "proxies": proxies,
        "stats": group_statistics(dist, defended),
    }
    if keep_values:
        out["defended"] = defended.tolist()
        out["values"] = {p: {m: v.tolist() for m, v in d.items()} for p, d in dist.items()}
    return out


def consistency_of_checkpoint(
    path: str | Path, *, n_examples: int = 500, proxies: Sequence[str] = ("logits",), batch_size: int = 250,
    device: str = "cpu", seed: int = 0, dataset: str | None = None, data_root: str | None = None,
    keep_values: bool = True,
) -> dict[str, Any]:
    """:func:`consistency_of_model` on an rpat checkpoint and ``n_examples`` of its held-out test images."""
    model, ckpt, threat, ds, root = load_for_analysis(path, dataset=dataset, data_root=data_root)
    dev = resolve_device(device)
    model.to(dev)
    data = held_out_images(ds, root, n_examples)
    t0 = time.perf_counter()
    res = consistency_of_model(model, data.x, data.y, threat, proxies, batch_size=batch_size, device=dev,
                               seed=seed, keep_values=keep_values)
    return {"checkpoint": str(path), "epoch": ckpt.get("epoch"), "arch": ckpt.get("arch"), "dataset": ds,
            "seconds": time.perf_counter() - t0, **res}


def epoch_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """``[(epoch, path), ...]`` of ``<run>/epochs/epoch_NNNN.pt``, sorted by epoch."""
    d = Path(run_dir) / "epochs"
    found = sorted((int(m.group(1)), p) for p in d.glob("epoch_*.pt") if (m := EPOCH_FILE.match(p.name)))
    return found


def consistency_of_run(
    run_dir: str | Path, *, n_examples: int = 500, trend_examples: int | None = None,
    proxies: Sequence[str] = ("logits",), batch_size: int = 250, device: str = "cpu", seed: int = 0,
    data_root: str | None = None, log=None,
) -> dict[str, Any]:
    """Consistency of a run's ``final.pt`` (or ``last.pt``) and the trend over its per-epoch checkpoints.

    ``trend_examples`` (default ``n_examples``) images per epoch checkpoint; the
    final checkpoint uses ``n_examples``. Returns ``{"run_dir", "final", "epochs": [...]}``
    where each epoch entry is a :func:`consistency_of_checkpoint` result without
    per-example values.
    """
    run = Path(run_dir)
    if not run.is_dir():
        raise InputError(f"run directory {str(run)!r} not found")
    final = next((run / f for f in (rd.FINAL, rd.LAST) if (run / f).is_file()), None)
    epochs = epoch_checkpoints(run)
    if final is None and not epochs:
        raise InputError(f"{str(run)!r} holds no final.pt, last.pt or epochs/epoch_NNNN.pt checkpoints")
    kw = dict(proxies=proxies, batch_size=batch_size, device=device, seed=seed, data_root=data_root)
    out: dict[str, Any] = {"run_dir": str(run)}
    if final is not None:
        out["final"] = consistency_of_checkpoint(final, n_examples=n_examples, keep_values=True, **kw)
    n_trend = trend_examples or n_examples
    trend = []
    for epoch, path in epochs:
        if final is not None and epoch == out["final"]["epoch"] and n_trend == n_examples:
            # the same weights as the final checkpoint (the trainer writes both after the last epoch)
            r = {k: v for k, v in out["final"].items() if k not in ("values", "defended")}
            r = {**r, "checkpoint": str(path), "same_as": str(final)}
        else:
            r = consistency_of_checkpoint(path, n_examples=n_trend, keep_values=False, **kw)
        trend.append(r)
        if log:
            s = r["stats"][r["proxies"][0]]
            log(f"{run.name} epoch {epoch}: robust {r['robust_accuracy']:.1f}% | mean clean_adv defended "
                f"{s['defended']['clean_adv']['mean']} failed {s['failed']['clean_adv']['mean']}")
    out["epochs"] = trend
    return out


def write_json(obj: dict[str, Any], path: str | Path) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(obj, indent=1) + "\n")
    return p
