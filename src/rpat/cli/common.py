"""What several verbs share: the ``--autoattack`` argument and the per-attack lines after a table."""

from __future__ import annotations

import argparse
import sys

from ..attacks.autoattack import EVAL_VERSIONS
from ..evaluation.robustness import format_per_attack, masking_drop


def add_autoattack(p: argparse.ArgumentParser, default: str = "standard") -> None:
    """``--autoattack {standard,apgd,none}`` (``rpat eval``, ``rpat sweep``)."""
    p.add_argument("--autoattack", choices=list(EVAL_VERSIONS), default=default,
                   help="standard (default): APGD-CE, APGD-T (9 targets x 100 its), FAB-T, Square (5,000 "
                   "queries), minutes per 1,000 images on a CPU; apgd: APGD-CE + APGD-T only, the cheaper "
                   "monitoring variant, reported as AA(APGD); none: no AutoAttack")


def print_per_attack(rows: list[tuple[str, dict]]) -> None:
    """Each row's robust accuracy after each AutoAttack attack, and a gradient-masking warning."""
    for name, rep in rows:
        if (rep.get("extras") or {}).get("aa_per_attack"):
            print(f"{name}: {format_per_attack(rep)}")
        drop = masking_drop(rep)
        if drop is not None and drop > 0 and "sanity" not in rep:
            print(f"rpat: warning: {name}: FAB-T/Square lowered robust accuracy by {drop:.2f} points after "
                  "APGD-T: a possible sign of gradient masking", file=sys.stderr)
