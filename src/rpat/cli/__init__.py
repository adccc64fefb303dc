"""The ``rpat`` command line: train, eval, demo, sweep, list, analyze, ablation, report, download, export.

Each verb's module holds its parser (``add_parser``) and its handler: :mod:`.train`, :mod:`.eval`,
:mod:`.sweep`, :mod:`.info` (list, demo), :mod:`.analyze` (analyze, ablation, report); this one builds
the parser, applies ``--threads`` and turns errors into one line. Every user error prints one line
(``rpat: error: ...``) and exits with status 2.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

from .. import __version__
from ..errors import InputError
from . import analyze, download, export, info, sweep, train
from . import eval as evaluate

#: The handler of each verb: it gets the parsed arguments and returns the exit status.
HANDLERS: dict[str, Callable[[argparse.Namespace], int]] = {
    "train": train.run,
    "eval": evaluate.run,
    "demo": info.run_demo_cmd,
    "list": info.run_list,
    "sweep": sweep.run,
    "analyze": analyze.run_analyze,
    "ablation": analyze.run_ablation_cmd,
    "report": analyze.run_report,
    "download": download.run,
    "export": export.run,
}


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
    train.add_parser(sub)
    evaluate.add_parser(sub)
    info.add_demo_parser(sub)
    sweep.add_parser(sub)
    info.add_list_parser(sub)
    analyze.add_parser(sub)  # analyze, ablation, report
    download.add_parser(sub)
    export.add_parser(sub)
    return parser


_PACKAGE = Path(__file__).resolve().parents[1]
_default_showwarning = warnings.showwarning


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:  # noqa: ANN001
    """rpat's own warnings (an unverified checkpoint, a cache it could not write) as one ``rpat: warning:`` line."""
    if Path(filename).resolve().is_relative_to(_PACKAGE):
        print(f"rpat: warning: {message}", file=sys.stderr if file is None else file, flush=True)
    else:
        _default_showwarning(message, category, filename, lineno, file, line)


def main(argv: list[str] | None = None) -> int:
    warnings.showwarning = _show_warning
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
        torch.set_num_threads(args.threads)
    try:
        return HANDLERS[args.command](args)
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
