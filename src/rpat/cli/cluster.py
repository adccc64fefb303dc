"""``rpat sweep --launcher slurm|local``: the sweep's cluster options and their run (:mod:`rpat.experiments.slurm`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import InputError
from ..experiments.slurm import LAUNCHERS, ClusterPlan, parse_slurm_args, parse_slurm_time, submit_sweep
from ..reports.sweep_table import to_markdown

CLUSTER_EPILOG = """\
on a SLURM cluster (submitit, pip install 'rpat[slurm]'; docs/cluster.md):
  rpat sweep bench/cifar10/resnet18/linf/{pgd_at,trades}/{base,rpat} --out runs/t1 --launcher slurm \\
      --slurm-partition gpu --slurm-time 1440 --gpus-per-run 1 --max-parallel 8 --dry-run
  (the same without --dry-run submits one job array; the same command again, or --collect, writes the table)
"""


def add_cluster_args(p: argparse.ArgumentParser) -> None:
    """The ``--launcher`` options of ``rpat sweep``; without ``--launcher`` none of them is used."""
    g = p.add_argument_group("cluster (--launcher; docs/cluster.md)")
    g.add_argument("--launcher", choices=LAUNCHERS, help="submit through submitit: slurm (one job array, one "
                   "task per run) or local (the same path, submitit's local executor, real subprocesses)")
    g.add_argument("--slurm-partition", metavar="P", help="SLURM partition (checked against sinfo)")
    g.add_argument("--slurm-time", metavar="MIN", default="60",
                   help="time limit per job: minutes or [D-]HH:MM:SS (default 60); longer runs chain jobs")
    g.add_argument("--gpus-per-run", type=int, default=1, metavar="N",
                   help="GPUs per node of each run, one DDP process each (default 1; 0: one CPU process)")
    g.add_argument("--nodes", type=int, default=1, metavar="M", help="nodes per run (multi-node DDP; default 1)")
    g.add_argument("--max-parallel", type=int, metavar="K", help="runs at once (the array's %%K; default all)")
    g.add_argument("--slurm-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="any other sbatch option, repeatable: --slurm-arg mem=64G --slurm-arg account=proj")
    g.add_argument("--dry-run", action="store_true", help="print the sbatch script and the task list; submit nothing")
    g.add_argument("--collect", action="store_true", help="write results.md/results.csv from the finished runs")


def run_cluster(args: argparse.Namespace) -> int:
    """``rpat sweep ... --launcher ...``: submit (or print, or collect); prints the table when it wrote one."""
    out = Path(args.out)
    if args.dry_run and not args.launcher:
        raise InputError("--dry-run shows what --launcher slurm (or local) would submit: add --launcher slurm")
    plan = ClusterPlan(launcher=args.launcher or "slurm", partition=args.slurm_partition,
                       time_min=parse_slurm_time(args.slurm_time), gpus_per_run=args.gpus_per_run,
                       nodes=args.nodes, max_parallel=args.max_parallel, slurm_args=parse_slurm_args(args.slurm_arg))
    rows = submit_sweep(args.configs, out, plan, overrides=args.overrides,
                        n_examples=None if args.all_test_images else args.n_examples, autoattack=args.autoattack,
                        extra_evals=args.extra_evals, device=args.device,
                        only=[s for s in (args.only or "").split(",") if s] or None,
                        dry_run=args.dry_run, collect_only=args.collect)
    if rows is not None:
        print(to_markdown(rows), end="")
        print(f"wrote {out / 'results.md'} and {out / 'results.csv'}")
    return 0
