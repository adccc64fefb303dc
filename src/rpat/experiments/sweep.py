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

import csv
import glob
import io
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import Config, build_config, load_yaml
from ..errors import InputError
from ..presets import GRID_PREFIX, list_presets


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
EVALS = ("best", "final")


def _eval_path(run_dir: Path, which: str) -> Path:
    return run_dir / f"eval_{which}.json"


def _version(autoattack: bool | str | None) -> str:
    from ..evaluation.checkpoint_eval import aa_version

    return aa_version(autoattack)


def _eval_ok(path: Path, n_examples: int | None, autoattack: bool | str) -> bool:
    if not path.is_file():
        return False
    try:
        done = json.loads(path.read_text()).get("sweep", {})
    except json.JSONDecodeError:
        return False
    recorded = done.get("autoattack")  # older sweeps recorded True/False
    return (done.get("n_examples") == n_examples and recorded is not None
            and _version(recorded) == _version(autoattack))


def is_finished(run_dir: Path, n_examples: int | None, autoattack: bool | str) -> bool:
    """True when training ended (final.pt) and best/final were evaluated with these settings
    (``autoattack``: ``"standard"``/True, ``"apgd"``, ``"none"``/False)."""
    return (run_dir / "final.pt").is_file() and all(
        _eval_ok(_eval_path(run_dir, w), n_examples, autoattack) for w in EVALS)


def _same_weights(a: Path, b: Path) -> bool:
    import torch

    from ..checkpoint import load_checkpoint

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
) -> str:
    """Train (or resume, or skip) one run, then evaluate best.pt and final.pt. Returns what it did."""
    from ..evaluation.checkpoint_eval import aa_state_path, evaluate_for_report, remove_aa_state
    from ..training import Trainer

    run_dir = out / run.name
    if is_finished(run_dir, n_examples, autoattack):
        log(f"[{run.name}] finished: skipped")
        return "skipped"
    did = "evaluated"
    if not (run_dir / "final.pt").is_file():
        resume = (run_dir / "last.pt").is_file()
        log(f"[{run.name}] {'resuming' if resume else 'training'}: {run.cfg.describe()}")
        Trainer(run.cfg, run_dir, resume=resume, overwrite=not resume, progress=progress, log=log).fit()
        did = "resumed" if resume else "trained"
    dev = device or run.cfg.device
    reports: dict[str, dict[str, Any]] = {}
    for which in EVALS:
        path = _eval_path(run_dir, which)
        if _eval_ok(path, n_examples, autoattack):
            continue
        ckpt = run_dir / f"{which}.pt"
        if which == "final" and "best" in reports and _same_weights(run_dir / "best.pt", ckpt):
            result = {**reports["best"], "checkpoint": str(ckpt), "same_weights_as": "best"}
        else:
            resuming = aa_state_path(path).is_file()
            log(f"[{run.name}] evaluating {which}.pt" + (" (resuming AutoAttack)" if resuming else ""))
            report, info = evaluate_for_report(ckpt, path, say=lambda m: log(f"[{run.name}] {m}"),
                                               n_examples=n_examples, autoattack=_version(autoattack),
                                               device=dev, progress=progress)
            result = {**info, **report.to_dict()}
        result["sweep"] = {"n_examples": n_examples, "autoattack": _version(autoattack)}
        reports[which] = result
        path.write_text(json.dumps(result, indent=2) + "\n")
        remove_aa_state(path)
    return did


# ---- the table -----------------------------------------------------------------------
METRICS = (("clean", "Clean"), ("pgd", "PGD-20"), ("aa", "AA"), ("mean", "Mean"), ("nrr", "NRR"))
#: The AutoAttack-derived metrics, labelled ``AA(APGD)`` etc. when the cheaper version made them.
AA_KEYS = ("aa", "mean", "nrr")
APGD_SUFFIX = "(APGD)"
COLUMNS = ["run", "setting", "method", *[f"{label} ({w})" for w in EVALS for _, label in METRICS]]


def _labels(version: str) -> list[tuple[str, str]]:
    """``(key, column label)`` of each metric for an evaluation made with AutoAttack ``version``."""
    return [(k, label + APGD_SUFFIX if version == "apgd" and k in AA_KEYS else label) for k, label in METRICS]


def columns(rows: list[dict[str, Any]]) -> list[str]:
    """The table's columns: :data:`COLUMNS`, with AA(APGD)/Mean(APGD)/NRR(APGD) in place of (or, in a
    mixed sweep, after) AA/Mean/NRR when a row has values there."""
    cols = ["run", "setting", "method", "best selected on", "test images"]
    for w in EVALS:
        for key, label in METRICS:
            names = [label] + ([label + APGD_SUFFIX] if key in AA_KEYS else [])
            present = [n for n in names if any(r.get(f"{n} ({w})") is not None for r in rows)]
            cols += [f"{n} ({w})" for n in (present or [label])]
    return cols


def _result_version(res: dict[str, Any]) -> str:
    recorded = (res.get("sweep") or {}).get("autoattack")
    if recorded is None:
        recorded = (res.get("extras") or {}).get("aa_version", res.get("autoattack", True))
    return _version(recorded)


