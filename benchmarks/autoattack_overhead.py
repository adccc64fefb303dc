"""rpat's AutoAttack against a direct pyautoattack call: same model, images, seed and batch size.

The model is checkpoint-free but partly robust: a small_cnn trained with 2
PGD-AT epochs (PGD-3, ℓ∞ 32/255, as the digits demo's budget) on
scikit-learn's 8x8 digits; AutoAttack runs at ℓ∞ 48/255, where a few of the 64
test images stay robust after APGD-CE, so every attack of standard AutoAttack
runs. One torch thread by default (``--threads``): on a shared 2-core machine
two threads slow small operators down by up to 100x as soon as another job
runs, which swamps any wrapper cost. The script times, interleaved (each
repetition runs every variant once, in rotating order):

- ``direct``: ``pyautoattack.AutoAttack(model, version="standard", seed=0)
  .run_standard_evaluation(x, y, batch_size=...)`` on the model in eval mode,
  as a user would call it;
- ``rpat``: ``rpat.attacks.run_autoattack`` (rpat's own per-attack loop over
  the same attack objects; eval mode, frozen parameters, forked RNG);
- ``rpat+state``: the same with a resumable state file (hashes of images,
  labels and weights, one atomic write per stage).

Each repetition checks that every variant gives the same robust flags and
adversarial images as ``direct``. The JSON (``--out``) has the per-variant
seconds (wall and process CPU), medians, the ratio of medians to ``direct`` and
the range of the per-repetition (paired) ratios.

    python benchmarks/autoattack_overhead.py                 # ~3 min on a 2-core CPU
    python benchmarks/autoattack_overhead.py --tiny --out /tmp/aa_tiny.json   # seconds; a smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from rpat.attacks import ThreatModel, pgd, run_autoattack
from rpat.data import load_dataset
from rpat.models import create_model

VARIANTS = ("direct", "rpat", "rpat+state")
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "cpu_autoattack_overhead.json"


def train_model(epochs: int, threat: ThreatModel, n_train: int | None, seed: int = 0) -> torch.nn.Module:
    """small_cnn, PGD-AT (PGD-``threat.steps``, uniform start) on the digits' training split; in eval mode."""
    torch.manual_seed(seed)
    train = load_dataset("digits", "data", "train", progress=False)
    x = train.images.float().div(255)
    y = train.labels
    if n_train is not None:
        x, y = x[:n_train], y[:n_train]
    model = create_model("small_cnn", num_classes=10, in_chans=1)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for idx in torch.randperm(len(y), generator=g).split(64):
            x_adv = pgd(model, x[idx], y[idx], threat, generator=g)
            model.train()
            opt.zero_grad()
            F.cross_entropy(model(x_adv), y[idx]).backward()
            opt.step()
    return model.eval()


