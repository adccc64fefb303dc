"""TensorBoard logging of a run (``logging.tensorboard=true``; needs ``pip install 'rpat[tensorboard]'``).

What goes into ``<run_dir>/tb/`` (written by rank 0 only; ``docs/logging.md`` lists every tag):

- at the start of a run, once: the resolved config as text (tag ``config``) and as hparams (the HParams
  tab, with ``held_out/clean`` and ``held_out/pgd`` as its metrics), at step 0;
- after every epoch, the numbers of that epoch's ``metrics.jsonl`` row (:func:`epoch_scalars`), at step
  ``epoch_number`` (1-based: epochs finished): loss terms under ``loss/``, lr, img/s, seconds and the
  training budget under ``train/``, the held-out accuracy (%) under ``held_out/`` (the WA model's when
  averaging is on; the online model's then under ``held_out_online/``);
- after an evaluation (``rpat train --eval``, ``rpat sweep``), every number of the report JSON
  (:func:`report_scalars`) under ``eval_best/`` / ``eval_final/`` at the checkpoint's epoch, and the
  report's table as text.

Resume: a resumed run opens its writer with ``purge_step`` = the first epoch it will write again, so
TensorBoard's reader drops whatever a stopped process had written from that step on (the rows
``metrics.jsonl`` dropped too): no step is shown twice. A fresh run (new or ``--overwrite``) first
removes the event files of the run it replaces.

The writer is :class:`torch.utils.tensorboard.SummaryWriter`, imported here and nowhere else, inside
:func:`require_tensorboard`, so that rpat needs no tensorboard unless it is asked for
(``Config._validate_logging`` refuses ``logging.tensorboard=true`` without it, before data is read).
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .. import run_dir as rd
from ..config import TENSORBOARD_MISSING, Config, dump_yaml
from ..errors import InputError
from ..evaluation.metrics import accuracy_se
from ..evaluation.robustness import format_table

#: The TensorBoard folder inside a run directory (``tensorboard --logdir`` a sweep's --out compares its runs).
TB_DIR = "tb"
#: ``metrics.jsonl`` keys ``train_<k>`` that are not loss terms: logged as ``train/<k>``.
TRAIN_STATS = ("lr", "images_per_s", "seconds", "skipped_steps", "eps", "steps")
#: The HParams tab's metrics (tags written every epoch).
HPARAM_METRICS = ("held_out/clean", "held_out/pgd")
#: Report numbers that are settings, not results: left out of TensorBoard (the report JSON keeps them).
REPORT_SETTINGS = ("epoch", "settings", "pgd_steps", "seed", "num_classes", "batch_size")
#: Report accuracies (percent) that get a standard error ``<key>_se`` (:func:`rpat.evaluation.metrics.accuracy_se`).
SE_KEYS = ("clean", "pgd", "aa", "cw", "noise", "transfer", "cw_art")


def require_tensorboard() -> tuple[Any, Any]:
    """``(torch.utils.tensorboard.SummaryWriter, torch.utils.tensorboard.summary.hparams)``; an InputError
    naming ``pip install 'rpat[tensorboard]'`` when the tensorboard package is missing."""
    try:
        from torch.utils.tensorboard import SummaryWriter, summary
    except ImportError:
        raise InputError(TENSORBOARD_MISSING) from None
    return SummaryWriter, summary.hparams


def tb_dir(run_dir: str | Path) -> Path:
    """``<run_dir>/tb``: where a run's event files go."""
    return Path(run_dir) / TB_DIR


def open_writer(folder: str | Path, purge_step: int | None = None) -> Any:
    """A ``SummaryWriter`` on ``folder`` whose event file sorts after those already there.

    TensorBoard reads a folder's event files in name order, and the name starts with the creation time in
    whole seconds; a writer opened in the same second as the newest file waits for the next second (at
    most 1 s), so that a resumed run's ``purge_step`` is read after the events it purges."""
    writer, _ = require_tensorboard()
    folder = Path(folder)
    stamps = [int(f.name.split(".")[3]) for f in folder.glob("events.out.tfevents.*")
              if len(f.name.split(".")) > 3 and f.name.split(".")[3].isdigit()] if folder.is_dir() else []
    while stamps and int(time.time()) <= max(stamps):
        time.sleep(0.05)
    return writer(log_dir=str(folder), purge_step=purge_step)


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def epoch_tag(key: str) -> str:
    """The TensorBoard tag of a ``metrics.jsonl`` key: ``train_loss`` -> ``loss/loss``, ``train_rpat`` ->
    ``loss/rpat``, ``train_lr`` -> ``train/lr``, ``held_out_pgd`` -> ``held_out/pgd``,
    ``online_held_out_pgd`` -> ``held_out_online/pgd``; any other key is its own tag."""
    if key.startswith("online_held_out_"):
        return "held_out_online/" + key.removeprefix("online_held_out_")
    if key.startswith("held_out_"):
        return "held_out/" + key.removeprefix("held_out_")
    if key.startswith("train_"):
        k = key.removeprefix("train_")
        return ("train/" if k in TRAIN_STATS else "loss/") + k
    return key


def epoch_scalars(record: Mapping[str, Any]) -> dict[str, float]:
    """``{tag: value}`` of one ``metrics.jsonl`` row: every number but ``epoch``/``epoch_number`` (the step);
    booleans (``best``) are left out. Accuracies in percent, lr and seconds as written in the row."""
    return {epoch_tag(k): float(v) for k, v in record.items()
            if k not in ("epoch", "epoch_number") and _number(v)}


