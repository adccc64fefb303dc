"""``rpat eval`` at scale: many checkpoints, reuse, report location, AutoAttack state, --normalize,
--jobs, the sanity section (skips, gradient-masking flag) and the sweep's AutoAttack version."""

from __future__ import annotations

import functools
import inspect
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

import rpat.evaluation.checkpoint_eval as ce
import rpat.evaluation.report as er
from rpat.attacks.threat import ThreatModel
from rpat.cli import main
from rpat.errors import InputError
from rpat.evaluation.robustness import RobustnessReport, evaluate_robustness
from rpat.evaluation.sanity import SANITY_CHECKS, masking_drop, run_sanity_checks
from rpat.models import create_model
from rpat.models.normalization import NORMALIZE_PRESETS, add_normalization, parse_normalize
from rpat.run_dir import aa_state_path, report_path_for

pytest.importorskip("sklearn")  # the 8x8 digits

FAST = ["--arch", "small_cnn", "--dataset", "digits", "--n-examples", "20", "--eps", "32/255",
        "--step-size", "8/255", "--steps", "3", "--autoattack", "none", "--no-sanity", "--no-progress"]
#: The engine with per-attack records, APGD-only version, resume and process split (rpat.evaluation.robustness).
ENGINE = "aa_state" in inspect.signature(evaluate_robustness).parameters


def _save_plain(path: Path, seed: int = 0, **kw) -> nn.Module:
    torch.manual_seed(seed)
    model = create_model("small_cnn", num_classes=10, in_chans=1, **kw)
    torch.save(model.state_dict(), path)
    return model