def run_variant(name: str, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, threat: ThreatModel,
                batch_size: int, tmp: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """``(robust, x_adv)`` of one AutoAttack run by variant ``name``."""
    if name == "direct":
        from pyautoattack import AutoAttack

        model.eval()
        adversary = AutoAttack(model, norm="Linf", eps=threat.eps, seed=0, version="standard", device="cpu")
        x_adv, y_adv = adversary.run_standard_evaluation(x, y, batch_size=batch_size)
        return y_adv == y, x_adv
    state = None
    if name == "rpat+state":
        state = tmp / f"state_{time.monotonic_ns()}.json"
    x_adv, robust = run_autoattack(model, x, y, threat, batch_size=batch_size, seed=0, state_path=state)
    return robust, x_adv


def _summary(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def measure(args: argparse.Namespace) -> dict[str, Any]:
    threat = ThreatModel("linf", args.eps / 255, args.eps / 255 / 4, 10)  # AutoAttack uses norm and ε only
    train_threat = ThreatModel("linf", args.train_eps / 255, 2 * args.train_eps / 255 / 3, 3)
    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    t = time.perf_counter()
    model = train_model(args.epochs, train_threat, args.n_train)
    train_seconds = time.perf_counter() - t
    test = load_dataset("digits", "data", "test", progress=False)
    x, y = test.images[: args.n].float().div(255), test.labels[: args.n]

    wall: dict[str, list[float]] = {v: [] for v in args.variants}
    cpu: dict[str, list[float]] = {v: [] for v in args.variants}
    reference: tuple[torch.Tensor, torch.Tensor] | None = None
    robust_pct = None
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(args.reps):
            order = list(args.variants[rep % len(args.variants):]) + list(args.variants[: rep % len(args.variants)])
            for name in order:
                t_wall, t_cpu = time.perf_counter(), time.process_time()
                robust, x_adv = run_variant(name, model, x, y, threat, args.batch_size, Path(tmp))
                wall[name].append(time.perf_counter() - t_wall)
                cpu[name].append(time.process_time() - t_cpu)
                if reference is None:
                    reference = (robust, x_adv)
                    robust_pct = 100.0 * float(robust.float().mean())
                elif not (torch.equal(robust, reference[0]) and torch.equal(x_adv, reference[1])):
                    raise SystemExit(f"{name} gave other robust flags or adversarial images than the first run")
                print(f"rep {rep + 1}/{args.reps} {name}: {wall[name][-1]:.2f} s", file=sys.stderr, flush=True)

    base = "direct" if "direct" in args.variants else args.variants[0]
    out: dict[str, Any] = {
        "what": "standard AutoAttack, small_cnn PGD-AT on digits; rpat's wrapper vs a direct pyautoattack call",
        "setting": {"n_examples": args.n, "eps": f"{args.eps}/255", "batch_size": args.batch_size,
                    "train_epochs": args.epochs, "train": f"PGD-3 linf {args.train_eps}/255",
                    "train_seconds": train_seconds, "reps": args.reps,
                    "robust_accuracy": robust_pct, "tiny": args.tiny},
        "machine": {"torch": torch.__version__, "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
                    "platform": platform.platform(), "load_average_before": load_before},
        "same_results": True,
        "seconds": {v: wall[v] for v in args.variants},
        "cpu_seconds": {v: cpu[v] for v in args.variants},
        "median_seconds": {v: statistics.median(wall[v]) for v in args.variants},
        "ratio_to_direct": {},
    }
    for v in args.variants:
        paired = [a / b for a, b in zip(wall[v], wall[base], strict=True)]
        out["ratio_to_direct"][v] = {
            "of_medians": statistics.median(wall[v]) / statistics.median(wall[base]),
            "paired": _summary(paired),
            "cpu_of_medians": statistics.median(cpu[v]) / statistics.median(cpu[base]),
        }
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="a few images, one short epoch, one repetition")
    p.add_argument("--n", type=int, default=None, help="test images (default 64; tiny 16)")
    p.add_argument("--epochs", type=int, default=None, help="PGD-AT epochs (default 2; tiny 1)")
    p.add_argument("--n-train", type=int, default=None, help="training images (default all 1,198; tiny 256)")
    p.add_argument("--train-eps", type=int, default=32, help="training ℓ∞ budget in 1/255 units (default 32)")
    p.add_argument("--eps", type=int, default=48, help="AutoAttack's ℓ∞ budget in 1/255 units (default 48)")
    p.add_argument("--batch-size", type=int, default=None, help="AutoAttack batch (default 250; tiny 8)")
    p.add_argument("--reps", type=int, default=None, help="interleaved repetitions (default 3; tiny 1)")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {', '.join(VARIANTS)}")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1; 0: torch's)")
    p.add_argument("--out", type=Path, default=None, help=f"JSON output (default {DEFAULT_OUT}; tiny: none)")
    args = p.parse_args(argv)
    tiny = args.tiny
    args.n = args.n or (16 if tiny else 64)
    args.epochs = args.epochs if args.epochs is not None else (1 if tiny else 2)
    args.n_train = args.n_train or (256 if tiny else None)
    args.batch_size = args.batch_size or (8 if tiny else 250)
    args.reps = args.reps or (1 if tiny else 3)
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    bad = [v for v in args.variants if v not in VARIANTS]
    if bad:
        p.error(f"unknown variants {bad}; valid: {', '.join(VARIANTS)}")
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    result = measure(args)
    text = json.dumps(result, indent=1)
    out = args.out if args.out is not None else (None if tiny else DEFAULT_OUT)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n")
    summary = {v: round(r["of_medians"], 3) for v, r in result["ratio_to_direct"].items()}
    print(f"median seconds {result['median_seconds']}; ratio to direct {summary}", file=sys.stderr)
    return result


if __name__ == "__main__":
    main()
