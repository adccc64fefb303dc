"""rpat report: table values, best marking, best & final columns, and figures from synthetic run dirs."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest
import yaml

from rpat.cli import main
from rpat.errors import InputError
from rpat.reports import build_report, columns_for, csv_table, latex_table, load_runs, markdown_table
from rpat.reports.figures import consistency_figure, smoothness_figure

pytest.importorskip("matplotlib")

# (dir, method, rpat, seed, best eval, final eval) -- accuracies in percent
RUNS = [
    ("pgdat", "pgd_at", False, 0, {"clean": 80.0, "pgd": 50.0, "aa": 45.0}, {"clean": 82.0, "pgd": 48.0, "aa": 44.0}),
    ("pgdat_rpat", "pgd_at", True, 0, {"clean": 81.5, "pgd": 51.0, "aa": 46.25}, {"clean": 83.0, "pgd": 47.0,
                                                                                 "aa": 44.5}),
    ("trades", "trades", False, 0, {"clean": 78.0, "pgd": 52.5, "aa": 47.0}, {"clean": 79.0, "pgd": 52.0,
                                                                             "aa": 46.0}),
]


def _write_run(root: Path, name: str, method: str, rpat: bool, seed: int, best: dict, final: dict,
               eval_style: str = "trainer") -> Path:
    run = root / name
    run.mkdir(parents=True)
    cfg = {"data": {"dataset": "cifar10"}, "model": {"arch": "resnet18"}, "attack": {"norm": "linf"},
           "method": {"name": method}, "rpat": {"enabled": rpat, "lam": 1.0, "alpha": 0.5}, "seed": seed}
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    lines = [{"epoch": e, "train_loss": 2.0 - 0.3 * e, "held_out_clean": 40.0 + 10 * e,
              "held_out_pgd": 20.0 + 5 * e - (8 if e == 3 else 0), "best": e < 3} for e in range(4)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    for which, d in (("best", best), ("final", final)):
        fname = f"eval_{which}.json" if eval_style == "trainer" else f"{which}.eval.json"
        (run / fname).write_text(json.dumps({"checkpoint": f"{which}.pt", **d, "mean": (d["clean"] + d["aa"]) / 2,
                                             "nrr": 2 * d["clean"] * d["aa"] / (d["clean"] + d["aa"])}))
    return run


@pytest.fixture
def runs_root(tmp_path: Path) -> Path:
    root = tmp_path / "runs"
    for i, r in enumerate(RUNS):
        _write_run(root, *r, eval_style="trainer" if i != 1 else "rpat-eval")
    return root


def test_table_values_and_best_marks(runs_root):
    runs = load_runs([runs_root])
    assert [r.label for r in runs] == ["PGD-AT", "PGD-AT + RPAT", "TRADES"]  # sorted dir names
    cols = columns_for(("best", "final"))
    md = markdown_table(runs, cols)
    lines = md.strip().splitlines()
    assert lines[0].startswith("| method | Clean (best) | Clean (final) | PGD-20 (best) | PGD-20 (final)")
    rpat_row = [c.strip() for c in lines[3].strip("|").split("|")]
    # column maxima: Clean best 81.5 and Clean final 83 (RPAT row); AA best 47 and AA final 46 (TRADES row),
    # yet none is bold: these evaluations do not say how many images they used, so their noise is unknown
    assert rpat_row[0] == "PGD-AT + RPAT"
    assert rpat_row[1] == "81.50" and rpat_row[2] == "83.00"
    assert rpat_row[5] == "46.25" and rpat_row[6] == "44.50"
    trades_row = [c.strip() for c in lines[4].strip("|").split("|")]
    assert trades_row[3] == "52.50" and trades_row[5] == "47.00" and trades_row[6] == "46.00"
    # Mean (best) of PGD-AT + RPAT = (81.5 + 46.25)/2 = 63.875 -> 63.88, and it is the best Mean (best)
    assert rpat_row[7] == "63.88"
    nrr = 2 * 81.5 * 46.25 / (81.5 + 46.25)
    assert rpat_row[9] == f"{nrr:.2f}"
    assert md.count("**") == 0  # no image counts, no standard errors: nothing is bold


def test_ties_are_all_marked_and_missing_values(tmp_path):
    root = tmp_path / "r"
    _write_run(root, "a", "pgd_at", False, 0, {"clean": 70.0, "pgd": 40.0, "aa": 30.0},
               {"clean": 70.0, "pgd": 40.0, "aa": 30.0})
    _write_run(root, "b", "pgd_at", True, 0, {"clean": 70.0, "pgd": 39.0, "aa": 31.0},
               {"clean": 69.0, "pgd": 40.0, "aa": 31.0})
    b = root / "b"
    for f in ("eval_best.json", "eval_final.json"):
        (b / f).unlink()  # falls back to the held-out log: Clean/PGD only, AA missing
    runs = load_runs([root / "a", b])
    assert runs[1].results["best"] == {"clean": 60.0, "pgd": 30.0, "aa": None, "mean": None, "nrr": None}
    assert runs[1].results["final"]["pgd"] == 27.0 and "epoch 4" in runs[1].sources["final"]
    md = markdown_table(runs, columns_for(("final",), ("clean", "pgd", "aa")))
    rows = md.strip().splitlines()[2:]
    # a tie marks both; missing is "-"; AA has one value only, so nothing is "best" there
    assert rows[0] == "| PGD-AT | 70.00 | 40.00 | 30.00 | eval_final.json |"
    assert rows[1] == "| PGD-AT + RPAT | 70.00 | 27.00 | - | training log, epoch 4, held-out images |"


def test_csv_and_latex(runs_root):
    runs = load_runs([runs_root])
    cols = columns_for(("best", "final"), ("clean", "aa"))
    rows = list(csv.reader(io.StringIO(csv_table(runs, cols))))
    assert rows[0] == ["method", "run_dir", "clean_best", "clean_best_se", "clean_final", "clean_final_se",
                       "aa_best", "aa_best_se", "aa_final", "aa_final_se", "source_best", "source_final"]
    assert rows[2][0] == "PGD-AT + RPAT" and rows[2][2:10] == ["81.50", "", "83.00", "", "46.25", "", "44.50", ""]
    assert rows[2][10:] == ["best.eval.json; best.pt selected on held-out images", "final.eval.json"]
    tex = latex_table(runs, cols, caption="CIFAR-10 & 50% <x>")
    assert r"\multicolumn{2}{c}{Clean} & \multicolumn{2}{c}{AA}" in tex
    assert r"PGD-AT + RPAT & 81.50 & 83.00 & 46.25 & 44.50 \\" in tex
    assert r"CIFAR-10 \& 50\% <x>" in tex and tex.count(r"\textbf") == 0
    assert r"Sources: PGD-AT (best): eval\_best.json" in tex


def test_build_report_writes_tables_and_figures(runs_root, tmp_path):
    cons = {"final": {"epoch": 2, "proxies": ["logits"], "defended": [True, False, True, False],
                      "values": {"logits": {m: [0.5, 0.1, 0.7, 0.2] for m in ("clean_adv", "clean_mid", "mid_adv")}},
                      "stats": {}},
            "epochs": [{"epoch": e, "proxies": ["logits"],
                        "stats": {"logits": {g: {m: {"mean": v} for m in ("clean_adv", "clean_mid", "mid_adv")}
                                             for g, v in (("defended", 0.5 + e), ("failed", 0.1 + e))}}}
                       for e in (1, 2)]}
    cfile, cfile2 = tmp_path / "cons.json", tmp_path / "cons2.json"
    cfile.write_text(json.dumps(cons))
    cfile2.write_text(json.dumps(cons))
    out = tmp_path / "report"
    written = build_report([runs_root], out, consistency=[cfile, cfile2])
    names = {p.name for p in written}
    for n in ("table.md", "table.csv", "table.tex", "plane.png", "plane.pdf", "curves.png", "curves.pdf",
              "consistency_cons.png", "consistency_cons.pdf", "consistency_trend.png", "consistency_trend.pdf"):
        assert n in names and (out / n).stat().st_size > 500, n
    assert (out / "plane.png").read_bytes()[:4] == b"\x89PNG" and (out / "plane.pdf").read_bytes()[:4] == b"%PDF"
    sources = json.loads((out / "sources.json").read_text())
    assert sources["PGD-AT + RPAT"]["best"] == "best.eval.json" and sources["TRADES"]["final"] == "eval_final.json"


def test_smoothness_figure_written(tmp_path):
    res = [{"label": name, "values": {"curvature_fd": [0.1, 0.2, 0.3], "spectral_norm": [1.0, 2.0, 1.5]},
            "drift": {"0.5": {"median": 0.1 * k}, "1": {"median": 0.2 * k}}} for k, name in ((1, "A"), (2, "B"))]
    paths = smoothness_figure(res, tmp_path / "s", formats=("png",))
    assert [p.name for p in paths] == ["s.png"] and paths[0].stat().st_size > 1000
    with pytest.raises(InputError):
        consistency_figure({}, tmp_path / "c")


def test_cli_report(runs_root, tmp_path, capsys):
    out = tmp_path / "rep"
    assert main(["report", str(runs_root / "pgdat"), str(runs_root / "pgdat_rpat"), "--out", str(out),
                 "--which", "final", "--formats", "png", "--labels", "base", "rpat"]) == 0
    text = capsys.readouterr().out
    assert "| base | 82.00 | 48.00 | 44.00 |" in text and "| rpat | 83.00 | 47.00 | 44.50 |" in text
    assert (out / "plane.png").exists() and not (out / "plane.pdf").exists()
    assert main(["report", str(tmp_path / "missing"), "--out", str(out)]) == 2
    assert "not found" in capsys.readouterr().err
    assert main(["report", str(runs_root), "--out", str(out), "--which", "last"]) == 2
    assert "unknown checkpoint 'last'" in capsys.readouterr().err


def test_table_names_each_cells_source_and_image_count(tmp_path):
    """A row mixing a training log's held-out numbers with rpat eval's says so in the table itself."""
    root = tmp_path / "r"
    a = _write_run(root, "a", "pgd_at", False, 0, {"clean": 70.0, "pgd": 40.0, "aa": 30.0},
                   {"clean": 71.0, "pgd": 41.0, "aa": 31.0}, eval_style="rpat-eval")
    (a / "best.eval.json").unlink()  # best: from the training log (1,000 test images); final: rpat eval (200)
    d = json.loads((a / "final.eval.json").read_text())
    (a / "final.eval.json").write_text(json.dumps({**d, "n_examples": 200, "dataset": "cifar10"}))
    (a / "meta.json").write_text(json.dumps({"held_out_images": 1000, "selection": "test: the first 1000 test images"}))
    b = _write_run(root, "b", "pgd_at", True, 0, {"clean": 72.0, "pgd": 42.0, "aa": 32.0},
                   {"clean": 73.0, "pgd": 43.0, "aa": 33.0})
    (b / "meta.json").write_text(json.dumps({"held_out_images": 500, "selection": "validation: 500 training images"}))
    md = markdown_table(load_runs([root]), columns_for(("best", "final"), ("clean",)))
    lines = md.strip().splitlines()
    assert lines[0] == "| method | Clean (best) | Clean (final) | source (best) | source (final) |"
    assert lines[2] == ("| PGD-AT | 60.00 ± 1.55† | 71.00 ± 3.21 | training log, epoch 3, first 1000 test images "
                        "| final.eval.json, 200 cifar10 test images |")
    assert lines[3] == ("| PGD-AT + RPAT | 72.00 | 73.00 | eval_best.json; best.pt selected on "
                        "500 validation images | eval_final.json |")


def test_a_single_row_is_never_bold(runs_root):
    runs = load_runs([runs_root])[:1]
    cols = columns_for(("best", "final"))
    assert "**" not in markdown_table(runs, cols) and r"\textbf" not in latex_table(runs, cols)
