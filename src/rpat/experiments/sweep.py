"""``rpat sweep``: train many configs, evaluate each into a report, gather one table.

The grid of presets it runs (``bench/...``) is composed in :mod:`rpat.presets`.

The sweep
---------
``run_sweep(specs, out)`` trains each config into ``out/<name>/`` one after
another (or one process per GPU with ``gpus``), skips finished runs (final.pt
and both evaluations present, made with the same number of images and
AutoAttack version), resumes interrupted ones from ``last.pt`` (and an
interrupted AutoAttack from its state file beside the evaluation JSON), then
evaluates ``best.pt`` and ``final.pt`` (Clean, PGD-20, AutoAttack, Mean, NRR;
accuracies in percent) and writes ``out/results.md`` and ``out/results.csv``.
With ``autoattack="apgd"`` the AutoAttack columns are ``AA(APGD)``,
``Mean(APGD)`` and ``NRR(APGD)``: never the standard ``AA`` column.
"""

from __future__ import annotations

import glob
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .. import run_dir as rd
from ..checkpoint import load_checkpoint
from ..config import Config, build_config, load_yaml
from ..errors import InputError
from ..evaluation.checkpoint_eval import aa_version
from ..evaluation.extra import check_extra_evals, parse_extra_evals
from ..evaluation.report import write_report
from ..presets import GRID_PREFIX, list_presets
from ..reports import sweep_table
from ..training import Trainer
from ..training.tensorboard import log_report


# ---- what to run ---------------------------------------------------------------------
@dataclass
class SweepRun:
    """One run of a sweep: its directory name under ``--out`` and its resolved config."""

    name: str
    cfg: Config


def _is_preset(spec: str) -> bool:
    return spec.startswith(GRID_PREFIX + "/") or spec in list_presets()


def _runs_from_listing(path: Path, data: dict[str, Any], overrides: list[str]) -> list[SweepRun]:
    entries = data.get("runs")
    common = data.get("overrides") or []
    if not isinstance(entries, list) or not isinstance(common, list):
        raise InputError(f"{str(path)!r}: 'runs' must be a list and 'overrides' a list of key=value strings")
    out = []
    for i, e in enumerate(entries):
        if isinstance(e, str):
            e = {"preset": e} if _is_preset(e) else {"config": e}
        if not isinstance(e, dict) or not ({"preset", "config"} & set(e)):
            raise InputError(f"{str(path)!r}: runs[{i}] needs a 'preset' or a 'config' (got {e!r})")
        unknown = set(e) - {"name", "preset", "config", "overrides"}
        if unknown:
            raise InputError(f"{str(path)!r}: runs[{i}] has unknown keys {sorted(unknown)}; "
                             "valid: name, preset, config, overrides")
        file = e.get("config")
        if file is not None and not Path(file).is_absolute():
            file = str(path.parent / file)
        ovr = [*common, *(e.get("overrides") or []), *overrides]
        cfg = build_config(e.get("preset"), file, ovr)
        name = e.get("name") or (e["preset"].replace("/", "_") if e.get("preset") else Path(file).stem)
        out.append(SweepRun(str(name), cfg))
    return out


def collect_runs(specs: list[str], overrides: list[str] | None = None) -> list[SweepRun]:
    """Resolve sweep arguments into runs, in order.

    Each spec is a preset name (``bench/...`` or a built-in preset), a config
    YAML file, a glob of such files (quote it), or a YAML *listing*:
    ``{runs: [{name, preset | config, overrides: [k=v, ...]}, ...], overrides: [...]}``
    (relative ``config`` paths are relative to the listing). ``overrides``
    apply to every run, last. Run names must be unique.
    """
    overrides = list(overrides or [])
    runs: list[SweepRun] = []
    for spec in specs:
        if _is_preset(spec):
            runs.append(SweepRun(spec.replace("/", "_"), build_config(spec, None, overrides)))
            continue
        paths = sorted(glob.glob(spec)) if any(c in spec for c in "*?[") else [spec]
        if not paths:
            raise InputError(f"no config file matches {spec!r}")
        for p in map(Path, paths):
            data = load_yaml(p)
            if isinstance(data, dict) and "runs" in data:
                runs += _runs_from_listing(p, data, overrides)
            else:
                runs.append(SweepRun(p.stem, build_config(None, p, overrides)))
    if not runs:
        raise InputError("nothing to sweep: give config files, presets or a listing")
    names = [r.name for r in runs]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise InputError(f"two runs share the name {dup[0]!r}; give them distinct 'name's in a listing")
    return runs


# ---- running -------------------------------------------------------------------------
def _eval_ok(path: Path, n_examples: int | None, autoattack: bool | str, extra_evals: str | None = None) -> bool:
    rep = rd.read_report(path)
    if rep is None:
        return False
    done = rep.get("sweep") or {}
    recorded = done.get("autoattack")  # older sweeps recorded True/False
    return (done.get("n_examples") == n_examples and recorded is not None
            and aa_version(recorded) == aa_version(autoattack)
            and (done.get("extra_evals") or None) == (extra_evals or None))


