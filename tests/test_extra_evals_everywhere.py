"""The extra evaluations beyond ``rpat eval``: ``--extra-evals`` of ``rpat train --eval`` and ``rpat sweep``,
their columns in the sweep table and in ``rpat report``, and the other AutoAttack versions kept out of AA."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from rpat.cli import main
from rpat.errors import InputError
from rpat.evaluation.extra import ExtraEvals, parse_extra_evals
from rpat.reports import columns_for, load_runs, markdown_table
from rpat.reports.collect import present_metrics

TINY = ["data.train_subset=64", "data.batch_size=32", "optim.epochs=1", "attack.steps=1", "eval.n_examples=16",
        "eval.steps=2", "device=cpu"]


def test_parse_extra_evals_items_and_errors(tmp_path):
    assert parse_extra_evals(None) == (ExtraEvals(), None)
    assert parse_extra_evals("") == (ExtraEvals(), None)
    evals, corr = parse_extra_evals("cw, noise ,transfer=a/b.pt,transfer_arch=small_cnn,corruptions=/data/CIFAR-10-C")
    assert evals == ExtraEvals(cw_steps=20, noise="uniform", transfer_from="a/b.pt", transfer_arch="small_cnn")
    assert corr == "/data/CIFAR-10-C"
    evals, _ = parse_extra_evals("cw=5,noise=gaussian:8/255,cw-art")
    assert (evals.cw_steps, evals.noise, evals.sigma, evals.cw_art) == (5, "gaussian", 8 / 255, True)
    for bad, msg in (("pgd", "unknown item 'pgd'"), ("cw=x", "whole number"), ("transfer", "needs a value"),
                     ("noise=laplace", "uniform or gaussian:SIGMA"), ("corruptions", "needs a value"),
                     ("cw_art=1", "takes no value"), ("cw=0", "--cw-steps must be >= 1")):
        with pytest.raises(InputError, match=msg):
            parse_extra_evals(bad)


def test_train_extra_evals_bad_input_is_one_line_before_training(tmp_path, capsys):
    run = tmp_path / "run"
    code = main(["train", "--preset", "digits_demo", "--run-dir", str(run), "--extra-evals", "cw", *TINY])
    err = capsys.readouterr().err
    assert code == 2 and "give --eval too" in err and err.count("\n") == 1 and not run.exists()
    code = main(["train", "--preset", "digits_demo", "--run-dir", str(run), "--eval", "--extra-evals",
                 f"transfer={tmp_path / 'missing.pt'}", *TINY])
    err = capsys.readouterr().err
    assert code == 2 and "missing.pt: no such file" in err and not run.exists()
    code = main(["train", "--preset", "digits_demo", "--run-dir", str(run), "--eval", "--extra-evals",
                 f"corruptions={tmp_path}", *TINY])
    assert code == 2 and not run.exists()


def test_train_eval_carries_the_extra_columns_into_its_reports_and_rpat_report(tmp_path, capsys):
    pytest.importorskip("sklearn")  # the 8x8 digits
    run = tmp_path / "run"
    code = main(["train", "--preset", "digits_demo", "--run-dir", str(run), "--eval", "--autoattack", "none",
                 "--n-examples", "16", "--extra-evals", "cw=2,noise", "--no-progress", *TINY])
    printed = capsys.readouterr().out
    assert code == 0
    head = next(ln for ln in printed.splitlines() if ln.startswith("| model"))
    assert "CW-2" in head and "Noise" in head
    for which in ("best", "final"):
        rep = json.loads((run / f"eval_{which}.json").read_text())
        assert 0 <= rep["cw"] <= 100 and 0 <= rep["noise"] <= 100 and rep["transfer"] is None
        assert rep["settings"]["extra"]["cw_steps"] == 2 and rep["n_examples"] == 16
    # rpat report: the columns are there because the run has them, each value with its standard error
    out = tmp_path / "report"
    assert main(["report", str(run), "--out", str(out), "--no-figures"]) == 0
    md = (out / "table.md").read_text()
    assert "CW-20 (best)" in md and "Noise (final)" in md and "Transfer" not in md
    assert "CW with 2 steps" in md  # the note says how CW ran (the column is labelled at 20 steps)
    capsys.readouterr()


def _report(d: Path, which: str, **values) -> None:
    base = {"clean": 80.0, "pgd": 50.0, "aa": None, "mean": None, "nrr": None, "n_examples": 100,
            "dataset": "cifar10", "extras": {}}
    base.update(values)
    (d / f"eval_{which}.json").write_text(json.dumps(base))


def _run(root: Path, name: str, method: str = "pgd_at") -> Path:
    d = root / name
    d.mkdir(parents=True)
    cfg = {"data": {"dataset": "cifar10"}, "model": {"arch": "resnet18"}, "method": {"name": method}}
    (d / "config.yaml").write_text(yaml.safe_dump(cfg))
    return d


def test_report_keeps_other_autoattack_versions_out_of_the_aa_column(tmp_path):
    root = tmp_path / "runs"
    std, quick, plus = _run(root, "a_std"), _run(root, "b_quick", "trades"), _run(root, "c_plus", "mart")
    for which in ("best", "final"):
        _report(std, which, aa=40.0, mean=60.0, nrr=53.33, extras={"aa_version": "standard"})
        _report(quick, which, aa=45.0, mean=62.5, nrr=57.6, extras={"aa_version": "apgd"}, cw=47.0)
        _report(plus, which, aa=39.0, extras={"aa_version": "plus"}, corruption_acc=70.0, mce=30.0,
                corruption_set="CIFAR-10-C", corruptions={f"c{i}": {} for i in range(15)}, corruption_images=10000)
    runs = load_runs([root])
    assert [r.results["best"]["aa"] for r in runs] == [40.0, None, None]
    assert runs[1].results["best"]["aa_apgd"] == 45.0 and runs[1].results["best"]["mean"] is None
    assert runs[2].results["best"]["aa_plus"] == 39.0
    metrics = present_metrics(runs)
    assert metrics == ["clean", "pgd", "aa", "mean", "nrr", "aa_apgd", "aa_plus", "cw", "corruption_acc", "mce"]
    md = markdown_table(runs, columns_for(("best",), metrics))
    head = [c.strip() for c in md.splitlines()[0].strip("|").split("|")]
    assert head[:11] == ["method", "Clean", "PGD-20", "AA", "Mean", "NRR", "AA(APGD)", "AA+", "CW-20",
                         "Corruptions", "mCE"]
    assert "15 corruptions x 5 severities x 10000 images" in md
    # CW's standard error is the binomial one on the report's 100 images
    assert f"47.00 ± {100 * np.sqrt(0.47 * 0.53 / 100):.2f}" in md


def test_sweep_extra_evals_columns_skip_and_reevaluation(tmp_path, capsys):
    pytest.importorskip("sklearn")
    out = tmp_path / "sweep"
    args = ["sweep", "digits_demo", "--out", str(out), "--n-examples", "16", "--autoattack", "none",
            "--no-progress", *[a for o in TINY for a in ("--set", o)]]
    assert main([*args, "--extra-evals", "noise"]) == 0
    o = capsys.readouterr().out
    head = (out / "results.md").read_text().splitlines()[0]
    assert "Noise (best)" in head and "Noise (final)" in head and "CW-20" not in head
    assert "Noise (best)" in (out / "results.csv").read_text().splitlines()[0]
    assert main([*args, "--extra-evals", "noise"]) == 0
    assert "finished: skipped" in capsys.readouterr().out
    # other extra evaluations: the same trained run is evaluated again (not skipped), now with CW
    assert main([*args, "--extra-evals", "noise,cw=2"]) == 0
    o = capsys.readouterr().out
    assert "finished: skipped" not in o and "evaluating best.pt" in o
    head = (out / "results.md").read_text().splitlines()[0]
    assert "CW-20 (best)" in head and "Noise (best)" in head
    rep = json.loads((out / "digits_demo" / "eval_best.json").read_text())
    assert rep["sweep"]["extra_evals"] == "noise,cw=2" and rep["cw"] is not None
    # a bad list fails before any run trains
    assert main([*args[:3], str(tmp_path / "other"), *args[4:], "--extra-evals", "bogus"]) == 2
    assert "unknown item 'bogus'" in capsys.readouterr().err and not (tmp_path / "other").exists()
