"""The ``rpat`` command line: train, eval, demo, list.

Every user error prints one line (``rpat: error: ...``) and exits with status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from . import __version__
from .errors import InputError

EXAMPLES_TRAIN = """\
examples:
  rpat train --preset cifar10_benchmark --data-root data --run-dir runs/pgdat
  rpat train --preset cifar10_benchmark --rpat --run-dir runs/pgdat_rpat
  rpat train --preset cifar10_benchmark rpat.enabled=true rpat.proxy=second_to_last optim.epochs=30
  rpat train --config my.yaml --run-dir runs/x --resume
  rpat train --dataset imagefolder --data-root ~/cifar10-jpeg --arch small_cnn --epochs 5
  rpat train --preset cifar10_rpatpp_strong --dataset imagefolder --data-root data --run-dir runs/rpatpp_s

overrides are section.key=value pairs (values parsed as YAML; eps as 8/255):
  data.{dataset,root,download,train_subset,batch_size,augment,val_size,val_seed}  model.{arch,normalize}
  attack.{norm,eps,step_size,steps,strong_after_decay,strong_eps,strong_step_size,strong_steps}
  method.{name,mart_exact}  rpat.{enabled,lam,alpha,proxy,start_epoch}  averaging.{enabled,decay,start_epoch}
  rebat.{enabled,beta,target,alpha,start_epoch,beta_growth}
  optim.{epochs,lr,momentum,weight_decay,nesterov,schedule,milestones,gamma}
  eval.{n_examples,eps,step_size,steps,batch_size}  seed  device  log_interval  nonfinite={stop,skip}
  speed.{amp=none|bf16,channels_last,compile,sync_bn}   (see benchmarks/README.md for what each pays)

several GPUs (DistributedDataParallel; data.batch_size is the global batch, split over the processes):
  torchrun --nproc-per-node 4 -m rpat train --preset cifar10_benchmark --rpat --run-dir runs/ddp speed.amp=bf16

