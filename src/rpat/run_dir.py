"""The run directory: its file names, and reading and writing what is in them.

Layout (written by ``rpat train``; ``rpat eval``, ``rpat sweep`` and ``rpat report`` read it)::

    config.yaml             the resolved config
    meta.json               rpat version, git commit, torch version, device, start time, held-out selection
    metrics.jsonl           one JSON object per finished epoch (``epoch`` is 0-based)
    last.pt                 model + optimizer + progress, rewritten atomically after each epoch
    best.pt                 weights with the highest held-out PGD accuracy so far
    final.pt                weights after the last epoch
                            (with ``averaging.enabled`` best/final/epochs hold the weight-averaged
                            model, the one evaluated; last.pt keeps the online model and ``averaged``)
    epochs/epoch_NNNN.pt    every ``save_every`` epochs (when set), for the analyses
    tb/                     TensorBoard event files (``logging.tensorboard``, rpat.training.tensorboard)
    eval_best.json          reports of best.pt / final.pt (``rpat train --eval``, ``rpat sweep``)
    eval_final.json
    best.eval.json          the report ``rpat eval best.pt`` writes beside a checkpoint
    <report>.aa-state.json  AutoAttack's resume state while a report is being made (removed after)
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from .errors import InputError
from .utils import write_text_atomic

CONFIG = "config.yaml"
META = "meta.json"
METRICS = "metrics.jsonl"
LAST, BEST, FINAL = "last.pt", "best.pt", "final.pt"
EPOCHS_DIR = "epochs"
#: The files of a run: what --overwrite removes and what makes a folder hold a run.
RUN_FILES: tuple[str, ...] = (CONFIG, META, METRICS, LAST, BEST, FINAL)
#: Files in a folder that make it a run directory (``rpat train`` writes both first).
RUN_DIR_MARKERS: tuple[str, ...] = (CONFIG, META)
#: The checkpoints a run is evaluated on, in table order.
EVALUATED: tuple[str, ...] = ("best", "final")


def epoch_path(run_dir: str | Path, epoch: int) -> Path:
    """``epochs/epoch_NNNN.pt`` of 1-based ``epoch`` (epochs finished)."""
    return Path(run_dir) / EPOCHS_DIR / f"epoch_{epoch:04d}.pt"


def is_run_dir(folder: str | Path) -> bool:
    """A folder ``rpat train`` made (it holds ``config.yaml`` or ``meta.json``)."""
    return any((Path(folder) / m).is_file() for m in RUN_DIR_MARKERS)


def check_run_dir(run_dir: Path, resume: bool, overwrite: bool) -> bool:
    """Refuse to clobber an existing run. Returns True when there is a run to resume."""
    if resume and overwrite:
        raise InputError("--resume and --overwrite exclude each other: pick one")
    existing = [f for f in RUN_FILES if (run_dir / f).exists()]
    if run_dir.exists() and not run_dir.is_dir():
        raise InputError(f"run directory {str(run_dir)!r} is a file")
    if not existing:
        if resume:
            raise InputError(f"nothing to resume in {str(run_dir)!r} (no last.pt)")
        return False
    if overwrite:
        for f in existing:
            (run_dir / f).unlink()
        return False
    if resume:
        if not (run_dir / LAST).exists():
            raise InputError(f"{str(run_dir)!r} has no last.pt to resume from; use --overwrite to start again")
        return True
    raise InputError(
        f"run directory {str(run_dir)!r} already holds a run; pass --resume to continue it "
        "or --overwrite to start again"
    )


def remove_stale_temporaries(run_dir: Path) -> None:
    """Delete the temporary files of writes that were killed (``rpat.utils.atomic_write``)."""
    for stale in [*run_dir.glob(".*.tmp"), *run_dir.glob(f"{EPOCHS_DIR}/.*.tmp")]:
        stale.unlink(missing_ok=True)


# ---- meta.json -------------------------------------------------------------------------------------
def write_meta(run_dir: Path, meta: dict[str, Any]) -> None:
    write_text_atomic(run_dir / META, json.dumps(meta, indent=2) + "\n")


def read_meta(run_dir: str | Path) -> dict[str, Any]:
    """A run's ``meta.json``; ``{}`` when it is missing or unreadable (a run killed before writing it)."""
    try:
        meta = json.loads((Path(run_dir) / META).read_text())
    except (OSError, ValueError):
        return {}
    return meta if isinstance(meta, dict) else {}


