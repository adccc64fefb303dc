"""The Section 5.4 ablation: the RPAT weight λ and interpolation rate a over a grid, on any base method.

``write_ablation`` resolves one full config per grid point (plus, by default,
the base method without RPAT) from a preset and/or base YAML file and extra
overrides, and writes::

    <out>/configs/<name>.yaml     one resolved config per run (``rpat train --config`` takes it)
    <out>/ablation.json           the grid: name, λ, a, config file and run directory of each point
    <out>/sweep.yaml              the same runs as an ``rpat sweep`` listing (train + evaluate + table):
                                  ``rpat sweep <out>/sweep.yaml --out <out>/runs``

``run_ablation`` then trains them one after the other with the Trainer into
``<out>/runs/<name>`` (finished runs are skipped, interrupted ones resumed), so
``rpat report <out>/runs`` tabulates the grid.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from .. import run_dir as rd
from ..config import build_config, config_from_dict, dump_yaml, load_yaml
from ..errors import InputError
from ..training import Trainer


def parse_grid(text: str | Sequence[float], what: str) -> list[float]:
    """``"0.5,1,2"`` (or a list of numbers) -> ``[0.5, 1.0, 2.0]``; duplicates dropped, order kept."""
    items = [t.strip() for t in text.split(",")] if isinstance(text, str) else list(text)
    out: list[float] = []
    for t in items:
        if t == "":
            raise InputError(f"--{what} has an empty value in {text!r}; write e.g. 0.5,1,2")
        try:
            v = float(t)
        except (TypeError, ValueError):
            raise InputError(f"--{what} must be comma-separated numbers such as 0.5,1,2, got {t!r}") from None
        if not math.isfinite(v):
            raise InputError(f"--{what} values must be finite, got {t!r}")
        if v not in out:
            out.append(v)
    if not out:
        raise InputError(f"--{what} needs at least one value")
    return out


def run_name(method: str, lam: float | None, alpha: float | None) -> str:
    return f"{method}_base" if lam is None else f"{method}_rpat_lam{lam:g}_a{alpha:g}"


def ablation_grid(
    method: str, lams: Sequence[float], alphas: Sequence[float], *, preset: str | None = None,
    base_config: str | Path | None = None, overrides: Sequence[str] = (), baseline: bool = True,
) -> list[dict[str, Any]]:
    """Resolve every grid point to a validated config: ``[{name, lam, alpha, config}, ...]``.

    λ-major order (λ₁a₁, λ₁a₂, ...), the baseline (RPAT off) first when ``baseline``.
    Raises InputError for an invalid value (e.g. a ∉ [0, 1], λ < 0) before anything is written.
    """
    points: list[tuple[float | None, float | None]] = [(None, None)] if baseline else []
    points += [(lam, a) for lam in lams for a in alphas]
    out = []
    for lam, a in points:
        extra: list[dict[str, Any] | str] = [{"method": {"name": method}}, *overrides]
        if lam is None:
            extra.append({"rpat": {"enabled": False}})
        else:
            extra.append({"rpat": {"enabled": True, "lam": lam, "alpha": a}})
        cfg = build_config(preset, base_config, extra)
        out.append({"name": run_name(method, lam, a), "lam": lam, "alpha": a, "config": cfg})
    return out


def write_ablation(out: str | Path, grid: list[dict[str, Any]]) -> Path:
    """Write ``configs/<name>.yaml`` and ``ablation.json`` under ``out``; returns the manifest path."""
    out = Path(out)
    (out / "configs").mkdir(parents=True, exist_ok=True)
    manifest = []
    for g in grid:
        path = out / "configs" / f"{g['name']}.yaml"
        path.write_text(dump_yaml(g["config"]))
        manifest.append({"name": g["name"], "lam": g["lam"], "alpha": g["alpha"], "config": str(path),
                         "run_dir": str(out / "runs" / g["name"])})
    m = out / "ablation.json"
    m.write_text(json.dumps({"runs": manifest}, indent=2) + "\n")
    listing = {"runs": [{"name": g["name"], "config": f"configs/{g['name']}.yaml"} for g in grid]}
    (out / "sweep.yaml").write_text(yaml.safe_dump(listing, sort_keys=False))
    return m


def run_ablation(manifest: str | Path, *, progress: bool = True, log=print) -> list[dict[str, Any]]:
    """Train every run of an ``ablation.json`` in turn (skip finished ones, resume interrupted ones)."""

    data = json.loads(Path(manifest).read_text())
    summaries = []
    for r in data["runs"]:
        run_dir = Path(r["run_dir"])
        if (run_dir / rd.FINAL).is_file():
            log(f"{r['name']}: finished, skipped")
            continue
        cfg = config_from_dict(load_yaml(r["config"])).validate()
        resume = (run_dir / rd.LAST).is_file()
        log(f"{r['name']}: {cfg.describe()} (λ={r['lam']}, a={r['alpha']})")
        summaries.append(Trainer(cfg, run_dir, resume=resume, progress=progress, log=log).fit())
    return summaries