def report_scalars(report: Mapping[str, Any]) -> dict[str, float]:
    """``{name: value}`` of every number in a report JSON (``rpat.evaluation.report.write_report``): the
    top-level metrics (clean, pgd, aa, mean, nrr, cw, noise, ..., seconds, n_examples), each accuracy's
    standard error ``<key>_se`` (percentage points, on ``n_examples`` images), the numbers one level down
    in a dict (``extras/<stage>_seconds``, ...), and the robust accuracy after each AutoAttack attack
    (``aa_per_attack/<n>_<attack>``, percent). ``epoch`` (the step) and settings
    (:data:`REPORT_SETTINGS`) are left out."""
    out: dict[str, float] = {}
    for key, value in report.items():
        if key in REPORT_SETTINGS:
            continue
        if _number(value):
            out[key] = float(value)
        elif isinstance(value, Mapping):
            for k, v in value.items():
                if _number(v) and k not in REPORT_SETTINGS:
                    out[f"{key}/{k}"] = float(v)
    n = report.get("n_examples")
    if _number(n) and n > 0:
        for key in SE_KEYS:
            if _number(report.get(key)):
                out[f"{key}_se"] = accuracy_se(float(report[key]), int(n))
    per_attack = report.get("aa_per_attack") or (report.get("extras") or {}).get("aa_per_attack") or []
    for i, row in enumerate(per_attack):
        if isinstance(row, Mapping) and _number(row.get("robust")):
            out[f"aa_per_attack/{i}_{row.get('attack')}"] = float(row["robust"])
    return out


def _hparam(value: Any) -> bool | int | float | str:
    """An hparams value: numbers, strings and booleans as they are, anything else (lists, None) as JSON."""
    return value if isinstance(value, (bool, int, float, str)) else json.dumps(value)


def flat_config(cfg: Config) -> dict[str, bool | int | float | str]:
    """The resolved config as ``{"optim.lr": 0.1, "attack.eps": "8/255", ...}`` (hparams keys)."""
    out: dict[str, bool | int | float | str] = {}
    for key, value in cfg.resolved_dict().items():
        if isinstance(value, dict):
            out.update({f"{key}.{k}": _hparam(v) for k, v in value.items()})
        else:
            out[key] = _hparam(value)
    return out


class RunLogger:
    """Rank 0's TensorBoard writer of one training run (``Trainer.tb``).

    ``RunLogger.for_run(cfg, run_dir, resumed=...)`` gives None when ``logging.tensorboard`` is off. Each
    :meth:`log_epoch` flushes, so a stopped run loses nothing it has recorded in ``metrics.jsonl``.
    """

    def __init__(self, run_dir: str | Path, purge_step: int | None = None):
        self.dir = tb_dir(run_dir)
        self.writer = open_writer(self.dir, purge_step)

    @classmethod
    def for_run(cls, cfg: Config, run_dir: str | Path, *, resumed: bool) -> RunLogger | None:
        """The writer of a run starting (``resumed=False``: old event files removed, config logged) or
        resumed (``purge_step`` = 1 + the last ``epoch_number`` left in ``metrics.jsonl``); None when off."""
        if not cfg.logging.tensorboard:
            return None
        folder = tb_dir(run_dir)
        if not resumed and folder.is_dir():  # the run this one replaces (--overwrite)
            for f in folder.glob("events.out.tfevents.*"):
                f.unlink()
        had_events = folder.is_dir() and any(folder.glob("events.out.tfevents.*"))
        purge = None
        if resumed:
            purge = 1 + max((int(r.get("epoch_number", 0)) for r in rd.read_metrics(run_dir)), default=0)
        logger = cls(run_dir, purge_step=purge)
        if not had_events:
            logger.log_config(cfg)
        return logger

    def log_config(self, cfg: Config) -> None:
        """The resolved config as text (``config``, YAML) and as hparams, at step 0."""
        self.writer.add_text("config", "    " + dump_yaml(cfg).replace("\n", "\n    "), 0)
        for s in _hparams_summaries(flat_config(cfg)):
            self.writer.file_writer.add_summary(s, 0)
        self.writer.flush()

    def log_epoch(self, record: Mapping[str, Any]) -> None:
        """One ``metrics.jsonl`` row (:func:`epoch_scalars`) at step ``record["epoch_number"]``, flushed."""
        step = int(record["epoch_number"])
        for tag, value in epoch_scalars(record).items():
            self.writer.add_scalar(tag, value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def _hparams_summaries(hparams: dict[str, Any]) -> tuple[Any, ...]:
    """The three hparams summaries (experiment, session start, session end) for the run's own folder
    (``SummaryWriter.add_hparams`` would put them in a sub-run)."""
    _, hparams_summary = require_tensorboard()
    return hparams_summary(hparams, dict.fromkeys(HPARAM_METRICS, 0.0))


def log_report(run_dir: str | Path, which: str, report: Mapping[str, Any]) -> None:
    """Every number of an evaluation report (:func:`report_scalars`) as ``eval_<which>/<name>`` at the
    checkpoint's epoch (``report["epoch"]``), and the report's table as text ``eval_<which>``, into
    ``<run_dir>/tb``. Called after ``write_report`` by ``rpat train --eval`` and ``rpat sweep`` (rank 0)."""
    writer = open_writer(tb_dir(run_dir))
    try:
        step = int(report.get("epoch") or 0)
        for name, value in report_scalars(report).items():
            writer.add_scalar(f"eval_{which}/{name}", value, step)
        writer.add_text(f"eval_{which}", format_table([(which, dict(report))]), step)
    finally:
        writer.close()
