"""Gather the results of run directories: config, training log, and the evaluation JSON files.

A run directory (written by the Trainer) holds ``config.yaml`` and ``metrics.jsonl``;
evaluations are ``eval_best.json`` / ``eval_final.json`` (``rpat train --eval``, the
studies) or ``best.eval.json`` / ``final.eval.json`` (``rpat eval`` next to the
checkpoint). All hold accuracies in percent under ``clean``, ``pgd``, ``aa``,
``mean``, ``nrr``. A run without evaluation files falls back to its held-out
log (Clean and PGD-20 of the best epoch and of the last one; no AA).

Each result also gets a short note (``RunRecord.notes``) naming its source and image
count, and for ``best`` where the checkpoint was selected (``meta.json``'s held-out set:
the first N test images, or a validation split); the tables print these notes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..errors import InputError
from ..evaluation.metrics import mean_score, nrr

WHICH: tuple[str, ...] = ("best", "final")
KEYS: tuple[str, ...] = ("clean", "pgd", "aa", "mean", "nrr")


@dataclass
class RunRecord:
    """One run: its label, config, training log and per-checkpoint (``best``/``final``) results."""

    path: Path
    label: str
    config: dict[str, Any]
    metrics: list[dict[str, Any]]
    results: dict[str, dict[str, float | None]] = field(default_factory=dict)
    sources: dict[str, str] = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)  #: which -> "source, N images[; selected on ...]"

    @property
    def rpat(self) -> bool:
        return bool(self.config.get("rpat", {}).get("enabled", False))

    @property
    def pair_key(self) -> tuple:
        """Runs that differ only in the RPAT switch share this key (baseline -> RPAT arrows)."""
        c = self.config
        return (c.get("data", {}).get("dataset"), c.get("model", {}).get("arch"), c.get("method", {}).get("name"),
                c.get("attack", {}).get("norm"), c.get("seed"))


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The records of a JSON-lines file such as a run's ``metrics.jsonl``; ``[]`` if it does not exist."""
    if not path.is_file():
        return []
    out = []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                raise InputError(f"{str(path)!r} line {i} is not valid JSON") from None
    return out


def _eval_file(run: Path, which: str) -> Path | None:
    for name in (f"eval_{which}.json", f"{which}.eval.json"):
        if (run / name).is_file():
            return run / name
    return None


def _from_eval(d: dict[str, Any]) -> dict[str, float | None]:
    out = {k: (float(d[k]) if d.get(k) is not None else None) for k in KEYS}
    if out["aa"] is not None and out["clean"] is not None:
        out["mean"] = out["mean"] if out["mean"] is not None else mean_score(out["clean"], out["aa"])
        out["nrr"] = out["nrr"] if out["nrr"] is not None else nrr(out["clean"], out["aa"])
    return out


def default_label(config: dict[str, Any]) -> str:
    """``pgd_at`` -> ``PGD-AT``; ``+ RPAT`` when the term is on."""
    names = {"pgd_at": "PGD-AT", "trades": "TRADES", "mart": "MART", "consistency": "Consistency-AT",
             "rebat": "ReBAT"}
    m = config.get("method", {}).get("name", "?")
    return names.get(m, m) + (" + RPAT" if config.get("rpat", {}).get("enabled") else "")


def _held_out_images(meta: dict[str, Any]) -> str | None:
    """``"first 1000 test images"`` / ``"1000 validation images"`` from a run's meta.json (None if unknown)."""
    n, sel = meta.get("held_out_images"), str(meta.get("selection", ""))
    if n is None or not sel:
        return None
    return f"{n} validation images" if sel.startswith("validation") else f"first {n} test images"


def _eval_note(name: str, d: dict[str, Any]) -> str:
    n = d.get("n_examples")
    return f"{name}, {n} {d.get('dataset', '')} test images".replace("  ", " ") if n else name


def load_run(run_dir: str | Path, label: str | None = None) -> RunRecord:
    """Read one run directory (see module doc)."""
    run = Path(run_dir)
    cfg_path = run / "config.yaml"
    if not cfg_path.is_file():
        raise InputError(f"{str(run)!r} is not a run directory (no config.yaml)")
    try:
        config = yaml.safe_load(cfg_path.read_text()) or {}
    except yaml.YAMLError:
        raise InputError(f"{str(cfg_path)!r} is not valid YAML") from None
    metrics = read_jsonl(run / "metrics.jsonl")
    try:
        meta = json.loads((run / "meta.json").read_text()) if (run / "meta.json").is_file() else {}
    except json.JSONDecodeError:
        meta = {}
    held = _held_out_images(meta if isinstance(meta, dict) else {})
    rec = RunRecord(run, label or default_label(config), config, metrics)
    for which in WHICH:
        f = _eval_file(run, which)
        if f is not None:
            try:
                d = json.loads(f.read_text())
            except json.JSONDecodeError:
                raise InputError(f"{str(f)!r} is not valid JSON") from None
            rec.results[which] = _from_eval(d)
            rec.sources[which] = f.name
            rec.notes[which] = _eval_note(f.name, d)
            if which == "best":
                rec.notes[which] += f"; best.pt selected on {held or 'held-out images'}"
        elif metrics:
            rows = [r for r in metrics if "held_out_pgd" in r]
            if rows:
                pick = max(rows, key=lambda r: r["held_out_pgd"]) if which == "best" else rows[-1]
                rec.results[which] = {"clean": pick.get("held_out_clean"), "pgd": pick["held_out_pgd"],
                                      "aa": None, "mean": None, "nrr": None}
                rec.sources[which] = f"metrics.jsonl (held-out, epoch {pick['epoch'] + 1})"
                rec.notes[which] = f"training log, epoch {pick['epoch'] + 1}, {held or 'held-out images'}"
    return rec


def find_runs(paths: list[str | Path]) -> list[Path]:
    """Each path that is a run directory, or the run directories directly inside it (sorted)."""
    out: list[Path] = []
    for p in map(Path, paths):
        if (p / "config.yaml").is_file():
            out.append(p)
        elif p.is_dir():
            subs = sorted(d for d in p.iterdir() if (d / "config.yaml").is_file())
            if not subs:
                raise InputError(f"{str(p)!r} holds no run directories (no config.yaml)")
            out += subs
        else:
            raise InputError(f"run directory {str(p)!r} not found")
    return out


def load_runs(paths: list[str | Path], labels: list[str] | None = None) -> list[RunRecord]:
    """Load every run (see :func:`find_runs`); duplicate labels get the directory name appended."""
    dirs = find_runs(paths)
    if labels is not None and len(labels) != len(dirs):
        raise InputError(f"got {len(labels)} labels for {len(dirs)} runs")
    runs = [load_run(d, labels[i] if labels else None) for i, d in enumerate(dirs)]
    counts: dict[str, int] = {}
    for r in runs:
        counts[r.label] = counts.get(r.label, 0) + 1
    if labels is None:
        for r in runs:
            if counts[r.label] > 1:
                r.label = f"{r.label} ({r.path.name})"
    return runs
