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

overrides are section.key=value pairs (values parsed as YAML; eps as 8/255):
  data.{dataset,root,download,train_subset,batch_size,augment}  model.{arch,normalize}
  attack.{norm,eps,step_size,steps}  method.name  rpat.{enabled,lam,alpha,proxy,start_epoch}
  optim.{epochs,lr,momentum,weight_decay,nesterov,schedule,milestones,gamma}
  eval.{n_examples,eps,step_size,steps,batch_size}  seed  device  log_interval
"""

EXAMPLES_EVAL = """\
examples:
  rpat eval runs/pgdat/best.pt                      # dataset and threat model from the checkpoint
  rpat eval runs/pgdat/final.pt --n-examples 1000 --out final.json
  rpat eval model_test.pt --arch resnet18 --dataset cifar10 --data-root data
  rpat eval runs/l2/best.pt --norm l2 --eps 128/255 --step-size 32/255
"""


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="adversarially train a model (PGD-AT, optionally + RPAT)",
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


def _add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="evaluate a checkpoint: Clean, PGD-20, AutoAttack, Mean, NRR",
                       description="Evaluate a checkpoint like the paper: Clean, PGD-20, AutoAttack "
                       "(standard), Mean = (Clean+AA)/2 and NRR = 2*Clean*AA/(Clean+AA), in percent.",
                       epilog=EXAMPLES_EVAL, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="an rpat checkpoint (best.pt, final.pt) or a plain state_dict")
    p.add_argument("--arch", help="architecture of a plain state_dict")
    p.add_argument("--dataset", help="dataset (default: the checkpoint's, else cifar10)")
    p.add_argument("--data-root", help="dataset folder (default: the checkpoint's, else data)")
    p.add_argument("--n-examples", type=int, help="N test images (default all; class-mixed for folders)")
    p.add_argument("--no-autoattack", action="store_true", help="skip AutoAttack (Mean/NRR not reported)")
    p.add_argument("--norm", choices=["linf", "l2"], help="threat model norm (default: the checkpoint's)")
    p.add_argument("--eps", help="budget in [0,1] pixel units, e.g. 8/255")
    p.add_argument("--step-size", help="PGD step size, e.g. 2/255")
    p.add_argument("--steps", type=int, default=20, help="PGD steps (default 20)")
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="write the report as JSON here (default: next to the checkpoint)")
    p.add_argument("--no-progress", action="store_true")


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="offline CPU demo: PGD-AT vs PGD-AT + RPAT on 8x8 digits",
                       description="Train a small CNN with PGD-AT and with PGD-AT + RPAT on "
                       "scikit-learn's bundled 8x8 digits (no download), then print the "
                       "Clean / PGD-20 / AutoAttack / Mean / NRR table for both.")
    p.add_argument("--out", default="runs/demo", help="run directory root (default runs/demo)")
    p.add_argument("--epochs", type=int, help="override the demo's epochs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")


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
    )
    parser.add_argument("--version", action="version", version=f"rpat {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_train(sub)
    _add_eval(sub)
    _add_demo(sub)
    _add_list(sub)
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
        run_dir = Path("runs") / name
    progress = not args.no_progress
    trainer = Trainer(cfg, run_dir, resume=args.resume, overwrite=args.overwrite, progress=progress)
    print(f"rpat {__version__}: {trainer.cfg.describe()} -> {run_dir}", flush=True)
    summary = trainer.fit()
    print(f"done: best held-out PGD {summary['best_held_out_pgd']:.2f} at epoch {summary['best_epoch']}; "
          f"checkpoints in {run_dir}")
    if args.eval:
        from .evaluation.checkpoint_eval import evaluate_checkpoint
        from .evaluation.robustness import format_table

        rows = []
        for which in ("best", "final"):
            report, info = evaluate_checkpoint(run_dir / f"{which}.pt", n_examples=args.n_examples,
                                               device=trainer.cfg.device, progress=progress)
            (run_dir / f"eval_{which}.json").write_text(
                json.dumps({**info, **report.to_dict()}, indent=2) + "\n")
            rows.append((which, report.to_dict()))
        print(format_table(rows))
    return 0


def _eval(args: argparse.Namespace) -> int:
    from .evaluation.checkpoint_eval import evaluate_checkpoint

    progress = not args.no_progress
    report, info = evaluate_checkpoint(
        args.checkpoint, arch=args.arch, dataset=args.dataset, data_root=args.data_root,
        n_examples=args.n_examples, autoattack=not args.no_autoattack, norm=args.norm, eps=args.eps,
        step_size=args.step_size, steps=args.steps, batch_size=args.batch_size, device=args.device,
        seed=args.seed, progress=progress, log=(lambda m: print(m, file=sys.stderr)) if progress else None,
    )
    print(f"{info['arch']} on {info['n_examples']} {info['dataset']} test images, {report.threat}")
    print(report.table(Path(args.checkpoint).name))
    out = Path(args.out) if args.out else Path(args.checkpoint).with_suffix(".eval.json")
    out.write_text(json.dumps({**info, **report.to_dict()}, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


def _list(args: argparse.Namespace) -> int:
    from .config import list_presets
    from .data import DATASETS
    from .models import PROXIES, list_models
    from .objectives import list_methods

    lists = {"models": list_models(), "datasets": sorted(DATASETS), "methods": list_methods(),
             "presets": list_presets(), "proxies": list(PROXIES)}
    for name, items in lists.items():
        if args.what in ("all", name):
            print(f"{name}: {', '.join(items)}" if args.what == "all" else "\n".join(items))
    return 0


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(Path(args.out), epochs=args.epochs, seed=args.seed, progress=not args.no_progress)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    handlers = {"train": _train, "eval": _eval, "demo": _demo, "list": _list}
    try:
        return handlers[args.command](args)
    except InputError as e:
        print(f"rpat: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("rpat: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
