"""Trainer: exact resume, run-directory safety, checkpoints that load with weights_only."""

from __future__ import annotations

import json

import pytest
import torch

from rpat.checkpoint import load_checkpoint, model_from_checkpoint
from rpat.config import build_config
from rpat.data import ArrayDataset
from rpat.errors import InputError
from rpat.training import RunData, Trainer


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