SIGINT (Ctrl-C) or SIGTERM stops training at once; last.pt keeps the last finished epoch and
`rpat train --run-dir DIR --resume` continues exactly (exit status 130 / 143).
"""

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
               1,000 images even for a small CNN (small_cnn on 1,000 CIFAR-10 images, 1 thread: 17-27 min
               with PGD-20, docs/baselines_cpu.md).
               --autoattack apgd: APGD-CE + APGD-T only, reported as AA(APGD), never as AA: the cheaper
               monitoring variant (on the demo's digits model, measured on a busy 2-core CPU, FAB-T and
               Square took 15 of AutoAttack's 16 minutes). --autoattack none (or --no-autoattack): no
               AA, Mean, NRR.
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


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="adversarially train a model (PGD-AT, TRADES, MART, Consistency-AT; + RPAT)",
                       description="Train a model. Config = defaults < --preset < --config < flags < overrides.",
                       epilog=EXAMPLES_TRAIN, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. optim.lr=0.05")
    p.add_argument("--preset", help="a built-in config (see `rpat list presets`)")
    p.add_argument("--config", help="a YAML config file")
    p.add_argument("--run-dir", default=None, help="where checkpoints and logs go (default runs/<name>)")
    p.add_argument("--resume", action="store_true", help="continue the run in --run-dir exactly")
    p.add_argument("--overwrite", action="store_true", help="replace the run in --run-dir")
    p.add_argument("--dataset", help="cifar10, cifar100, tiny-imagenet, imagefolder, digits")
    p.add_argument("--data-root", help="folder with the dataset archive / image-folder tree")
    p.add_argument("--download", action="store_true", help="download the dataset archive if missing")
    p.add_argument("--arch", help="model name (see `rpat list models`)")
    p.add_argument("--method", help="base method (see `rpat list methods`)")
    p.add_argument("--rpat", action="store_true", help="add the RPAT term (rpat.enabled=true)")
    p.add_argument("--epochs", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--device", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--eval", action="store_true",
                   help="after training, evaluate best.pt and final.pt (Clean/PGD-20/AA/Mean/NRR)")
    p.add_argument("--n-examples", type=int, default=1000, help="test images for --eval (default 1000)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _add_autoattack(p: argparse.ArgumentParser, default: str = "standard") -> None:
    p.add_argument("--autoattack", choices=["standard", "apgd", "none"], default=default,
                   help="standard (default): APGD-CE, APGD-T (9 targets x 100 its), FAB-T, Square (5,000 "
                   "queries), minutes per 1,000 images on a CPU; apgd: APGD-CE + APGD-T only, the cheaper "
                   "monitoring variant, reported as AA(APGD); none: no AutoAttack")


def _add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="evaluate checkpoints: Clean, PGD-20, AutoAttack, Mean, NRR",
                       description="Evaluate checkpoints like the paper: Clean, PGD-20, AutoAttack "
                       "(standard), Mean = (Clean+AA)/2 and NRR = 2*Clean*AA/(Clean+AA), in percent; "
                       "one table, one row per checkpoint, plus the robust accuracy after each attack.",
                       epilog=EXAMPLES_EVAL, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", nargs="+",
                   help="rpat checkpoints (best.pt, final.pt) or plain state_dicts; globs are expanded")
    p.add_argument("--arch", help="architecture of a plain state_dict")
    p.add_argument("--dataset", help="dataset (default: the checkpoint's, else cifar10)")
    p.add_argument("--data-root", help="dataset folder (default: the checkpoint's, else data)")
    p.add_argument("--n-examples", type=int,
                   help="N test images (default: the whole test set; class-mixed for folders)")
    _add_autoattack(p)
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
    p.add_argument("--steps", type=int, default=20, help="PGD steps (default 20)")
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


def _add_demo(sub: argparse._SubParsersAction) -> None:
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


def _add_sweep(sub: argparse._SubParsersAction) -> None:
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
    _add_autoattack(p)
    p.add_argument("--no-autoattack", dest="autoattack", action="store_const", const="none",
                   help="same as --autoattack none (AA/Mean/NRR left empty)")
    p.add_argument("--gpus", help="spread runs over these GPUs, one process each: 0,1,2 or all; "
                   "a GPU listed twice runs two processes on it: 0,0,1,1")
    p.add_argument("--device", help="evaluation device (default: each run's config)")
    p.add_argument("--only", help="comma-separated run names: run only these (the table lists all)")
    p.add_argument("--no-table", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _add_list(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("list", help="list models, datasets, methods, presets or proxies")
    p.add_argument("what", nargs="?", default="all",
                   choices=["all", "models", "datasets", "methods", "presets", "proxies"])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rpat",
        description="Adversarial training with Robust Perception (RPAT, ICCV 2025): train, "
        "evaluate (Clean, PGD-20, AutoAttack, Mean, NRR) and compare robust image classifiers. "
        "Images are in [0,1]; eps is in pixel units and may be written 8/255.",
        epilog="threads: rpat sets OMP_WAIT_POLICY=PASSIVE unless set, so that it shares busy cores fairly; "
        "--threads N (or OMP_NUM_THREADS=N) caps the CPU threads torch uses.",
    )
    parser.add_argument("--version", action="version", version=f"rpat {__version__}")
    parser.add_argument("--threads", type=int, metavar="N",
                        help="CPU threads for torch (torch.set_num_threads; default: torch's, one per core)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_train(sub)
    _add_eval(sub)
    _add_demo(sub)
    _add_sweep(sub)
    _add_list(sub)
    from .analysis.cli import add_parsers as _add_analysis  # analyze, ablation, report

    _add_analysis(sub)
    return parser


def _train(args: argparse.Namespace) -> int:
    from .config import build_config
    from .training import Trainer

    flags: list[dict] = []
    for key, section, name in (("dataset", "data", "dataset"), ("data_root", "data", "root"),
                               ("arch", "model", "arch"), ("method", "method", "name"),
                               ("epochs", "optim", "epochs")):
        v = getattr(args, key)
        if v is not None:
            flags.append({section: {name: v}})
    if args.download:
        flags.append({"data": {"download": True}})
    if args.rpat:
        flags.append({"rpat": {"enabled": True}})
    if args.seed is not None:
        flags.append({"seed": args.seed})
    if args.device is not None:
        flags.append({"device": args.device})
    run_dir = Path(args.run_dir) if args.run_dir else None
    if args.resume and run_dir is None:
        raise InputError("--resume needs --run-dir")
    cfg = build_config(args.preset, args.config, [*flags, *args.overrides])
    if run_dir is None:
        name = f"{cfg.data.dataset}_{cfg.model.arch}_{cfg.method.name}{'_rpat' if cfg.rpat.enabled else ''}"
        if cfg.rebat.enabled:
            name += "_rebat" if cfg.rebat.target == "adversarial" else "_rpatpp"
        run_dir = Path("runs") / name
    progress = not args.no_progress
    trainer = Trainer(cfg, run_dir, resume=args.resume, overwrite=args.overwrite, progress=progress)
    if trainer.is_main:
        print(f"rpat {__version__}: {trainer.cfg.describe()} -> {run_dir}", flush=True)
    summary = trainer.fit()
    if trainer.dist.active:  # under torchrun: rank 0 reports (and evaluates); the others are done
        from .distributed import cleanup

        cleanup()
        if not trainer.is_main:
            return 0
    hint = "" if summary["held_out"].startswith("validation") else "; data.val_size=N selects on a validation split"
    print(f"done: best.pt = epoch {summary['best_epoch']}, held-out PGD {summary['best_held_out_pgd']:.2f} "
          f"(selected on the {summary['held_out']}{hint}); checkpoints in {run_dir}")
    if args.eval:
        from .evaluation.checkpoint_eval import evaluate_for_report, remove_aa_state
        from .evaluation.robustness import format_table

        rows = []
        for which in ("best", "final"):
            out = run_dir / f"eval_{which}.json"
            if summary["already_finished"] and out.is_file():  # a finished run is not evaluated again
                print(f"{out} exists (run already finished): shown as it is")
                rows.append((which, json.loads(out.read_text())))
                continue
            report, info = evaluate_for_report(run_dir / f"{which}.pt", out, say=print, n_examples=args.n_examples,
                                               autoattack=args.autoattack, device=trainer.cfg.device,
                                               progress=progress)
            sel = {"selected_on": summary["held_out"]} if which == "best" else {}
            result = {**info, **report.to_dict(), **sel}
            out.write_text(json.dumps(result, indent=2) + "\n")
            remove_aa_state(out)
            rows.append((which, result))
        print(format_table(rows))
        print(f"(best = best.pt, selected on the {summary['held_out']})")
        _print_per_attack(rows)
    return 0


def _print_per_attack(rows: list[tuple[str, dict]]) -> None:
    """Each row's robust accuracy after each AutoAttack attack, and a gradient-masking warning."""
    from . import evaluation
    from .evaluation.robustness import masking_drop

    fmt = getattr(evaluation, "format_per_attack", None)  # the per-attack AutoAttack engine
    for name, rep in rows:
        if fmt is not None and (rep.get("extras") or {}).get("aa_per_attack"):
            print(f"{name}: {fmt(rep)}")
        drop = masking_drop(rep)
        if drop is not None and drop > 0 and "sanity" not in rep:
            print(f"rpat: warning: {name}: FAB-T/Square lowered robust accuracy by {drop:.2f} points after "
                  "APGD-T: a possible sign of gradient masking", file=sys.stderr)