def _counting(monkeypatch) -> list[dict]:
    """Record every call of the evaluation engine made by ``rpat eval`` (and still run it)."""
    calls: list[dict] = []
    real = ce.evaluate_robustness

    @functools.wraps(real)
    def counted(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(ce, "evaluate_robustness", counted)
    return calls


# ---- argument checks before any work ---------------------------------------------------
def test_plain_state_dict_without_arch_fails_before_the_dataset(tmp_path, monkeypatch, capsys):
    path = tmp_path / "model_test.pt"
    _save_plain(path)

    def no_data(*a, **k):
        raise AssertionError("the dataset was touched before the architecture check")

    monkeypatch.setattr(ce, "load_dataset", no_data)
    code = main(["eval", str(path), "--dataset", "cifar10", "--data-root", str(tmp_path / "missing")])
    err = capsys.readouterr().err
    assert code == 2 and "plain state_dict" in err and "--arch" in err and "archive" not in err
    # every checkpoint is checked before the first is evaluated
    code = main(["eval", str(path), str(tmp_path / "nope.pt"), *FAST])
    assert code == 2 and "nope.pt" in capsys.readouterr().err
    code = main(["eval", str(path), str(path), *FAST, "--out", str(tmp_path / "r.json")])
    assert code == 2 and "--out names one report" in capsys.readouterr().err


# ---- where the report goes --------------------------------------------------------------
def test_report_location(tmp_path, monkeypatch, capsys):
    run, plain, cwd = tmp_path / "run", tmp_path / "share", tmp_path / "cwd"
    for d in (run, plain, cwd):
        d.mkdir()
    (run / "config.yaml").write_text("seed: 0\n")
    _save_plain(run / "best.pt")
    _save_plain(plain / "model_test.pt")
    monkeypatch.chdir(cwd)
    assert report_path_for(run / "best.pt") == run / "best.eval.json"
    assert report_path_for(plain / "model_test.pt") == cwd / "model_test.eval.json"
    assert report_path_for(plain / "model_test.pt", out="x.json") == Path("x.json")
    assert main(["eval", str(run / "best.pt"), str(plain / "model_test.pt"), *FAST]) == 0
    out = capsys.readouterr().out
    assert f"wrote {run / 'best.eval.json'}" in out and f"wrote {cwd / 'model_test.eval.json'}" in out
    assert not (plain / "model_test.eval.json").exists()
    # one table, one row per checkpoint
    assert out.count("| model") == 1 and str(run / "best.pt") in out and str(plain / "model_test.pt") in out
    if os.geteuid() != 0:  # root writes anywhere
        run.chmod(0o555)
        try:
            assert report_path_for(run / "best.pt") == cwd / "best.eval.json"
        finally:
            run.chmod(0o755)


# ---- reuse ----------------------------------------------------------------------------
def test_reports_with_the_same_settings_are_reused_not_recomputed(tmp_path, monkeypatch, capsys):
    a, b = tmp_path / "a.pt", tmp_path / "b.pt"
    _save_plain(a, seed=0)
    _save_plain(b, seed=1)
    monkeypatch.chdir(tmp_path)
    calls = _counting(monkeypatch)
    assert main(["eval", str(a), str(b), *FAST]) == 0
    assert len(calls) == 2
    ra, rb = tmp_path / "a.eval.json", tmp_path / "b.eval.json"
    first = capsys.readouterr().out
    stamp = ra.stat().st_mtime_ns
    rb.unlink()
    assert main(["eval", str(tmp_path / "*.pt"), *FAST]) == 0  # a quoted glob
    out = capsys.readouterr().out
    assert len(calls) == 3 and f"reused {ra}" in out and f"reused {rb}" not in out
    assert ra.stat().st_mtime_ns == stamp
    rep_a = json.loads(ra.read_text())
    assert rep_a["settings"]["autoattack"] == "none" and rep_a["settings"]["n_examples"] == 20
    assert first.splitlines()[-1] in out  # the same row for a, reused
    # another setting (the batch size too: AutoAttack's batches are its unit of seeding and of the split),
    # another checkpoint file, or --force: recomputed
    assert main(["eval", str(a), *FAST, "--batch-size", "7"]) == 0
    assert main(["eval", str(a), *FAST, "--steps", "4"]) == 0
    assert len(calls) == 5
    calls.pop()
    _save_plain(a, seed=2)
    assert main(["eval", str(a), *FAST, "--steps", "4"]) == 0
    assert len(calls) == 5
    assert main(["eval", str(a), *FAST, "--steps", "4", "--force"]) == 0
    assert len(calls) == 6
    # a report without the sanity section does not satisfy a request for it
    assert main(["eval", str(a), *[f for f in FAST if f != "--no-sanity"], "--steps", "4"]) == 0
    assert len(calls) == 7 and "sanity" in json.loads(ra.read_text())
    capsys.readouterr()


# ---- AutoAttack state beside the report -----------------------------------------------------
def test_autoattack_state_is_passed_announced_and_removed(tmp_path, monkeypatch, capsys):
    path = tmp_path / "m.pt"
    _save_plain(path)
    out = tmp_path / "r.json"
    state = aa_state_path(out)
    assert state == tmp_path / "r.aa-state.json"
    state.write_text("{}")
    (tmp_path / "r.aa-state.pt").write_bytes(b"x")
    seen = {}

    def fake(model, x, y, threat, *, autoattack=True, batch_size=500, device="cpu", seed=0, progress=True,
             log=None, aa_state=None, stages=None):
        seen.update(autoattack=autoattack, aa_state=aa_state)
        # 60 images: Square breaks 3 (5%) that APGD missed, beyond the late_attacks noise threshold
        per = [{"attack": "clean", "robust": 50.0, "n_robust": 30, "seconds": 0.0},
               {"attack": "apgd-ce", "robust": 30.0, "n_robust": 18, "seconds": 1.0},
               {"attack": "apgd-t", "robust": 25.0, "n_robust": 15, "seconds": 2.0},
               {"attack": "fab-t", "robust": 25.0, "n_robust": 15, "seconds": 3.0},
               {"attack": "square", "robust": 20.0, "n_robust": 12, "seconds": 4.0}]
        return RobustnessReport(clean=50.0, pgd=30.0, aa=20.0, mean=35.0, nrr=28.57, n_examples=60,
                                threat=threat.describe(), pgd_steps=threat.steps, seconds=1.0,
                                extras={"aa_version": "standard", "aa_per_attack": per, "aa_resumed": True})

    monkeypatch.setattr(ce, "evaluate_robustness", fake)
    args = [a for a in FAST if a not in ("--autoattack", "none", "--no-sanity")]
    assert main(["eval", str(path), *args, "--no-sanity", "--out", str(out)]) == 0
    o, err = capsys.readouterr()
    assert seen == {"autoattack": "standard", "aa_state": state}
    assert f"resuming AutoAttack from {state}" in o and "continued from the saved state" in o
    assert not state.exists() and not (tmp_path / "r.aa-state.pt").exists()
    rep = json.loads(out.read_text())
    assert [r["attack"] for r in rep["aa_per_attack"]] == ["clean", "apgd-ce", "apgd-t", "fab-t", "square"]
    assert "gradient masking" in err  # 25% after APGD-T, 20% in the end
    # with the sanity checks, the flag is in the sanity section
    assert main(["eval", str(path), *args, "--out", str(out), "--force"]) == 0
    o, err = capsys.readouterr()
    san = json.loads(out.read_text())["sanity"]
    assert "late_attacks" in san["failed"] and san["checks"]["late_attacks"]["drop"] == pytest.approx(5.0)
    assert "sanity check late_attacks failed" in err and "gradient masking" in err
    assert "sanity checks on 20 images" in o and "FAILED (late_attacks)" in o


def _env() -> dict[str, str]:
    src = str(Path(__file__).resolve().parents[1] / "src")
    path = os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}


