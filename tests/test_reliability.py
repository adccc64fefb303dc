"""Reliability: clean stops on SIGINT/SIGTERM, full disks, non-finite losses, newer checkpoints,
and evaluation sanity checks that catch masked or random models."""

from __future__ import annotations

import errno
import json
import math
import os
import signal
import tempfile

import pytest
import torch
from torch import nn

from rpat.attacks.threat import ThreatModel
from rpat.checkpoint import FORMAT, FORMAT_VERSION, load_checkpoint
from rpat.cli import main
from rpat.config import build_config
from rpat.data import load_dataset
from rpat.errors import InputError
from rpat.evaluation.sanity import SANITY_CHECKS, run_sanity_checks
from rpat.models import create_model
from rpat.objectives.objective import Objective
from rpat.training import Trainer
from rpat.training.nonfinite import NonFiniteGuard, NonFiniteLossError

TRAIN = ["--dataset", "digits", "--arch", "small_cnn", "--epochs", "3", "--device", "cpu", "--no-progress",
         "data.train_subset=64", "data.batch_size=32", "attack.steps=1", "attack.eps=32/255",
         "attack.step_size=8/255", "eval.n_examples=32", "eval.steps=1", "optim.schedule=cosine"]


def _train(run_dir, *extra: str) -> int:
    flags = [e for e in extra if e.startswith("-")]
    overrides = [e for e in extra if not e.startswith("-")]  # must follow TRAIN's overrides (one argparse run)
    return main(["train", "--run-dir", str(run_dir), *flags, *TRAIN, *overrides])


def _cfg(**extra):
    base = {"data": {"dataset": "digits", "train_subset": 64, "batch_size": 32}, "model": {"arch": "small_cnn"},
            "attack": {"eps": "32/255", "step_size": "8/255", "steps": 1}, "device": "cpu",
            "optim": {"epochs": 3, "schedule": "cosine"}, "eval": {"n_examples": 32, "steps": 1}}
    return build_config(None, None, [base, *[{k: v} for k, v in extra.items()]])


def _weights(path):
    return load_checkpoint(path)["model"]


