"""The sweep's Table-1-style results: one row per run (Clean/PGD-20/AA/Mean/NRR of best and final), as
markdown and CSV. AA(APGD), AA+ and AA-rand results (``--autoattack apgd|plus|rand``) get their own
columns, never the AA ones; the extra evaluations (``--extra-evals``) and corruptions a column each.

Each accuracy carries its standard error on the evaluation's ``n_examples`` images
(:func:`rpat.evaluation.metrics.accuracy_se`; Mean: the bound ``(SE_Clean + SE_AA)/2``,
:func:`~rpat.evaluation.metrics.mean_se`; NRR: none): the markdown prints ``72.30 ± 1.42``,
the CSV a separate ``<column> SE`` column after each column that has one."""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

from .. import run_dir as rd
from ..config import Config
from ..evaluation.checkpoint_eval import aa_version
from ..evaluation.corruptions import CORRUPTION_COLUMNS
from ..evaluation.metrics import accuracy_se, format_pm, mean_se
from ..evaluation.robustness import AA_LABELS, EXTRA_COLUMNS, aa_group_labels
from .collect import OPTIONAL_LABELS

EVALS = rd.EVALUATED
METRICS = (("clean", "Clean"), ("pgd", "PGD-20"), ("aa", "AA"), ("mean", "Mean"), ("nrr", "NRR"))
#: The AutoAttack-derived metrics, labelled ``AA(APGD)``, ``AA+``... when another version made them.
AA_KEYS = ("aa", "mean", "nrr")
#: The extra evaluations and the corruptions: a column each, only when some run has a value.
OPTIONAL: tuple[tuple[str, str], ...] = tuple((k, OPTIONAL_LABELS[k]) for k in (*EXTRA_COLUMNS, *CORRUPTION_COLUMNS))
#: The suffix of a column's standard-error key and CSV column: ``"Clean (best) SE"``.
SE_SUFFIX = " SE"
COLUMNS = ["run", "setting", "method", *[f"{label} ({w})" for w in EVALS for _, label in METRICS]]


def _labels(version: str) -> list[tuple[str, str]]:
    """``(key, column label)`` of each metric for an evaluation made with AutoAttack ``version``."""
    aa = dict(zip(AA_KEYS, aa_group_labels(version if version != "none" else "standard"), strict=True))
    return [(k, aa.get(k, label)) for k, label in METRICS] + list(OPTIONAL)


def columns(rows: list[dict[str, Any]]) -> list[str]:
    """The table's columns: :data:`COLUMNS`, with AA(APGD)/Mean(APGD)/NRR(APGD) (or AA+, AA-rand...) in
    place of (or, in a mixed sweep, after) AA/Mean/NRR when a row has values there; then CW-20, Noise,
    Transfer, CW(ART), Corruptions, mCE where some row has them."""
    cols = ["run", "setting", "method", "best selected on", "test images"]
    versions = [v for v in AA_LABELS if v != "standard"]
    for w in EVALS:
        for key, label in METRICS:
            names = [label] + ([aa_group_labels(v)[AA_KEYS.index(key)] for v in versions] if key in AA_KEYS else [])
            present = [n for n in names if any(r.get(f"{n} ({w})") is not None for r in rows)]
            cols += [f"{n} ({w})" for n in (present or [label])]
        cols += [f"{label} ({w})" for _, label in OPTIONAL if any(r.get(f"{label} ({w})") is not None for r in rows)]
    return cols


def _result_version(res: dict[str, Any]) -> str:
    recorded = (res.get("sweep") or {}).get("autoattack")
    if recorded is None:
        recorded = (res.get("extras") or {}).get("aa_version", res.get("autoattack", True))
    return aa_version(recorded)


def _count(res: dict[str, Any]) -> int | None:
    """The images a report was measured on: its ``n_examples`` (else the sweep's), None if unknown."""
    n = res.get("n_examples", (res.get("sweep") or {}).get("n_examples"))
    return int(n) if isinstance(n, (int, float)) and not isinstance(n, bool) and n > 0 and int(n) == n else None


def standard_errors(res: dict[str, Any]) -> dict[str, float | None]:
    """``key -> SE`` (percentage points) of a report's accuracies on its images (clean, pgd, aa and the
    extra evaluations), Mean's bound; NRR and the corruption columns None."""
    n = _count(res)
    se: dict[str, float | None] = {}
    for k in ("clean", "pgd", "aa", *EXTRA_COLUMNS):
        v = res.get(k)
        se[k] = accuracy_se(float(v), n) if n and isinstance(v, (int, float)) and not isinstance(v, bool) else None
    c, a = se["clean"], se["aa"]
    se["mean"] = mean_se(c, a) if c is not None and a is not None and res.get("mean") is not None else None
    se.update(dict.fromkeys(("nrr", *CORRUPTION_COLUMNS)))
    return se


def gather(runs: list[tuple[str, Config]], out: Path) -> list[dict[str, Any]]:
    """One row per ``(name, config)`` run in ``out/<name>``: run, setting (dataset/arch/norm), method, where
    best.pt was selected, then the metrics of best and final (and each one's ``"<column> SE"``)."""
    rows = []
    for name, c in runs:
        row: dict[str, Any] = {"run": name, "setting": f"{c.data.dataset}/{c.model.arch}/{c.attack.norm}",
                               "method": c.label(), "best selected on": rd.held_out_of(rd.read_meta(out / name))}
        counts = set()
        for which in EVALS:
            res = rd.read_report(rd.eval_report_path(out / name, which)) or {}
            if res.get("n_examples") is not None:
                counts.add(int(res["n_examples"]))
            se = standard_errors(res)
            for key, label in _labels(_result_version(res) if res else "standard"):
                row[f"{label} ({which})"] = res.get(key)
                if se[key] is not None:
                    row[f"{label} ({which}){SE_SUFFIX}"] = se[key]
        row["test images"] = "/".join(str(n) for n in sorted(counts)) or None
        rows.append(row)
    return rows


def _fmt(v: Any, se: float | None = None) -> str:
    if se is not None and isinstance(v, (int, float)) and not isinstance(v, bool):
        return format_pm(float(v), se)
    return "–" if v is None else (f"{v:.2f}" if isinstance(v, float) else str(v))


def to_markdown(rows: list[dict[str, Any]]) -> str:
    """Table 1 layout: one row per method ± RPAT; Clean/PGD-20/AA/Mean/NRR of best, then of final (%).

    Each value ``± its standard error`` where known (module doc). AA(APGD) results
    (``--autoattack apgd``) get their own columns, never the AA ones."""
    cols = columns(rows)
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    lines += ["| " + " | ".join(_fmt(r.get(c), r.get(c + SE_SUFFIX)) for c in cols) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def to_csv(rows: list[dict[str, Any]]) -> str:
    """The table as CSV: plain numbers, each column with a standard error followed by its ``<column> SE``."""
    cols = [x for c in columns(rows)
            for x in (c, c + SE_SUFFIX) if x == c or any(r.get(x) is not None for r in rows)]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({c: ("" if r.get(c) is None else (round(r[c], 4) if isinstance(r[c], float) else r[c]))
                    for c in cols})
    return buf.getvalue()


def write_tables(runs: list[tuple[str, Config]], out: Path) -> list[dict[str, Any]]:
    rows = gather(runs, out)
    (out / "results.md").write_text(to_markdown(rows))
    (out / "results.csv").write_text(to_csv(rows))
    return rows


