"""``rpat demo``: PGD-AT vs PGD-AT + RPAT on 8x8 digits, on the CPU, offline, in about 3 minutes.

Standard AutoAttack dominates the time (APGD-T, FAB-T and Square on every still-robust image,
about 0.6 CPU-seconds per image here), then the held-out PGD-20 after each epoch. So the demo
evaluates the first ``DEMO_TEST_IMAGES`` of the 599 digits test images by default
(``n_examples=None`` evaluates all of them, as the demo did before: 5-6 minutes) and logs its
held-out PGD-20 on ``DEMO_HELD_OUT`` test images (this changes no weight: final.pt is the same).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from .config import build_config
from .evaluation.checkpoint_eval import evaluate_checkpoint
from .evaluation.robustness import format_table
from .training import Trainer
from .utils import progress_enabled

RUNS = (("PGD-AT", "pgd_at", False), ("PGD-AT + RPAT", "pgd_at_rpat", True))
DEMO_TEST_IMAGES = 150  #: test images evaluated by default (of 599): keeps the demo within ~3 min on 2 cores
DEMO_HELD_OUT = 200  #: held-out test images for the per-epoch PGD-20 in the training log


def run_demo(out: Path, epochs: int | None = None, seed: int = 0, progress: bool = True,
             n_examples: int | None = DEMO_TEST_IMAGES) -> list[tuple[str, dict]]:
    """Train both methods from the ``digits_demo`` preset into ``out/<name>``, evaluate ``final.pt``.

    ``n_examples``: test images for Clean / PGD-20 / AutoAttack (None: all 599).
    Returns the table rows ``[(label, report dict), ...]`` and writes ``out/results.json``.
    Existing demo runs in ``out`` are replaced.
    """
    rows = []
    t0 = time.perf_counter()
    bars = progress_enabled(progress)  # bars on a terminal; otherwise one line per evaluation stage
    log = None if bars else (lambda m: print(f"   {m}", flush=True))
    base = build_config("digits_demo", None, [{"optim": {"epochs": epochs}}] if epochs is not None else [])
    what = "all 599" if n_examples is None else f"the first {min(n_examples, 599)} of 599"
    print(f"rpat demo: PGD-AT and PGD-AT + RPAT, {base.optim.epochs} epochs each on the 1,198 digits training "
          f"images (held-out PGD-20 on {DEMO_HELD_OUT} test images after each epoch), then Clean / PGD-20 / "
          f"standard AutoAttack (APGD-CE, APGD-T, FAB-T, Square) on {what} test images of final.pt", flush=True)
    for label, name, use_rpat in RUNS:
        overrides: list[dict] = [{"seed": seed, "device": "cpu", "rpat": {"enabled": use_rpat},
                                  "eval": {"n_examples": DEMO_HELD_OUT}}]
        if epochs is not None:
            overrides.append({"optim": {"epochs": epochs}})
        cfg = build_config("digits_demo", None, overrides)
        print(f"== {label}: {cfg.describe()}", flush=True)
        t = time.perf_counter()
        Trainer(cfg, out / name, overwrite=True, progress=progress).fit()
        t_train = time.perf_counter() - t
        report, _ = evaluate_checkpoint(out / name / "final.pt", device="cpu", progress=bars,
                                        n_examples=n_examples, log=log)
        print(f"   {label}: training {t_train:.0f} s, evaluation {time.perf_counter() - t - t_train:.0f} s",
              flush=True)
        rows.append((label, report.to_dict()))
    table = format_table(rows)
    threat = rows[0][1]["threat"]
    print(f"\nfinal checkpoints, {rows[0][1]['n_examples']} digits test images, {threat}, "
          f"{base.optim.epochs} epochs, standard AutoAttack:")
    print(table)
    elapsed = time.perf_counter() - t0
    print(f"(total {elapsed // 60:.0f} min {elapsed % 60:.0f} s; runs in {out})")
    (out / "results.json").write_text(json.dumps(dict(rows), indent=2) + "\n")
    return rows