def _equal(a, b) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted 3-epoch run (2 steps per epoch)."""
    run = tmp_path_factory.mktemp("ref") / "run"
    assert _train(run) == 0
    return run


def _signal_at_call(monkeypatch, n: int, signum: int) -> None:
    """Send ``signum`` to this process at the ``n``-th training step (1-based)."""
    real = Objective.step
    calls = {"n": 0}

    def step(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == n:
            os.kill(os.getpid(), signum)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Objective, "step", step)


@pytest.mark.parametrize("signum, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_stops_cleanly_and_resume_is_exact(signum, code, reference, tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    _signal_at_call(monkeypatch, 4, signum)  # second step of the second epoch
    assert _train(run) == code
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and signal.Signals(signum).name in err[0] and "holds 1 finished epoch" in err[0]
    assert f"rpat train --run-dir {run} --resume" in err[0]
    assert load_checkpoint(run / "last.pt")["epoch"] == 1 and not (run / "final.pt").exists()
    monkeypatch.undo()
    if signum == signal.SIGINT:
        return  # the resume path is the same as for SIGTERM
    # a kill mid-write leaves a stale temp file and perhaps a cut metrics line: both are handled
    (run / ".last.pt.stale.tmp").write_bytes(b"partial")
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"epoch": 1, "train_lo')
    assert _train(run, "--resume") == 0
    assert not list(run.glob(".*.tmp"))
    for name in ("final.pt", "best.pt", "last.pt"):
        assert _equal(_weights(reference / name), _weights(run / name)), name
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    ref_rows = [json.loads(x) for x in (reference / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [0, 1, 2]
    assert [r["train_loss"] for r in rows] == [r["train_loss"] for r in ref_rows]


def test_signal_during_first_epoch_is_resumable(reference, tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    _signal_at_call(monkeypatch, 1, signal.SIGTERM)
    assert _train(run) == 143
    assert "holds 0 finished epoch" in capsys.readouterr().err
    assert load_checkpoint(run / "last.pt")["epoch"] == 0
    monkeypatch.undo()
    assert _train(run, "--resume") == 0
    assert _equal(_weights(reference / "final.pt"), _weights(run / "final.pt"))


@pytest.mark.parametrize("which", ["after_held_out", "before_held_out"])
def test_signal_during_checkpoint_write_waits_for_it(which, tmp_path, monkeypatch):
    import rpat.training.trainer as trainer_mod

    real = trainer_mod.atomic_save

    def save(obj, path):
        # last.pt is written twice per epoch: before the held-out evaluation (marked pending), then after it
        if path.name == "last.pt" and obj["epoch"] == 2 and ("held_out_pending" in obj) == (which == "before_held_out"):
            os.kill(os.getpid(), signal.SIGTERM)  # arrives while the epoch-boundary writes run
        return real(obj, path)

    monkeypatch.setattr(trainer_mod, "atomic_save", save)
    t = Trainer(_cfg(), tmp_path / "run", progress=False, log=lambda m: None)
    with pytest.raises(trainer_mod.TrainingInterrupted) as e:
        t.fit()
    assert e.value.exit_code == 143
    ck = load_checkpoint(tmp_path / "run" / "last.pt")
    assert ck["epoch"] == 2  # the write finished before the stop
    rows = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    if which == "after_held_out":
        assert [json.loads(r)["epoch"] for r in rows] == [0, 1]
        assert "held_out_pending" not in ck
        return
    # stopped before epoch 2's held-out evaluation: the trained epoch is kept, its row comes on resume
    assert [json.loads(r)["epoch"] for r in rows] == [0] and "held_out_pending" in ck
    assert "holds 2 finished epoch(s) (the resume evaluates epoch 2 first)" in str(e.value)
    monkeypatch.undo()
    assert _train(tmp_path / "run", "--resume") == 0
    reference = tmp_path / "uninterrupted"
    Trainer(_cfg(), reference, progress=False, log=lambda m: None).fit()
    for name in ("final.pt", "best.pt", "last.pt"):
        assert _equal(_weights(reference / name), _weights(tmp_path / "run" / name)), name
    got = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    ref = [json.loads(x) for x in (reference / "metrics.jsonl").read_text().splitlines()]
    keys = ("epoch", "train_loss", "held_out_clean", "held_out_pgd", "best")
    assert [[r[k] for k in keys] for r in got] == [[r[k] for k in keys] for r in ref]


# ---- full disk, unwritable folders ------------------------------------------------------
def _fail_after(monkeypatch, target, name: str, n_ok: int, err: OSError) -> None:
    real = getattr(target, name)
    calls = {"n": 0}

    def fake(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > n_ok:
            raise err
        return real(*args, **kwargs)

    monkeypatch.setattr(target, name, fake)


@pytest.mark.parametrize("where", ["torch.save", "os.replace"])
def test_disk_full_keeps_previous_checkpoint(where, tmp_path, monkeypatch):
    run = tmp_path / "run"
    t = Trainer(_cfg(), run, progress=False, log=lambda m: None)
    # saves: initial last.pt, then per epoch best.pt (if improved) and last.pt: fail from epoch 2 on
    first = {"n": 0}
    real_train_epoch = t.train_epoch

    def train_epoch(epoch):
        if epoch == 1 and not first["n"]:
            first["n"] = 1
            target, name = (torch, "save") if where == "torch.save" else (os, "replace")
            _fail_after(monkeypatch, target, name, 0, OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))
        return real_train_epoch(epoch)

    t.train_epoch = train_epoch
    with pytest.raises(InputError) as e:
        t.fit()
    monkeypatch.undo()
    msg = str(e.value)
    assert "No space left on device" in msg and "previous checkpoint is intact" in msg and "\n" not in msg
    ck = load_checkpoint(run / "last.pt")
    assert ck["epoch"] == 1 and all(torch.isfinite(v).all() for v in ck["model"].values() if v.is_floating_point())
    assert load_checkpoint(run / "best.pt")["epoch"] == 1
    assert not list(run.glob(".*.tmp"))


def test_disk_full_cli_one_line_exit_2(tmp_path, monkeypatch, capsys):
    _fail_after(monkeypatch, torch, "save", 2, OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))
    assert _train(tmp_path / "run") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("rpat: error: cannot write checkpoint") and "No space" in err[0]


def test_unwritable_run_dir(tmp_path, monkeypatch):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(InputError, match="cannot write to run directory"):
        Trainer(_cfg(), blocker / "run", progress=False, log=lambda m: None)
    # a folder that refuses new files (EACCES from the temp file), as root or not
    run = tmp_path / "run"
    t = Trainer(_cfg(), run, progress=False, log=lambda m: None)
    _fail_after(monkeypatch, tempfile, "mkstemp", 0, PermissionError(errno.EACCES, "Permission denied"))
    with pytest.raises(InputError, match="cannot write checkpoint .*Permission denied"):
        t.fit()
    monkeypatch.undo()
    if os.geteuid() != 0:  # a real read-only folder (root ignores permissions)
        run2 = tmp_path / "ro"
        run2.mkdir()
        os.chmod(run2, 0o500)
        try:
            with pytest.raises(InputError, match="cannot write"):
                Trainer(_cfg(), run2 / "sub", progress=False, log=lambda m: None)
        finally:
            os.chmod(run2, 0o700)


# ---- non-finite losses ------------------------------------------------------------------
def _nan_at_call(monkeypatch, n: int) -> None:
    real = Objective.step
    calls = {"n": 0}

    def step(self, *args, **kwargs):
        calls["n"] += 1
        loss, terms = real(self, *args, **kwargs)
        if calls["n"] == n:
            loss = loss * float("nan")
            terms = {k: v * float("nan") if k == "ce_adv" else v for k, v in terms.items()}
        return loss, terms

    monkeypatch.setattr(Objective, "step", step)


def test_nonfinite_stop_names_step_and_term_and_saves_nothing(tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    _nan_at_call(monkeypatch, 3)  # first step of the second epoch
    assert _train(run) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "epoch 2, step 1/2" in err[0] and "ce_adv" in err[0], err
    assert load_checkpoint(run / "last.pt")["epoch"] == 1 and not (run / "final.pt").exists()
    best = load_checkpoint(run / "best.pt")
    assert best["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in best["model"].values() if v.is_floating_point())


def test_nonfinite_weights_are_never_saved(tmp_path, monkeypatch):
    t = Trainer(_cfg(nonfinite="skip"), tmp_path / "run", progress=False, log=lambda m: None)
    real = t.train_epoch

    def poisoned(epoch):
        out = real(epoch)
        if epoch == 1:
            with torch.no_grad():
                next(t.model.parameters()).fill_(float("nan"))
        return out

    t.train_epoch = poisoned
    with pytest.raises(NonFiniteLossError, match="weights became non-finite in epoch 2"):
        t.fit()
    for p in (tmp_path / "run").glob("*.pt"):
        ck = load_checkpoint(p)
        assert ck["epoch"] <= 1
        assert all(torch.isfinite(v).all() for v in ck["model"].values() if v.is_floating_point()), p


def test_nonfinite_skip_skips_the_batch(tmp_path, monkeypatch):
    run = tmp_path / "run"
    _nan_at_call(monkeypatch, 3)
    assert _train(run, "nonfinite=skip") == 0
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["train_skipped_steps"] for r in rows] == [0, 1, 0]
    assert all(math.isfinite(r["train_loss"]) for r in rows)
    for name in ("final.pt", "best.pt"):
        w = _weights(run / name)
        assert all(torch.isfinite(v).all() for v in w.values() if v.is_floating_point())


def test_guard_restores_params_buffers_and_momentum_exactly():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    x, y = torch.rand(8, 1, 8, 8), torch.randint(0, 3, (8,))
    guard = NonFiniteGuard(model, opt, "skip", torch.device("cpu"))

    def step(inp):
        guard.snapshot()
        loss = nn.functional.cross_entropy(model(inp), y)
        opt.zero_grad()
        loss.backward()
        ok = guard.observe(0, loss, {"ce": loss.detach()})
        opt.step()
        guard.restore_if_bad(ok)
        return ok

    bad = x.clone()
    bad[0, 0, 0, 0] = float("nan")
    assert not bool(step(bad))  # a bad first step: no momentum buffer may keep NaNs
    assert all(torch.isfinite(t).all() for t in model.state_dict().values() if t.is_floating_point())
    assert bool(step(x))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    momenta = [opt.state[p]["momentum_buffer"].clone() for p in model.parameters()]
    model.train()
    assert not bool(step(bad))
    assert _equal(state, model.state_dict())
    for m, p in zip(momenta, model.parameters(), strict=True):
        assert torch.equal(m, opt.state[p]["momentum_buffer"])
    assert guard.check(0, 3) == 2  # skip mode counts, does not raise
    opt.zero_grad(set_to_none=True)
    stop = NonFiniteGuard(model, opt, "stop", torch.device("cpu"))
    stop.observe(4, torch.tensor(float("inf")), {"rpat": torch.tensor(float("inf")), "ce": torch.tensor(1.0)})
    with pytest.raises(NonFiniteLossError, match=r"loss term\(s\) rpat at epoch 1, step 5/9"):
        stop.check(0, 9)


# ---- checkpoints from the future ----------------------------------------------------------
def test_newer_checkpoint_format_is_refused(tmp_path):
    path = tmp_path / "future.pt"
    torch.save({"format": FORMAT, "format_version": FORMAT_VERSION + 1, "model": {}}, path)
    with pytest.raises(InputError) as e:
        load_checkpoint(path)
    assert f"format version {FORMAT_VERSION + 1}" in str(e.value) and f"({FORMAT_VERSION})" in str(e.value)


# ---- evaluation sanity checks -----------------------------------------------------------
@pytest.fixture(scope="module")
def digits_model():
    """A small CNN trained briefly (clean CE) on the 8x8 digits, and the test images."""
    train, test = load_dataset("digits", "data", "train"), load_dataset("digits", "data", "test")
    x, y = train.images.float() / 255, train.labels
    torch.manual_seed(0)
    model = create_model("small_cnn", num_classes=10, in_chans=1)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(4):
        for i in range(0, len(x), 64):
            loss = nn.functional.cross_entropy(model(x[i:i + 64]), y[i:i + 64])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    return model, test.images.float() / 255, test.labels


THREAT = ThreatModel("linf", 32 / 255, 8 / 255, 10)


class Quantized(nn.Module):
    """Rounds its input to 4 levels: zero input gradients everywhere (gradient masking)."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(torch.round(x * 3) / 3)


