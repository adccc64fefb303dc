"""Trainer: exact resume, run-directory safety, checkpoints that load with weights_only."""

from __future__ import annotations

import io
import json
import re
import signal
import sys

import pytest
import torch

from rpat.checkpoint import load_checkpoint, model_from_checkpoint
from rpat.config import build_config
from rpat.data import ArrayDataset
from rpat.errors import InputError
from rpat.training import RunData, Trainer
from rpat.training.signals import TrainingInterrupted
from rpat.training.trainer import format_duration


def _data(n_train: int = 96, n_test: int = 48) -> RunData:
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 4, (n_train + n_test,), generator=g)
    # class-dependent brightness so there is something to learn
    images = (torch.rand(n_train + n_test, 1, 8, 8, generator=g) * 120 + labels.view(-1, 1, 1, 1) * 40)
    images = images.clamp(0, 255).to(torch.uint8)
    classes = ["a", "b", "c", "d"]
    train = ArrayDataset(images[:n_train], labels[:n_train], classes)
    test = ArrayDataset(images[n_train:], labels[n_train:], classes)
    return RunData(train, test, 4, 1, 1, False, None, None)


def _cfg(epochs: int = 3, **extra):
    o = [
        {"data": {"dataset": "digits", "batch_size": 32}, "model": {"arch": "small_cnn"},
         "attack": {"eps": "16/255", "step_size": "8/255", "steps": 2},
         "optim": {"epochs": epochs, "lr": 0.05, "milestones": [2]},
         "eval": {"n_examples": 48, "steps": 3}, "device": "cpu"},
        *[{k: v} for k, v in extra.items()],
    ]
    return build_config(None, None, o)


def _weights(path):
    return load_checkpoint(path)["model"]


def test_resume_after_interrupted_epoch_equals_uninterrupted(tmp_path, monkeypatch):
    cfg = _cfg(rpat={"enabled": True})
    Trainer(cfg, tmp_path / "a", data=_data(), progress=False, log=lambda m: None).fit()

    t = Trainer(cfg, tmp_path / "b", data=_data(), progress=False, log=lambda m: None)
    calls = {"n": 0}
    real_step = t.objective.step

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:  # second step of the second epoch (3 steps per epoch)
            raise KeyboardInterrupt
        return real_step(*args, **kwargs)

    monkeypatch.setattr(t.objective, "step", flaky)
    with pytest.raises(KeyboardInterrupt):
        t.fit()
    assert load_checkpoint(tmp_path / "b" / "last.pt")["epoch"] == 1
    monkeypatch.undo()

    resumed = Trainer(cfg, tmp_path / "b", resume=True, data=_data(), progress=False, log=lambda m: None)
    assert resumed.start_epoch == 1
    resumed.fit()
    wa, wb = _weights(tmp_path / "a" / "final.pt"), _weights(tmp_path / "b" / "final.pt")
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    la = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    lb = [json.loads(x) for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lb] == [0, 1, 2]
    for ra, rb in zip(la, lb, strict=True):
        for key in ("train_loss", "train_rpat", "held_out_clean", "held_out_pgd"):
            assert ra[key] == rb[key]


def test_same_seed_same_run_different_seed_different(tmp_path):
    cfg = _cfg(epochs=1)
    Trainer(cfg, tmp_path / "a", data=_data(), progress=False, log=lambda m: None).fit()
    Trainer(cfg, tmp_path / "b", data=_data(), progress=False, log=lambda m: None).fit()
    other = _cfg(epochs=1, seed=1)
    Trainer(other, tmp_path / "c", data=_data(), progress=False, log=lambda m: None).fit()
    a, b, c = (_weights(tmp_path / d / "final.pt") for d in "abc")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_run_dir_is_protected(tmp_path):
    cfg = _cfg(epochs=1)
    run = tmp_path / "run"
    Trainer(cfg, run, data=_data(), progress=False, log=lambda m: None).fit()
    with pytest.raises(InputError, match="already holds a run"):
        Trainer(cfg, run, data=_data(), progress=False, log=lambda m: None)
    with pytest.raises(InputError, match="exclude each other"):
        Trainer(cfg, run, resume=True, overwrite=True, data=_data(), progress=False)
    with pytest.raises(InputError, match="nothing to resume"):
        Trainer(cfg, tmp_path / "empty", resume=True, data=_data(), progress=False)
    Trainer(cfg, run, overwrite=True, data=_data(), progress=False, log=lambda m: None).fit()
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 1


