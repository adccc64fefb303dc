"""Table 1/5/6-style result tables in markdown, CSV and LaTeX, with each accuracy's uncertainty.

Columns are ``(metric, which)`` pairs, e.g. ``("clean", "best")``; values are
accuracies in percent.

Every number honest:

* **±.** A value shows its standard error on the images it was measured on,
  ``72.30 ± 1.42`` with ``SE = 100·sqrt(p(1−p)/n)``
  (:func:`rpat.evaluation.metrics.accuracy_se`; ``n`` is the evaluation's
  ``n_examples``, or ``meta.json``'s held-out count for training-log numbers). Mean
  gets the conservative bound ``(SE_Clean + SE_AA)/2``
  (:func:`~rpat.evaluation.metrics.mean_se`); NRR and values of unknown ``n`` are shown
  without ``±``. A row of several seeds (``"(k seeds)"``, :func:`rpat.reports.collect.group_seeds`)
  shows the mean ± the standard deviation over its seeds. The CSV holds plain numbers
  with the standard errors in their own ``<column>_se`` columns (and ``<column>_sd``,
  ``seeds`` when a row averages seeds).
* **Bold only beyond noise.** A column's highest value is bold (markdown ``**x**``,
  LaTeX ``\\textbf{x}``) only when it beats the next-best by more than
  ``2·sqrt(SE_best² + SE_next²)`` (:func:`rpat.evaluation.metrics.clearly_best`; for a
  seed group the SE is ``sqrt(sd²/k + SE_images²)``); on a tie, within the noise, with
  fewer than two values, or when either SE is unknown, nothing in that column is bold
  (so NRR, which has no SE, is never bold).
* **One kind of source per row.** When one of a row's best/final has an evaluation
  report and the other only the training log, the log-derived cells get a ``†`` and a
  footnote under the table names the held-out images they were measured on.

Each row also says where its numbers come from (``RunRecord.notes``: the evaluation
file or the training log, how many images, and where ``best.pt`` was selected): a
``source (best)``/``source (final)`` column in markdown and CSV, notes under the LaTeX table.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence

from ..errors import InputError
from ..evaluation.metrics import NOISE_FACTOR, clearly_best, format_pm
from .collect import ALL_KEYS, KEYS, OPTIONAL_LABELS, RunRecord

#: Column heads: the Table-1 metrics, then the optional columns (other AutoAttack versions, the extra
#: evaluations, the corruptions), each labelled as ``rpat eval`` labels it.
LABELS = {"clean": "Clean", "pgd": "PGD-20", "aa": "AA", "mean": "Mean", "nrr": "NRR", **OPTIONAL_LABELS}
Column = tuple[str, str]
Grid = list[list[float | None]]
DAGGER = "†"
PM_NOTE = ("± is the standard error on the n images a number was measured on, 100·sqrt(p(1−p)/n) "
           "(Mean: the bound (SE_Clean + SE_AA)/2; NRR: none). Bold: a column's best, only where it beats "
           f"the next-best by more than {NOISE_FACTOR:g}·sqrt(SE_best² + SE_next²).")
SEEDS_NOTE = "(k seeds): the mean ± the standard deviation over the seeds."
DAGGER_NOTE = DAGGER + " held-out numbers from the training log ({}), not an evaluation report."


def columns_for(which: Sequence[str] = ("best", "final"), metrics: Sequence[str] = KEYS) -> list[Column]:
    """Every ``(metric, which)`` pair, metric-major: Clean best, Clean final, PGD-20 best, ..."""
    for w in which:
        if w not in ("best", "final"):
            raise InputError(f"unknown checkpoint {w!r}; valid: best, final")
    for m in metrics:
        if m not in ALL_KEYS:
            raise InputError(f"unknown metric {m!r}; valid: {', '.join(ALL_KEYS)}")
    return [(m, w) for m in metrics for w in which]


def table_values(runs: Sequence[RunRecord], columns: Sequence[Column]) -> Grid:
    return [[r.results.get(w, {}).get(m) for m, w in columns] for r in runs]


def table_errors(runs: Sequence[RunRecord], columns: Sequence[Column]) -> Grid:
    """The ``±`` of each cell (:meth:`RunRecord.error`: SE on the images, sd over seeds for a seed group)."""
    return [[r.error(w, m) for m, w in columns] for r in runs]


def table_noise(runs: Sequence[RunRecord], columns: Sequence[Column]) -> Grid:
    """The standard error of each cell that the bold rule compares (:meth:`RunRecord.noise`)."""
    return [[r.noise(w, m) for m, w in columns] for r in runs]


def best_marks(values: Grid, noise: Grid) -> list[list[bool]]:
    """True at a column's best value where it beats the next-best beyond the noise (module doc), else False."""
    marks = [[False] * (len(values[0]) if values else 0) for _ in values]
    for j in range(len(marks[0]) if marks else 0):
        i = clearly_best([row[j] for row in values], [row[j] for row in noise])
        if i is not None:
            marks[i][j] = True
    return marks


def log_marks(runs: Sequence[RunRecord], columns: Sequence[Column]) -> list[list[bool]]:
    """True at the cells of a training log in a row whose other checkpoint has an evaluation report."""
    out = []
    for r in runs:
        kinds = {r.kinds.get(w) for w in _whiches(columns) if w in r.results}
        mixed = {"eval", "log"} <= kinds
        out.append([mixed and r.kinds.get(w) == "log" and r.results[w].get(m) is not None for m, w in columns])
    return out