def is_finished(run_dir: Path, n_examples: int | None, autoattack: bool | str, extra_evals: str | None = None) -> bool:
    """True when training ended (final.pt) and best/final were evaluated with these settings
    (``autoattack``: ``"standard"``/True, ``"apgd"``, ``"none"``/False; ``extra_evals``: the
    ``--extra-evals`` list, :func:`rpat.evaluation.extra.parse_extra_evals`)."""
    return (run_dir / rd.FINAL).is_file() and all(
        _eval_ok(rd.eval_report_path(run_dir, w), n_examples, autoattack, extra_evals) for w in rd.EVALUATED)


def _same_weights(a: Path, b: Path) -> bool:
    sa, sb = load_checkpoint(a)["model"], load_checkpoint(b)["model"]
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def train_and_evaluate(
    run: SweepRun,
    out: Path,
    *,
    n_examples: int | None = 1000,
    autoattack: bool | str = True,
    device: str | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
    extra_evals: str | None = None,
    trainer_setup: Callable[[Trainer], None] | None = None,
) -> str:
    """Train (or resume, or skip) one run, then evaluate best.pt and final.pt. Returns what it did.

    ``extra_evals``: the extra evaluations of both reports, as ``--extra-evals`` lists them
    (``"cw,noise,corruptions=DIR"``: :func:`rpat.evaluation.extra.parse_extra_evals`)."""
    run_dir = out / run.name
    evals, corruptions = parse_extra_evals(extra_evals)
    if is_finished(run_dir, n_examples, autoattack, extra_evals):
        log(f"[{run.name}] finished: skipped")
        return "skipped"
    did = "evaluated"
    if not (run_dir / rd.FINAL).is_file():
        resume = (run_dir / rd.LAST).is_file()
        log(f"[{run.name}] {'resuming' if resume else 'training'}: {run.cfg.describe()}")
        trainer = Trainer(run.cfg, run_dir, resume=resume, overwrite=not resume, progress=progress, log=log)
        if trainer_setup is not None:  # e.g. the SLURM task's save signals (rpat.experiments.slurm)
            trainer_setup(trainer)
        trainer.fit()
        did = "resumed" if resume else "trained"
    version = aa_version(autoattack)
    settings = {"sweep": {"n_examples": n_examples, "autoattack": version, "extra_evals": extra_evals or None}}
    reports: dict[str, dict[str, Any]] = {}
    for which in rd.EVALUATED:
        path = rd.eval_report_path(run_dir, which)
        if _eval_ok(path, n_examples, autoattack, extra_evals):
            continue
        ckpt = run_dir / f"{which}.pt"
        if which == "final" and "best" in reports and _same_weights(run_dir / rd.BEST, ckpt):
            result = None  # under DDP (several SLURM tasks) only rank 0 has the report and writes
            if reports["best"] is not None:
                result = {**reports["best"], "checkpoint": str(ckpt), "same_weights_as": "best", **settings}
                rd.write_report_file(path, result)
        else:
            log(f"[{run.name}] evaluating {which}.pt")
            result = write_report(ckpt, path, say=lambda m: log(f"[{run.name}] {m}"), extra=settings,
                                  n_examples=n_examples, autoattack=version, device=device or run.cfg.device,
                                  progress=progress, extra_evals=evals, corruptions=corruptions)
        if run.cfg.logging.tensorboard and result is not None:  # out/<run>/tb: `tensorboard --logdir out` compares runs
            log_report(run_dir, which, result)
        reports[which] = result
    return did


def write_tables(runs: list[SweepRun], out: Path) -> list[dict[str, Any]]:
    """``out/results.md`` and ``out/results.csv`` (:mod:`rpat.reports.sweep_table`); returns the rows."""
    return sweep_table.write_tables([(r.name, r.cfg) for r in runs], out)


# ---- the whole sweep -----------------------------------------------------------------
def parse_gpus(text: str | None) -> list[str]:
    """``"0,1,3"`` -> ``["0", "1", "3"]``; ``"all"`` -> every visible CUDA device.

    A GPU may be listed several times (``"0,0,1,1"``): it then runs that many worker
    processes at once (small models leave a large GPU idle with one process).
    """
    if not text:
        return []
    if text == "all":
        return [str(i) for i in range(torch.cuda.device_count())]
    ids = [t.strip() for t in text.split(",") if t.strip()]
    if not ids or not all(t.isdigit() for t in ids):
        raise InputError(f"--gpus must be a comma-separated list of GPU indices such as 0,1 (or all), got {text!r}")
    return ids


