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

Every result records how many images it was measured on (``RunRecord.n_images``: the
evaluation's ``n_examples``, or ``meta.json``'s held-out count for training-log numbers)
and what kind of source it is (``RunRecord.kinds``: ``"eval"`` or ``"log"``), so the
tables can show standard errors and mark a row that mixes the two kinds.
:func:`group_seeds` folds runs whose configs differ only in ``seed`` into one record
holding the mean over seeds and their standard deviation.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .. import run_dir as rd
from ..config import config_from_dict
from ..errors import InputError
from ..evaluation.corruptions import CORRUPTION_COLUMNS
from ..evaluation.metrics import accuracy_se, mean_score, mean_se, nrr, seeds_mean_sd, seeds_noise
from ..evaluation.robustness import AA_LABELS, EXTRA_COLUMNS

WHICH: tuple[str, ...] = ("best", "final")
KEYS: tuple[str, ...] = ("clean", "pgd", "aa", "mean", "nrr")
#: The robust accuracy of the other AutoAttack versions (``aa_apgd``, ``aa_plus``, ``aa_rand``): a report
#: made with ``--autoattack apgd|plus|rand`` fills these, never ``aa``/``mean``/``nrr``.
AA_VERSION_KEYS: dict[str, str] = {f"aa_{v}": v for v in AA_LABELS if v != "standard"}
#: The optional columns, present in a table only when some run has them: the other AutoAttack versions,
#: the extra evaluations (``rpat eval --cw/--noise/--transfer-from/--cw-art``) and the corruptions.
EXTRA_KEYS: tuple[str, ...] = (*AA_VERSION_KEYS, *EXTRA_COLUMNS, *CORRUPTION_COLUMNS)
ALL_KEYS: tuple[str, ...] = (*KEYS, *EXTRA_KEYS)
#: The optional columns' heads in the reports' tables (as ``rpat eval`` labels them; CW at its default 20 steps).
OPTIONAL_LABELS: dict[str, str] = {**{k: AA_LABELS[v] for k, v in AA_VERSION_KEYS.items()},
                                   **EXTRA_COLUMNS, "cw": "CW-20", **CORRUPTION_COLUMNS}
#: The metrics measured as a fraction of images correct (their standard error is binomial).
MEASURED: tuple[str, ...] = ("clean", "pgd", "aa", *AA_VERSION_KEYS, *EXTRA_COLUMNS)


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
    n_images: dict[str, int | None] = field(default_factory=dict)  #: which -> images its numbers were measured on
    kinds: dict[str, str] = field(default_factory=dict)  #: which -> "eval" (a report JSON) or "log" (metrics.jsonl)
    held_out: str | None = None  #: the held-out set of the training log ("first 1000 test images"), if known
    base_label: str = ""  #: the label before duplicates got their directory name appended
    seeds: tuple[int, ...] = ()  #: for a :func:`group_seeds` record: the seeds it averages (else empty)
    spread: dict[str, dict[str, float | None]] = field(default_factory=dict)  #: which -> metric -> sd over seeds
    members: list[RunRecord] = field(default_factory=list)  #: for a seed group: the runs it averages

    @property
    def rpat(self) -> bool:
        return bool(self.config.get("rpat", {}).get("enabled", False))

    @property
    def pair_key(self) -> tuple:
        """Runs that differ only in the RPAT switch share this key (baseline -> RPAT arrows); a seed group's
        seed is the tuple of its seeds."""
        c = self.config
        return (c.get("data", {}).get("dataset"), c.get("model", {}).get("arch"), c.get("method", {}).get("name"),
                c.get("attack", {}).get("norm"), self.seeds or c.get("seed"))

    @property
    def seed_key(self) -> str:
        """Runs whose configs are equal but for ``seed`` share this key (:func:`group_seeds`)."""
        return json.dumps({k: v for k, v in self.config.items() if k != "seed"}, sort_keys=True, default=str)

    def images_se(self, which: str, metric: str) -> float | None:
        """Standard error of ``results[which][metric]`` from the images alone (:func:`accuracy_se`; Mean: the
        bound :func:`mean_se`; NRR: None); None when the image count is unknown."""
        res, n = self.results.get(which, {}), self.n_images.get(which)
        if not n:
            return None
        if metric in MEASURED:
            v = res.get(metric)
            return None if v is None else accuracy_se(v, n)
        if metric == "mean" and res.get("mean") is not None:
            c, a = self.images_se(which, "clean"), self.images_se(which, "aa")
            return None if c is None or a is None else mean_se(c, a)
        return None

    def error(self, which: str, metric: str) -> float | None:
        """The ``±`` the tables show: the standard error on the images (:meth:`images_se`), or for a seed
        group the standard deviation over its seeds."""
        if self.seeds:
            return self.spread.get(which, {}).get(metric)
        return self.images_se(which, metric)

    def noise(self, which: str, metric: str) -> float | None:
        """The standard error the bold rule compares (:func:`rpat.evaluation.metrics.clearly_best`): the
        images' for one run; for a seed group ``sqrt(sd²/k + SE_images²)`` (:func:`seeds_noise`), None when
        the images' part is unknown."""
        if not self.seeds:
            return self.images_se(which, metric)
        sd, se = self.spread.get(which, {}).get(metric), self.images_se(which, metric)
        return None if sd is None or se is None else seeds_noise(sd, len(self.seeds), se)


