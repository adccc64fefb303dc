"""``rpat report``: one folder of tables and figures from many run directories."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from ..errors import InputError
from .collect import group_seeds, load_runs, present_metrics
from .figures import consistency_comparison_figure, consistency_figure, curves_figure, plane_figure, shared_ylims
from .tables import columns_for, csv_table, latex_table, markdown_table

#: What ``build_report`` says when it skips the figures because matplotlib cannot be imported.
NO_MATPLOTLIB = "figures skipped: matplotlib is not installed (pip install 'rpat[plots]')"


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr)


def matplotlib_available() -> bool:
    """Whether ``import matplotlib`` works (the figures need it; the tables do not)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def build_report(
    run_dirs: Sequence[str | Path], out: str | Path, *, labels: Sequence[str] | None = None,
    which: Sequence[str] = ("best", "final"), metrics: Sequence[str] | None = None,
    consistency: Sequence[str | Path] = (), formats: Sequence[str] = ("png", "pdf"), figures: bool = True,
    decimals: int = 2, say: Callable[[str], None] | None = None,
) -> list[Path]:
    """Write the tables (md, csv, tex) and figures for ``run_dirs`` into ``out``; return the paths written.

    Runs whose configs differ only in ``seed`` share one table row (``"<label> (k seeds)"``,
    mean ± sd over the seeds: :func:`rpat.reports.collect.group_seeds`) and one point of
    the accuracy-robustness plane; the training curves show every run. ``consistency``
    are JSON files written by ``rpat analyze consistency``; each gets a figure
    ``consistency_<file stem>`` (all on one y range), and two or more a
    ``consistency_trend`` comparison.

    ``metrics`` None: Clean, PGD-20, AA, Mean, NRR and each optional column some run has (AA(APGD), AA+,
    AA-rand, CW-20, Noise, Transfer, CW(ART), Corruptions, mCE: :func:`rpat.reports.collect.present_metrics`).

    The tables are written first. Without matplotlib the figures are skipped: ``say``
    (default: standard error) gets the one line :data:`NO_MATPLOTLIB` and nothing is raised.
    """
    say = say or _stderr
    loaded = load_runs(list(run_dirs), list(labels) if labels else None)
    runs = group_seeds(loaded)
    cols = columns_for(which, present_metrics(runs, tuple(which)) if metrics is None else metrics)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    tables = (("table.md", markdown_table(runs, cols, decimals)), ("table.csv", csv_table(runs, cols, decimals)),
              ("table.tex", latex_table(runs, cols, decimals)))
    for name, text in tables:
        (out / name).write_text(text)
        written.append(out / name)
    sources = {r.label: {"run_dir": str(r.path), **r.sources} for r in loaded}
    (out / "sources.json").write_text(json.dumps(sources, indent=2) + "\n")
    written.append(out / "sources.json")
    if not figures:
        return written
    if not matplotlib_available():
        say(NO_MATPLOTLIB)
        return written
    if any(r.results.get(which[0]) for r in runs):
        written += plane_figure(runs, out / "plane", which=which[0], formats=formats)
    if any(r.metrics for r in loaded):
        written += curves_figure(loaded, out / "curves", formats=formats)
    results = []
    for c in consistency:
        p = Path(c)
        if not p.is_file():
            raise InputError(f"consistency file {str(p)!r} not found")
        try:
            results.append((p.stem.removeprefix("consistency_"), json.loads(p.read_text())))
        except json.JSONDecodeError:
            raise InputError(f"{str(p)!r} is not valid JSON") from None
    ylims = shared_ylims([res for _, res in results]) if len(results) > 1 else None
    for stem, res in results:
        written += consistency_figure(res, out / f"consistency_{stem}", formats=formats, ylims=ylims)
    trends = [(stem, res) for stem, res in results if res.get("epochs")]
    if len(trends) > 1:
        written += consistency_comparison_figure(trends, out / "consistency_trend", formats=formats)
    return written
