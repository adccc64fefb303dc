"""``rpat eval``: evaluate checkpoints into reports (reusing those with the same settings) and print one
table; ``--jobs N`` relaunches itself under torch.distributed.run, torchrun splits the images over ranks."""

from __future__ import annotations

import argparse
import glob
import os
import signal
import subprocess
import sys
from pathlib import Path

from .. import distributed
from ..errors import InputError
from ..evaluation.checkpoint_eval import eval_settings, reusable_report
from ..evaluation.report import write_report
from ..evaluation.robustness import format_table
from ..evaluation.sanity import summarize
from ..run_dir import report_path_for
from ..utils import progress_enabled, resolve_device
from .common import HelpFormatter, add_autoattack, print_per_attack

EXAMPLES_EVAL = """\
examples:
  rpat eval runs/pgdat/best.pt                      # dataset and threat model from the checkpoint
  rpat eval runs/*/best.pt --n-examples 1000        # one table; reports with the same settings are reused
  rpat eval runs/pgdat/final.pt --n-examples 1000 --out final.json
  rpat eval model_test.pt --arch resnet18 --dataset cifar10 --data-root data
  rpat eval public.pt --arch wrn34_10 --normalize cifar10   # a checkpoint that expects normalized input
  rpat eval runs/l2/best.pt --norm l2 --eps 128/255 --step-size 32/255
  rpat eval runs/pgdat/best.pt --autoattack apgd    # quick monitoring number, labelled AA(APGD)
  rpat eval runs/pgdat/best.pt --jobs 2 --device cpu        # split the images over 2 CPU processes
  torchrun --nproc-per-node 4 -m rpat eval runs/pgdat/best.pt   # split over 4 GPUs

phases and what they cost:
  clean        one forward pass per image
  PGD-20       20 forward + backward passes per image
  AutoAttack   --autoattack standard (default; the number papers report): APGD-CE (100 iterations),
               APGD-T (9 target classes x 100 iterations), FAB-T (9 targets), Square (5,000 queries),
               each on the images the attacks before it did not break. On a CPU this takes minutes per
               1,000 images even for a small CNN (timings: docs/baselines_cpu.md, benchmarks/README.md).
               --autoattack apgd: APGD-CE + APGD-T only, reported as AA(APGD), never as AA: the cheaper
               monitoring variant (FAB-T and Square are most of standard AutoAttack's time on a CPU).
               --autoattack none (or --no-autoattack): no AA, Mean, NRR.
  sanity       extra time on top (default on; --no-sanity skips it): on 200 images, eval mode,
               determinism, PGD with eps=0, AA <= PGD <= Clean, PGD with an eps covering the whole image
               and PGD with twice the steps (together about 4x the PGD-20 cost on 200 images; the last
               two are skipped when PGD accuracy is already <= 1%), and whether FAB-T/Square broke
               images APGD missed (a sign of gradient masking). One line per check, total seconds in
               the JSON ('sanity').

the report (JSON) goes next to the checkpoint when that folder is a writable run directory
(config.yaml/meta.json), else into the working directory; the path is printed. AutoAttack's state
is kept beside it (<report>.aa-state.json) while it runs: run the same command again after a kill
and it continues from the last finished attack; the state is removed once the report is written.
"""


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="evaluate checkpoints: Clean, PGD-20, AutoAttack, Mean, NRR",
                       description="Evaluate checkpoints like the paper: Clean, PGD-20, AutoAttack "
                       "(standard), Mean = (Clean+AA)/2 and NRR = 2*Clean*AA/(Clean+AA), in percent; "
                       "one table, one row per checkpoint, plus the robust accuracy after each attack.",
                       epilog=EXAMPLES_EVAL, formatter_class=HelpFormatter)
    p.add_argument("checkpoint", nargs="+",
                   help="rpat checkpoints (best.pt, final.pt) or plain state_dicts; globs are expanded")
    p.add_argument("--arch", help="architecture of a plain state_dict (default: inferred from its keys and "
                   "shapes when exactly one of rpat's models fits)")
    p.add_argument("--dataset", help="dataset (default: the checkpoint's, else cifar10)")
    p.add_argument("--data-root", help="dataset folder (default: the checkpoint's, else data)")
    p.add_argument("--download", action="store_true", help="download the dataset's test archive if missing")
    p.add_argument("--n-examples", type=int,
                   help="N test images (default: the whole test set; class-mixed for folders)")
    add_autoattack(p)
    p.add_argument("--no-autoattack", dest="autoattack", action="store_const", const="none",
                   help="same as --autoattack none (Mean/NRR not reported)")
    p.add_argument("--no-sanity", action="store_true",
                   help="skip the sanity checks (extra time; see 'phases' below)")
    p.add_argument("--normalize", metavar="MEAN/STD",
                   help="the checkpoint expects normalized input: wrap it with (x - mean) / std, e.g. "
                   "0.4914,0.4822,0.4465/0.2471,0.2435,0.2616, or a preset: cifar10, cifar100, imagenet")
    p.add_argument("--norm", choices=["linf", "l2"], help="threat model norm (default: the checkpoint's)")
    p.add_argument("--eps", help="budget in [0,1] pixel units, e.g. 8/255")
    p.add_argument("--step-size", help="PGD step size, e.g. 2/255")
    p.add_argument("--steps", type=int, default=20, help="PGD steps")
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="write the report as JSON here (one checkpoint only; default: see below)")
    p.add_argument("--force", action="store_true",
                   help="recompute even if a report with the same settings exists (and drop a saved AutoAttack state)")
    p.add_argument("--jobs", type=int, default=1, metavar="N",
                   help="split the test images over N processes by batch (torch.distributed.run, gloo on the "
                   "CPU, cores/N threads each); same numbers as one process; needs >= N batches")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (one log line per phase)")


