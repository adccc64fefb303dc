"""Table 1/5/6-style result tables in markdown, CSV and LaTeX, the best value of each column marked.

Columns are ``(metric, which)`` pairs, e.g. ``("clean", "best")``; values are
accuracies in percent. The highest value of each column is marked (ties all
marked) when the column has values from two rows or more: bold in markdown
(``**x**``) and LaTeX (``\\textbf{x}``); the CSV holds plain numbers.

Each row also says where its numbers come from (``RunRecord.notes``: the evaluation
file or the training log, how many images, and where ``best.pt`` was selected): a
``source (best)``/``source (final)`` column in markdown and CSV, notes under the LaTeX table.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence

from ..errors import InputError
from .collect import KEYS, RunRecord

LABELS = {"clean": "Clean", "pgd": "PGD-20", "aa": "AA", "mean": "Mean", "nrr": "NRR"}
Column = tuple[str, str]


def columns_for(which: Sequence[str] = ("best", "final"), metrics: Sequence[str] = KEYS) -> list[Column]:
    """Every ``(metric, which)`` pair, metric-major: Clean best, Clean final, PGD-20 best, ..."""
    for w in which:
        if w not in ("best", "final"):
            raise InputError(f"unknown checkpoint {w!r}; valid: best, final")
    for m in metrics:
        if m not in KEYS:
            raise InputError(f"unknown metric {m!r}; valid: {', '.join(KEYS)}")
    return [(m, w) for m in metrics for w in which]


def table_values(runs: Sequence[RunRecord], columns: Sequence[Column]) -> list[list[float | None]]:
    return [[r.results.get(w, {}).get(m) for m, w in columns] for r in runs]


def best_marks(values: list[list[float | None]], decimals: int = 2) -> list[list[bool]]:
    """True where a value is the (rounded) maximum of its column; nothing marked in a column of fewer than 2 values."""
    marks = [[False] * (len(values[0]) if values else 0) for _ in values]
    for j in range(len(marks[0]) if marks else 0):
        col = [round(v[j], decimals) for v in values if v[j] is not None]
        if len(col) < 2:  # "best" means best of several
            continue
        top = max(col)
        for i, row in enumerate(values):
            marks[i][j] = row[j] is not None and round(row[j], decimals) == top
    return marks


def _headers(columns: Sequence[Column]) -> list[str]:
    whiches = {w for _, w in columns}
    return [LABELS[m] + (f" ({w})" if len(whiches) > 1 else "") for m, w in columns]


def _whiches(columns: Sequence[Column]) -> list[str]:
    return list(dict.fromkeys(w for _, w in columns))


def _note(run: RunRecord, which: str) -> str:
    return run.notes.get(which) or run.sources.get(which) or "-"


def _fmt(v: float | None, decimals: int) -> str:
    return "-" if v is None else f"{v:.{decimals}f}"


def markdown_table(runs: Sequence[RunRecord], columns: Sequence[Column], decimals: int = 2) -> str:
    """A markdown table, one row per run, best value per column in bold."""
    vals = table_values(runs, columns)
    marks = best_marks(vals, decimals)
    whiches = _whiches(columns)
    head = ["method", *_headers(columns), *[f"source ({w})" for w in whiches]]
    lines = ["| " + " | ".join(head) + " |",
             "|:---|" + "|".join(["---:"] * len(columns) + [":---"] * len(whiches)) + "|"]
    for r, row, mk in zip(runs, vals, marks, strict=True):
        cells = [f"**{_fmt(v, decimals)}**" if b else _fmt(v, decimals) for v, b in zip(row, mk, strict=True)]
        lines.append("| " + " | ".join([r.label, *cells, *[_note(r, w) for w in whiches]]) + " |")
    return "\n".join(lines) + "\n"


def csv_table(runs: Sequence[RunRecord], columns: Sequence[Column], decimals: int = 2) -> str:
    """CSV: ``method, run_dir, <metric>_<which>..., source_<which>...``; empty cells for missing values."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    whiches = _whiches(columns)
    w.writerow(["method", "run_dir", *[f"{m}_{wh}" for m, wh in columns], *[f"source_{wh}" for wh in whiches]])
    for r, row in zip(runs, table_values(runs, columns), strict=True):
        w.writerow([r.label, str(r.path), *["" if v is None else f"{v:.{decimals}f}" for v in row],
                    *[_note(r, wh) for wh in whiches]])
    return buf.getvalue()


_TEX = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "_": r"\_", "#": r"\#", "$": r"\$",
        "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}


def _tex_escape(s: str) -> str:
    return "".join(_TEX.get(c, c) for c in s)


def latex_table(runs: Sequence[RunRecord], columns: Sequence[Column], decimals: int = 2,
                caption: str | None = None) -> str:
    """A ``tabular`` (booktabs rules) with a two-level header when both best and final are shown."""
    vals = table_values(runs, columns)
    marks = best_marks(vals, decimals)
    whiches = _whiches(columns)
    lines = [r"\begin{table}[t]", r"\centering"]
    if caption:
        lines.append(rf"\caption{{{_tex_escape(caption)}}}")
    lines += [r"\begin{tabular}{l" + "r" * len(columns) + "}", r"\toprule"]
    if len(whiches) > 1:
        metrics = list(dict.fromkeys(m for m, _ in columns))
        top = ["Method"] + [rf"\multicolumn{{{len(whiches)}}}{{c}}{{{LABELS[m]}}}" for m in metrics]
        lines.append(" & ".join(top) + r" \\")
        lines.append(" & ".join([""] + [w.capitalize() for _, w in columns]) + r" \\")
    else:
        lines.append(" & ".join(["Method"] + [LABELS[m] for m, _ in columns]) + r" \\")
    lines.append(r"\midrule")
    for r, row, mk in zip(runs, vals, marks, strict=True):
        cells = [rf"\textbf{{{_fmt(v, decimals)}}}" if b else _fmt(v, decimals) for v, b in zip(row, mk, strict=True)]
        lines.append(" & ".join([_tex_escape(r.label), *cells]) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}"]
    notes = [f"{r.label} ({w}): {_note(r, w)}" for r in runs for w in whiches]
    lines.append(r"\par\smallskip{\footnotesize Sources: " + _tex_escape("; ".join(notes)) + ".}")
    lines.append(r"\end{table}")
    return "\n".join(lines) + "\n"
