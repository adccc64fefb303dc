"""``rpat list`` (models, datasets, methods, presets, proxies) and ``rpat demo`` (``rpat.experiments.demo``)."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..data import DATASETS
from ..errors import InputError
from ..experiments.demo import run_demo
from ..models import PROXIES, list_models
from ..objectives import list_methods
from ..presets import GRID_PATTERN, list_presets, preset_description

METHOD_NOTE = ("each with or without RPAT (--rpat / rpat.enabled=true); ReBAT and RPAT++ are not base "
               "methods but a weight-averaged teacher term on top of one (rebat.enabled=true, averaging.enabled=true): "
               "presets cifar10_rebat, cifar10_rpatpp")


def add_demo_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="offline CPU demo: PGD-AT vs PGD-AT + RPAT on 8x8 digits",
                       description="Train a small CNN with PGD-AT and with PGD-AT + RPAT on "
                       "scikit-learn's bundled 8x8 digits (no download), then print the "
                       "Clean / PGD-20 / AutoAttack / Mean / NRR table for both. 2 x 10 epochs on the "
                       "1,198 training images, then standard AutoAttack on the first 100 of the 599 test "
                       "images (AutoAttack takes most of the time); the two runs go side by side in two "
                       "one-thread processes. Under 3 minutes on 2 idle CPU cores. Needs the 'digits' extra: "
                       "pip install 'rpat[digits]'.",
                       epilog="examples:\n  rpat demo\n"
                       "  rpat demo --n-examples 599            # all 599 test images (slower)\n"
                       "  rpat demo --epochs 5 --n-examples 50  # shorter: fewer epochs and test images",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/demo", help="run directory root (default runs/demo)")
    p.add_argument("--epochs", type=int, help="override the demo's epochs (default 10)")
    p.add_argument("--n-examples", type=int, default=100, help="test images to evaluate (default 100 of 599)")
    p.add_argument("--jobs", type=int, help="worker processes, one run each (default 2 on a 2-core machine; "
                   "1 = one after the other, with progress bars)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")


def add_list_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("list", help="list models, datasets, methods, presets or proxies")
    p.add_argument("what", nargs="?", default="all",
                   choices=["all", "models", "datasets", "methods", "presets", "proxies"])


def run_list(args: argparse.Namespace) -> int:
    lists = {"models": list_models(), "datasets": sorted(DATASETS), "methods": list_methods(),
             "presets": [*list_presets(), GRID_PATTERN], "proxies": list(PROXIES)}
    for name, items in lists.items():
        if args.what == "all":
            print(f"{name}: {', '.join(items)}" + (f"\n  ({METHOD_NOTE})" if name == "methods" else ""))
        elif args.what == name == "presets":
            width = max(len(p) for p in items[:-1])
            print("\n".join(f"{p:<{width}}  {preset_description(p)}" for p in items[:-1]))
            print(f"{items[-1]}\n  the paper's grid, composed (e.g. bench/cifar10/resnet18/linf/trades/rpat)")
        elif args.what == name:
            print("\n".join(items))
            if name == "methods":
                print(f"({METHOD_NOTE})")
    return 0


def run_demo_cmd(args: argparse.Namespace) -> int:
    if args.epochs is not None and args.epochs < 1:
        raise InputError(f"--epochs must be >= 1, got {args.epochs}")
    if args.jobs is not None and args.jobs < 1:
        raise InputError(f"--jobs must be >= 1, got {args.jobs}")
    run_demo(Path(args.out), epochs=args.epochs, seed=args.seed, progress=not args.no_progress,
             n_examples=args.n_examples, jobs=args.jobs)
    return 0
