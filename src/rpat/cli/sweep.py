"""``rpat sweep``: train and evaluate many configs (``rpat.experiments.sweep``), then print the results table."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..experiments.sweep import parse_gpus, run_sweep
from ..reports.sweep_table import to_markdown
from .cluster import add_cluster_args, run_cluster
from .common import add_autoattack, add_extra_evals

EXAMPLES_SWEEP = """\
examples:
  rpat sweep bench/cifar10/resnet18/linf/{pgd_at,trades,mart,consistency_at}/{base,rpat} --out runs/table1
  rpat sweep 'configs/*.yaml' --out runs/mine --n-examples 500 --no-autoattack
  rpat sweep 'configs/*.yaml' --out runs/quick --autoattack apgd   # AA(APGD) columns, never the AA ones
  rpat sweep listing.yaml --out runs/study --set optim.epochs=5 --set device=cpu
  rpat sweep bench/cifar10/wrn34_10/l2/trades/{base,rpat} --out runs/l2 --gpus 0,1

a CONFIG is a preset (`rpat list presets`; grid names bench/DATASET/ARCH/NORM/METHOD/VARIANT),
a config YAML file, a quoted glob of them, or a listing YAML:
  runs:
    - {name: pgdat, preset: bench/cifar10/resnet18/linf/pgd_at/base}
    - {name: mine, config: my.yaml, overrides: [optim.lr=0.05]}
  overrides: [data.root=data]          # applied to every run
each run goes to OUT/<name>/ (name: the listing's, else the preset with / -> _, else the file stem).
Finished runs (final.pt + eval_best.json + eval_final.json made with the same --n-examples and
--autoattack) are skipped; interrupted ones resume from last.pt (and an interrupted AutoAttack from
its last finished attack). Results: OUT/results.md and OUT/results.csv (Clean/PGD-20/AA/Mean/NRR of
best and final, %; with --autoattack apgd the columns are AA(APGD)/Mean(APGD)/NRR(APGD)).
"""


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sweep", help="train and evaluate many configs, then gather one results table",
                       description="Train each config one after another (or one process per GPU with --gpus), "
                       "skipping finished runs and resuming interrupted ones; evaluate best.pt and final.pt "
                       "(Clean, PGD-20, AutoAttack, Mean, NRR) and write a Table-1-style markdown + CSV table.",
                       epilog=EXAMPLES_SWEEP, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("configs", nargs="+", metavar="CONFIG", help="presets, config files, globs or listings")
    p.add_argument("--out", required=True, help="sweep directory (one sub-folder per run)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="config override for every run (repeatable), e.g. --set optim.epochs=5")
    p.add_argument("--n-examples", type=int, default=1000, help="test images per evaluation (default 1000)")
    p.add_argument("--all-test-images", action="store_true", help="evaluate on the whole test set")
    add_autoattack(p)
    add_extra_evals(p)
    p.add_argument("--no-autoattack", dest="autoattack", action="store_const", const="none",
                   help="same as --autoattack none (AA/Mean/NRR left empty)")
    p.add_argument("--gpus", help="spread runs over these GPUs, one process each: 0,1,2 or all; "
                   "a GPU listed twice runs two processes on it: 0,0,1,1")
    p.add_argument("--device", help="evaluation device (default: each run's config)")
    p.add_argument("--only", help="comma-separated run names: run only these (the table lists all)")
    p.add_argument("--no-table", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_cluster_args(p)  # --launcher slurm|local and its options (rpat.cli.cluster)


def run(args: argparse.Namespace) -> int:
    if args.launcher or args.dry_run or args.collect:  # through submitit (docs/cluster.md)
        return run_cluster(args)
    out = Path(args.out)
    rows = run_sweep(args.configs, out, overrides=args.overrides,
                     n_examples=None if args.all_test_images else args.n_examples,
                     autoattack=args.autoattack, gpus=parse_gpus(args.gpus), device=args.device,
                     only=[s for s in (args.only or "").split(",") if s] or None,
                     progress=not args.no_progress, write_table=not args.no_table, extra_evals=args.extra_evals)
    if not args.no_table:
        print(to_markdown(rows), end="")
        print(f"wrote {out / 'results.md'} and {out / 'results.csv'}")
    return 0
