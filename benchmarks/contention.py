"""How much a competing CPU job slows `rpat eval` down, with and without passive OpenMP waiting.

The job: `python -m rpat eval` of a small_cnn trained for one epoch on the 8x8 digits
(PGD-20 on the 599 test images, no AutoAttack, no sanity checks; about 3 s on an idle
2-core machine), timed as the wall time of the whole process (start-up included).
The competitor: a second process doing fp32 torch matrix products in a loop with torch's
default threads and OpenMP's default (active) waiting, like an ordinary torch job.

Configurations, each timed ``--repeats`` times (median reported), interleaved:

    idle/active        alone, OMP_WAIT_POLICY=ACTIVE (rpat's behaviour before it set PASSIVE)
    idle/passive       alone, rpat's default (OMP_WAIT_POLICY=PASSIVE)
    busy/active        beside the competitor, ACTIVE
    busy/passive       beside the competitor, rpat's default
    busy/passive/1t    beside the competitor, rpat's default and --threads 1

Slowdowns are relative to ``idle/passive`` (rpat's default alone); ``passive_cost_idle`` is
idle/passive over idle/active, what passive waiting costs when nothing else runs.
Target: busy/passive <= 3x.

    python benchmarks/contention.py                       # full: 599 images, 5 repeats, ~3-4 min
    python benchmarks/contention.py --tiny --out /tmp/c.json   # a few seconds' check that it works

Writes JSON (default benchmarks/results/contention.json). Run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

COMPETITOR = """
import torch, time
a = torch.randn(512, 512); b = torch.randn(512, 512)
end = time.time() + {seconds}
while time.time() < end:
    for _ in range(20):
        c = a @ b
"""

CONFIGS = {  # name: (with competitor, OMP_WAIT_POLICY, extra rpat flags)
    "idle/active": (False, "ACTIVE", []),
    "idle/passive": (False, None, []),
    "busy/active": (True, "ACTIVE", []),
    "busy/passive": (True, None, []),
    "busy/passive/1t": (True, None, ["--threads", "1"]),
}


def _env(policy: str | None) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("OMP_WAIT_POLICY", None)
    env.pop("OMP_NUM_THREADS", None)
    env["PYTHONPATH"] = str(ROOT / "src") + os.pathsep + env.get("PYTHONPATH", "")
    if policy is not None:
        env["OMP_WAIT_POLICY"] = policy
    return env


def make_checkpoint(work: Path) -> Path:
    """A small_cnn trained for one epoch on the digits (a few seconds)."""
    cmd = [sys.executable, "-m", "rpat", "train", "--preset", "digits_demo", "--run-dir", str(work / "run"),
           "--no-progress", "optim.epochs=1", "device=cpu"]
    subprocess.run(cmd, env=_env(None), check=True, capture_output=True, text=True)
    return work / "run" / "final.pt"


def time_eval(ckpt: Path, n_examples: int, policy: str | None, flags: list[str], out: Path) -> float:
    cmd = [sys.executable, "-m", "rpat", *flags, "eval", str(ckpt), "--no-autoattack", "--no-sanity",
           "--no-progress", "--n-examples", str(n_examples), "--device", "cpu", "--out", str(out)]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, env=_env(policy), capture_output=True, text=True)
    dt = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(f"rpat eval failed:\n{r.stderr}")
    return dt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n-examples", type=int, default=599)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--tiny", action="store_true", help="50 images, 1 repeat: checks that the script works")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "contention.json"))
    args = ap.parse_args()
    n, repeats = (50, 1) if args.tiny else (args.n_examples, args.repeats)
    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    times: dict[str, list[float]] = {k: [] for k in CONFIGS}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        ckpt = make_checkpoint(work)
        time_eval(ckpt, n, None, [], work / "warm.json")  # warm the file cache
        for rep in range(repeats):
            names = list(CONFIGS)
            names = names[rep % len(names):] + names[: rep % len(names)]  # rotate the order
            for name in names:
                busy, policy, flags = CONFIGS[name]
                comp = None
                if busy:
                    comp = subprocess.Popen([sys.executable, "-c", COMPETITOR.format(seconds=600)], env=_env(None))
                    time.sleep(2.0)  # let it load torch and start multiplying
                try:
                    times[name].append(time_eval(ckpt, n, policy, flags, work / "e.json"))
                finally:
                    if comp is not None:
                        comp.kill()
                        comp.wait()
                print(f"rep {rep + 1}/{repeats} {name:18s} {times[name][-1]:6.2f} s", flush=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    base = med["idle/passive"]
    result = {
        "what": f"python -m rpat eval: small_cnn (1 digits epoch), PGD-20 on {n} digits test images, "
                "no AutoAttack, no sanity checks; wall seconds of the whole process",
        "competitor": "one python process: 512x512 fp32 matmuls in a loop, default threads, default OMP waiting",
        "n_examples": n, "repeats": repeats, "tiny": args.tiny,
        "seconds": times, "median_s": med,
        "slowdown_vs_idle_passive": {k: v / base for k, v in med.items()},
        "passive_cost_idle": med["idle/passive"] / med["idle/active"],
        "target_busy_passive_max": 3.0,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "load_avg_before": load_before},
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }
    try:
        import torch

        result["machine"]["torch"] = torch.__version__
    except ImportError:
        pass
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\n{'config':18s} {'median s':>9s} {'vs idle/passive':>16s}")
    for k in CONFIGS:
        print(f"{k:18s} {med[k]:9.2f} {med[k] / base:15.2f}x")
    print(f"passive waiting on an idle machine costs {100 * (result['passive_cost_idle'] - 1):+.1f}%")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
