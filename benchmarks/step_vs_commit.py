"""The training step of this checkout against the step of an earlier commit, side by side, as ratios.

Each round runs ``benchmarks/train_step.py --variants rpat,reference`` once with this checkout's
``src`` and once with the other commit's (its tree exported to a temporary folder with ``git
archive``), in fresh processes, alternating which goes first. The ``reference`` step (the release-style
step in ``benchmarks/reference_step.py``) is the same code in both and serves as the control for load
on a shared machine: the figure that matters is the ratio of the two ``rpat`` medians, next to the
ratio of the two ``reference`` medians (≈ 1 when the machine was steady).

    python benchmarks/step_vs_commit.py a47ed82 --arch small_cnn --rounds 3 \\
        --out benchmarks/results/cpu_step_vs_a47ed82_small_cnn.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def export_tree(commit: str, dest: Path) -> Path:
    """``git archive`` of ``commit`` unpacked into ``dest``; returns its folder."""
    archive = dest / "tree.tar"
    subprocess.run(["git", "-C", str(ROOT), "archive", "--format=tar", "-o", str(archive), commit], check=True)
    with tarfile.open(archive) as t:
        t.extractall(dest / "tree", filter="data")
    return dest / "tree"


def run_once(tree: Path, args: argparse.Namespace, out: Path) -> dict:
    cmd = [sys.executable, str(tree / "benchmarks" / "train_step.py"), "--arch", args.arch,
           "--batch-size", str(args.batch_size), "--reps", str(args.reps), "--steps-per-rep", str(args.steps_per_rep),
           "--variants", "rpat,reference", "--no-memory", "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": str(tree / "src")}
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
    data = json.loads(out.read_text())
    return {r["variant"]: r["ms_per_step"]["median"] for r in data["results"]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("commit", help="the earlier commit (e.g. the one before a refactor)")
    p.add_argument("--arch", default="small_cnn")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--reps", type=int, default=3, help="repetitions inside each train_step.py run")
    p.add_argument("--steps-per-rep", type=int, default=5)
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds (each runs both trees once)")
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    runs: dict[str, list[dict]] = {"this": [], "other": []}
    with tempfile.TemporaryDirectory(prefix="rpat-step-vs-") as tmpd:
        tmp = Path(tmpd)
        trees = {"this": ROOT, "other": export_tree(args.commit, tmp)}
        for r in range(args.rounds):
            order = ["this", "other"] if r % 2 == 0 else ["other", "this"]
            for name in order:
                runs[name].append(run_once(trees[name], args, tmp / f"{name}{r}.json"))
                print(f"round {r + 1}/{args.rounds} {name}: {runs[name][-1]}", flush=True)
    med = {name: {v: statistics.median(x[v] for x in rs) for v in ("rpat", "reference")} for name, rs in runs.items()}
    result = {
        "what": "train_step.py --variants rpat,reference, this checkout against another commit, alternating rounds",
        "commit": args.commit, "arch": args.arch, "batch_size": args.batch_size, "rounds": args.rounds,
        "reps": args.reps, "steps_per_rep": args.steps_per_rep, "ms_per_step_median": med, "runs": runs,
        "rpat_ratio_this_over_other": med["this"]["rpat"] / med["other"]["rpat"],
        "reference_ratio_this_over_other": med["this"]["reference"] / med["other"]["reference"],
        "seconds": round(time.perf_counter() - t0, 1),
    }
    print(f"{args.arch}: rpat step {med['this']['rpat']:.1f} ms here vs {med['other']['rpat']:.1f} ms at {args.commit} "
          f"({result['rpat_ratio_this_over_other']:.3f}x); control (reference step) "
          f"{result['reference_ratio_this_over_other']:.3f}x")
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
