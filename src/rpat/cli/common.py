"""What several verbs share: the ``--autoattack`` argument and the per-attack lines after a table."""

from __future__ import annotations

import argparse
import sys

from ..attacks.autoattack import EVAL_VERSIONS
from ..evaluation.extra import EXTRA_EVAL_ITEMS
from ..evaluation.robustness import format_per_attack
from ..evaluation.sanity import late_attacks_check


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keeps the epilog's layout and shows every option's default in ``--help``."""


def add_autoattack(p: argparse.ArgumentParser, default: str = "standard") -> None:
    """``--autoattack {standard,apgd,plus,rand,none}`` (``rpat eval``, ``rpat sweep``)."""
    p.add_argument("--autoattack", choices=list(EVAL_VERSIONS), default=default,
                   help="standard (default): APGD-CE, APGD-T (9 targets x 100 its), FAB-T, Square (5,000 "
                   "queries), minutes per 1,000 images on a CPU; apgd: APGD-CE + APGD-T only, the cheaper "
                   "monitoring variant, reported as AA(APGD); plus: AutoAttack+ (more attacks and restarts, "
                   "several times standard's cost), reported as AA+; rand: for randomized defenses (EOT), "
                   "reported as AA-rand; none: no AutoAttack")


def add_extra_evals(p: argparse.ArgumentParser) -> None:
    """``--extra-evals LIST`` (``rpat train --eval``, ``rpat sweep``): ``rpat eval``'s extra evaluations by name."""
    p.add_argument("--extra-evals", metavar="LIST", default=None,
                   help="extra evaluations in every report, comma-separated (rpat eval's --cw, --noise, "
                   "--transfer-from, --cw-art, --corruptions; columns CW-20, Noise, Transfer, CW(ART), Corruptions "
                   "and mCE): " + "; ".join(EXTRA_EVAL_ITEMS.values()) + ". Costs: CW-20 as much as PGD-20, "
                   "noise one forward pass, transfer a PGD-20 on the source, corruptions 75 clean passes over "
                   "the test images (15 corruptions x 5 severities)")


def print_per_attack(rows: list[tuple[str, dict]]) -> None:
    """Each row's robust accuracy after each AutoAttack attack, and the late-attacks finding (FAB-T/Square
    breaking images APGD missed) when it is beyond noise or worth a warning (``late_attacks_check``)."""
    for name, rep in rows:
        if (rep.get("extras") or {}).get("aa_per_attack"):
            print(f"{name}: {format_per_attack(rep)}")
        if "sanity" in rep:
            continue  # the sanity summary already said it
        check = late_attacks_check(rep)
        if check is not None and (not check.get("passed", True) or check.get("warning")):
            print(f"rpat: warning: {name}: {check['detail'].removeprefix('warning: ')}", file=sys.stderr)