def test_run_files_and_checkpoints(tmp_path):
    cfg = _cfg(epochs=2, optim={"epochs": 2, "lr": 0.05, "milestones": [1]})
    run = tmp_path / "run"
    summary = Trainer(cfg, run, data=_data(), progress=False, log=lambda m: None).fit()
    for f in ("config.yaml", "meta.json", "metrics.jsonl", "last.pt", "best.pt", "final.pt"):
        assert (run / f).is_file(), f
    meta = json.loads((run / "meta.json").read_text())
    assert meta["rpat_version"] and "git_commit" in meta and meta["objective"] == "pgd_at"
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["train_lr"] == 0.05 and rows[1]["train_lr"] == pytest.approx(0.005)
    assert {"train_ce_adv", "train_loss", "held_out_clean", "held_out_pgd", "train_images_per_s"} <= set(rows[0])
    best = max(rows, key=lambda r: r["held_out_pgd"])
    assert summary["best_epoch"] == best["epoch"] + 1
    # weights_only loads; the model is rebuilt from the metadata and predicts like the trained one
    raw = torch.load(run / "final.pt", weights_only=True)
    assert raw["format"] == "rpat-checkpoint" and "optimizer" not in raw
    model, _ = model_from_checkpoint(run / "final.pt")
    x = torch.rand(4, 1, 8, 8)
    state = raw["model"]
    assert all(torch.equal(model.state_dict()[k], state[k]) for k in state)
    with torch.no_grad():
        assert model(x).shape == (4, 4)
    held = torch.load(run / "best.pt", weights_only=True)["held_out"]
    assert held["pgd"] == pytest.approx(best["held_out_pgd"])


def test_save_every_keeps_per_epoch_checkpoints(tmp_path):
    cfg = _cfg(epochs=3, save_every=2)
    run = tmp_path / "run"
    Trainer(cfg, run, data=_data(), progress=False, log=lambda m: None).fit()
    kept = sorted(p.name for p in (run / "epochs").iterdir())
    assert kept == ["epoch_0002.pt"]
    ck = load_checkpoint(run / "epochs" / "epoch_0002.pt")
    assert ck["epoch"] == 2 and "held_out" in ck


# ---- progress off a terminal: a step line every progress_every_s seconds ---------------------
class _NotATerminal(io.StringIO):
    def isatty(self) -> bool:
        return False


def test_step_lines_off_a_terminal_only_past_the_interval(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "stderr", _NotATerminal())  # as under `rpat train ... > log 2>&1`
    cfg = _cfg(epochs=2)
    lines: list[str] = []
    t = Trainer(cfg, tmp_path / "every", data=_data(), progress=True, log=lines.append)
    assert t.progress is False and t.step_lines is True and t.progress_every_s == 30.0
    t.progress_every_s = 0.0  # a line at every step boundary but the last
    losses: list[float] = []
    real_step = t.objective.step

    def step_and_record(*args, **kwargs):
        loss, terms = real_step(*args, **kwargs)
        losses.append(float(loss.detach()))
        return loss, terms

    monkeypatch.setattr(t.objective, "step", step_and_record)
    t.fit()
    step = [ln for ln in lines if " step " in ln]
    assert [ln.split(" (")[0] for ln in step] == ["epoch 1/2 step 1/3", "epoch 1/2 step 2/3",
                                                  "epoch 2/2 step 1/3", "epoch 2/2 step 2/3"]
    for ln in step:
        assert re.fullmatch(r"epoch \d/2 step \d/3 \(\d+%\) \d+ img/s, ETA \d+ s \| ce_adv=\d\.\d{4} loss=\d\.\d{4}",
                            ln), ln
    assert "(33%)" in step[0] and "(67%)" in step[1]
    # each epoch's step lines come before its epoch line
    assert lines.index(step[1]) < next(i for i, ln in enumerate(lines) if ln.startswith("epoch 1/2 lr="))
    # the loss shown is the running mean of the epoch's batch losses so far (3 batches of 32)
    shown = [float(ln.rsplit("loss=", 1)[1]) for ln in step]
    expected = [sum(losses[e * 3:e * 3 + k]) / k for e in range(2) for k in (1, 2)]
    assert shown == pytest.approx(expected, abs=6e-5)

    quiet: list[str] = []  # the default interval: a tiny run logs only its epoch lines
    Trainer(cfg, tmp_path / "default", data=_data(), progress=True, log=quiet.append).fit()
    quiet = [ln for ln in quiet if not ln.startswith("rpat: warning:")]  # the config's own warnings
    assert [ln.split(" lr=")[0] for ln in quiet] == ["epoch 1/2", "epoch 2/2"]
    off: list[str] = []  # progress=False (--no-progress): no step lines either
    t_off = Trainer(cfg, tmp_path / "off", data=_data(), progress=False, log=off.append)
    t_off.progress_every_s = 0.0
    t_off.fit()
    assert not [ln for ln in off if " step " in ln]
    # reading the running loss at the lines changes nothing in the run
    for name in ("final.pt", "last.pt"):
        a, b = _weights(tmp_path / "every" / name), _weights(tmp_path / "off" / name)
        assert all(torch.equal(a[k], b[k]) for k in a), name


