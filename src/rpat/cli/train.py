"""``rpat train``: build the config from preset, file, flags and overrides, train, and with ``--eval``
evaluate best.pt and final.pt into the run directory's reports."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .. import __version__, distributed
from .. import run_dir as rd
from ..config import Config, build_config, dump_yaml, override_keys_help
from ..errors import InputError
from ..evaluation.extra import check_extra_evals, parse_extra_evals
from ..evaluation.report import write_report
from ..evaluation.robustness import format_table
from ..training import Trainer
from ..training.tensorboard import log_report
from .common import HelpFormatter, add_autoattack, add_extra_evals, print_per_attack

EXAMPLES_TRAIN = """\
examples:
  rpat train --preset cifar10_benchmark --data-root data --run-dir runs/pgdat
  rpat train --preset cifar10_benchmark --rpat --run-dir runs/pgdat_rpat
  rpat train --preset cifar10_benchmark rpat.enabled=true rpat.proxy=second_to_last optim.epochs=30
  rpat train --config my.yaml --run-dir runs/x --resume
  rpat train --dataset imagefolder --data-root ~/cifar10-jpeg --arch small_cnn --epochs 5
  rpat train --preset cifar10_rpatpp_strong --dataset imagefolder --data-root data --run-dir runs/rpatpp_s

overrides are section.key=value pairs (values parsed as YAML; eps as 8/255); every key, with its default
in `rpat train --print-config` and its meaning in src/rpat/config.py:
{keys}
  speed.amp=none|bf16, channels_last, compile, sync_bn: see benchmarks/README.md for what each pays
  awp.enabled=true (AWP; docs/awp.md)   method.label_smoothing, averaging.warmup, optim.warmup_epochs,
    attack.eps_ramp_epochs (docs/recipes.md)   data.autoaugment, data.cutmix (docs/augmentation.md)
  model.init=CKPT: start (fine-tune) from these weights
  logging.tensorboard=true   (event files in <run_dir>/tb; pip install 'rpat[tensorboard]'; docs/logging.md)
  data.extra=FILE.npz|DIR data.extra_fraction=0.7 data.extra_label_smoothing   (generated data, memory-mapped:
    round(f·B) rows of each batch; an epoch stays ceil(N_real / B) batches, as in the published recipes;
    docs/extra_data.md)

several GPUs (DistributedDataParallel; data.batch_size is the global batch, split over the processes):
  torchrun --nproc-per-node 4 -m rpat train --preset cifar10_benchmark --rpat --run-dir runs/ddp speed.amp=bf16

SIGINT (Ctrl-C) or SIGTERM stops training at once; last.pt keeps the last finished epoch and
`rpat train --run-dir DIR --resume` continues exactly (exit status 130 / 143). A resumed run keeps its
own config (other flags are ignored, and said so); `--resume --epochs N` with N above the run's epochs
continues a finished run to N epochs (piecewise milestones kept, so the lr stays at its last value).

without a preset, the defaults are the paper's 110-epoch ResNet-18 benchmark; for a first try on a CPU:
  rpat train --preset cifar10_cpu_quick --dataset imagefolder --data-root ~/cifar10-jpeg --print-config