class StuckDropout(nn.Module):
    """Dropout that ignores eval(): random outputs during evaluation."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner, self.drop = inner, nn.Dropout(0.5)

    def train(self, mode: bool = True):
        super().train(mode)
        self.drop.train(True)
        return self

    def forward(self, x):
        return self.inner(self.drop(x))


def test_sanity_healthy_model_passes(digits_model):
    model, x, y = digits_model
    res = run_sanity_checks(model, x, y, THREAT, n_examples=200)
    assert res["passed"], res
    assert set(res["checks"]) == set(SANITY_CHECKS) and res["n_examples"] == 200
    assert res["checks"]["eps0_equals_clean"]["clean"] > 80
    assert res["checks"]["large_eps"]["accuracy"] <= res["checks"]["large_eps"]["limit"]
    assert not model.training  # modes restored


def test_sanity_catches_gradient_masking(digits_model):
    model, x, y = digits_model
    warnings = []
    res = run_sanity_checks(Quantized(model), x, y, THREAT, n_examples=200, warn=warnings.append)
    assert not res["passed"] and "large_eps" in res["failed"], res
    assert res["checks"]["large_eps"]["accuracy"] > 50
    assert any(w.startswith("rpat: warning: sanity check large_eps failed") for w in warnings)


def test_sanity_catches_dropout_left_on(digits_model):
    model, x, y = digits_model
    res = run_sanity_checks(StuckDropout(model), x, y, THREAT, n_examples=200)
    assert {"eval_mode", "deterministic"} <= set(res["failed"]), res
    assert "drop" in res["checks"]["eval_mode"]["detail"]


def test_sanity_catches_broken_ordering(digits_model):
    model, x, y = digits_model
    res = run_sanity_checks(model, x, y, THREAT, n_examples=50,
                            report={"clean": 90.0, "pgd": 50.0, "aa": 60.0, "n_examples": 1000})
    assert "ordering" in res["failed"]


def test_rpat_eval_records_sanity(digits_model, tmp_path, capsys):
    model, _, _ = digits_model
    path = tmp_path / "m.pt"
    torch.save(model.state_dict(), path)
    common = [str(path), "--arch", "small_cnn", "--dataset", "digits", "--n-examples", "60", "--no-autoattack",
              "--eps", "32/255", "--step-size", "8/255", "--steps", "5", "--no-progress"]
    assert main(["eval", *common, "--out", str(tmp_path / "a.json")]) == 0
    rep = json.loads((tmp_path / "a.json").read_text())
    assert rep["sanity"]["passed"] and set(rep["sanity"]["checks"]) == set(SANITY_CHECKS)
    assert rep["sanity"]["n_examples"] == 60
    assert main(["eval", *common, "--no-sanity", "--out", str(tmp_path / "b.json")]) == 0
    assert "sanity" not in json.loads((tmp_path / "b.json").read_text())
    capsys.readouterr()