@pytest.mark.skipif(not ENGINE, reason="needs the resumable per-attack AutoAttack engine")
def test_killed_eval_resumes_from_the_last_finished_attack(tmp_path, capsys):
    """``rpat eval`` killed inside APGD-T; the same command continues after APGD-CE, with the uninterrupted numbers."""
    path = tmp_path / "m.pt"
    _save_plain(path)
    args = [str(path), *[a if a != "none" else "apgd" for a in FAST], "--device", "cpu"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the child process
    try:
        assert main(["eval", *args, "--out", str(tmp_path / "whole.json")]) == 0
        out = tmp_path / "r.json"
        state = aa_state_path(out)
        child = subprocess.Popen([sys.executable, "-m", "rpat", "eval", *args, "--out", str(out)], env=_env(),
                                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline, done = time.monotonic() + 120, []
        try:
            while time.monotonic() < deadline and child.poll() is None:
                if state.is_file():
                    try:
                        done = json.loads(state.read_text())["done"]
                    except (ValueError, KeyError):
                        done = []
                    if "apgd-ce" in done:
                        break
                time.sleep(0.02)
            child.send_signal(signal.SIGKILL)
        finally:
            err = child.communicate(timeout=60)[1]
        assert child.returncode == -signal.SIGKILL, err.decode()[-2000:]
        assert done == ["clean", "apgd-ce"] and not out.exists()
        saved = {f.name: f.read_bytes() for f in tmp_path.iterdir() if f.name.startswith("r.aa-state")}
        capsys.readouterr()
        assert main(["eval", *args, "--out", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)
    o, _ = capsys.readouterr()
    assert f"resuming AutoAttack from {state}" in o and "continued from the saved state" in o
    assert not any(f.name.startswith("r.aa-state") for f in tmp_path.iterdir())  # removed once written
    whole, resumed = (json.loads((tmp_path / n).read_text()) for n in ("whole.json", "r.json"))
    assert resumed["extras"]["aa_resumed"] and not whole["extras"]["aa_resumed"]
    assert (resumed["clean"], resumed["pgd"], resumed["aa"]) == (whole["clean"], whole["pgd"], whole["aa"])
    assert ([r["n_robust"] for r in resumed["aa_per_attack"]] == [r["n_robust"] for r in whole["aa_per_attack"]])
    # a state left by a killed run with other settings (here: the seed) is discarded, not an error
    for name, data in saved.items():
        (tmp_path / name).write_bytes(data)
    torch.set_num_threads(1)
    try:
        assert main(["eval", *args, "--out", str(out), "--seed", "1"]) == 0
    finally:
        torch.set_num_threads(threads)
    o, _ = capsys.readouterr()
    assert f"discarding {state}" in o and json.loads(out.read_text())["settings"]["seed"] == 1
    assert not any(f.name.startswith("r.aa-state") for f in tmp_path.iterdir())


# ---- the sanity section ------------------------------------------------------------------
def _tiny_model_and_data():
    torch.manual_seed(0)
    model = create_model("small_cnn", num_classes=10, in_chans=1).eval()
    x = torch.rand(16, 1, 8, 8)
    return model, x, torch.randint(0, 10, (16,))


PER_ATTACK = [{"attack": a, "robust": r / 10, "n_robust": r, "seconds": 1.0}
              for a, r in (("clean", 600), ("apgd-ce", 450), ("apgd-t", 440), ("fab-t", 430), ("square", 415))]


def test_masking_flag_from_a_synthetic_per_attack_list():
    model, x, y = _tiny_model_and_data()
    threat = ThreatModel("linf", 8 / 255, 2 / 255, 2)
    report = {"clean": 60.0, "pgd": 46.0, "aa": 41.5, "n_examples": 1000, "extras": {"aa_per_attack": PER_ATTACK}}
    assert masking_drop(report) == pytest.approx(2.5)
    warnings, lines = [], []
    res = run_sanity_checks(model, x, y, threat, report=report, warn=warnings.append, log=lines.append)
    assert "late_attacks" in res["failed"]
    assert res["checks"]["late_attacks"]["drop"] == pytest.approx(2.5)
    assert any("late_attacks" in w and "gradient masking" in w for w in warnings)
    clean_run = [*PER_ATTACK[:3], {**PER_ATTACK[2], "attack": "fab-t"}, {**PER_ATTACK[2], "attack": "square"}]
    report["extras"] = {"aa_per_attack": clean_run}
    report["aa"] = 44.0
    assert masking_drop(report) == 0
    res = run_sanity_checks(model, x, y, threat, report=report)
    assert "late_attacks" not in res["failed"] and not res["checks"]["late_attacks"].get("skipped")
    # the APGD-only version has nothing after APGD-T: the check is skipped, not failed
    report["extras"] = {"aa_per_attack": PER_ATTACK[:3], "aa_version": "apgd"}
    assert masking_drop(report) is None
    assert run_sanity_checks(model, x, y, threat, report=report)["checks"]["late_attacks"]["skipped"]


def test_sanity_skips_what_cannot_inform_and_reports_its_cost():
    model, x, y = _tiny_model_and_data()
    threat = ThreatModel("linf", 8 / 255, 2 / 255, 2)
    lines: list[str] = []
    res = run_sanity_checks(model, x, y, threat, report={"clean": 12.0, "pgd": 0.5, "aa": 0.0, "n_examples": 16},
                            log=lines.append)
    assert set(res["checks"]) == set(SANITY_CHECKS)
    assert {"large_eps", "more_steps", "late_attacks"} <= set(res["skipped"])
    assert "already 0.50% <= 1%" in res["checks"]["large_eps"]["detail"]
    assert "accuracy" not in res["checks"]["large_eps"]  # not run
    assert len(lines) == len(SANITY_CHECKS) and all(line.startswith("sanity ") for line in lines)
    assert all(c["seconds"] >= 0 for c in res["checks"].values()) and res["seconds"] >= 0
    res = run_sanity_checks(model, x, y, threat, report={"clean": 12.0, "pgd": 6.0, "aa": 5.0, "n_examples": 16})
    assert "large_eps" not in res["skipped"] and "accuracy" in res["checks"]["large_eps"]


# ---- --normalize ------------------------------------------------------------------------------
def test_parse_and_add_normalization():
    assert parse_normalize("cifar10") == NORMALIZE_PRESETS["cifar10"]
    mean, std = parse_normalize("0.4914,0.4822,0.4465/0.2471,0.2435,0.2616")
    assert mean == (0.4914, 0.4822, 0.4465) and std == (0.2471, 0.2435, 0.2616)
    for bad in ("cifar", "0.5/0.2,0.3", "a/b", "0.5/0"):
        with pytest.raises(InputError, match="--normalize"):
            parse_normalize(bad)
    model = create_model("small_cnn", num_classes=10, in_chans=1)
    assert add_normalization(model, (0.3,), (0.4,)) is model and model.normalize.enabled
    with pytest.raises(InputError, match="already normalizes"):
        add_normalization(model, (0.3,), (0.4,))
    with pytest.raises(InputError, match="channel"):
        add_normalization(create_model("small_cnn", num_classes=10, in_chans=1), (0.1, 0.2, 0.3), (1, 1, 1))
    wrapped = add_normalization(nn.Flatten(), (0.5,), (0.25,))
    assert torch.allclose(wrapped(torch.ones(1, 1, 2, 2)), torch.full((1, 4), 2.0))


def test_normalize_flag_matches_the_normalized_model(tmp_path, capsys):
    from rpat.data import evaluation_subset, load_dataset

    mean, std = (0.3053,), (0.3759,)
    train = load_dataset("digits", "data", "train")
    torch.manual_seed(0)
    model = create_model("small_cnn", num_classes=10, in_chans=1, mean=mean, std=std)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    xt, yt = train.images.float() / 255, train.labels
    for _ in range(2):
        for i in range(0, len(xt), 64):
            loss = nn.functional.cross_entropy(model(xt[i:i + 64]), yt[i:i + 64])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    path = tmp_path / "normalized.pt"
    torch.save(model.state_dict(), path)  # a plain state_dict that expects (x - mean) / std
    args = [a if a != "20" else "100" for a in FAST]
    assert main(["eval", str(path), *args, "--normalize", "0.3053/0.3759", "--out", str(tmp_path / "n.json")]) == 0
    assert main(["eval", str(path), *args, "--out", str(tmp_path / "raw.json")]) == 0
    capsys.readouterr()
    with_norm = json.loads((tmp_path / "n.json").read_text())
    without = json.loads((tmp_path / "raw.json").read_text())
    test = evaluation_subset("digits", load_dataset("digits", "data", "test"), 100)
    ref = evaluate_robustness(model, test.images.float() / 255, test.labels, ThreatModel("linf", 32 / 255, 8 / 255, 3),
                              autoattack=False, seed=0, progress=False)
    assert (with_norm["clean"], with_norm["pgd"]) == (ref.clean, ref.pgd)
    assert with_norm["clean"] > 80 and without["clean"] != with_norm["clean"]
    assert with_norm["settings"]["normalize"] == {"mean": [0.3053], "std": [0.3759]}


# ---- --jobs ----------------------------------------------------------------------------------
def test_jobs_2_gives_the_numbers_of_one_process(tmp_path, capsys):
    """``--jobs 2`` (two gloo processes of one thread, 3 batches of 8 images) equals one single-thread process."""
    path = tmp_path / "m.pt"
    _save_plain(path)
    aa = "apgd" if ENGINE else "none"
    # the extra evaluations split like PGD: CW-3, uniform noise and transfer (from the model itself)
    args = [str(path), *[a if a != "none" else aa for a in FAST], "--batch-size", "8", "--device", "cpu",
            "--cw", "--cw-steps", "3", "--noise", "--transfer-from", str(path)]
    p = subprocess.run([sys.executable, "-m", "rpat", "eval", *args, "--jobs", "2", "--out", str(tmp_path / "j2.json")],
                       capture_output=True, text=True, env=_env(), timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "2 processes x 1 thread(s)" in p.stderr
    assert p.stdout.count("| model") == 1 and p.stdout.count("wrote ") == 1  # rank 0 alone prints
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each of the two processes
    try:
        assert main(["eval", *args, "--out", str(tmp_path / "j1.json")]) == 0
    finally:
        torch.set_num_threads(threads)
    capsys.readouterr()
    one, two = (json.loads((tmp_path / f"j{j}.json").read_text()) for j in (1, 2))
    for key in ("clean", "pgd", "aa", "n_examples", "cw", "noise", "transfer"):
        assert one[key] == two[key], key
    assert two["transfer"] == two["pgd"]  # transfer from the model itself is its white-box PGD
    if ENGINE:
        assert two["aa"] is not None and two["extras"]["aa_version"] == "apgd" and two["extras"]["processes"] == 2
        assert [r["n_robust"] for r in one["aa_per_attack"]] == [r["n_robust"] for r in two["aa_per_attack"]]


def test_jobs_refused_under_torchrun(tmp_path, monkeypatch, capsys):
    path = tmp_path / "m.pt"
    _save_plain(path)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    assert main(["eval", str(path), *FAST, "--jobs", "2"]) == 2
    assert "under torchrun" in capsys.readouterr().err


# ---- sweep: the AutoAttack version -----------------------------------------------------------
def test_sweep_keeps_apgd_out_of_the_aa_column(tmp_path):
    from rpat.config import build_config
    from rpat.experiments.sweep import is_finished
    from rpat.reports.sweep_table import gather, to_csv, to_markdown

    cfg = build_config("digits_demo", None, [])
    runs = [("std", cfg), ("quick", cfg)]
    for run, version, aa in (("std", "standard", 40.0), ("quick", "apgd", 45.0)):
        d = tmp_path / run
        d.mkdir()
        (d / "final.pt").write_bytes(b"")
        for which in ("best", "final"):
            (d / f"eval_{which}.json").write_text(json.dumps({
                "clean": 80.0, "pgd": 50.0, "aa": aa, "mean": (80 + aa) / 2, "nrr": 1.0,
                "sweep": {"n_examples": 10, "autoattack": version}}))
    rows = gather(runs, tmp_path)
    assert rows[0]["AA (best)"] == 40.0 and "AA(APGD) (best)" not in rows[0]
    assert rows[1]["AA(APGD) (best)"] == 45.0 and "AA (best)" not in rows[1]
    md = to_markdown(rows)
    header = md.splitlines()[0].split(" | ")
    assert "AA (best)" in header and "AA(APGD) (best)" in header and "Mean(APGD) (final)" in header
    assert "AA(APGD) (final)" in to_csv(rows).splitlines()[0]
    only_apgd = to_markdown(rows[1:]).splitlines()[0]
    assert "AA(APGD) (best)" in only_apgd and "| AA (best)" not in only_apgd
    # the skip logic notices the version (and reads older sweeps' True/False)
    assert is_finished(tmp_path / "quick", 10, "apgd") and not is_finished(tmp_path / "quick", 10, "standard")
    assert is_finished(tmp_path / "std", 10, True) and not is_finished(tmp_path / "std", 10, "apgd")
    legacy = tmp_path / "std" / "eval_best.json"
    legacy.write_text(json.dumps({"aa": 40.0, "sweep": {"n_examples": 10, "autoattack": True}}))
    assert is_finished(tmp_path / "std", 10, "standard")


def test_a_stale_state_is_discarded_for_sweeps_and_train_eval(tmp_path, monkeypatch):
    report = tmp_path / "eval_best.json"
    state = aa_state_path(report)
    state.write_text("{}")
    (tmp_path / f"{state.name}.1.pt").write_bytes(b"x")
    seen: list = []

    def fake(path, *, aa_state=None, stage_state=None, **kw):
        seen.append(aa_state)
        if aa_state is not None and Path(aa_state).exists():
            raise InputError(f"the AutoAttack state {aa_state} was {er.STALE_STATE} (differs in: seed)")
        return SimpleNamespace(extras={}, to_dict=lambda: {"clean": 50.0}), {}

    monkeypatch.setattr(er, "evaluate_checkpoint", fake)
    said: list[str] = []
    # write_report (rpat.evaluation.report) replaced checkpoint_eval.evaluate_for_report: it writes the report too
    assert er.write_report("best.pt", report, say=said.append, autoattack="standard") == {"clean": 50.0}
    assert seen == [state, state] and said == [f"resuming AutoAttack from {state}",
                                               f"discarding {state}: it was saved by an evaluation with other settings",
                                               f"wrote {report}"]
    assert list(tmp_path.iterdir()) == [report]
    seen.clear()
    er.write_report("best.pt", report, autoattack="none")
    assert seen == [None]
