"""``rpat demo``: PGD-AT vs PGD-AT + RPAT on 8x8 digits, on the CPU, offline, in minutes."""

from __future__ import annotations

import json
import time
from pathlib import Path

from .config import build_config
from .evaluation.checkpoint_eval import evaluate_checkpoint
from .evaluation.robustness import format_table
from .training import Trainer

RUNS = (("PGD-AT", "pgd_at", False), ("PGD-AT + RPAT", "pgd_at_rpat", True))


def run_demo(out: Path, epochs: int | None = None, seed: int = 0, progress: bool = True,
             n_examples: int | None = None) -> list[tuple[str, dict]]:
    """Train both methods from the ``digits_demo`` preset into ``out/<name>``, evaluate ``final.pt``.

    Returns the table rows ``[(label, report dict), ...]`` and writes ``out/results.json``.
    Existing demo runs in ``out`` are replaced.
    """
    rows = []
    t0 = time.perf_counter()
    for label, name, use_rpat in RUNS:
        overrides: list[dict] = [{"seed": seed, "device": "cpu", "rpat": {"enabled": use_rpat}}]
        if epochs is not None:
            overrides.append({"optim": {"epochs": epochs}})
        cfg = build_config("digits_demo", None, overrides)
        print(f"== {label}: {cfg.describe()}", flush=True)
        Trainer(cfg, out / name, overwrite=True, progress=progress).fit()
        report, _ = evaluate_checkpoint(out / name / "final.pt", device="cpu", progress=progress,
                                        n_examples=n_examples)
        rows.append((label, report.to_dict()))
    table = format_table(rows)
    threat = rows[0][1]["threat"]
    print(f"\nfinal checkpoints, {rows[0][1]['n_examples']} digits test images, {threat}:")
    print(table)
    print(f"(total {time.perf_counter() - t0:.0f} s; runs in {out})")
    (out / "results.json").write_text(json.dumps(dict(rows), indent=2) + "\n")
    return rows