def expand_checkpoints(patterns: list[str]) -> list[str]:
    """Checkpoint arguments with quoted globs expanded (sorted); a pattern matching nothing is an error."""
    out: list[str] = []
    for pat in patterns:
        if not Path(pat).exists() and any(c in pat for c in "*?["):
            found = sorted(glob.glob(pat))
            if not found:
                raise InputError(f"no checkpoint matches {pat!r}")
            out += found
        else:
            out.append(pat)
    return out


def relaunch_jobs(args: argparse.Namespace) -> int:
    """``rpat eval --jobs N``: the same command under ``torch.distributed.run`` with N processes."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    threads = max(1, cores // args.jobs)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(args.jobs),
           "-m", "rpat", *args.argv, "--jobs", "1"]  # the last --jobs wins
    print(f"rpat eval: {args.jobs} processes x {threads} thread(s) (torch.distributed.run)", file=sys.stderr,
          flush=True)
    if args.n_examples is not None and -(-args.n_examples // args.batch_size) < args.jobs:
        print(f"rpat eval: note: {args.n_examples} images make fewer batches of {args.batch_size} than processes; "
              f"the work is split by batch, so pass --batch-size {-(-args.n_examples // args.jobs)} or less to keep "
              "every process busy (the batch size is part of AutoAttack's result)", file=sys.stderr, flush=True)
    proc = subprocess.Popen(cmd, env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    try:
        return proc.wait()
    except KeyboardInterrupt:
        proc.send_signal(signal.SIGTERM)  # torchrun stops its workers; the AutoAttack state stays
        proc.wait()
        raise


def _say(message: str) -> None:
    print(message, flush=True)


def _quiet(message: str) -> None:
    pass


def _warn(message: str) -> None:
    print(message, file=sys.stderr)


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> int:
    ctx = distributed.context_from_env()
    if args.jobs < 1:
        raise InputError(f"--jobs must be >= 1, got {args.jobs}")
    if args.jobs > 1 and ctx.active:
        raise InputError("--jobs starts its own processes; under torchrun leave it out")
    ckpts = expand_checkpoints(args.checkpoint)
    if args.out and len(ckpts) > 1:
        raise InputError("--out names one report: give one checkpoint, or leave --out out")
    sanity = not args.no_sanity
    plans = []
    for c in ckpts:  # every argument is checked (and its settings known) before any evaluation starts
        _, settings = eval_settings(c, arch=args.arch, dataset=args.dataset, n_examples=args.n_examples,
                                    autoattack=args.autoattack, norm=args.norm, eps=args.eps,
                                    step_size=args.step_size, steps=args.steps, seed=args.seed,
                                    normalize=args.normalize, batch_size=args.batch_size)
        plans.append((c, settings, report_path_for(c, args.out)))
    outs = [o.resolve() for _, _, o in plans]
    dup = next((o for o in outs if outs.count(o) > 1), None)
    if dup is not None:
        raise InputError(f"two checkpoints would write the same report {str(dup)!r}; evaluate them one at a "
                         "time with --out")
    reused = {i: r for i, (_, st, o) in enumerate(plans)
              if not args.force and (r := reusable_report(o, st, sanity)) is not None}
    if args.jobs > 1 and len(reused) < len(plans):
        return relaunch_jobs(args)

    main_rank = ctx.is_main
    say = _say if main_rank else _quiet
    progress = progress_enabled(not args.no_progress) and main_rank
    log = _log if main_rank else _quiet
    device = args.device
    if ctx.active and len(reused) < len(plans):
        _, device = distributed.setup(resolve_device(args.device))
    rows = []
    try:
        _evaluate_all(plans, reused, rows, args, say=say, sanity=sanity, device=device, progress=progress, log=log)
    except KeyboardInterrupt:
        raise KeyboardInterrupt("interrupted; AutoAttack's finished attacks are saved beside the report "
                                "(<report>.aa-state.json): run the same command again to resume") from None
    finally:
        if ctx.active:
            distributed.cleanup()
    if main_rank:
        print(format_table(rows))
        print_per_attack(rows)
    return 0


def _evaluate_all(plans: list, reused: dict, rows: list, args: argparse.Namespace, *, say, sanity: bool,
                  device, progress: bool, log) -> None:
    """Each planned checkpoint: its reused report, or a new one (``write_report``); rows appended in order."""
    for i, (c, _, out) in enumerate(plans):
        if i in reused:
            say(f"reused {out} ({c}: same checkpoint and settings; --force recomputes)")
            if "sanity" in reused[i]:
                say(summarize(reused[i]["sanity"]))
            rows.append((c, reused[i]))
            continue
        # the sanity checks run on rank 0 only; the other ranks wait for it at the next barrier
        result = write_report(
            c, out, say=say, sanity=sanity, force=args.force, arch=args.arch, dataset=args.dataset,
            data_root=args.data_root, n_examples=args.n_examples, autoattack=args.autoattack, norm=args.norm,
            eps=args.eps, step_size=args.step_size, steps=args.steps, batch_size=args.batch_size,
            device=device, seed=args.seed, progress=progress, log=log, normalize=args.normalize, warn=_warn,
            download=args.download,
        )
        if result is None:  # not rank 0
            continue
        say(f"{c}: {result['arch']} on {result['n_examples']} {result['dataset']} test images, "
            f"{result['threat']}")
        rows.append((c, result))
