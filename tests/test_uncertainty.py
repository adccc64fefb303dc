"""Every number honest: standard errors in every table, bold only beyond noise, one kind of source per row,
error bars and unzoomed axes on the plane, shared consistency ranges, and a report without matplotlib."""

from __future__ import annotations

import builtins
import csv
import io
import json
import math
from pathlib import Path
from typing import Any

import pytest
import yaml

from rpat.errors import InputError
from rpat.evaluation import format_table
from rpat.evaluation.metrics import accuracy_se, clearly_best, mean_se, seeds_mean_sd, seeds_noise
from rpat.reports import build, build_report, columns_for, csv_table, latex_table, load_runs, markdown_table
from rpat.reports.collect import group_seeds
from rpat.reports.sweep_table import to_csv, to_markdown


def _run(root: Path, name: str, *, method: str = "pgd_at", rpat: bool = False, seed: int = 0,
         best: dict[str, float] | None = None, final: dict[str, float] | None = None, n: int | None = 1000,
         held_out: int | None = None, log: bool = True) -> Path:
    """A run directory; ``best``/``final`` become eval JSONs on ``n`` images (None: no eval for it)."""
    run = root / name
    run.mkdir(parents=True)
    cfg = {"data": {"dataset": "cifar10"}, "model": {"arch": "resnet18"}, "attack": {"norm": "linf"},
           "method": {"name": method}, "rpat": {"enabled": rpat}, "seed": seed}
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    if held_out is not None:
        (run / "meta.json").write_text(json.dumps({"held_out_images": held_out,
                                                   "selection": f"test: the first {held_out} test images"}))
    if log:  # held-out Clean 40/50/60/70, PGD 20/25/30/35: best and last epoch are epoch 4
        rows = [{"epoch": e, "train_loss": 2.0 - 0.3 * e, "held_out_clean": 40.0 + 10 * e,
                 "held_out_pgd": 20.0 + 5 * e} for e in range(4)]
        (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    for which, d in (("best", best), ("final", final)):
        if d is not None:
            rep: dict[str, Any] = {**d, "checkpoint": f"{which}.pt", "dataset": "cifar10"}
            if "aa" in d:
                rep.update(mean=(d["clean"] + d["aa"]) / 2, nrr=2 * d["clean"] * d["aa"] / (d["clean"] + d["aa"]))
            if n is not None:
                rep["n_examples"] = n
            (run / f"eval_{which}.json").write_text(json.dumps(rep))
    return run


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


# ---- 1. the standard error, in one place -------------------------------------------------------------
def test_accuracy_se_matches_a_hand_computation():
    # 72.30 % of 1000 images: p(1-p) = 0.723 * 0.277 = 0.200271; /1000 -> 2.00271e-4; sqrt -> 0.0141517
    assert accuracy_se(72.3, 1000) == pytest.approx(1.41517, abs=1e-5)
    assert f"{accuracy_se(72.3, 1000):.2f}" == "1.42"
    assert accuracy_se(50.0, 100) == pytest.approx(5.0)  # 100 * sqrt(0.25 / 100)
    assert accuracy_se(0.0, 10) == 0.0 and accuracy_se(100.0, 10) == 0.0
    for bad_n in (0, -3, 2.5, True):
        with pytest.raises(InputError):
            accuracy_se(50.0, bad_n)  # type: ignore[arg-type]
    with pytest.raises(InputError):
        accuracy_se(101.0, 10)


def test_mean_se_is_the_conservative_bound_and_seed_spread():
    assert mean_se(1.0, 3.0) == 2.0
    # the bound holds for any correlation: sd((X+Y)/2) = sqrt(a² + b² + 2ρab)/2 <= (a + b)/2
    for rho in (-1.0, 0.0, 0.5, 1.0):
        assert math.sqrt(1 + 9 + 2 * rho * 3) / 2 <= mean_se(1.0, 3.0) + 1e-12
    assert seeds_mean_sd([70.0, 72.0, 74.0]) == (72.0, 2.0)
    assert seeds_noise(2.0, 4, 1.5) == pytest.approx(math.sqrt(1.0 + 2.25))
    with pytest.raises(InputError):
        seeds_mean_sd([70.0])


def test_format_table_shows_standard_errors():
    rows = [("best", {"clean": 72.3, "pgd": 50.0, "aa": 40.0, "mean": 56.15, "nrr": 51.5, "pgd_steps": 20,
                      "n_examples": 1000}),
            ("unknown n", {"clean": 72.3, "pgd": 50.0, "aa": None, "mean": None, "nrr": None, "pgd_steps": 20})]
    lines = format_table(rows).splitlines()
    assert len({len(line) for line in lines}) == 1  # still aligned
    se_c, se_aa = accuracy_se(72.3, 1000), accuracy_se(40.0, 1000)
    assert _cells(lines[2]) == ["best", "72.30 ± 1.42", f"50.00 ± {accuracy_se(50.0, 1000):.2f}",
                                f"40.00 ± {se_aa:.2f}", f"56.15 ± {(se_c + se_aa) / 2:.2f}", "51.50"]
    assert _cells(lines[3]) == ["unknown n", "72.30", "50.00", "-", "-", "-"]


def test_sweep_table_has_se_columns_and_plus_minus(tmp_path):
    rows = [{"run": "a", "setting": "s", "method": "PGD-AT", "best selected on": None, "test images": "100",
             "Clean (best)": 72.0, "Clean (best) SE": accuracy_se(72.0, 100), "NRR (best)": 50.0}]
    md = to_markdown(rows)
    assert "| 72.00 ± 4.49 |" in md and "| 50.00 |" in md
    parsed = list(csv.DictReader(io.StringIO(to_csv(rows))))
    header = to_csv(rows).splitlines()[0].split(",")
    assert header[header.index("Clean (best)") + 1] == "Clean (best) SE" and "NRR (best) SE" not in header
    assert float(parsed[0]["Clean (best)"]) == 72.0 and float(parsed[0]["Clean (best) SE"]) == pytest.approx(4.49, 0.01)


def test_sweep_gather_records_the_standard_errors(tmp_path):
    from rpat.config import build_config
    from rpat.reports.sweep_table import gather

    d = tmp_path / "r"
    d.mkdir()
    for which in ("best", "final"):
        (d / f"eval_{which}.json").write_text(json.dumps({"clean": 80.0, "pgd": 50.0, "aa": 40.0, "mean": 60.0,
                                                          "nrr": 53.3, "n_examples": 400}))
    row = gather([("r", build_config("digits_demo", None, []))], tmp_path)[0]
    assert row["Clean (best) SE"] == pytest.approx(2.0)  # 100 * sqrt(0.8 * 0.2 / 400)
    assert row["Mean (final) SE"] == pytest.approx((2.0 + accuracy_se(40.0, 400)) / 2)
    assert "NRR (best) SE" not in row
    assert "| 80.00 ± 2.00 |" in to_markdown([row])


# ---- 2. bold only beyond noise ----------------------------------------------------------------------
def test_clearly_best_rule():
    assert clearly_best([72.0, 71.0], [accuracy_se(72.0, 100), accuracy_se(71.0, 100)]) is None
    assert clearly_best([50.0, 90.0], [accuracy_se(50.0, 1000), accuracy_se(90.0, 1000)]) == 1
    assert clearly_best([90.0, 90.0], [0.1, 0.1]) is None  # a tie
    assert clearly_best([90.0, None], [0.1, None]) is None  # one value
    assert clearly_best([90.0, 50.0], [None, 1.0]) is None  # unknown noise never wins
    # just past the threshold 2·sqrt(1² + 1²) = 2.83
    assert clearly_best([52.9, 50.0], [1.0, 1.0]) == 0 and clearly_best([52.8, 50.0], [1.0, 1.0]) is None


@pytest.mark.parametrize("a, b, n, bold", [(72.0, 71.0, 100, False), (90.0, 50.0, 1000, True)])
def test_report_table_bold_only_beyond_noise(tmp_path, a, b, n, bold):
    _run(tmp_path, "a", best={"clean": a}, final={"clean": a}, n=n)
    _run(tmp_path, "b", method="trades", best={"clean": b}, final={"clean": b}, n=n)
    runs = load_runs([tmp_path])
    cols = columns_for(("best",), ("clean",))
    md = markdown_table(runs, cols)
    lines = md.splitlines()
    cell = f"{a:.2f} ± {accuracy_se(a, n):.2f}"
    assert _cells(lines[2])[1] == (f"**{cell}**" if bold else cell)
    assert _cells(lines[3])[1] == f"{b:.2f} ± {accuracy_se(b, n):.2f}"
    assert ("**" in md) == bold and (r"\textbf" in latex_table(runs, cols)) == bold
    assert any(line.startswith("± is the standard error") for line in lines)  # the note says what ± is
    tex = latex_table(runs, cols)
    assert rf"{a:.2f} $\pm$ {accuracy_se(a, n):.2f}" in tex


def test_report_csv_keeps_standard_errors_in_their_own_columns(tmp_path):
    _run(tmp_path, "a", best={"clean": 80.0, "pgd": 50.0, "aa": 40.0}, final=None, n=400, log=False)
    rows = list(csv.DictReader(io.StringIO(csv_table(load_runs([tmp_path]), columns_for(("best",))))))
    r = rows[0]
    assert r["clean_best"] == "80.00" and r["clean_best_se"] == "2.00"
    assert r["mean_best_se"] == f"{(2.0 + accuracy_se(40.0, 400)) / 2:.2f}"
    assert "nrr_best_se" not in r and "±" not in "".join(v for k, v in r.items() if not k.startswith("source"))


# ---- seeds ------------------------------------------------------------------------------------------
def test_runs_differing_only_in_seed_share_a_row_with_mean_and_sd(tmp_path):
    for seed, clean in ((0, 70.0), (1, 72.0), (2, 74.0)):
        _run(tmp_path / "runs", f"pgd_s{seed}", seed=seed, best={"clean": clean, "pgd": 40.0, "aa": 30.0},
             final={"clean": clean, "pgd": 40.0, "aa": 30.0})
    _run(tmp_path / "runs", "trades", method="trades", best={"clean": 60.0, "pgd": 45.0, "aa": 35.0},
         final={"clean": 60.0, "pgd": 45.0, "aa": 35.0})
    out = tmp_path / "rep"
    build_report([tmp_path / "runs"], out, figures=False, say=lambda m: None)
    md = (out / "table.md").read_text()
    lines = md.splitlines()
    labels = [_cells(line)[0] for line in lines[2:4]]
    assert labels == ["PGD-AT (3 seeds)", "TRADES"]
    grouped = _cells(lines[2])
    # mean ± sd over seeds 70, 72, 74; bold: 12 points over TRADES beats 2·sqrt(noise² + SE²), the group's
    # noise sqrt(sd²/3 + SE_images²) = 1.83, TRADES' SE 1.55
    assert grouped[1] == "**72.00 ± 2.00**"
    assert grouped[5] == "30.00 ± 0.00"  # AA equal over seeds
    assert "mean ± sd over seeds 0, 1, 2" in grouped[-2]
    assert _cells(lines[3])[1] == f"60.00 ± {accuracy_se(60.0, 1000):.2f}"  # the single-seed row as before
    assert "(k seeds): the mean ± the standard deviation over the seeds." in md
    rows = list(csv.DictReader(io.StringIO((out / "table.csv").read_text())))
    assert rows[0]["seeds"] == "3" and rows[0]["clean_best_sd"] == "2.00" and rows[1]["seeds"] == "1"
    assert rows[0]["run_dir"].count(";") == 2
    # sources.json still lists each run
    assert len(json.loads((out / "sources.json").read_text())) == 4


def test_group_seeds_leaves_other_differences_apart(tmp_path):
    _run(tmp_path, "a0", seed=0, best={"clean": 70.0})
    _run(tmp_path, "a1", seed=1, best={"clean": 72.0})
    _run(tmp_path, "b0", seed=0, rpat=True, best={"clean": 71.0})
    runs = group_seeds(load_runs([tmp_path]))
    assert [r.label for r in runs] == ["PGD-AT (2 seeds)", "PGD-AT + RPAT"]
    assert runs[0].seeds == (0, 1) and runs[0].results["best"]["clean"] == 71.0
    assert runs[0].spread["best"]["clean"] == pytest.approx(math.sqrt(2.0))
    assert runs[1].seeds == () and runs[0].pair_key != runs[1].pair_key


# ---- 4. one kind of source per row ------------------------------------------------------------------
def test_mixed_sources_mark_the_training_log_cells(tmp_path):
    # best: a 300-image evaluation; final: only the 500-image held-out log (epoch 4: Clean 70, PGD 35)
    _run(tmp_path, "mixed", best={"clean": 80.0, "pgd": 40.0, "aa": 30.0}, final=None, n=300, held_out=500)
    _run(tmp_path, "evals", method="trades", best={"clean": 75.0, "pgd": 41.0, "aa": 31.0},
         final={"clean": 76.0, "pgd": 42.0, "aa": 32.0}, n=300, held_out=500)
    runs = load_runs([tmp_path])
    md = markdown_table(runs, columns_for(("best", "final"), ("clean", "pgd", "aa")))
    lines = md.splitlines()
    evals_row, mixed_row = _cells(lines[2]), _cells(lines[3])
    assert mixed_row[0] == "PGD-AT"
    assert mixed_row[1] == f"80.00 ± {accuracy_se(80.0, 300):.2f}"  # the evaluation: no mark
    assert mixed_row[2] == f"70.00 ± {accuracy_se(70.0, 500):.2f}†"  # the log, on its 500 held-out images
    assert mixed_row[4] == f"35.00 ± {accuracy_se(35.0, 500):.2f}†" and mixed_row[6] == "-"
    assert "†" not in "".join(evals_row)
    assert ("† held-out numbers from the training log (first 500 test images), not an evaluation report."
            in lines)
    assert r"$^\dagger$" in latex_table(runs, columns_for(("best", "final"), ("clean",)))
    # one checkpoint shown: nothing mixes within a row, nothing marked
    assert "†" not in markdown_table(runs, columns_for(("final",), ("clean",)))


def test_a_row_all_from_the_training_log_is_not_marked(tmp_path):
    _run(tmp_path, "log", best=None, final=None, held_out=500)
    md = markdown_table(load_runs([tmp_path]), columns_for(("best", "final"), ("clean",)))
    assert "†" not in md and "70.00 ± 2.05" in md  # 100 * sqrt(0.7 * 0.3 / 500) = 2.049


# ---- 3. figures -------------------------------------------------------------------------------------
def test_plane_limits_never_zoom_into_noise():
    from rpat.reports.figures import plane_limits

    lo, hi = plane_limits([72.0, 72.6], [1.42, 1.41])  # a 6-image difference on 1000 images
    assert hi - lo >= 10.0 and lo < 72.0 - 1.42 and hi > 72.6 + 1.41
    lo, hi = plane_limits([50.0, 51.0], [3.0, 3.0])  # 6 SE = 18 points > 10
    assert hi - lo == pytest.approx(18.0)
    lo, hi = plane_limits([20.0, 80.0], [1.0, 1.0])  # wide data: all of it, with a margin
    assert lo < 19.0 and hi > 81.0
    lo, hi = plane_limits([99.0], [None])  # shifted inside [0, 100]
    assert (lo, hi) == (90.0, 100.0)


def test_plane_figure_has_error_bars_and_wide_axes(tmp_path):
    pytest.importorskip("matplotlib")
    from matplotlib.container import ErrorbarContainer

    from rpat.reports.figures import make_plane_figure, plane_figure

    _run(tmp_path / "r", "base", best={"clean": 72.0, "pgd": 40.0, "aa": 35.0}, n=1000)
    _run(tmp_path / "r", "rpat", rpat=True, best={"clean": 72.6, "pgd": 40.5, "aa": 35.6}, n=1000)
    runs = load_runs([tmp_path / "r"])
    fig = make_plane_figure(runs, "best")
    try:
        ax = fig.axes[0]
        (x0, x1), (y0, y1) = ax.get_xlim(), ax.get_ylim()
        assert x1 - x0 >= max(10.0, 6 * accuracy_se(72.0, 1000)) - 1e-9 and y1 - y0 >= 10.0 - 1e-9
        bars = [c for c in ax.containers if isinstance(c, ErrorbarContainer)]
        assert len(bars) == 2 and all(c.has_xerr and c.has_yerr for c in bars)
        # the bars are ±1 SE: the x bar of the first point runs 72 ± SE
        seg = bars[0].lines[2][0].get_segments()[0]
        assert [p[0] for p in seg] == pytest.approx([72.0 - accuracy_se(72.0, 1000), 72.0 + accuracy_se(72.0, 1000)])
    finally:
        import matplotlib.pyplot as plt

        plt.close(fig)
    paths = plane_figure(runs, tmp_path / "plane", formats=("png",))
    assert paths[0].read_bytes()[:4] == b"\x89PNG"


def _consistency(scale: float) -> dict[str, Any]:
    ms = ("clean_adv", "clean_mid", "mid_adv")
    return {"final": {"epoch": 2, "proxies": ["logits"], "defended": [True, False, True, False],
                      "values": {"logits": {m: [0.5 * scale, 0.1 * scale, 0.7 * scale, 0.2 * scale] for m in ms}},
                      "stats": {}},
            "epochs": [{"epoch": e, "proxies": ["logits"],
                        "stats": {"logits": {g: {m: {"mean": v * scale} for m in ms}
                                             for g, v in (("defended", 0.5 + e), ("failed", 0.1 + e))}}}
                       for e in (1, 2)]}


def test_consistency_figures_of_several_runs_share_one_y_range(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt

    from rpat.reports.figures import make_consistency_figure, shared_ylims

    small, large = _consistency(1.0), _consistency(100.0)
    ylims = shared_ylims([small, large])
    lo, hi = ylims["clean_adv"]
    assert lo <= 0.1 and hi >= 250.0  # covers both runs' values and epoch means
    figs = [make_consistency_figure(r, ylims=ylims) for r in (small, large)]
    try:
        limits = [[ax.get_ylim() for ax in f.axes] for f in figs]
        assert limits[0] == limits[1]  # every panel of one run has the other run's range
        assert limits[0][0] == pytest.approx(ylims["clean_adv"])
    finally:
        for f in figs:
            plt.close(f)
    # build_report hands both figures the same ranges
    seen: list[Any] = []
    real = build.consistency_figure
    monkeypatch.setattr(build, "consistency_figure", lambda res, stem, **kw: seen.append(kw["ylims"]) or
                        real(res, stem, **kw))
    files = []
    for name, res in (("a", small), ("b", large)):
        files.append(tmp_path / f"consistency_{name}.json")
        files[-1].write_text(json.dumps(res))
    _run(tmp_path / "runs", "r", best={"clean": 70.0, "pgd": 40.0, "aa": 30.0})
    written = build_report([tmp_path / "runs"], tmp_path / "rep", consistency=files, formats=("png",))
    assert seen == [ylims, ylims]
    assert {"consistency_a.png", "consistency_b.png", "consistency_trend.png"} <= {p.name for p in written}


# ---- 5. a report without matplotlib -----------------------------------------------------------------
def _no_matplotlib(monkeypatch: pytest.MonkeyPatch) -> None:
    real = builtins.__import__

    def fake(name: str, *args: Any, **kwargs: Any) -> Any:
        if name == "matplotlib" or name.startswith("matplotlib."):
            raise ImportError("No module named 'matplotlib'")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake)


def test_report_without_matplotlib_writes_tables_and_says_figures_skipped(tmp_path, monkeypatch, capsys):
    _run(tmp_path / "runs", "r", best={"clean": 70.0, "pgd": 40.0, "aa": 30.0})
    _no_matplotlib(monkeypatch)
    said: list[str] = []
    written = build_report([tmp_path / "runs"], tmp_path / "rep", say=said.append)
    assert said == ["figures skipped: matplotlib is not installed (pip install 'rpat[plots]')"]
    assert {p.name for p in written} == {"table.md", "table.csv", "table.tex", "sources.json"}
    assert all((tmp_path / "rep" / n).is_file() for n in ("table.md", "table.csv", "table.tex"))
    assert not list((tmp_path / "rep").glob("*.png"))
    # the command: exit 0, the tables printed, the note on stderr
    from rpat.cli import main

    assert main(["report", str(tmp_path / "runs"), "--out", str(tmp_path / "rep2")]) == 0
    captured = capsys.readouterr()
    assert "| PGD-AT |" in captured.out and "figures skipped: matplotlib is not installed" in captured.err
    assert (tmp_path / "rep2" / "table.md").is_file()