def _expand(patterns: list[str]) -> list[str]:
    """Checkpoint arguments with quoted globs expanded (sorted); a pattern matching nothing is an error."""
    import glob

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


def _relaunch_jobs(args: argparse.Namespace) -> int:
    """``rpat eval --jobs N``: the same command under ``torch.distributed.run`` with N processes."""
    import os
    import signal
    import subprocess

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


def _eval(args: argparse.Namespace) -> int:
    import functools

    from . import distributed
    from .evaluation.checkpoint_eval import (
        STALE_STATE,
        aa_state_path,
        eval_settings,
        evaluate_checkpoint,
        remove_aa_state,
        report_path_for,
        reusable_report,
    )
    from .evaluation.robustness import format_table
    from .evaluation.sanity import summarize
    from .utils import progress_enabled, resolve_device

    ctx = distributed.context_from_env()
    if args.jobs < 1:
        raise InputError(f"--jobs must be >= 1, got {args.jobs}")
    if args.jobs > 1 and ctx.active:
        raise InputError("--jobs starts its own processes; under torchrun leave it out")
    ckpts = _expand(args.checkpoint)
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
        return _relaunch_jobs(args)

    main_rank = ctx.is_main
    say = print if main_rank else (lambda *a, **k: None)
    progress = progress_enabled(not args.no_progress) and main_rank
    log = (lambda m: print(m, file=sys.stderr, flush=True)) if main_rank else None
    device = args.device
    if ctx.active and len(reused) < len(plans):
        _, device = distributed.setup(resolve_device(args.device))
    rows = []
    try:
        for i, (c, settings, out) in enumerate(plans):
            if i in reused:
                say(f"reused {out} ({c}: same checkpoint and settings; --force recomputes)")
                if "sanity" in reused[i]:
                    say(summarize(reused[i]["sanity"]))
                rows.append((c, reused[i]))
                continue
            state = aa_state_path(out) if settings["autoattack"] != "none" else None
            if args.force and main_rank:
                remove_aa_state(out)
            distributed.barrier(ctx)
            if state is not None and state.is_file():
                say(f"resuming AutoAttack from {state}", flush=True)
            run = functools.partial(
                evaluate_checkpoint, c, arch=args.arch, dataset=args.dataset, data_root=args.data_root,
                n_examples=args.n_examples, autoattack=args.autoattack, norm=args.norm, eps=args.eps,
                step_size=args.step_size, steps=args.steps, batch_size=args.batch_size, device=device,
                seed=args.seed, progress=progress, log=log, normalize=args.normalize, aa_state=state,
                # the sanity checks run on rank 0 only; the other ranks wait for it at the next barrier
                sanity=sanity and main_rank, warn=lambda m: print(m, file=sys.stderr),
            )
            try:
                report, info = run()
            except InputError as e:  # a state left by a killed run with other settings: this report replaces it
                if state is None or STALE_STATE not in str(e):
                    raise
                say(f"discarding {state}: it was saved by an evaluation with other settings", flush=True)
                distributed.barrier(ctx)  # every rank has failed to load it before it goes
                if main_rank:
                    remove_aa_state(out)
                distributed.barrier(ctx)
                report, info = run()
            if not main_rank:
                continue
            result = {**info, **report.to_dict()}
            if report.extras.get("aa_resumed"):
                say(f"{c}: AutoAttack continued from the saved state of an interrupted run")
            say(f"{c}: {info['arch']} on {info['n_examples']} {info['dataset']} test images, {report.threat}")
            if "sanity" in info:
                say(summarize(info["sanity"]))
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(result, indent=2) + "\n")
            remove_aa_state(out)
            say(f"wrote {out}", flush=True)
            rows.append((c, result))
    finally:
        if ctx.active:
            distributed.cleanup()
    if main_rank:
        print(format_table(rows))
        _print_per_attack(rows)
    return 0


