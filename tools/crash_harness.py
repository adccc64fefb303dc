"""Crash harness: kill ``rpat train`` at random moments, resume it, and check nothing was lost.

What it does:

1. Runs a small training job (small_cnn on the bundled 8x8 digits, CPU, one thread,
   cosine lr, ``save_every=2``) to the end without interruption: the reference.
2. Runs the same job in a second folder and, ``--kills`` times, stops it at a random
   moment after it has started training (a step, an evaluation, or a checkpoint
   write), then restarts it with ``--resume`` (or fresh with ``--overwrite`` when no
   ``last.pt`` exists yet). Each stop is one of:

   - ``kill``: SIGKILL at a random moment: after 0 or 1 finished epochs, a delay uniform
     over about one epoch (so it lands in a training step, the evaluation or a save);
   - ``kill-save``: SIGKILL while a checkpoint is being written: the child runs with
     ``RPAT_TEST_SLOW_SAVE`` (a sleep between writing the temporary file and the
     rename, see ``rpat.checkpoint``) and is killed as soon as a ``.*.tmp`` file shows up;
   - ``term`` / ``int``: SIGTERM / SIGINT; the child must exit 143 / 130 and say how to resume.

   After every stop, every ``*.pt`` in the run folder (and ``epochs/``) must load with
   ``rpat.checkpoint.load_checkpoint``.
3. Lets the job finish and checks that ``final.pt`` and ``best.pt`` hold the same
   weights as the reference, bit for bit, and that ``metrics.jsonl`` has the same rows.

Usage::

    python tools/crash_harness.py --kills 50 --out docs/crash_harness_result.json
    python tools/crash_harness.py --kills 3 --workdir /tmp/crash --seed 1

Exit status 0 when every check passed, 1 otherwise. Importable:
``from crash_harness import run_harness`` (with ``tools/`` on ``sys.path``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import queue
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import torch

from rpat.checkpoint import SLOW_SAVE_ENV, load_checkpoint

MODES = ("kill", "kill-save", "term", "int")
MODE_WEIGHTS = (0.6, 0.2, 0.1, 0.1)
EXPECTED_RC = {"term": 128 + signal.SIGTERM, "int": 128 + signal.SIGINT}


def train_args(run_dir: Path, epochs: int, seed: int, train_subset: int) -> list[str]:
    """The ``rpat train`` command line of the harness job (deterministic on CPU)."""
    return [sys.executable, "-m", "rpat", "train", "--dataset", "digits", "--arch", "small_cnn",
            "--epochs", str(epochs), "--device", "cpu", "--seed", str(seed), "--no-progress",
            "--run-dir", str(run_dir), "data.batch_size=64", f"data.train_subset={train_subset}",
            "attack.steps=3", "attack.eps=32/255", "attack.step_size=8/255", "optim.lr=0.05",
            "optim.schedule=cosine", "eval.n_examples=200", "eval.steps=5", "save_every=2"]


def _env(slow_save: float | None = None) -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop(SLOW_SAVE_ENV, None)
    if slow_save:
        env[SLOW_SAVE_ENV] = str(slow_save)
    return env


class _Child:
    """A running ``rpat train`` whose stdout lines are timestamped by a reader thread."""

    def __init__(self, cmd: list[str], env: dict[str, str]):
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        self.lines: queue.Queue[tuple[float, str]] = queue.Queue()
        self.stdout: list[str] = []
        self.stderr = ""
        self._out = threading.Thread(target=self._read_out, daemon=True)
        self._err = threading.Thread(target=self._read_err, daemon=True)
        self._out.start()
        self._err.start()

    def _read_out(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.stdout.append(line)
            self.lines.put((time.perf_counter(), line))

    def _read_err(self) -> None:
        assert self.proc.stderr is not None
        self.stderr = self.proc.stderr.read()

    def wait_started(self, timeout: float = 120.0) -> float | None:
        """Block until the trainer prints its start line; its time, or None if the child exited first."""
        deadline = time.perf_counter() + timeout
        while time.perf_counter() < deadline:
            try:
                t, line = self.lines.get(timeout=0.05)
            except queue.Empty:
                if self.proc.poll() is not None:
                    return None
                continue
            if line.startswith("rpat ") and " -> " in line:
                return t
        return None

    def wait_epochs(self, n: int, timeout: float = 300.0) -> bool:
        """Block until ``n`` more "epoch k/E" lines were printed; False if the child exited first."""
        seen = 0
        deadline = time.perf_counter() + timeout
        while seen < n and time.perf_counter() < deadline:
            try:
                _, line = self.lines.get(timeout=0.05)
            except queue.Empty:
                if self.proc.poll() is not None:
                    return False
                continue
            seen += line.startswith("epoch ")
        return seen >= n

    def finish(self, timeout: float = 600.0) -> int:
        rc = self.proc.wait(timeout=timeout)
        self._out.join(timeout=10)
        self._err.join(timeout=10)
        return rc


def check_checkpoints(run_dir: Path) -> tuple[int, list[str]]:
    """Load every checkpoint of a run folder; ``(number checked, failures)``."""
    paths = sorted([*run_dir.glob("*.pt"), *run_dir.glob("epochs/*.pt")])
    failures = []
    for p in paths:
        try:
            ck = load_checkpoint(p)
            if not isinstance(ck.get("model"), dict) or not isinstance(ck.get("epoch"), int):
                failures.append(f"{p.name}: missing model/epoch")
        except Exception as e:  # noqa: BLE001 - any failure to load is what we look for
            failures.append(f"{p.name}: {e}")
    return len(paths), failures


def _same_weights(a: Path, b: Path) -> bool:
    wa, wb = load_checkpoint(a)["model"], load_checkpoint(b)["model"]
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def _metric_rows(run_dir: Path) -> list[dict[str, Any]]:
    drop = ("train_seconds", "train_images_per_s")
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return [{k: v for k, v in r.items() if k not in drop} for r in rows]


def _last_epoch(run_dir: Path) -> int | None:
    try:
        return int(load_checkpoint(run_dir / "last.pt")["epoch"])
    except Exception:  # noqa: BLE001
        return None


def run_harness(
    kills: int,
    *,
    workdir: str | Path | None = None,
    seed: int = 0,
    epochs: int | None = None,
    train_subset: int = 256,
    slow_save: float = 0.3,
    modes: list[str] | None = None,
    log=print,
) -> dict[str, Any]:
    """Run the reference job, then the killed-and-resumed one; returns the JSON-able summary.

    ``epochs`` defaults to ``kills + 4``; each stop lets about 0.3-1 epoch finish on average,
    so the run normally outlives the stops (if it does finish first, ``passed`` is False).
    ``modes`` fixes the sequence of stop modes (cycled; default: random, weighted ``MODE_WEIGHTS``).
    ``summary["passed"]`` is True when every checkpoint loaded after every stop, every
    SIGTERM/SIGINT exit was clean, and the final/best weights equal the reference bit for bit.
    """
    if kills < 0:
        raise ValueError("kills must be >= 0")
    if modes and not set(modes) <= set(MODES):
        raise ValueError(f"modes must be among {MODES}")
    epochs = epochs if epochs is not None else kills + 4
    rng = random.Random(seed)
    own_tmp = workdir is None
    root = Path(tempfile.mkdtemp(prefix="rpat-crash-")) if own_tmp else Path(workdir)
    root.mkdir(parents=True, exist_ok=True)
    ref_dir, run_dir = root / "reference", root / "interrupted"
    for d in (ref_dir, run_dir):
        shutil.rmtree(d, ignore_errors=True)
    t_start = time.perf_counter()

    log(f"reference run: {epochs} epochs")
    ref = _Child(train_args(ref_dir, epochs, 0, train_subset), _env())
    t_train0 = ref.wait_started()
    rc = ref.finish()
    if rc != 0 or t_train0 is None:
        raise RuntimeError(f"the reference run failed (exit {rc}): {ref.stderr.strip()[-500:]}")
    epoch_s = max((time.perf_counter() - t_train0) / epochs, 0.05)

    events: list[dict[str, Any]] = []
    checked = fresh = resumed = 0
    all_failures: list[str] = []
    finished_early = False
    while len(events) < kills:
        has_last = (run_dir / "last.pt").exists()
        cmd = train_args(run_dir, epochs, 0, train_subset) + (["--resume"] if has_last else ["--overwrite"])
        resumed += has_last
        fresh += not has_last
        mode = modes[len(events) % len(modes)] if modes else rng.choices(MODES, MODE_WEIGHTS)[0]
        child = _Child(cmd, _env(slow_save if mode == "kill-save" else None))
        t0 = child.wait_started()
        if t0 is None:
            rc = child.finish()
            if rc == 0:
                finished_early = True
                break
            raise RuntimeError(f"the run failed to start (exit {rc}): {child.stderr.strip()[-500:]}")
        # let 0 or 1 epochs finish (so the run makes progress however slow the start is), then stop
        # at a random moment within about the next epoch: in a step, the evaluation or a save
        wait_epochs = rng.choice([0, 0, 1])
        delay = rng.uniform(0.05, 1.2 * epoch_s)
        event: dict[str, Any] = {"i": len(events) + 1, "mode": mode, "resumed_from": _last_epoch(run_dir),
                                 "after_epochs": wait_epochs}
        child.wait_epochs(wait_epochs)
        t0 = time.perf_counter()
        if mode == "kill-save":
            deadline = time.perf_counter() + 4 * epoch_s + 5
            seen_tmp = False
            while time.perf_counter() < deadline and child.proc.poll() is None:
                if any(run_dir.glob(".*.tmp")) or any(run_dir.glob("epochs/.*.tmp")):
                    seen_tmp = True
                    time.sleep(rng.uniform(0.0, slow_save * 0.8))
                    break
                time.sleep(0.005)
            event["during_write"] = seen_tmp
            sig = signal.SIGKILL
        else:
            time.sleep(max(0.0, t0 + delay - time.perf_counter()))
            sig = {"kill": signal.SIGKILL, "term": signal.SIGTERM, "int": signal.SIGINT}[mode]
        event["after_start_s"] = round(time.perf_counter() - t0, 3)
        if child.proc.poll() is None:
            child.proc.send_signal(sig)
        rc = child.finish()
        event["rc"] = rc
        if rc == 0:  # it finished before the signal landed: nothing was stopped
            finished_early = True
            break
        if mode in EXPECTED_RC:
            event["clean_exit"] = rc == EXPECTED_RC[mode] and "--resume" in child.stderr
            if not event["clean_exit"]:
                all_failures.append(f"stop {event['i']} ({mode}): exit {rc}, stderr {child.stderr.strip()[-300:]!r}")
        event["tmp_files_left"] = len([*run_dir.glob(".*.tmp"), *run_dir.glob("epochs/.*.tmp")])
        n, failures = check_checkpoints(run_dir)
        checked += n
        event["checkpoints_loaded"] = n - len(failures)
        event["last_epoch"] = _last_epoch(run_dir)
        if failures:
            event["load_failures"] = failures
            all_failures.extend(f"stop {event['i']}: {f}" for f in failures)
        events.append(event)
        log(f"stop {event['i']}/{kills}: {mode} after {event['after_start_s']:.2f}s, exit {rc}, "
            f"last.pt epoch {event['last_epoch']}, {n} checkpoints load"
            f"{'' if not failures else ', FAILURES: ' + '; '.join(failures)}")

    if not finished_early:
        has_last = (run_dir / "last.pt").exists()
        child = _Child(train_args(run_dir, epochs, 0, train_subset) + (["--resume"] if has_last else ["--overwrite"]),
                       _env())
        child.wait_started()
        rc = child.finish()
        if rc != 0:
            all_failures.append(f"the final resume failed (exit {rc}): {child.stderr.strip()[-300:]}")
    final_equal = (run_dir / "final.pt").exists() and _same_weights(ref_dir / "final.pt", run_dir / "final.pt")
    best_equal = (run_dir / "best.pt").exists() and _same_weights(ref_dir / "best.pt", run_dir / "best.pt")
    metrics_equal = (run_dir / "metrics.jsonl").exists() and _metric_rows(ref_dir) == _metric_rows(run_dir)
    n, failures = check_checkpoints(run_dir)
    checked += n
    all_failures.extend(f"final: {f}" for f in failures)
    counts = {m: sum(e["mode"] == m for e in events) for m in MODES}
    summary = {
        "passed": bool(final_equal and best_equal and metrics_equal and not all_failures
                       and len(events) == kills),
        "kills_requested": kills, "stops": len(events), "stops_by_mode": counts,
        "kills_during_checkpoint_write": sum(bool(e.get("during_write")) for e in events),
        "finished_before_all_stops": finished_early, "fresh_starts": fresh, "resumes": resumed,
        "checkpoint_loads_checked": checked, "failures": all_failures,
        "final_weights_bit_equal": bool(final_equal), "best_weights_bit_equal": bool(best_equal),
        "metrics_rows_equal": bool(metrics_equal), "epochs": epochs, "epoch_seconds_reference": round(epoch_s, 3),
        "seconds": round(time.perf_counter() - t_start, 1),
        "command": " ".join(train_args(Path("RUN"), epochs, 0, train_subset)[1:]),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version(),
                    "torch": torch.__version__, "OMP_NUM_THREADS": "1"},
        "events": events,
    }
    if own_tmp:
        shutil.rmtree(root, ignore_errors=True)
    return summary


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="crash_harness.py",
        description="Kill `rpat train` at random moments (SIGKILL in a step, an evaluation or a checkpoint "
        "write; SIGTERM; SIGINT), resume it each time, and check that every checkpoint loads and that the "
        "final weights equal an uninterrupted run bit for bit.",
        epilog="examples:\n  python tools/crash_harness.py --kills 3\n"
        "  OMP_NUM_THREADS=1 python tools/crash_harness.py --kills 50 --out docs/crash_harness_result.json",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kills", type=int, default=10, help="how many times to stop the run (default 10)")
    p.add_argument("--epochs", type=int, help="epochs of the job (default kills + 4)")
    p.add_argument("--seed", type=int, default=0, help="seed of the stop schedule (default 0)")
    p.add_argument("--workdir", help="keep the two run folders here (default: a temporary folder, removed)")
    p.add_argument("--out", help="write the JSON summary here")
    args = p.parse_args(argv)
    if args.kills < 0 or (args.epochs is not None and args.epochs < 1):
        p.error("--kills must be >= 0 and --epochs >= 1")
    summary = run_harness(args.kills, workdir=args.workdir, seed=args.seed, epochs=args.epochs)
    text = json.dumps(summary, indent=2) + "\n"
    if args.out:
        Path(args.out).write_text(text)
    print(json.dumps({k: v for k, v in summary.items() if k != "events"}, indent=2))
    return 0 if summary["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
