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
from ..evaluation.extra import ExtraEvals
from ..evaluation.report import write_report
from ..evaluation.robustness import format_table
from ..evaluation.sanity import summarize
from ..run_dir import report_path_for
from ..utils import progress_enabled, resolve_device
from .common import HelpFormatter, add_autoattack, print_per_attack
from .robustbench import add_arguments as add_robustbench_arguments
from .robustbench import apply_protocol as apply_robustbench_protocol
from .robustbench import write_entry as write_robustbench_entry

EXAMPLES_EVAL = """\
examples:
  rpat eval runs/pgdat/best.pt                      # dataset and threat model from the checkpoint
  rpat eval runs/*/best.pt --n-examples 1000        # one table; reports with the same settings are reused
  rpat eval runs/pgdat/final.pt --n-examples 1000 --out final.json
  rpat eval model_test.pt --arch resnet18 --dataset cifar10 --data-root data
  rpat eval public.pt --arch wrn34_10 --normalize cifar10   # a checkpoint that expects normalized input
  rpat eval runs/l2/best.pt --norm l2 --eps 128/255 --step-size 32/255
  rpat eval runs/pgdat/best.pt --autoattack apgd    # quick monitoring number, labelled AA(APGD)
  rpat eval runs/pgdat/best.pt --no-autoattack --cw --noise --transfer-from runs/other/best.pt
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
  --cw         CW-20: PGD-20 on the CW margin max_{j!=y} z_j - z_y (same eps, step, random start):
               --cw-steps forward + backward passes per image (20, like PGD-20). Column CW-<steps>.
  --noise      one forward pass per image on a noisy copy: uniform in the eps-ball (PGD's random
               start) or --noise-kind gaussian --noise-sigma S (N(0, S^2) per pixel); clipped to [0, 1],
               seeded by --seed. Column Noise.
  --transfer-from SRC.pt
               PGD-20 crafted on SRC (20 forward + backward passes of SRC per image), scored on the
               checkpoint (one forward pass). Column Transfer. SRC is not wrapped by --normalize.
  --cw-art     ART's CarliniLInfMethod / CarliniL2Method with ART's defaults (a minimal-perturbation
               search; results beyond eps count as failed):
               hundreds of passes per image (slow on a CPU); needs pip install 'rpat[art]'. Column CW(ART).
  --autoattack plus / rand
               AutoAttack+ (APGD-CE, APGD-T, FAB-T, Square, APGD-DLR, FAB with restarts: several times
               standard's cost) and the randomized-defense version (APGD-CE, APGD-DLR with EOT
               iterations); columns AA+ / AA-rand, never AA.
  sanity       extra time on top (default on; --no-sanity skips it): on 200 images, eval mode,
               determinism, PGD with eps=0, AA <= PGD <= Clean, PGD with an eps covering the whole image
               and PGD with twice the steps (together about 4x the PGD-20 cost on 200 images; the last
               two are skipped when PGD accuracy is already <= 1%), and whether FAB-T/Square broke
               images APGD missed (a sign of gradient masking); with --cw / --transfer-from, whether
               CW is above PGD or transfer below white-box PGD beyond 2 standard errors (free: from the
               report's numbers). One line per check, total seconds in the JSON ('sanity').

the report (JSON) goes next to the checkpoint when that folder is a writable run directory
(config.yaml/meta.json), else into the working directory; the path is printed. AutoAttack's state
(<report>.aa-state.json) and the other finished stages (<report>.stages.json: Clean + PGD, each extra
evaluation, each corruption) are kept beside it while it runs: run the same command again after a kill
and only the unfinished stage is recomputed; both are removed once the report is written.
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
    p.add_argument("--cw", action="store_true",
                   help="CW-20: PGD on the Carlini-Wagner margin with the PGD-20 threat (JSON key cw)")
    p.add_argument("--cw-steps", type=int, default=20, metavar="N", help="steps of --cw (column CW-N)")
    p.add_argument("--noise", action="store_true",
                   help="accuracy under random noise, uniform in the eps-ball by default (JSON key noise)")
    p.add_argument("--noise-kind", choices=["uniform", "gaussian"], default="uniform",
                   help="--noise: uniform in the eps-ball, or gaussian N(0, S^2) per pixel (needs --noise-sigma)")
    p.add_argument("--noise-sigma", metavar="S", help="σ of --noise-kind gaussian in pixel units, e.g. 8/255")
    p.add_argument("--transfer-from", metavar="SRC.pt",
                   help="black-box transfer: PGD-20 on this source checkpoint, scored here (JSON key transfer)")
    p.add_argument("--transfer-arch", metavar="A",
                   help="architecture of a plain-state_dict --transfer-from (inferred from its weights when omitted)")
    p.add_argument("--cw-art", action="store_true",
                   help="ART's Carlini-Wagner (CarliniLInfMethod / CarliniL2Method), for parity (JSON key cw_art)")
    p.add_argument("--corruptions", metavar="DIR",
                   help="common corruptions: accuracy on CIFAR-10-C / CIFAR-100-C (<corruption>.npy + labels.npy) or "
                   "Tiny-ImageNet-C (<corruption>/<severity>/<class>/*.JPEG) in DIR, per corruption and severity, "
                   "their mean (corruption_acc, RobustBench's number) and the release's mCE; one forward pass per "
                   "image, 15 x 5 x N images (--n-examples applies per severity); `rpat download cifar10-c` gets it")
    p.add_argument("--no-sanity", action="store_true",
                   help="skip the sanity checks (extra time; see 'phases' below)")
    p.add_argument("--normalize", metavar="MEAN/STD",
                   help="the checkpoint expects normalized input: wrap it with (x - mean) / std, e.g. "
                   "0.4914,0.4822,0.4465/0.2471,0.2435,0.2616, or a preset: cifar10, cifar100, imagenet")
    p.add_argument("--norm", choices=["linf", "l2"], help="threat model norm (default: the checkpoint's)")
    p.add_argument("--eps", help="budget in [0,1] pixel units, e.g. 8/255")
    p.add_argument("--step-size", help="PGD step size, e.g. 2/255")
    p.add_argument("--steps", type=int, default=20, help="PGD steps")
    p.add_argument("--batch-size", type=int, default=None,
                   help="images per batch (default 500; 32 with --robustbench, RobustBench's default); part of "
                   "AutoAttack's result (each batch is seeded)")
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="write the report as JSON here (one checkpoint only; default: see below)")
    p.add_argument("--force", action="store_true",
                   help="recompute even if a report with the same settings exists (and drop a saved AutoAttack state)")
    p.add_argument("--jobs", type=int, default=1, metavar="N",
                   help="split the test images over N processes by batch (torch.distributed.run, gloo on the "
                   "CPU, cores/N threads each); same numbers as one process; needs >= N batches")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (one log line per phase)")
    add_robustbench_arguments(p)


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
    extra_evals = extra_evals_from(args)
    if args.robustbench:  # the protocol sets what the user left unset (images, batch size, eps)
        _, first = eval_settings(ckpts[0], arch=args.arch, dataset=args.dataset, norm=args.norm, eps=args.eps,
                                 autoattack=args.autoattack)
        apply_robustbench_protocol(args, first["dataset"], first["threat"]["norm"])
    if args.batch_size is None:
        args.batch_size = 500
    plans = []
    for c in ckpts:  # every argument is checked (and its settings known) before any evaluation starts
        _, settings = eval_settings(c, arch=args.arch, dataset=args.dataset, n_examples=args.n_examples,
                                    autoattack=args.autoattack, norm=args.norm, eps=args.eps,
                                    step_size=args.step_size, steps=args.steps, seed=args.seed,
                                    normalize=args.normalize, batch_size=args.batch_size,
                                    extra_evals=extra_evals, corruptions=args.corruptions)
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
        _evaluate_all(plans, reused, rows, args, say=say, sanity=sanity, device=device, progress=progress, log=log,
                      extra_evals=extra_evals)
    except KeyboardInterrupt:
        raise KeyboardInterrupt("interrupted; the finished stages (Clean + PGD, each AutoAttack attack, each extra "
                                "evaluation and corruption) are saved beside the report (<report>.aa-state.json, "
                                "<report>.stages.json): run the same command again to resume") from None
    finally:
        if ctx.active:
            distributed.cleanup()
    if main_rank:
        print(format_table(rows))
        print_per_attack(rows)
        for name, rep in rows:
            if rep.get("corruption_acc") is not None:
                print(f"{name}: {rep.get('corruption_set', 'corruptions')}: mean corruption accuracy "
                      f"{rep['corruption_acc']:.2f}, mCE {rep['mce']:.2f} ({len(rep['corruptions'])} corruptions x 5 "
                      f"severities, {rep['corruption_images']} images each)")
        if args.robustbench and rows:
            write_robustbench_entry(args, rows[0][1], say)
    return 0


def extra_evals_from(args: argparse.Namespace) -> ExtraEvals:
    """The extra evaluations the flags ask for (``--cw``, ``--noise``, ``--transfer-from``, ``--cw-art``)."""
    if args.noise_sigma is not None and not args.noise:
        raise InputError("--noise-sigma is for --noise --noise-kind gaussian")
    if args.noise_kind == "gaussian" and not args.noise:
        raise InputError("--noise-kind gaussian needs --noise")
    if args.cw_steps != 20 and not args.cw:
        raise InputError("--cw-steps is for --cw")
    return ExtraEvals(cw_steps=args.cw_steps if args.cw else None, noise=args.noise_kind if args.noise else None,
                      noise_sigma=args.noise_sigma, transfer_from=args.transfer_from,
                      transfer_arch=args.transfer_arch, cw_art=args.cw_art)


def _evaluate_all(plans: list, reused: dict, rows: list, args: argparse.Namespace, *, say, sanity: bool,
                  device, progress: bool, log, extra_evals: ExtraEvals) -> None:
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
            download=args.download, extra_evals=extra_evals, corruptions=args.corruptions,
        )
        if result is None:  # not rank 0
            continue
        say(f"{c}: {result['arch']} on {result['n_examples']} {result['dataset']} test images, "
            f"{result['threat']}")
        rows.append((c, result))
