"""The experiment grid (composed presets) and ``rpat sweep`` end to end on real CIFAR-10 JPEGs."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from rpat.cli import main
from rpat.config import build_config
from rpat.errors import InputError
from rpat.experiments.sweep import collect_runs
from rpat.presets import GRID_ARCHS, GRID_DATASETS, GRID_METHODS, GRID_NORMS, grid_names

METHODS = ("pgd_at", "trades", "mart", "consistency_at")


def test_every_grid_cell_resolves_to_the_right_config():
    names = grid_names()
    assert len(names) == 3 * 3 * 2 * 4 * 2 == 144 and len(set(names)) == 144
    budgets = {"linf": (8 / 255, 2 / 255), "l2": (128 / 255, 32 / 255)}
    for name in names:
        _, ds, arch, norm, method, variant = name.split("/")
        cfg = build_config(name)
        assert (cfg.data.dataset, cfg.model.arch, cfg.attack.norm, cfg.method.name) == (ds, arch, norm, method)
        assert cfg.rpat.enabled == (variant == "rpat") and cfg.rpat.proxy == "logits"
        assert (cfg.rpat.lam, cfg.rpat.alpha) == (1.0, 0.5)
        t = cfg.train_threat()
        assert (t.eps, t.step_size, t.steps) == (*budgets[norm], 10)
        e = cfg.eval_threat()
        assert (e.norm, e.eps, e.steps) == (norm, budgets[norm][0], 20)
        o = cfg.optim
        assert (o.epochs, o.lr, o.momentum, o.weight_decay, o.milestones, o.gamma, cfg.data.batch_size) == (
            110, 0.1, 0.9, 5e-4, [100, 105], 0.1, 128)
    assert {n.split("/")[1] for n in names} == set(GRID_DATASETS)
    assert {n.split("/")[2] for n in names} == set(GRID_ARCHS)
    assert {n.split("/")[3] for n in names} == set(GRID_NORMS)
    assert {n.split("/")[4] for n in names} == set(GRID_METHODS) == set(METHODS)


def test_table5_proxy_variants():
    for proxy in ("second_to_last", "third_to_last"):
        cfg = build_config(f"bench/cifar10/resnet18/linf/pgd_at/rpat-{proxy}")
        assert cfg.rpat.enabled and cfg.rpat.proxy == proxy
        assert cfg.label() == f"PGD-AT + RPAT ({proxy})"
    assert build_config("bench/cifar10/resnet18/linf/mart/rpat").label() == "MART + RPAT"


@pytest.mark.parametrize("name,msg", [
    ("bench/cifar10/resnet18/linf/trades", "must look like"),
    ("bench/cifar10/resnet50/linf/trades/base", "unknown arch 'resnet50'"),
    ("bench/cifar10/resnet18/l1/trades/base", "unknown norm 'l1'"),
    ("bench/svhn/resnet18/linf/trades/base", "unknown dataset 'svhn'"),
    ("nope", "unknown preset"),
])
def test_bad_grid_names(name, msg):
    with pytest.raises(InputError, match=msg):
        build_config(name)


def test_cli_bad_grid_name_exits_2(tmp_path, capsys):
    assert main(["sweep", "bench/cifar10/resnet18/linf/fgsm/base", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown method 'fgsm'" in err


def test_collect_runs_listing_globs_and_names(tmp_path):
    (tmp_path / "a.yaml").write_text("method: {name: mart}\n")
    (tmp_path / "b.yaml").write_text("method: {name: trades}\nrpat: {enabled: true}\n")
    listing = tmp_path / "list.yaml"
    listing.write_text("runs:\n  - {name: one, config: a.yaml, overrides: [optim.lr=0.05]}\n"
                       "  - bench/cifar100/wrn34_10/l2/consistency_at/rpat\n"
                       "overrides: [optim.epochs=3]\n")
    runs = collect_runs([str(tmp_path / "[ab].yaml"), str(listing)], ["seed=4"])
    assert [r.name for r in runs] == ["a", "b", "one", "bench_cifar100_wrn34_10_l2_consistency_at_rpat"]
    assert runs[2].cfg.method.name == "mart" and runs[2].cfg.optim.lr == 0.05 and runs[2].cfg.optim.epochs == 3
    assert runs[3].cfg.train_threat().eps == 128 / 255 and runs[3].cfg.optim.epochs == 3
    assert all(r.cfg.seed == 4 for r in runs)
    with pytest.raises(InputError, match="share the name"):
        collect_runs([str(tmp_path / "a.yaml"), str(tmp_path / "a.yaml")])
    with pytest.raises(InputError, match="no config file matches"):
        collect_runs([str(tmp_path / "*.yml")])


def test_tiny_sweep_all_methods_table_skip_and_resume(cifar10_jpeg_subset, tmp_path, capsys):
    """8 runs (4 methods x ±RPAT), 1 epoch on 64 real CIFAR-10 JPEGs, AutoAttack on 6 test images."""
    root = cifar10_jpeg_subset
    runs = "".join(f"  - {{name: {m}{'_rpat' if v == 'rpat' else ''}, preset: bench/cifar10/resnet18/linf/{m}/{v}}}\n"
                   for m in METHODS for v in ("base", "rpat"))
    listing = tmp_path / "tiny.yaml"
    listing.write_text(
        "runs:\n" + runs +
        f"overrides: [data.dataset=imagefolder, 'data.root={root}', model.arch=small_cnn, data.train_subset=64,\n"
        "  data.batch_size=32,\n"
        "  attack.steps=1, optim.epochs=1, eval.n_examples=10, eval.steps=1, device=cpu, seed=3]\n")
    out = tmp_path / "sweep"
    args = ["sweep", str(listing), "--out", str(out), "--n-examples", "6", "--no-progress"]
    assert main(args) == 0
    first = capsys.readouterr().out
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["method"] for r in rows] == ["PGD-AT", "PGD-AT + RPAT", "TRADES", "TRADES + RPAT", "MART",
                                          "MART + RPAT", "Consistency-AT", "Consistency-AT + RPAT"]
    for r in rows:
        assert r["setting"] == "imagefolder/small_cnn/linf"
        assert r["best selected on"] == "first 10 test images" and r["test images"] == "6"  # where best.pt came from
        assert all(v != "" for v in r.values()), r  # every cell filled, AA/Mean/NRR included
        for w in ("best", "final"):
            clean, aa = float(r[f"Clean ({w})"]), float(r[f"AA ({w})"])
            assert 0 <= aa <= clean <= 100 and float(r[f"Mean ({w})"]) == pytest.approx((clean + aa) / 2, abs=0.01)
    md = (out / "results.md").read_text()
    assert md.count("\n") == 2 + 8 and "| Consistency-AT + RPAT |" in md and md in first
    # the RPAT runs logged the term, the two-view method saw twice the images per step
    rec = json.loads((out / "consistency_at_rpat" / "metrics.jsonl").read_text().splitlines()[0])
    assert rec["train_rpat"] > 0 and rec["train_js"] >= 0
    meta = json.loads((out / "trades_rpat" / "meta.json").read_text())
    assert meta["objective"] == "trades+rpat"

    # re-running skips everything: no checkpoint or evaluation is rewritten
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.suffix in (".pt", ".json")}
    assert main(args) == 0
    again = capsys.readouterr().out
    assert again.count("finished: skipped") == 8 and md in again and "training" not in again
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items())

    # an interrupted run (no final.pt, no evaluations) resumes from last.pt and ends the same
    run = out / "mart_rpat"
    final = torch.load(run / "final.pt", weights_only=True)["model"]
    for f in ("final.pt", "eval_best.json", "eval_final.json"):
        (run / f).unlink()
    assert main([*args, "--only", "mart_rpat"]) == 0
    log = capsys.readouterr().out
    assert "[mart_rpat] resuming" in log and "[mart_rpat] resumed" in log
    again_final = torch.load(run / "final.pt", weights_only=True)["model"]
    assert all(torch.equal(final[k], again_final[k]) for k in final)
    assert (run / "eval_final.json").is_file()
    assert Path(out / "results.csv").read_text().count("\n") == 9


def test_parse_gpus():
    from rpat.experiments.sweep import parse_gpus

    assert parse_gpus("0, 2,3") == ["0", "2", "3"] and parse_gpus(None) == []
    for bad in ("cuda:0", "a,b", ","):
        with pytest.raises(InputError, match="--gpus"):
            parse_gpus(bad)


def test_a_gpu_listed_twice_runs_two_workers():
    from rpat.experiments.sweep import gpu_workers, parse_gpus

    w = gpu_workers(parse_gpus("0,0,1,1"))
    assert list(w) == ["gpu0", "gpu0-2", "gpu1", "gpu1-2"]
    assert [e["CUDA_VISIBLE_DEVICES"] for e in w.values()] == ["0", "0", "1", "1"]
    assert list(gpu_workers(["2", "0"])) == ["gpu2", "gpu0"]


def test_run_workers_deals_runs_and_matches_a_sequential_sweep(tmp_path):
    """Two CPU worker processes (``run_workers``, as ``--gpus`` uses) give the same weights as one process."""
    pytest.importorskip("sklearn")
    from rpat.experiments.sweep import run_sweep, run_workers

    listing = tmp_path / "two.yaml"
    listing.write_text(
        "runs:\n  - {name: a, preset: bench/cifar10/resnet18/linf/pgd_at/base}\n"
        "  - {name: b, preset: bench/cifar10/resnet18/linf/trades/rpat}\n"
        "overrides: [data.dataset=digits, model.arch=small_cnn, data.train_subset=64, data.batch_size=32,\n"
        "  attack.steps=1, optim.epochs=1, eval.n_examples=10, eval.steps=1, device=cpu, seed=1]\n")
    runs = collect_runs([str(listing)])
    par, seq = tmp_path / "par", tmp_path / "seq"
    par.mkdir()
    logged: list[str] = []
    run_workers([str(listing)], par, runs, [], 10, False,
                {"w0": {"OMP_NUM_THREADS": "1"}, "w1": {"OMP_NUM_THREADS": "1"}}, None, logged.append)
    assert logged[0].startswith("w0: 1 runs (a)") and logged[1].startswith("w1: 1 runs (b)")
    assert "[a]" in (par / "_logs" / "w0.log").read_text() and "[b]" in (par / "_logs" / "w1.log").read_text()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the workers: the same reduction order, so bit-equal weights
    try:
        run_sweep([str(listing)], seq, n_examples=10, autoattack=False, progress=False, log=lambda m: None)
    finally:
        torch.set_num_threads(threads)
    for name in ("a", "b"):
        p = torch.load(par / name / "final.pt", weights_only=True)["model"]
        s = torch.load(seq / name / "final.pt", weights_only=True)["model"]
        assert p.keys() == s.keys() and all(torch.equal(p[k], s[k]) for k in p), name
        assert (json.loads((par / name / "eval_final.json").read_text())["pgd"]
                == json.loads((seq / name / "eval_final.json").read_text())["pgd"])


@pytest.mark.parametrize("spec, label", [
    *[(f"bench/cifar10/resnet18/linf/{m}/{v}", name + (" + RPAT" if v == "rpat" else ""))
      for m, name in (("pgd_at", "PGD-AT"), ("trades", "TRADES"), ("mart", "MART"),
                      ("consistency_at", "Consistency-AT")) for v in ("base", "rpat")],
    ("cifar10_rebat", "ReBAT"), ("cifar10_rpatpp", "RPAT++"),
])
def test_rpat_report_and_rpat_sweep_label_a_run_alike(tmp_path, spec, label):
    """One label per method: the sweep table's and `rpat report`'s, read from the same run directory."""
    from rpat.config import dump_yaml
    from rpat.reports.collect import load_run
    from rpat.reports.sweep_table import gather

    cfg = build_config(spec)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text(dump_yaml(cfg))
    assert cfg.label() == label
    assert gather([("run", cfg)], tmp_path)[0]["method"] == load_run(tmp_path / "run").label == label