def _footnotes(runs: Sequence[RunRecord], errors: Grid, daggers: list[list[bool]]) -> list[str]:
    """The notes under a table: what ``±`` is (when one is shown), seed rows, ``†`` cells."""
    notes = []
    if any(e is not None for row in errors for e in row):
        notes.append(PM_NOTE)
    if any(r.seeds for r in runs):
        notes.append(SEEDS_NOTE)
    held = [r.held_out or "held-out images" for r, row in zip(runs, daggers, strict=True) if any(row)]
    if held:
        notes.append(DAGGER_NOTE.format("; ".join(dict.fromkeys(held))))
    return notes


def _headers(columns: Sequence[Column]) -> list[str]:
    whiches = {w for _, w in columns}
    return [LABELS[m] + (f" ({w})" if len(whiches) > 1 else "") for m, w in columns]


def _whiches(columns: Sequence[Column]) -> list[str]:
    return list(dict.fromkeys(w for _, w in columns))


def _note(run: RunRecord, which: str) -> str:
    return run.notes.get(which) or run.sources.get(which) or "-"


def markdown_table(runs: Sequence[RunRecord], columns: Sequence[Column], decimals: int = 2) -> str:
    """A markdown table, one row per run, ``value ± SE``, bold only beyond noise, ``†`` and notes (module doc)."""
    vals, errs = table_values(runs, columns), table_errors(runs, columns)
    marks, daggers = best_marks(vals, table_noise(runs, columns)), log_marks(runs, columns)
    whiches = _whiches(columns)
    head = ["method", *_headers(columns), *[f"source ({w})" for w in whiches]]
    lines = ["| " + " | ".join(head) + " |",
             "|:---|" + "|".join(["---:"] * len(columns) + [":---"] * len(whiches)) + "|"]
    for r, row, err, mk, dg in zip(runs, vals, errs, marks, daggers, strict=True):
        cells = []
        for v, e, b, d in zip(row, err, mk, dg, strict=True):
            text = format_pm(v, e, decimals)
            cells.append((f"**{text}**" if b else text) + (DAGGER if d else ""))
        lines.append("| " + " | ".join([r.label, *cells, *[_note(r, w) for w in whiches]]) + " |")
    notes = _footnotes(runs, errs, daggers)
    return "\n".join(lines) + "\n" + "".join(f"\n{n}\n" for n in notes)


def csv_table(runs: Sequence[RunRecord], columns: Sequence[Column], decimals: int = 2) -> str:
    """CSV: ``method, run_dir, [seeds,] <metric>_<which>, <metric>_<which>_se, ..., source_<which>...``.

    Plain numbers, empty cells for missing values. ``_se`` is the standard error (no ``_se``
    column for NRR, which has none); for a seed group it is the SE of its mean
    (:meth:`RunRecord.noise`) and ``_sd`` columns, present when a row averages seeds, hold
    the standard deviation over the seeds (``seeds``: how many, 1 for a single run).
    """
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    whiches = _whiches(columns)
    grouped = any(r.seeds for r in runs)
    head = ["method", "run_dir"] + (["seeds"] if grouped else [])
    for m, wh in columns:
        head += [f"{m}_{wh}"] + ([f"{m}_{wh}_se"] if m != "nrr" else []) + ([f"{m}_{wh}_sd"] if grouped else [])
    w.writerow([*head, *[f"source_{wh}" for wh in whiches]])

    def num(v: float | None) -> str:
        return "" if v is None else f"{v:.{decimals}f}"

    for r in runs:
        row = [r.label, ";".join(str(m.path) for m in r.members) if r.members else str(r.path)]
        if grouped:
            row.append(str(len(r.seeds) or 1))
        for m, wh in columns:
            row.append(num(r.results.get(wh, {}).get(m)))
            if m != "nrr":
                row.append(num(r.noise(wh, m)))
            if grouped:
                row.append(num(r.spread.get(wh, {}).get(m)))
        w.writerow([*row, *[_note(r, wh) for wh in whiches]])
    return buf.getvalue()


_TEX = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "_": r"\_", "#": r"\#", "$": r"\$",
        "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}


def _tex_escape(s: str) -> str:
    return "".join(_TEX.get(c, c) for c in s)


_TEX_SYMBOLS = {"±": r"$\pm$", "·": r"$\cdot$", "−": "-", "²": r"$^2$", "†": r"$^\dagger$"}


def _tex_note(note: str) -> str:
    """A footnote line in LaTeX: escaped, its symbols (``±``, ``†``, ...) in math mode."""
    return "".join(_TEX_SYMBOLS.get(c) or _TEX.get(c, c) for c in note)


def latex_table(runs: Sequence[RunRecord], columns: Sequence[Column], decimals: int = 2,
                caption: str | None = None) -> str:
    """A ``tabular`` (booktabs rules) with a two-level header when both best and final are shown."""
    vals, errs = table_values(runs, columns), table_errors(runs, columns)
    marks, daggers = best_marks(vals, table_noise(runs, columns)), log_marks(runs, columns)
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
    for r, row, err, mk, dg in zip(runs, vals, errs, marks, daggers, strict=True):
        cells = []
        for v, e, b, d in zip(row, err, mk, dg, strict=True):
            text = format_pm(v, e, decimals, pm=r" $\pm$ ")
            cells.append((rf"\textbf{{{text}}}" if b else text) + (r"$^\dagger$" if d else ""))
        lines.append(" & ".join([_tex_escape(r.label), *cells]) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}"]
    notes = [f"{r.label} ({w}): {_note(r, w)}" for r in runs for w in whiches]
    lines.append(r"\par\smallskip{\footnotesize Sources: " + _tex_note("; ".join(notes)) + ".}")
    for note in _footnotes(runs, errs, daggers):
        lines.append(r"\par{\footnotesize " + _tex_note(note) + "}")
    lines.append(r"\end{table}")
    return "\n".join(lines) + "\n"