def gpu_workers(gpus: list[str]) -> dict[str, dict[str, str]]:
    """One worker per entry of ``gpus`` for ``run_workers``: ``["0", "0", "1"]`` ->
    ``{"gpu0": {...: "0"}, "gpu0-2": {...: "0"}, "gpu1": {...: "1"}}`` (CUDA_VISIBLE_DEVICES)."""
    workers: dict[str, dict[str, str]] = {}
    for g in gpus:
        n = sum(1 for env in workers.values() if env["CUDA_VISIBLE_DEVICES"] == g)
        workers[f"gpu{g}" if n == 0 else f"gpu{g}-{n + 1}"] = {"CUDA_VISIBLE_DEVICES": g}
    return workers


def run_sweep(
    specs: list[str],
    out: str | Path,
    *,
    overrides: list[str] | None = None,
    n_examples: int | None = 1000,
    autoattack: bool | str = True,
    gpus: list[str] | None = None,
    only: list[str] | None = None,
    device: str | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
    write_table: bool = True,
    extra_evals: str | None = None,
) -> list[dict[str, Any]]:
    """Run a whole sweep (see the module docstring); returns the table rows.

    With two or more ``gpus`` the runs are dealt round-robin to one worker
    process per entry (``CUDA_VISIBLE_DEVICES`` set to that GPU; a GPU listed
    twice gets two processes), each running its share one after another; logs
    go to ``out/_logs/gpu<i>.log`` (``gpu<i>-2.log`` for a second process on GPU i).
    ``extra_evals`` (``--extra-evals``) adds CW-20, noise, transfer, ART's CW or corruptions to every
    report (:func:`rpat.evaluation.extra.parse_extra_evals`); checked before anything runs.
    """
    if n_examples is not None and n_examples < 1:
        raise InputError(f"--n-examples must be >= 1, got {n_examples}")
    out = Path(out)
    runs = collect_runs(specs, overrides)
    for ds in dict.fromkeys(r.cfg.data.dataset for r in runs):  # a bad list fails before the first run trains
        check_extra_evals(extra_evals, ds)
    todo = runs
    if only:
        missing = sorted(set(only) - {r.name for r in runs})
        if missing:
            raise InputError(f"--only names a run that is not in the sweep: {missing[0]!r}")
        todo = [r for r in runs if r.name in only]
    out.mkdir(parents=True, exist_ok=True)
    if gpus and len(gpus) > 1:
        run_workers(specs, out, todo, overrides or [], n_examples, autoattack,
                    gpu_workers(gpus), device, log, extra_evals=extra_evals)
    else:
        if gpus:
            os.environ["CUDA_VISIBLE_DEVICES"] = gpus[0]
        for i, run in enumerate(todo):
            t0 = time.perf_counter()
            did = train_and_evaluate(run, out, n_examples=n_examples, autoattack=autoattack, device=device,
                                     progress=progress, log=log, extra_evals=extra_evals)
            log(f"[{run.name}] {did} ({i + 1}/{len(todo)}, {time.perf_counter() - t0:.0f} s)")
    return write_tables(runs, out) if write_table else sweep_table.gather([(r.name, r.cfg) for r in runs], out)


def run_workers(specs: list[str], out: Path, todo: list[SweepRun], overrides: list[str], n_examples: int | None,
                autoattack: bool | str, workers: dict[str, dict[str, str]], device: str | None,
                log: Callable[[str], None], extra_evals: str | None = None) -> None:
    """Deal ``todo`` round-robin to one ``rpat sweep --only ...`` subprocess per worker; wait for all.

    ``workers`` maps a worker name to the environment variables it adds (for
    example ``{"gpu1": {"CUDA_VISIBLE_DEVICES": "1"}}`` or, for CPU workers,
    ``{"worker0": {"OMP_NUM_THREADS": "1"}}``). Each worker logs to
    ``out/_logs/<name>.log``. Raises ``InputError`` if one failed.
    """
    logs = out / "_logs"
    logs.mkdir(exist_ok=True)
    procs = []
    for k, (name, extra_env) in enumerate(workers.items()):
        share = [r.name for r in todo[k::len(workers)]]
        if not share:
            continue
        cmd = [sys.executable, "-m", "rpat", "sweep", *specs, "--out", str(out), "--no-progress", "--no-table",
               "--only", ",".join(share)]
        cmd += [a for o in overrides for a in ("--set", o)]
        cmd += ["--n-examples", str(n_examples)] if n_examples is not None else ["--all-test-images"]
        cmd += ["--autoattack", aa_version(autoattack)]
        cmd += ["--device", device] if device else []
        cmd += ["--extra-evals", extra_evals] if extra_evals else []
        f = open(logs / f"{name}.log", "a")  # noqa: SIM115 - closed after the process ends
        procs.append((name, subprocess.Popen(cmd, env={**os.environ, **extra_env}, stdout=f,
                                             stderr=subprocess.STDOUT), f))
        log(f"{name}: {len(share)} runs ({', '.join(share)}) -> {logs / f'{name}.log'}")
    failed = []
    for name, proc, f in procs:
        if proc.wait() != 0:
            failed.append(name)
        f.close()
    if failed:
        raise InputError(f"worker {failed[0]} failed; see {logs / f'{failed[0]}.log'}")