def _num(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def report_version(d: dict[str, Any]) -> str:
    """The AutoAttack version a report's ``aa`` was made with (``standard`` when it does not say)."""
    v = (d.get("extras") or {}).get("aa_version") or (d.get("settings") or {}).get("autoattack") or "standard"
    return "standard" if v is True else str(v)


def _from_eval(d: dict[str, Any]) -> dict[str, float | None]:
    """A report's numbers by column key: an ``aa`` of another AutoAttack version goes to its own key
    (``aa_apgd``...), never to ``aa``; the extra evaluations and corruptions under their keys."""
    out = {k: _num(d.get(k)) for k in ALL_KEYS if k not in AA_VERSION_KEYS}
    version = report_version(d)
    if version != "standard":
        for k in ("aa", "mean", "nrr"):
            out[k] = None
        if f"aa_{version}" in AA_VERSION_KEYS:
            out[f"aa_{version}"] = _num(d.get("aa"))
    if out["aa"] is not None and out["clean"] is not None:
        out["mean"] = out["mean"] if out["mean"] is not None else mean_score(out["clean"], out["aa"])
        out["nrr"] = out["nrr"] if out["nrr"] is not None else nrr(out["clean"], out["aa"])
    return out


def default_label(config: dict[str, Any]) -> str:
    """The run's method label (``Config.label``: ``PGD-AT``, ``TRADES + RPAT``, ``ReBAT``, ``RPAT++``...)."""
    try:
        return config_from_dict(config).label()
    except InputError:  # a config this rpat cannot read: its raw method name
        return str(config.get("method", {}).get("name", "?"))


def _eval_note(name: str, d: dict[str, Any]) -> str:
    """``"eval_best.json, 1000 cifar10 test images"``, with what the extra columns were measured on."""
    n = d.get("n_examples")
    note = f"{name}, {n} {d.get('dataset', '')} test images".replace("  ", " ") if n else name
    extras = d.get("extras") or {}
    if d.get("cw") is not None and extras.get("cw_steps") not in (None, 20):
        note += f"; CW with {extras['cw_steps']} steps"
    if d.get("transfer") is not None and extras.get("transfer_from"):
        note += f"; transfer from {extras['transfer_from']}"
    if d.get("corruption_acc") is not None:
        note += (f"; corruptions: {d.get('corruption_set', 'corruption set')}, {len(d.get('corruptions') or {})} "
                 f"corruptions x 5 severities x {d.get('corruption_images', '?')} images")
    return note


def load_run(run_dir: str | Path, label: str | None = None) -> RunRecord:
    """Read one run directory (see module doc)."""
    run = Path(run_dir)
    cfg_path = run / rd.CONFIG
    if not cfg_path.is_file():
        raise InputError(f"{str(run)!r} is not a run directory (no config.yaml)")
    try:
        config = yaml.safe_load(cfg_path.read_text()) or {}
    except yaml.YAMLError:
        raise InputError(f"{str(cfg_path)!r} is not valid YAML") from None
    metrics = rd.read_metrics(run)
    meta = rd.read_meta(run)
    held = rd.held_out_of(meta)
    held_n = meta.get("held_out_images")
    rec = RunRecord(run, label or default_label(config), config, metrics, held_out=held)
    rec.base_label = rec.label
    for which in WHICH:
        f = rd.find_report(run, which)
        if f is not None:
            try:
                d = json.loads(f.read_text())
            except json.JSONDecodeError:
                raise InputError(f"{str(f)!r} is not valid JSON") from None
            rec.results[which] = _from_eval(d)
            rec.sources[which] = f.name
            rec.kinds[which] = "eval"
            rec.n_images[which] = _count(d.get("n_examples"))
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
                rec.kinds[which] = "log"
                rec.n_images[which] = _count(held_n)
                rec.notes[which] = f"training log, epoch {pick['epoch'] + 1}, {held or 'held-out images'}"
    return rec


def _count(n: Any) -> int | None:
    """An image count from a JSON file: a positive integer, else None (unknown)."""
    if isinstance(n, bool) or not isinstance(n, (int, float)) or n != n or n <= 0 or int(n) != n:
        return None
    return int(n)


def group_seeds(runs: list[RunRecord]) -> list[RunRecord]:
    """Fold runs whose configs differ only in ``seed`` (and share a label) into one record, in order.

    A group of k >= 2 runs becomes a record labelled ``"<label> (k seeds)"`` whose
    ``results`` are the means over the seeds (None where a seed lacks the value) and whose
    ``spread`` holds the standard deviations over the seeds (``ddof=1``); its ``n_images``
    is the smallest image count of its runs (None if one is unknown), its ``kinds`` the
    members' (``"log"`` if any member's number comes from a training log). Runs with a
    single seed are returned as they are.
    """
    groups: dict[tuple[str, str], list[RunRecord]] = {}
    for r in runs:
        groups.setdefault((r.seed_key, r.base_label or r.label), []).append(r)
    out = [members[0] if len(members) == 1 else _seed_group(label, members)
           for (_, label), members in groups.items()]
    counts: dict[str, int] = {}
    for r in out:
        counts[r.label] = counts.get(r.label, 0) + 1
    for r in out:  # two groups of one label (configs that differ in more than the seed)
        if r.seeds and counts[r.label] > 1:
            r.label = f"{r.label} ({r.path.name})"
    return out


def _seed_group(label: str, members: list[RunRecord]) -> RunRecord:
    seeds = tuple(m.config.get("seed") for m in members)
    first = members[0]
    rec = RunRecord(first.path, f"{label} ({len(members)} seeds)", {**first.config, "seed": None}, first.metrics,
                    held_out=first.held_out, base_label=label, seeds=seeds, members=list(members))
    for which in WHICH:
        if not any(which in m.results for m in members):
            continue
        res: dict[str, float | None] = {}
        sd: dict[str, float | None] = {}
        for k in ALL_KEYS:
            vals = [m.results.get(which, {}).get(k) for m in members]
            if any(v is None for v in vals):
                res[k] = sd[k] = None
            else:
                res[k], sd[k] = seeds_mean_sd([float(v) for v in vals if v is not None])
        rec.results[which], rec.spread[which] = res, sd
        counts = [m.n_images.get(which) for m in members]
        rec.n_images[which] = None if any(c is None for c in counts) else min(c for c in counts if c is not None)
        kinds = {m.kinds.get(which) for m in members}
        rec.kinds[which] = "log" if "log" in kinds else "eval"
        seeds_text = ", ".join(str(s) for s in seeds)
        notes = list(dict.fromkeys(m.notes.get(which) or m.sources.get(which) or "-" for m in members))
        rec.notes[which] = f"mean ± sd over seeds {seeds_text}: " + " / ".join(notes)
        rec.sources[which] = " / ".join(dict.fromkeys(m.sources.get(which, "-") for m in members))
    return rec


def present_metrics(runs: list[RunRecord], which: tuple[str, ...] | list[str] = WHICH) -> list[str]:
    """:data:`KEYS` and, after them, each of :data:`EXTRA_KEYS` that some run has for one of ``which``:
    the columns ``rpat report`` shows by default."""
    extra = [k for k in EXTRA_KEYS if any(r.results.get(w, {}).get(k) is not None for r in runs for w in which)]
    return [*KEYS, *extra]


def find_runs(paths: list[str | Path]) -> list[Path]:
    """Each path that is a run directory, or the run directories directly inside it (sorted)."""
    out: list[Path] = []
    for p in map(Path, paths):
        if rd.is_run_dir(p) and (p / rd.CONFIG).is_file():
            out.append(p)
        elif p.is_dir():
            subs = sorted(d for d in p.iterdir() if (d / rd.CONFIG).is_file())
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