def method_label(cfg: Config) -> str:
    """``"TRADES + RPAT"``, ``"PGD-AT + RPAT (second_to_last)"``, ``"MART"``..."""
    label = METHOD_LABELS.get(cfg.method.name, cfg.method.name)
    if cfg.rpat.enabled:
        label += " + RPAT" + ("" if cfg.rpat.proxy == "logits" else f" ({cfg.rpat.proxy})")
    return label


def gather(runs: list[SweepRun], out: Path) -> list[dict[str, Any]]:
    """One row per run: run, setting (dataset/arch/norm), method, then the metrics of best and final."""
    rows = []
    for run in runs:
        c = run.cfg
        row: dict[str, Any] = {"run": run.name, "setting": f"{c.data.dataset}/{c.model.arch}/{c.attack.norm}",
                               "method": method_label(c), "best selected on": _selection(out / run.name)}
        counts = set()
        for which in EVALS:
            path = _eval_path(out / run.name, which)
            res = json.loads(path.read_text()) if path.is_file() else {}
            if res.get("n_examples") is not None:
                counts.add(int(res["n_examples"]))
            for key, label in _labels(_result_version(res) if res else "standard"):
                row[f"{label} ({which})"] = res.get(key)
        row["test images"] = "/".join(str(n) for n in sorted(counts)) or None
        rows.append(row)
    return rows


def _selection(run_dir: Path) -> str | None:
    """Where the run chose best.pt (meta.json's ``selection``, shortened): ``"test (first 1000)"``,
    ``"validation (1000 train)"``; None before the run has started."""
    try:
        sel = json.loads((run_dir / "meta.json").read_text()).get("selection", "")
    except (OSError, ValueError):
        return None
    n = next((w for w in sel.replace(",", "").split() if w.isdigit()), "?")
    if sel.startswith("validation"):
        return f"validation ({n} train)"
    return f"test (first {n})" if sel.startswith("test") else (sel or None)


def _fmt(v: Any) -> str:
    return "–" if v is None else (f"{v:.2f}" if isinstance(v, float) else str(v))


def to_markdown(rows: list[dict[str, Any]]) -> str:
    """Table 1 layout: one row per method ± RPAT; Clean/PGD-20/AA/Mean/NRR of best, then of final (%).

    AA(APGD) results (``--autoattack apgd``) get their own columns, never the AA ones."""
    cols = columns(rows)
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    lines += ["| " + " | ".join(_fmt(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def to_csv(rows: list[dict[str, Any]]) -> str:
    cols = columns(rows)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({c: ("" if r.get(c) is None else (round(r[c], 4) if isinstance(r[c], float) else r[c]))
                    for c in cols})
    return buf.getvalue()


def write_tables(runs: list[SweepRun], out: Path) -> list[dict[str, Any]]:
    rows = gather(runs, out)
    (out / "results.md").write_text(to_markdown(rows))
    (out / "results.csv").write_text(to_csv(rows))
    return rows


# ---- the whole sweep -----------------------------------------------------------------
def parse_gpus(text: str | None) -> list[str]:
    """``"0,1,3"`` -> ``["0", "1", "3"]``; ``"all"`` -> every visible CUDA device.

    A GPU may be listed several times (``"0,0,1,1"``): it then runs that many worker
    processes at once (small models leave a large GPU idle with one process).
    """
    if not text:
        return []
    if text == "all":
        import torch

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
) -> list[dict[str, Any]]:
    """Run a whole sweep (see the module docstring); returns the table rows.

    With two or more ``gpus`` the runs are dealt round-robin to one worker
    process per entry (``CUDA_VISIBLE_DEVICES`` set to that GPU; a GPU listed
    twice gets two processes), each running its share one after another; logs
    go to ``out/_logs/gpu<i>.log`` (``gpu<i>-2.log`` for a second process on GPU i).
    """
    if n_examples is not None and n_examples < 1:
        raise InputError(f"--n-examples must be >= 1, got {n_examples}")
    out = Path(out)
    runs = collect_runs(specs, overrides)
    todo = runs
    if only:
        missing = sorted(set(only) - {r.name for r in runs})
        if missing:
            raise InputError(f"--only names a run that is not in the sweep: {missing[0]!r}")
        todo = [r for r in runs if r.name in only]
    out.mkdir(parents=True, exist_ok=True)
    if gpus and len(gpus) > 1:
        run_workers(specs, out, todo, overrides or [], n_examples, autoattack,
                    gpu_workers(gpus), device, log)
    else:
        if gpus:
            os.environ["CUDA_VISIBLE_DEVICES"] = gpus[0]
        for i, run in enumerate(todo):
            t0 = time.perf_counter()
            did = train_and_evaluate(run, out, n_examples=n_examples, autoattack=autoattack, device=device,
                                     progress=progress, log=log)
            log(f"[{run.name}] {did} ({i + 1}/{len(todo)}, {time.perf_counter() - t0:.0f} s)")
    return write_tables(runs, out) if write_table else gather(runs, out)


def run_workers(specs: list[str], out: Path, todo: list[SweepRun], overrides: list[str], n_examples: int | None,
                autoattack: bool | str, workers: dict[str, dict[str, str]], device: str | None,
                log: Callable[[str], None]) -> None:
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
        cmd += ["--autoattack", _version(autoattack)]
        cmd += ["--device", device] if device else []
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
