"""Reports over many runs: Table 1/5/6-style tables (markdown, CSV, LaTeX) and figures.

``build_report(run_dirs, out)`` writes ``table.md``, ``table.csv``, ``table.tex``,
``plane.{png,pdf}`` (Clean vs AA, arrows baseline -> RPAT), ``curves.{png,pdf}``
(training curves) and, for each consistency JSON given, its figure.
"""

from .build import build_report
from .collect import RunRecord, load_run, load_runs
from .tables import columns_for, csv_table, latex_table, markdown_table

__all__ = ["RunRecord", "build_report", "columns_for", "csv_table", "latex_table", "load_run", "load_runs",
           "markdown_table"]