def test_format_duration():
    assert [format_duration(s) for s in (0, 0.4, 42, 59.6, 66, 3599, 3600, 7530)] == [
        "0 s", "0 s", "42 s", "1 min 0 s", "1 min 6 s", "59 min 59 s", "1 h 0 min", "2 h 5 min"]


# ---- a stop during the held-out evaluation keeps the trained epoch ---------------------------
def _rows(run) -> list[dict]:
    wall = {"train_seconds", "train_images_per_s"}  # wall-clock numbers differ between any two runs
    return [{k: v for k, v in json.loads(x).items() if k not in wall}
            for x in (run / "metrics.jsonl").read_text().splitlines()]


def _same_state(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("averaging", [False, True])
@pytest.mark.parametrize("where", ["held_out_eval", "after_metrics_row"])
def test_stop_in_held_out_evaluation_keeps_the_epoch_and_resume_is_exact(where, averaging, tmp_path, monkeypatch):
    extra = {"averaging": {"enabled": True, "decay": 0.5}} if averaging else {}
    cfg = _cfg(rpat={"enabled": True}, **extra)
    quiet = {"data": _data(), "progress": False, "log": lambda m: None}
    Trainer(cfg, tmp_path / "a", **quiet).fit()

    t = Trainer(cfg, tmp_path / "b", **quiet)
    if where == "held_out_eval":  # Ctrl-C while epoch 2's held-out PGD runs
        real_eval, calls = t.evaluate_held_out, {"n": 0}

        def evaluate(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] == (3 if averaging else 2):  # epoch 2's first evaluation
                raise TrainingInterrupted(signal.SIGINT)
            return real_eval(*args, **kwargs)

        monkeypatch.setattr(t, "evaluate_held_out", evaluate)
    else:  # a kill (SIGKILL: no critical section helps) after epoch 2's metrics row, before last.pt
        real_save = t._save_last

        def save_last(done, held_out_pending=None):
            if done == 2 and held_out_pending is None:
                raise KeyboardInterrupt
            return real_save(done, held_out_pending)

        monkeypatch.setattr(t, "_save_last", save_last)
    with pytest.raises(KeyboardInterrupt) as e:
        t.fit()
    b = tmp_path / "b"
    ck = load_checkpoint(b / "last.pt")
    assert ck["epoch"] == 2 and ck["held_out_pending"]["loss"] == _rows(tmp_path / "a")[1]["train_loss"]
    assert [r["epoch"] for r in _rows(b)] == ([0] if where == "held_out_eval" else [0, 1])
    if where == "held_out_eval":
        msg = str(e.value)
        assert "stopped by SIGINT in the held-out evaluation of epoch 2/3" in msg, msg
        assert "holds 2 finished epoch(s)" in msg and f"rpat train --run-dir {b} --resume" in msg
    monkeypatch.undo()

    lines: list[str] = []
    resumed = Trainer(cfg, b, resume=True, data=_data(), progress=False, log=lines.append)
    assert resumed.start_epoch == 2 and resumed.held_out_pending is not None
    assert "first the held-out evaluation of epoch 2/3" in lines[0]
    resumed.fit()
    assert [ln.split(" lr=")[0] for ln in lines[1:]] == ["epoch 2/3", "epoch 3/3"]
    a = tmp_path / "a"
    for name in ("final.pt", "best.pt", "last.pt"):
        ca, cb = load_checkpoint(a / name), load_checkpoint(b / name)
        assert ca["epoch"] == cb["epoch"] and _same_state(ca["model"], cb["model"]), name
    la, lb = load_checkpoint(a / "last.pt"), load_checkpoint(b / "last.pt")
    assert la["best"] == lb["best"] and "held_out_pending" not in lb
    for pa, pb in zip(la["optimizer"]["state"].values(), lb["optimizer"]["state"].values(), strict=True):
        assert torch.equal(pa["momentum_buffer"], pb["momentum_buffer"])
    if averaging:
        assert _same_state(la["averaged"], lb["averaged"])
    assert _rows(a) == _rows(b)
    assert [r["epoch"] for r in _rows(b)] == [0, 1, 2]
