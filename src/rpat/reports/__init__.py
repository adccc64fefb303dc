"""Reports over many runs: Table 1/5/6-style tables (markdown, CSV, LaTeX) and figures.

``build_report(run_dirs, out)`` writes ``table.md``, ``table.csv``, ``table.tex``,
``plane.{png,pdf}`` (Clean vs AA with ±1 SE error bars, arrows baseline -> RPAT),
``curves.{png,pdf}`` (training curves) and, for each consistency JSON given, its figure.
Every accuracy in the tables carries its standard error (``72.30 ± 1.42``), bold marks
a column's best only beyond noise, and runs that differ only in ``seed`` share a row
(mean ± sd over seeds); see :mod:`rpat.reports.tables`. Without matplotlib the tables are
still written and the figures skipped with a note.

:mod:`rpat.reports.robustbench` holds RobustBench's protocol (``robustbench_settings``) and writes its result
file (``model_info/<dataset>/<threat>/<NAME>.json``: ``model_info_entry``, ``update_model_info``).
"""

from .build import build_report
from .collect import RunRecord, group_seeds, load_run, load_runs
from .robustbench import (
    check_normalization,
    load_metadata,
    model_info_entry,
    model_info_path,
    robustbench_settings,
    update_model_info,
    write_model_info,
)
from .tables import columns_for, csv_table, latex_table, markdown_table

__all__ = ["RunRecord", "build_report", "check_normalization", "columns_for", "csv_table", "group_seeds",
           "latex_table", "load_metadata", "load_run", "load_runs", "markdown_table", "model_info_entry",
           "model_info_path", "robustbench_settings", "update_model_info", "write_model_info"]
