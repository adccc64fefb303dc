"""``rpat report``: one folder of tables and figures from many run directories."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from ..errors import InputError
from .collect import KEYS, load_runs
from .tables import columns_for, csv_table, latex_table, markdown_table


def build_report(
    run_dirs: Sequence[str | Path], out: str | Path, *, labels: Sequence[str] | None = None,
    which: Sequence[str] = ("best", "final"), metrics: Sequence[str] = KEYS,
    consistency: Sequence[str | Path] = (), formats: Sequence[str] = ("png", "pdf"), figures: bool = True,
    decimals: int = 2,
) -> list[Path]:
    """Write the tables (md, csv, tex) and figures for ``run_dirs`` into ``out``; return the paths written.

    ``consistency`` are JSON files written by ``rpat analyze consistency``; each
    gets a figure ``consistency_<file stem>``.
    """
    runs = load_runs(list(run_dirs), list(labels) if labels else None)
    cols = columns_for(which, metrics)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    tables = (("table.md", markdown_table(runs, cols, decimals)), ("table.csv", csv_table(runs, cols, decimals)),
              ("table.tex", latex_table(runs, cols, decimals)))
    for name, text in tables:
        (out / name).write_text(text)
        written.append(out / name)
    sources = {r.label: {"run_dir": str(r.path), **r.sources} for r in runs}
    (out / "sources.json").write_text(json.dumps(sources, indent=2) + "\n")
    written.append(out / "sources.json")
    if figures:
        from .figures import consistency_comparison_figure, consistency_figure, curves_figure, plane_figure

        if any(r.results.get(which[0]) for r in runs):
            written += plane_figure(runs, out / "plane", which=which[0], formats=formats)
        if any(r.metrics for r in runs):
            written += curves_figure(runs, out / "curves", formats=formats)
        trends = []
        for c in consistency:
            p = Path(c)
            if not p.is_file():
                raise InputError(f"consistency file {str(p)!r} not found")
            try:
                res = json.loads(p.read_text())
            except json.JSONDecodeError:
                raise InputError(f"{str(p)!r} is not valid JSON") from None
            written += consistency_figure(res, out / f"consistency_{p.stem.removeprefix('consistency_')}",
                                          formats=formats)
            if res.get("epochs"):
                trends.append((p.stem.removeprefix("consistency_"), res))
        if len(trends) > 1:
            written += consistency_comparison_figure(trends, out / "consistency_trend", formats=formats)
    return written
