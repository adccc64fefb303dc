"""``model.init``: start training from given weights (fine-tuning a public or an rpat checkpoint)."""

from __future__ import annotations

import json

import pytest
import torch

from rpat.checkpoint import load_checkpoint
from rpat.cli import main
from rpat.config import build_config
from rpat.models import create_model
from rpat.training import Trainer

TINY = {"device": "cpu", "data": {"train_subset": 64, "batch_size": 32}, "optim": {"epochs": 1},
        "attack": {"steps": 1}, "eval": {"n_examples": 16, "steps": 2}}


def test_init_loads_the_weights_before_the_first_step_and_is_recorded(tmp_path):
    pytest.importorskip("sklearn")  # the 8x8 digits
    torch.manual_seed(5)
    start = create_model("small_cnn", num_classes=10, in_chans=1)
    plain = tmp_path / "start.pt"
    torch.save({f"module.{k}": v for k, v in start.state_dict().items()}, plain)  # a DDP-saved state_dict
    cfg = build_config("digits_demo", None, [TINY, {"model": {"init": str(plain)}}])
    trainer = Trainer(cfg, tmp_path / "ft", progress=False, log=lambda *_: None)
    for k, v in start.state_dict().items():
        assert torch.equal(trainer.model.state_dict()[k], v), k
    meta = json.loads((tmp_path / "ft" / "meta.json").read_text())
    assert meta["init"]["path"] == str(plain) and len(meta["init"]["sha256"]) == 64
    trainer.fit()
    # an rpat checkpoint as the start: its evaluated model; the resumed run ignores init (its own weights)
    best = tmp_path / "ft" / "best.pt"
    cfg2 = build_config("digits_demo", None, [TINY, {"model": {"init": str(best)}}])
    again = Trainer(cfg2, tmp_path / "ft2", progress=False, log=lambda *_: None)
    ref = load_checkpoint(best)["model"]
    assert all(torch.equal(again.model.state_dict()[k], v) for k, v in ref.items())


def test_init_errors_are_one_line_exit_2(tmp_path, capsys):
    code = main(["train", "--preset", "digits_demo", "--run-dir", str(tmp_path / "r"), "model.init=nope.pt"])
    err = capsys.readouterr().err
    assert code == 2 and "model.init=nope.pt: no such file" in err and err.count("\n") == 1
    pytest.importorskip("sklearn")
    wrong = tmp_path / "wrong.pt"
    torch.save(create_model("resnet18", num_classes=10, in_chans=1).state_dict(), wrong)
    code = main(["train", "--preset", "digits_demo", "--run-dir", str(tmp_path / "r2"), f"model.init={wrong}",
                 *[f"{k}={v}" for k, v in (("device", "cpu"), ("optim.epochs", 1))]])
    err = capsys.readouterr().err
    assert code == 2 and "resnet18" in err and err.count("\n") == 1
    assert not (tmp_path / "r2" / "last.pt").exists()