def selection_record(kind: str, n: int, val_seed: int = 0) -> str:
    """``meta.json``'s ``selection``: where best.pt is chosen (``kind`` "test" or "validation", ``n`` images)."""
    if kind == "validation":
        return f"validation: {n} training images held out (data.val_seed={val_seed})"
    return f"test: the first {n} test images"


def held_out_label(kind: str, n: int) -> str:
    """The one wording of the held-out set, for log lines and tables:
    ``"first 1000 test images"`` or ``"1000 validation images"`` (training images held out)."""
    return f"{n} validation images" if kind == "validation" else f"first {n} test images"


def held_out_of(meta: dict[str, Any]) -> str | None:
    """:func:`held_out_label` of a run from its ``meta.json``; None when it does not say."""
    n, sel = meta.get("held_out_images"), str(meta.get("selection", ""))
    if n is None or not sel:
        return None
    return held_out_label("validation" if sel.startswith("validation") else "test", int(n))


# ---- metrics.jsonl ---------------------------------------------------------------------------------
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


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    return read_jsonl(Path(run_dir) / METRICS)


def append_metrics(run_dir: Path, record: dict[str, Any]) -> None:
    """Append one epoch's record to ``metrics.jsonl``."""
    path = run_dir / METRICS
    try:
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")
    except OSError as e:
        raise InputError(f"cannot write {str(path)!r}: {e.strerror or e}") from None


def truncate_metrics(run_dir: Path, epoch: int) -> None:
    """Keep only the rows of 0-based epochs ``< epoch`` (a resume continues from there)."""
    path = run_dir / METRICS
    if not path.exists():
        return
    keep = []
    for ln in path.read_text().splitlines():
        try:
            if json.loads(ln)["epoch"] < epoch:
                keep.append(ln)
        except (ValueError, KeyError, TypeError):
            continue  # a line cut short by a kill
    write_text_atomic(path, "".join(ln + "\n" for ln in keep))


# ---- reports ---------------------------------------------------------------------------------------
def eval_report_path(run_dir: str | Path, which: str) -> Path:
    """``eval_best.json`` / ``eval_final.json``: the report of best.pt / final.pt made by a sweep or ``--eval``."""
    return Path(run_dir) / f"eval_{which}.json"


def find_report(run_dir: Path, which: str) -> Path | None:
    """The report of ``which`` (best/final) in a run: ``eval_<which>.json``, else ``<which>.eval.json``."""
    for p in (eval_report_path(run_dir, which), run_dir / f"{which}.eval.json"):
        if p.is_file():
            return p
    return None


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


def read_report(path: Path) -> dict[str, Any] | None:
    """A report JSON; None when missing or unreadable."""
    try:
        rep = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return rep if isinstance(rep, dict) else None


def write_report_file(path: Path, report: dict[str, Any]) -> None:
    """Write a report JSON atomically (a kill never leaves half a report that a rerun would reuse)."""
    write_text_atomic(path, json.dumps(report, indent=2) + "\n")


def aa_state_path(report_path: str | Path) -> Path:
    """AutoAttack's resume state for a report: ``<report without .json>.aa-state.json`` beside it."""
    p = Path(report_path)
    return p.with_name(p.name.removesuffix(".json") + ".aa-state.json")


def stages_path(report_path: str | Path) -> Path:
    """The finished stages of a report's evaluation (:mod:`rpat.evaluation.stages`): ``<report>.stages.json``."""
    p = Path(report_path)
    return p.with_name(p.name.removesuffix(".json") + ".stages.json")


def remove_aa_state(report_path: str | Path) -> list[Path]:
    """Delete the AutoAttack state of a report (the state file and its tensor files); returns what went."""
    state = aa_state_path(report_path)
    stem = state.name.removesuffix(".json")
    # the state, its tensor files, and temporaries of a write that was killed (``.<name>.<random>.tmp``)
    patterns = (f"{stem}*", f".{stem}*.tmp")
    gone = [f for pat in patterns for f in state.parent.glob(pat) if f.is_file()] if state.parent.is_dir() else []
    for f in gone:
        f.unlink(missing_ok=True)
    return gone