`--epochs N` on a piecewise schedule rescales its milestones in proportion (100/110, 105/110 of N), and
says so; set optim.milestones to choose them.
""".replace("{keys}", override_keys_help())

#: The flags that set one config key: (argument, section, key).
_FLAG_KEYS = (("dataset", "data", "dataset"), ("data_root", "data", "root"), ("arch", "model", "arch"),
              ("method", "method", "name"), ("epochs", "optim", "epochs"))
#: The checkpoint each ``--eval`` report is made of.
_CHECKPOINTS = {"best": rd.BEST, "final": rd.FINAL}


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="adversarially train a model (PGD-AT, TRADES, MART, Consistency-AT; + RPAT)",
                       description="Train a model. Config = defaults < --preset < --config < flags < overrides.",
                       epilog=EXAMPLES_TRAIN, formatter_class=HelpFormatter)
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
    p.add_argument("--epochs", type=int, help="train this many epochs (a piecewise schedule's milestones are "
                   "rescaled in proportion); with --resume: extend the run to N epochs")
    p.add_argument("--seed", type=int)
    p.add_argument("--device", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--eval", action="store_true",
                   help="after training, evaluate best.pt and final.pt (Clean/PGD-20/AA/Mean/NRR)")
    p.add_argument("--n-examples", type=int, default=1000, help="test images for --eval")
    add_autoattack(p)
    add_extra_evals(p)
    p.add_argument("--print-config", "--dry-run", dest="print_config", action="store_true",
                   help="print the resolved config (YAML) and the warnings, then exit without training")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bars (and, off a terminal, no progress lines inside an epoch)")


def _flag_overrides(args: argparse.Namespace) -> list[dict]:
    """The config layer the flags make (above --config, below the KEY=VALUE overrides)."""
    flags: list[dict] = []
    for key, section, name in _FLAG_KEYS:
        if key == "epochs":
            continue  # applied after the config is built (the milestones are rescaled with it)
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
    return flags


def _default_run_dir(cfg: Config) -> Path:
    """``runs/<dataset>_<arch>_<method>[_rpat][_rebat|_rpatpp]``."""
    name = f"{cfg.data.dataset}_{cfg.model.arch}_{cfg.method.name}{'_rpat' if cfg.rpat.enabled else ''}"
    if cfg.rebat.enabled:
        name += "_rebat" if cfg.rebat.target == "adversarial" else "_rpatpp"
    return Path("runs") / name


def _ignored_on_resume(args: argparse.Namespace) -> list[str]:
    """What ``--resume`` does not use: a resumed run keeps the config it was started with."""
    given = [f"--{k.replace('_', '-')}" for k in ("preset", "config", "dataset", "data_root", "arch", "method", "seed")
             if getattr(args, k) is not None]
    given += [f for f, on in (("--rpat", args.rpat), ("--download", args.download)) if on]
    return given + list(args.overrides)


def _build(args: argparse.Namespace) -> Config:
    cfg = build_config(args.preset, args.config, [*_flag_overrides(args), *args.overrides])
    if args.epochs is not None and not args.resume:
        if any(o.strip().startswith("optim.milestones") for o in args.overrides):
            cfg = build_config(args.preset, args.config, [*_flag_overrides(args), {"optim": {"epochs": args.epochs}},
                                                          *args.overrides])
        else:
            cfg, note = cfg.with_epochs(args.epochs)
            if note:
                print(f"rpat: note: {note}", flush=True)
    return cfg


def _evaluate_run(run_dir: Path, summary: dict, *, n_examples: int, autoattack: str, device: str,
                  progress: bool, tensorboard: bool = False, extra_evals: str | None = None) -> None:
    """``--eval``: best.pt and final.pt into eval_best.json / eval_final.json, then one table
    (with ``--extra-evals``, their columns too)."""
    evals, corruptions = parse_extra_evals(extra_evals)
    rows = []
    for which, checkpoint in _CHECKPOINTS.items():
        out = rd.eval_report_path(run_dir, which)
        if summary["already_finished"] and out.is_file():  # a finished run is not evaluated again
            print(f"{out} exists (run already finished): shown as it is")
            rows.append((which, json.loads(out.read_text())))
            continue
        extra = {"selected_on": summary["held_out"]} if which == "best" else None
        result = write_report(run_dir / checkpoint, out, say=print, extra=extra, n_examples=n_examples,
                              autoattack=autoattack, device=device, progress=progress, extra_evals=evals,
                              corruptions=corruptions)
        if tensorboard:  # every number of the report into <run_dir>/tb (logging.tensorboard)
            log_report(run_dir, which, result)
        rows.append((which, result))
    print(format_table(rows))
    print(f"(best = best.pt, selected on the {summary['held_out']})")
    print_per_attack(rows)


def run(args: argparse.Namespace) -> int:
    run_dir = Path(args.run_dir) if args.run_dir else None
    if args.resume and run_dir is None:
        raise InputError("--resume needs --run-dir")
    cfg = _build(args)
    if args.extra_evals and not args.eval:
        raise InputError("--extra-evals adds evaluations to --eval's reports: give --eval too")
    check_extra_evals(args.extra_evals, cfg.data.dataset)  # a bad list fails before training, not after it
    if args.print_config:
        print(dump_yaml(cfg), end="")
        print(f"# {cfg.describe()}")
        for w in cfg.warnings():
            print(f"# warning: {w}")
        return 0
    if run_dir is None:
        run_dir = _default_run_dir(cfg)
    if args.resume and _ignored_on_resume(args):
        print(f"rpat: note: --resume continues {run_dir} with its own config ({run_dir / rd.CONFIG}); ignored: "
              f"{' '.join(_ignored_on_resume(args))} (--resume --epochs N extends the run)", flush=True)
    progress = not args.no_progress
    trainer = Trainer(cfg, run_dir, resume=args.resume, overwrite=args.overwrite, progress=progress,
                      epochs=args.epochs if args.resume else None)
    if trainer.is_main:
        print(f"rpat {__version__}: {trainer.cfg.describe()} -> {run_dir}", flush=True)
    summary = trainer.fit()
    if trainer.dist.active:  # under torchrun: rank 0 reports (and evaluates); the others are done
        distributed.cleanup()
        if not trainer.is_main:
            return 0
    hint = "" if summary["held_out"].startswith("validation") else "; data.val_size=N selects on a validation split"
    print(f"done: best.pt = epoch {summary['best_epoch']}, held-out PGD {summary['best_held_out_pgd']:.2f} "
          f"(selected on the {summary['held_out']}{hint}); checkpoints in {run_dir}")
    if args.eval:
        _evaluate_run(run_dir, summary, n_examples=args.n_examples, autoattack=args.autoattack,
                      device=trainer.cfg.device, progress=progress, tensorboard=trainer.cfg.logging.tensorboard,
                      extra_evals=args.extra_evals)
    return 0
