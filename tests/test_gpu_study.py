"""studies/gpu_study.py: the budget planner against hand computations, and the smoke run end to end."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from rpat.errors import InputError

ROOT = Path(__file__).resolve().parents[1]


def _study():
    spec = importlib.util.spec_from_file_location("gpu_study", ROOT / "studies" / "gpu_study.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["gpu_study"] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


gs = _study()


def test_schedule_keeps_the_papers_shape_only_where_whole_epochs_can_hold_it():
    assert gs.choose_schedule(110)[:2] == ("piecewise", [100, 105])
    assert gs.choose_schedule(22)[:2] == ("piecewise", [20, 21])  # 20 / 1 / 1 epochs at 0.1 / 0.01 / 0.001
    assert gs.choose_schedule(17)[:2] == ("piecewise", [15, 16])  # round(15.45), round(16.23)
    assert gs.choose_schedule(16)[:2] == ("cosine", [])  # round(14.55) = round(15.27) = 15: the decays collapse
    assert gs.choose_schedule(5)[:2] == ("cosine", [])
    assert gs.choose_schedule(1)[:2] == ("cosine", [])


def test_eval_estimate_by_hand():
    # passes = 1000·(1 + 21 + 100) + 0.6·1000·(900 + 1350 + 5000/3) = 122,000 + 2,350,000 = 2,472,000;
    # at 20,000 passes/s: 123.6 s, × 1.25 margin = 154.5 s
    assert gs.estimate_eval_seconds(1000, 20000.0) == pytest.approx(154.5)
    assert gs.estimate_eval_seconds(1000, 20000.0, robust_fraction=0.0, margin=1.0) == pytest.approx(6.1)


def test_plan_by_hand():
    # per epoch of a pair: 50,000/1,000 + 50,000/800 + 2·1 = 114.5 s; fixed per pair: 2·(5 + 60) = 130 s;
    # usable 0.9·480 = 432 s; room for epochs: 432 − 30 − 130 = 272 s -> 2 epochs; predicted 30 + 130 + 229 = 389 s
    p = gs.plan_study(480, 30, 50000, (1000, 800), 1.0, 5.0, 60.0)
    assert (p.epochs, p.schedule, p.capped) == (2, "cosine", False)
    assert p.epoch_seconds_per_pair == pytest.approx(114.5)
    assert p.fixed_seconds_per_pair == pytest.approx(130)
    assert p.predicted_seconds == pytest.approx(389) and p.predicted_seconds <= p.usable_seconds
    # two pairs in 15 min: room (810 − 30)/2 − 130 = 260 s per pair -> 2 epochs; 30 + 2·(130 + 229) = 748 s
    p2 = gs.plan_study(900, 30, 50000, (1000, 800), 1.0, 5.0, 60.0, pairs=2)
    assert (p2.epochs, p2.predicted_seconds) == (2, pytest.approx(748))
    # the H100 figure (about 3,600 img/s with the CUDA graph) and 90 s per evaluation, 8 min:
    # per epoch 2·50,000/3,600 + 2 = 29.78 s; room 432 − 30 − 2·(5 + 90) = 212 s -> 7 epochs
    assert gs.plan_study(480, 30, 50000, (3600, 3600), 1.0, 5.0, 90.0).epochs == 7
    assert gs.plan_study(480, 30, 50000, (1000, 800), 1.0, 5.0, 60.0, max_epochs=1).capped


def test_plan_refuses_a_budget_that_fits_no_epoch():
    # room per pair (0.95·480 − 30)/2 − 130 = 83 s < one epoch (114.5 s); one epoch of 2 pairs needs
    # (30 + 2·(130 + 114.5))/0.95 = 546.3 s = 9.1 min
    with pytest.raises(InputError, match=r"fits no epoch of 2 pair\(s\).*about 9.1 min"):
        gs.plan_study(480, 30, 50000, (1000, 800), 1.0, 5.0, 60.0, pairs=2, safety=0.95)


def test_per_attack_report_is_rendered_when_the_evaluation_records_it():
    rec = [{"attack": "clean", "robust": 80.0, "n_robust": 800, "seconds": 0.1},
           {"attack": "apgd-ce", "robust": 45.5, "n_robust": 455, "seconds": 12.3}]
    lines = gs._per_attack_lines([{"seed": 0, "method": "pgd_at", "n_examples": 1000, "aa": 45.5,
                                   "extras": {"aa_version": "standard", "aa_per_attack": rec}},
                                  {"seed": 0, "method": "pgd_at_rpat", "extras": {}}])
    assert len(lines) == 4 and "seed 0, PGD-AT" in lines[3] and "45.50" in lines[3]
    assert gs._per_attack_lines([{"seed": 0, "method": "pgd_at", "extras": {}}]) == []


def test_smoke_run_end_to_end(cifar10_jpeg_subset, tmp_path, capsys):
    out = tmp_path / "study"
    assert gs.main(["--smoke", "--data", str(cifar10_jpeg_subset), "--out", str(out), "--seeds", "3"]) == 0
    study = json.loads((out / "study.json").read_text())
    md = (out / "study.md").read_text()
    runs = {(r["method"], r["seed"]): r for r in study["runs"]}
    assert set(runs) == {("pgd_at", 3), ("pgd_at_rpat", 3)}
    for r in runs.values():
        assert r["n_examples"] == 16 and r["aa"] is not None and r["info"]["epoch"] == 1
        assert r["extras"]["aa_version"] == "standard"
    diff = study["paired"]["per_seed"]["3"]
    for k in ("clean", "pgd", "aa"):
        assert diff[k] == pytest.approx(runs["pgd_at_rpat", 3][k] - runs["pgd_at", 3][k])
    assert "RPAT − PGD-AT (paired)" in md and "SMOKE TEST" in md and "of 110 epochs" in md
    # the plan respects the budget given the measured throughput, and follows from the recorded measurements
    plan, probe = study["plan"], study["probe"]
    assert plan["epochs"] == 1 and plan["predicted_seconds"] <= plan["usable_seconds"] <= 60 * study["budget_minutes"]
    again = gs.plan_study(plan["budget_seconds"], plan["elapsed_seconds"], study["train_images"],
                          [probe[m]["images_per_s"] for m in gs.METHODS],
                          max(probe[m]["epoch_overhead_seconds"] for m in gs.METHODS),
                          max(probe[m]["setup_seconds"] for m in gs.METHODS),
                          study["eval_estimate_seconds_per_model"], max_epochs=1)
    assert again.predicted_seconds == pytest.approx(plan["predicted_seconds"])
    assert study["minutes_used"] <= study["budget_minutes"] and study["within_budget"]
    assert study["status"] == "complete" and "Incomplete" not in md
    gs.write_markdown({**study, "status": "running"}, tmp_path / "partial.md")  # what a stopped run leaves
    assert "**Incomplete** (status `running`)" in (tmp_path / "partial.md").read_text()


def test_cuda_speed_options_are_valid_config_and_the_graph_is_used_when_the_config_has_it():
    import dataclasses

    import torch

    from rpat.config import SpeedConfig

    cuda = torch.device("cuda")
    opts = gs.speed_overrides(cuda)
    assert opts[:2] == ["speed.amp=bf16", "speed.channels_last=true"]
    has_graph = "cuda_graph" in {f.name for f in dataclasses.fields(SpeedConfig)}
    assert ("speed.cuda_graph=true" in opts) == has_graph
    assert gs.speed_overrides(torch.device("cpu")) == []
    args = gs.parse_args(["--data", "d", "--out", "o"])
    args.data_root = "d"
    cfg = gs.make_config(args, "pgd_at_rpat", 1, 20, *gs.choose_schedule(20)[:2], cuda, None)
    assert (cfg.model.arch, cfg.data.batch_size, cfg.rpat.enabled, cfg.rpat.lam, cfg.rpat.alpha) == \
        ("resnet18", 128, True, 1.0, 0.5)
    assert (cfg.optim.schedule, cfg.optim.milestones, cfg.speed.amp, cfg.speed.channels_last) == \
        ("piecewise", [18, 19], "bf16", True)