def _grid_pattern() -> str:
    from .presets import GRID_PATTERN

    return GRID_PATTERN


def _sweep(args: argparse.Namespace) -> int:
    from .experiments.sweep import parse_gpus, run_sweep, to_markdown

    out = Path(args.out)
    rows = run_sweep(args.configs, out, overrides=args.overrides,
                     n_examples=None if args.all_test_images else args.n_examples,
                     autoattack=args.autoattack, gpus=parse_gpus(args.gpus), device=args.device,
                     only=[s for s in (args.only or "").split(",") if s] or None,
                     progress=not args.no_progress, write_table=not args.no_table)
    if not args.no_table:
        print(to_markdown(rows), end="")
        print(f"wrote {out / 'results.md'} and {out / 'results.csv'}")
    return 0


METHOD_NOTE = ("each with or without RPAT (--rpat / rpat.enabled=true); ReBAT and RPAT++ are not base "
               "methods but a weight-averaged teacher term on top of one (rebat.enabled=true, averaging.enabled=true): "
               "presets cifar10_rebat, cifar10_rpatpp")


def _list(args: argparse.Namespace) -> int:
    from .data import DATASETS
    from .models import PROXIES, list_models
    from .objectives import list_methods
    from .presets import list_presets, preset_description

    lists = {"models": list_models(), "datasets": sorted(DATASETS), "methods": list_methods(),
             "presets": [*list_presets(), _grid_pattern()], "proxies": list(PROXIES)}
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


def _demo(args: argparse.Namespace) -> int:
    from .experiments.demo import run_demo

    if args.epochs is not None and args.epochs < 1:
        raise InputError(f"--epochs must be >= 1, got {args.epochs}")
    if args.jobs is not None and args.jobs < 1:
        raise InputError(f"--jobs must be >= 1, got {args.jobs}")
    run_demo(Path(args.out), epochs=args.epochs, seed=args.seed, progress=not args.no_progress,
             n_examples=args.n_examples, jobs=args.jobs)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # for `rpat eval --jobs N` to re-launch itself
    if args.command is None:
        parser.print_help()
        return 2
    if args.threads is not None:
        if args.threads < 1:
            print(f"rpat: error: --threads must be >= 1, got {args.threads}", file=sys.stderr)
            return 2
        import torch

        torch.set_num_threads(args.threads)
    handlers = {"train": _train, "eval": _eval, "demo": _demo, "list": _list, "sweep": _sweep}
    from .analysis.cli import HANDLERS as _analysis_handlers

    handlers.update(_analysis_handlers)
    try:
        return handlers[args.command](args)
    except InputError as e:
        print(f"rpat: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:  # training's TrainingInterrupted says how to resume; 130 / 143
        print(f"rpat: {e}" if str(e) else "rpat: interrupted", file=sys.stderr)
        return int(getattr(e, "exit_code", 130))
    except FloatingPointError as e:  # non-finite loss with nonfinite=stop (rpat.training.nonfinite)
        print(f"rpat: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
