"""``rpat demo``: PGD-AT vs PGD-AT + RPAT on 8x8 digits, on the CPU, offline, in under 3 minutes.

Standard AutoAttack dominates the time: on a small CNN its cost is mostly per-iteration
overhead (FAB-T's 9 targets x 100 iterations, Square's 5,000 queries), about 60 s per model
on the first ``DEMO_TEST_IMAGES`` test images, whatever their number. So the two runs
(training, then Clean / PGD-20 / AutoAttack of ``final.pt``) go side by side in two worker
processes of one thread each when the machine has two cores (``jobs``), and the demo
evaluates the first ``DEMO_TEST_IMAGES`` of the 599 digits test images (``n_examples=None``:
all of them). The per-epoch held-out PGD-20 in the training log uses ``DEMO_HELD_OUT`` test
images (this changes no weight).
"""

from __future__ import annotations

import json
import multiprocessing
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, TextIO

import torch

from .. import run_dir as rd
from ..config import build_config
from ..evaluation.checkpoint_eval import evaluate_checkpoint
from ..evaluation.robustness import format_table
from ..training import Trainer
from ..utils import progress_enabled

RUNS = (("PGD-AT", "pgd_at", False), ("PGD-AT + RPAT", "pgd_at_rpat", True))
DEMO_TEST_IMAGES = 100  #: test images evaluated by default (of 599): keeps the demo within ~3 min on 2 cores
DEMO_HELD_OUT = 200  #: held-out test images for the per-epoch PGD-20 in the training log


class _Prefixed:
    """A text stream that writes each complete line to ``stream`` with ``prefix`` (worker logs)."""

    def __init__(self, stream: TextIO, prefix: str):
        self.stream, self.prefix, self.buf = stream, prefix, ""

    def write(self, text: str) -> int:
        self.buf += text
        *lines, self.buf = self.buf.split("\n")
        for line in lines:
            self.stream.write(f"{self.prefix}{line}\n")
        self.stream.flush()
        return len(text)

    def flush(self) -> None:
        self.stream.flush()

    def isatty(self) -> bool:
        return False


def _one_run(label: str, name: str, use_rpat: bool, out: Path, epochs: int | None, seed: int,
             n_examples: int | None, progress: bool, worker: bool) -> dict[str, Any]:
    """Train one demo run into ``out/name`` and evaluate its ``final.pt``; the report dict + seconds.

    As a worker process: one torch thread, every line of its log prefixed with ``[label]``.
    """
    if worker:
        torch.set_num_threads(1)
        sys.stdout = _Prefixed(sys.__stdout__, f"[{label}] ")  # type: ignore[assignment]
        progress = False
    bars = progress_enabled(progress)  # bars on a terminal; otherwise one line per evaluation stage
    log = None if bars else (lambda m: print(f"   {m}", flush=True))
    overrides: list[dict] = [{"seed": seed, "device": "cpu", "rpat": {"enabled": use_rpat},
                              "eval": {"n_examples": DEMO_HELD_OUT}}]
    if epochs is not None:
        overrides.append({"optim": {"epochs": epochs}})
    cfg = build_config("digits_demo", None, overrides)
    print(f"== {label}: {cfg.describe()}", flush=True)
    t = time.perf_counter()
    Trainer(cfg, out / name, overwrite=True, progress=progress).fit()
    t_train = time.perf_counter() - t
    report, _ = evaluate_checkpoint(out / name / rd.FINAL, device="cpu", progress=bars,
                                    n_examples=n_examples, log=log)
    return {"report": report.to_dict(), "train_s": t_train, "eval_s": time.perf_counter() - t - t_train}


def run_demo(out: Path, epochs: int | None = None, seed: int = 0, progress: bool = True,
             n_examples: int | None = DEMO_TEST_IMAGES, jobs: int | None = None) -> list[tuple[str, dict]]:
    """Train both methods from the ``digits_demo`` preset into ``out/<name>``, evaluate ``final.pt``.

    ``n_examples``: test images for Clean / PGD-20 / AutoAttack (None: all 599). ``jobs``: worker
    processes (default: 2 where the machine has 2 cores, else 1; 1 runs both in this process).
    Returns the table rows ``[(label, report dict), ...]`` and writes ``out/results.json``.
    Existing demo runs in ``out`` are replaced.
    """
    t0 = time.perf_counter()
    if jobs is None:
        jobs = min(len(RUNS), os.cpu_count() or 1)
    base = build_config("digits_demo", None, [{"optim": {"epochs": epochs}}] if epochs is not None else [])
    what = "all 599" if n_examples is None else f"the first {min(n_examples, 599)} of 599"
    side = f"side by side in {jobs} processes of one thread" if jobs > 1 else "one after the other"
    print(f"rpat demo: PGD-AT and PGD-AT + RPAT ({side}), {base.optim.epochs} epochs each on the 1,198 digits "
          f"training images (held-out PGD-20 on {DEMO_HELD_OUT} test images after each epoch), then Clean / PGD-20 / "
          f"standard AutoAttack (APGD-CE, APGD-T, FAB-T, Square) on {what} test images of final.pt", flush=True)
    args = [(label, name, use_rpat, out, epochs, seed, n_examples, progress, jobs > 1)
            for label, name, use_rpat in RUNS]
    if jobs > 1:
        with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            results = list(pool.map(_one_run, *zip(*args, strict=True)))
    else:
        results = [_one_run(*a) for a in args]
    rows = []
    for (label, _, _), r in zip(RUNS, results, strict=True):
        print(f"   {label}: training {r['train_s']:.0f} s, evaluation {r['eval_s']:.0f} s", flush=True)
        rows.append((label, r["report"]))
    table = format_table(rows)
    threat = rows[0][1]["threat"]
    print(f"\nfinal checkpoints, {rows[0][1]['n_examples']} digits test images, {threat}, "
          f"{base.optim.epochs} epochs, standard AutoAttack:")
    print(table)
    elapsed = time.perf_counter() - t0
    print(f"(total {elapsed // 60:.0f} min {elapsed % 60:.0f} s; runs in {out})")
    (out / "results.json").write_text(json.dumps(dict(rows), indent=2) + "\n")
    return rows
