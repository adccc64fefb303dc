"""Figures (matplotlib, Agg backend), readable in grayscale: markers, line styles and hatches carry meaning.

Every function writes ``<stem>.png`` and ``<stem>.pdf`` (or the ``formats`` given)
and returns the written paths; ``make_plane_figure`` and ``make_consistency_figure``
return the matplotlib figure itself (what ``plane_figure``/``consistency_figure`` save).

The accuracy-robustness plane draws ±1 error bars on both axes (the tables' ``±``) and
never zooms in on noise: each axis spans at least ``max(10 points, 6·SE)`` around the
data (:func:`plane_limits`). Consistency figures of several runs share one y range per
metric (:func:`shared_ylims`; the comparison figure shares one axis).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..errors import InputError

MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">")
LINESTYLES = ("-", "--", "-.", ":")
GRAYS = ("0.0", "0.45", "0.7", "0.25", "0.55")
GROUP_STYLE = {"defended": {"ls": "-", "marker": "o", "color": "0.1", "hatch": ""},
               "failed": {"ls": "--", "marker": "s", "color": "0.55", "hatch": "///"}}
#: The plane's axes span at least this many accuracy points ...
PLANE_MIN_SPAN = 10.0
#: ... and at least this many times the largest standard error on the axis.
PLANE_MIN_SE = 6.0
METRIC_LABEL = {"clean_adv": "MSE(h(x), h(x_adv))", "clean_mid": "MSE(h(x), h(x_mid))",
                "mid_adv": "MSE(h(x_mid), h(x_adv))"}


def _plt():
    try:
        import matplotlib
    except ImportError:
        raise InputError("figures need matplotlib: pip install 'rpat[plots]'") from None
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    return plt


def _integer_ticks(ax: Any) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def save_figure(fig: Any, stem: str | Path, formats: Sequence[str] = ("png", "pdf"), dpi: int = 110) -> list[Path]:
    """Save ``fig`` as ``<stem>.<fmt>`` for each format, close it, return the paths."""
    plt = _plt()
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    out = []
    for fmt in formats:
        p = stem.with_name(f"{stem.name}.{fmt}")
        fig.savefig(p, dpi=dpi, bbox_inches="tight")
        out.append(p)
    plt.close(fig)
    return out


def _boxplot(ax: Any, data: list[list[float]], labels: list[str], hatches: list[str]) -> None:
    data = [d if d else [float("nan")] for d in data]
    bp = ax.boxplot(data, patch_artist=True, showfliers=False, widths=0.6)
    ax.set_xticks(range(1, len(labels) + 1), labels)
    for patch, hatch, gray in zip(bp["boxes"], hatches, GRAYS, strict=False):
        patch.set_facecolor(gray if gray != "0.0" else "0.85")
        patch.set_alpha(0.6)
        patch.set_hatch(hatch)
    for med in bp["medians"]:
        med.set_color("black")


def _default_proxy(result: dict[str, Any]) -> str | None:
    final = result.get("final", result if "stats" in result else None)
    epochs = result.get("epochs") or []
    src = final or (epochs[0] if epochs else None)
    return (src.get("proxies") or [None])[0] if src else None


def shared_ylims(results: Sequence[dict[str, Any]], proxy: str | None = None,
                 pad: float = 1.25) -> dict[str, tuple[float, float]]:
    """One (log-scale) y range per MSE metric covering every consistency result given, for figures that compare.

    Covers the per-example values (the box plots) and the epoch means (the trends) of each
    result's ``proxy`` (default: its first), widened by the factor ``pad`` on both ends.
    Metrics with no positive finite value get no entry.
    """
    out = {}
    for m in METRIC_LABEL:
        vals: list[float] = []
        for res in results:
            px = proxy or _default_proxy(res)
            final = res.get("final", res if "stats" in res else None)
            if final is not None and px in (final.get("values") or {}):
                vals += final["values"][px].get(m, [])
            for e in res.get("epochs") or []:
                for g in ("defended", "failed"):
                    vals.append(((e.get("stats") or {}).get(px, {}).get(g, {}).get(m) or {}).get("mean"))
        ok = [float(v) for v in vals if v is not None and math.isfinite(float(v)) and float(v) > 0]
        if ok:
            out[m] = (min(ok) / pad, max(ok) * pad)
    return out


def consistency_figure(result: dict[str, Any], stem: str | Path, proxy: str | None = None,
                       title: str | None = None, formats: Sequence[str] = ("png", "pdf"),
                       ylims: dict[str, tuple[float, float]] | None = None) -> list[Path]:
    """Save :func:`make_consistency_figure` as ``<stem>.<fmt>``; return the paths."""
    return save_figure(make_consistency_figure(result, proxy, title, ylims), stem, formats)


def make_consistency_figure(result: dict[str, Any], proxy: str | None = None, title: str | None = None,
                            ylims: dict[str, tuple[float, float]] | None = None) -> Any:
    """Per-group distributions of the three MSEs (top row) and, for a run, their trend over epochs.

    ``result`` is the output of ``consistency_of_checkpoint`` (with per-example
    ``values``) or of ``consistency_of_run`` (``final`` + ``epochs``). ``ylims`` (metric ->
    ``(low, high)``, e.g. :func:`shared_ylims` of several runs) fixes each metric's y range,
    so the figures of several runs compare at a glance.
    """
    plt = _plt()
    final = result.get("final", result if "stats" in result else None)
    epochs = result.get("epochs") or []
    if final is None and not epochs:
        raise InputError("nothing to plot: the consistency result has neither a final checkpoint nor epochs")
    proxy = proxy or (final or epochs[0])["proxies"][0]
    metrics = list(METRIC_LABEL)
    rows = (1 if final is not None and "values" in final else 0) + (1 if epochs else 0)
    fig, axes = plt.subplots(rows, 3, figsize=(11, 3.3 * rows), squeeze=False)
    r = 0
    if final is not None and "values" in final:
        flags = final["defended"]
        for j, m in enumerate(metrics):
            vals = final["values"][proxy][m]
            groups = [[v for v, d in zip(vals, flags, strict=True) if d],
                      [v for v, d in zip(vals, flags, strict=True) if not d]]
            ax = axes[r][j]
            _boxplot(ax, groups, [f"defended\n(n={len(groups[0])})", f"failed\n(n={len(groups[1])})"],
                     [GROUP_STYLE["defended"]["hatch"], GROUP_STYLE["failed"]["hatch"]])
            ax.set_yscale("log")
            ax.set_title(METRIC_LABEL[m], fontsize=9)
        axes[r][0].set_ylabel(f"{proxy}, epoch {final.get('epoch')}")
        r += 1
    if epochs:
        xs = [e["epoch"] for e in epochs]
        for j, m in enumerate(metrics):
            ax = axes[r][j]
            for g in ("defended", "failed"):
                st = GROUP_STYLE[g]
                ys = [e["stats"][proxy][g][m]["mean"] for e in epochs]
                ys = [float("nan") if y is None else y for y in ys]
                ax.plot(xs, ys, ls=st["ls"], marker=st["marker"], color=st["color"], label=g)
            ax.set_xlabel("epoch")
            ax.set_yscale("log")
            _integer_ticks(ax)
            ax.set_title(f"mean {METRIC_LABEL[m]}", fontsize=9)
        axes[r][0].legend(fontsize=8)
        axes[r][0].set_ylabel(f"{proxy}: group mean")
    if ylims:
        for row in axes:
            for ax, m in zip(row, metrics, strict=True):
                if m in ylims:
                    ax.set_ylim(*ylims[m])
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def consistency_comparison_figure(results: Sequence[tuple[str, dict[str, Any]]], stem: str | Path,
                                  proxy: str = "logits", metric: str = "clean_adv",
                                  formats: Sequence[str] = ("png", "pdf")) -> list[Path]:
    """Trend over epochs of one metric, defended vs failed, one panel per run (``(label, run result)``)."""
    plt = _plt()
    if not results:
        raise InputError("no consistency results to plot")
    fig, axes = plt.subplots(1, len(results), figsize=(4.2 * len(results), 3.2), squeeze=False, sharey=True)
    for ax, (label, res) in zip(axes[0], results, strict=True):
        eps = res.get("epochs") or []
        xs = [e["epoch"] for e in eps]
        for g in ("defended", "failed"):
            st = GROUP_STYLE[g]
            ys = [e["stats"][proxy][g][metric]["mean"] for e in eps]
            ax.plot(xs, [float("nan") if y is None else y for y in ys], ls=st["ls"], marker=st["marker"],
                    color=st["color"], label=g)
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("epoch")
        _integer_ticks(ax)
        ax.set_yscale("log")
    axes[0][0].set_ylabel(f"mean {METRIC_LABEL[metric]} ({proxy})", fontsize=8)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, stem, formats)


def smoothness_figure(results: Sequence[dict[str, Any]], stem: str | Path,
                      formats: Sequence[str] = ("png", "pdf")) -> list[Path]:
    """Side by side per checkpoint: curvature ‖4s‖, Jacobian drift vs rate a (median), ‖J(x)‖₂."""
    plt = _plt()
    if not results:
        raise InputError("no smoothness results to plot")
    labels = [r["label"] for r in results]
    hatches = ["", "///", "...", "xx", "\\\\"]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.4))
    _boxplot(axes[0], [r["values"]["curvature_fd"] for r in results], labels, hatches)
    axes[0].set_yscale("log")
    axes[0].set_title("curvature ‖h(x+Δ) − 2h(x+Δ/2) + h(x)‖ × 4", fontsize=9)
    for i, r in enumerate(results):
        alphas = [float(a) for a in r["drift"]]
        med = [r["drift"][a]["median"] for a in r["drift"]]
        axes[1].plot(alphas, med, marker=MARKERS[i % len(MARKERS)], ls=LINESTYLES[i % len(LINESTYLES)],
                     color=GRAYS[i % len(GRAYS)], label=r["label"])
    axes[1].set_xlabel("rate a")
    axes[1].set_title("median ‖J(x + aΔ) − J(x)‖_F", fontsize=9)
    axes[1].legend(fontsize=8)
    _boxplot(axes[2], [r["values"]["spectral_norm"] for r in results], labels, hatches)
    axes[2].set_title("‖J(x)‖₂ (power iteration)", fontsize=9)
    fig.tight_layout()
    return save_figure(fig, stem, formats)


def plane_limits(values: Sequence[float], errors: Sequence[float | None], min_span: float = PLANE_MIN_SPAN,
                 n_se: float = PLANE_MIN_SE) -> tuple[float, float]:
    """Axis limits of the accuracy-robustness plane: never zoomed in on noise.

    The limits hold every value with its error bar (``value ± error``) plus a 10 % margin,
    and span at least ``max(min_span, n_se·SE)`` points (``SE`` the largest error on the
    axis; 10 points and 6 SE by default), centred on the data, so a difference of a few
    images never fills the axis. Shifted (not shrunk) to stay inside [0, 100] where the span allows.
    """
    errs = [e or 0.0 for e in errors]
    lo = min(v - e for v, e in zip(values, errs, strict=True))
    hi = max(v + e for v, e in zip(values, errs, strict=True))
    span = max((hi - lo) * 1.1, min_span, n_se * max(errs, default=0.0))
    centre = (lo + hi) / 2
    lo, hi = centre - span / 2, centre + span / 2
    if lo < 0:
        lo, hi = 0.0, hi - lo
    if hi > 100:
        lo, hi = max(0.0, lo - (hi - 100)), 100.0
    return lo, hi


def plane_figure(runs: Sequence[Any], stem: str | Path, which: str = "best",
                 formats: Sequence[str] = ("png", "pdf")) -> list[Path]:
    """Save :func:`make_plane_figure` as ``<stem>.<fmt>``; return the paths."""
    return save_figure(make_plane_figure(runs, which), stem, formats)


def make_plane_figure(runs: Sequence[Any], which: str = "best") -> Any:
    """The accuracy-robustness plane: Clean (x) vs AA (y; PGD-20 when a run has no AA), one point per run.

    ``runs`` are :class:`rpat.reports.collect.RunRecord` (a seed group is one point);
    an arrow goes from each baseline to the RPAT run with the same dataset, model,
    method, norm and seed. Each point has ±1 error bars on both axes, the ``±`` of the
    tables (:meth:`~rpat.reports.collect.RunRecord.error`: the standard error on the
    images, the sd over seeds for a seed group; none where unknown), and each axis spans
    at least 10 points or 6 SE (:func:`plane_limits`), whichever is larger.
    """
    plt = _plt()
    pts = [(r, r.results.get(which)) for r in runs]
    pts = [(r, d) for r, d in pts if d and d.get("clean") is not None]
    if not pts:
        raise InputError(f"no run has {which} results to place on the accuracy-robustness plane")
    use_aa = all(d.get("aa") is not None for _, d in pts)
    key = "aa" if use_aa else "pgd"
    pts = [(r, d) for r, d in pts if d.get(key) is not None]
    if not pts:
        raise InputError(f"no run has {which} Clean and PGD-20 results to place on the accuracy-robustness plane")
    fig, ax = plt.subplots(figsize=(5.2, 4.2))
    xerr = [_error(r, which, "clean") for r, _ in pts]
    yerr = [_error(r, which, key) for r, _ in pts]
    for i, (r, d) in enumerate(pts):
        if xerr[i] is not None or yerr[i] is not None:
            ax.errorbar(d["clean"], d[key], xerr=xerr[i], yerr=yerr[i], fmt="none", ecolor="0.35", elinewidth=1,
                        capsize=3, zorder=2)
        ax.scatter(d["clean"], d[key], marker=MARKERS[i % len(MARKERS)], s=55,
                   facecolor="white" if not r.rpat else "0.2", edgecolor="black", zorder=3, label=r.label)
    base = {r.pair_key: d for r, d in pts if not r.rpat}
    for r, d in pts:
        b = base.get(r.pair_key) if r.rpat else None
        if b is not None:
            ax.annotate("", xy=(d["clean"], d[key]), xytext=(b["clean"], b[key]),
                        arrowprops={"arrowstyle": "->", "color": "0.3", "lw": 1.2})
    ax.set_xlim(*plane_limits([d["clean"] for _, d in pts], xerr))
    ax.set_ylim(*plane_limits([d[key] for _, d in pts], yerr))
    ax.set_xlabel(f"Clean accuracy (%), {which}")
    ax.set_ylabel(f"{'AutoAttack' if use_aa else 'PGD-20'} accuracy (%), {which}")
    grouped = any(getattr(r, "seeds", ()) for r, _ in pts)
    bars = "error bars: ±1 SE" + (" (sd over seeds for seed groups)" if grouped else "")
    ax.set_title(f"accuracy-robustness plane (filled: + RPAT; {bars})", fontsize=8)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    return fig


def _error(run: Any, which: str, metric: str) -> float | None:
    err = getattr(run, "error", None)
    return err(which, metric) if callable(err) else None


def curves_figure(runs: Sequence[Any], stem: str | Path, formats: Sequence[str] = ("png", "pdf")) -> list[Path]:
    """Training curves from ``metrics.jsonl``: held-out Clean, held-out PGD-20 and the training loss per epoch."""
    plt = _plt()
    runs = [r for r in runs if r.metrics]
    if not runs:
        raise InputError("no run has a metrics.jsonl training log to plot")
    panels = (("held_out_clean", "held-out Clean (%)"), ("held_out_pgd", "held-out PGD-20 (%)"),
              ("train_loss", "training loss (total, incl. any RPAT term)"))
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.4))
    for i, r in enumerate(runs):
        style = {"marker": MARKERS[i % len(MARKERS)], "ls": LINESTYLES[i % len(LINESTYLES)],
                 "color": GRAYS[i % len(GRAYS)], "markersize": 4, "label": r.label}
        for ax, (k, _) in zip(axes, panels, strict=True):
            rows = [m for m in r.metrics if m.get(k) is not None]
            ax.plot([m["epoch"] + 1 for m in rows], [m[k] for m in rows], **style)
    for ax, (_, title) in zip(axes, panels, strict=True):
        ax.set_xlabel("epoch")
        _integer_ticks(ax)
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    return save_figure(fig, stem, formats)
