"""``rpat eval CKPT --robustbench NAME``: RobustBench's protocol (``benchmark()``: the first 10,000 test
images in order, clean accuracy, standard AutoAttack at the leaderboard's ε, batch size 32) and its
result file ``model_info/<dataset>/<Linf|L2>/<NAME>.json`` (:mod:`rpat.reports.robustbench`)."""

from __future__ import annotations

import argparse
from typing import Any

from ..errors import InputError
from ..reports.robustbench import (
    check_normalization,
    load_metadata,
    merge_metadata,
    protocol_deviations,
    robustbench_settings,
    write_model_info,
)

#: Archives that hold the test split in RobustBench's order (image folders are class-sorted).
_IN_ORDER = ("cifar10", "cifar100")
_META_FLAGS = ("link", "authors", "venue", "footnote")


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("RobustBench (--robustbench NAME)")
    g.add_argument("--robustbench", metavar="NAME",
                   help="run RobustBench's protocol (first 10,000 test images in order, clean + standard AutoAttack "
                   "at the leaderboard's eps: 8/255 linf, 0.5 l2; batch size 32 unless --batch-size) and write "
                   "model_info/<dataset>/<Linf|L2>/NAME.json (merged into an existing file like RobustBench's "
                   "update_json); costs a full standard AutoAttack on 10,000 images")
    g.add_argument("--robustbench-root", default=".", metavar="DIR",
                   help="folder that holds (or gets) model_info/")
    g.add_argument("--robustbench-meta", metavar="YAML",
                   help="the entry's descriptive fields (link, name, authors, additional_data, venue, "
                   "architecture, reported, number_forward_passes, unreliable, footnote)")
    for flag in _META_FLAGS:
        g.add_argument(f"--{flag}", help=f"the entry's {flag} (overrides --robustbench-meta)")
    g.add_argument("--robustbench-allow-deviations", action="store_true",
                   help="write the file even if the run deviates from the protocol (e.g. --n-examples 1000); "
                   "the deviations are printed")


def apply_protocol(args: argparse.Namespace, dataset: str, norm: str) -> dict[str, Any] | None:
    """With ``--robustbench``: the protocol's settings, set on ``args`` where the user left them unset
    (images, batch size, ε, standard AutoAttack); None without it."""
    if not args.robustbench:
        return None
    if len(args.checkpoint) != 1:
        raise InputError("--robustbench names one model: give one checkpoint")
    if args.autoattack not in ("standard",):
        raise InputError(f"--robustbench runs standard AutoAttack, not --autoattack {args.autoattack}")
    if dataset not in _IN_ORDER and not args.robustbench_allow_deviations:
        raise InputError(f"--robustbench takes the first test images in RobustBench's order, which the {dataset} "
                         "layout does not keep (image folders are sorted by class); use --dataset cifar10/cifar100 "
                         "with the archive, or --robustbench-allow-deviations")
    s = robustbench_settings(dataset, norm, args.n_examples, args.batch_size)
    args.n_examples = s["n_examples"]
    args.batch_size = s["batch_size"]
    if args.eps is None:
        args.eps = s["eps_text"]
    return s


def check_report_normalization(report: dict[str, Any]) -> None:
    check_normalization(report.get("normalize"), report.get("dataset", "cifar10"))


def write_entry(args: argparse.Namespace, report: dict[str, Any], say) -> None:  # noqa: ANN001
    """Write (or merge into) the model_info file for ``report`` and say where, with any deviation."""
    check_report_normalization(report)
    meta = merge_metadata(load_metadata(args.robustbench_meta) if args.robustbench_meta else {},
                          {k: getattr(args, k) for k in _META_FLAGS})
    deviations = protocol_deviations(report)
    path, entry = write_model_info(args.robustbench_root, args.robustbench, report, meta,
                                   allow_deviations=args.robustbench_allow_deviations)
    say(f"wrote {path} (clean_acc {entry['clean_acc']}, autoattack_acc {entry.get('autoattack_acc')})")
    for d in deviations:
        say(f"rpat: note: deviates from RobustBench's protocol: {d}")
