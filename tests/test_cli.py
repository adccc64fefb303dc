"""The command line: bad input is one line and exit 2; train + eval end to end on real JPEGs."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from rpat.cli import main


def run_cli(*args: str, capsys=None) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize(
    "args, message",
    [
        (["train", "--dataset", "imagenet"], "unknown dataset 'imagenet'; valid: cifar10, cifar100, digits"),
        (["train", "--arch", "vgg"], "unknown model 'vgg'; valid:"),
        (["train", "--method", "fgsm"], "unknown method 'fgsm'; valid: consistency_at, mart, pgd_at, trades"),
        (["train", "attack.eps=8"], "did you mean 8/255"),
        (["train", "--resume"], "--resume needs --run-dir"),
    ],
)
def test_bad_input_one_line_exit_2(args, message, capsys):
    code, out, err = run_cli(*args, capsys=capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("rpat: error: ") and message in lines[0]


def test_console_script_help_and_list():
    out = subprocess.run([sys.executable, "-m", "rpat", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "train" in out.stdout and "eval" in out.stdout
    out = subprocess.run([sys.executable, "-m", "rpat", "list", "models"], capture_output=True, text=True)
    assert out.stdout.split() == ["dm_preact_resnet18_swish", "dm_wrn28_10_swish", "dm_wrn70_16_swish", "mobilenetv2",
                                  "preact_resnet18", "resnet18", "small_cnn", "vgg16", "wrn28_10", "wrn34_10"]
    out = subprocess.run([sys.executable, "-m", "rpat", "train", "--dataset", "nope"],
                         capture_output=True, text=True)
    assert out.returncode == 2 and "Traceback" not in out.stderr


def test_eval_refuses_wrong_architecture(tmp_path, capsys):
    from rpat.models import create_model

    path = tmp_path / "preact.pt"
    torch.save(create_model("preact_resnet18").state_dict(), path)
    code, _, err = run_cli("eval", str(path), "--arch", "resnet18", "--dataset", "digits", capsys=capsys)
    assert code == 2 and "key" in err and "resnet18" in err
    code, _, err = run_cli("eval", str(path), "--dataset", "digits", capsys=capsys)
    assert code == 2 and "--arch" in err


def test_eval_strips_ddp_prefix(tmp_path, capsys):
    from rpat.models import create_model

    torch.manual_seed(0)
    model = create_model("small_cnn", num_classes=10, in_chans=1)
    path = tmp_path / "ddp.pt"
    torch.save({f"module.{k}": v for k, v in model.state_dict().items()}, path)
    code, out, err = run_cli("eval", str(path), "--arch", "small_cnn", "--dataset", "digits",
                             "--n-examples", "20", "--no-autoattack", "--eps", "8/255",
                             "--no-progress", "--out", str(tmp_path / "r.json"), capsys=capsys)
    assert code == 0, err
    rep = json.loads((tmp_path / "r.json").read_text())
    assert rep["n_examples"] == 20 and rep["aa"] is None


def test_train_then_eval_on_cifar10_jpegs(cifar10_jpeg_subset, tmp_path, capsys):
    run = tmp_path / "run"
    args = ["train", "--dataset", "imagefolder", "--data-root", str(cifar10_jpeg_subset), "--arch",
            "small_cnn", "--epochs", "2", "--rpat", "--run-dir", str(run), "--no-progress",
            "optim.lr=0.05", "optim.milestones=[1]", "eval.n_examples=100", "attack.steps=3"]
    code, out, err = run_cli(*args, capsys=capsys)
    assert code == 0, err
    assert "epoch 2/2" in out
    # a second train into the same run directory is refused
    code, _, err = run_cli(*args, capsys=capsys)
    assert code == 2 and "already holds a run" in err
    report = tmp_path / "eval.json"
    code, out, err = run_cli("eval", str(run / "best.pt"), "--n-examples", "40", "--no-progress",
                             "--out", str(report), capsys=capsys)
    assert code == 0, err
    rep = json.loads(report.read_text())
    assert rep["n_examples"] == 40 and rep["dataset"] == "imagefolder"
    assert 100 >= rep["clean"] >= rep["pgd"] >= rep["aa"] >= 0
    assert rep["mean"] == pytest.approx((rep["clean"] + rep["aa"]) / 2)
    assert "Clean" in out and "AA" in out and "NRR" in out


def test_demo_trains_both_methods_and_prints_a_consistent_table(tmp_path, capsys):
    from rpat.cli import main

    assert main(["demo", "--out", str(tmp_path), "--epochs", "1", "--n-examples", "30", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "| PGD-AT " in out and "| PGD-AT + RPAT" in out and "NRR" in out
    # it says what it runs (epochs, test images, which AutoAttack) and how long it took
    assert "1 epochs each" in out and "the first 30 of 599 test images" in out and "standard AutoAttack" in out
    assert "(total " in out and " min " in out
    rows = json.loads((tmp_path / "results.json").read_text())
    assert set(rows) == {"PGD-AT", "PGD-AT + RPAT"}
    for r in rows.values():
        assert r["n_examples"] == 30
        assert r["aa"] <= r["pgd"] + 1e-9 and r["pgd"] <= r["clean"] + 1e-9
        assert r["mean"] == pytest.approx((r["clean"] + r["aa"]) / 2)
    assert json.loads((tmp_path / "pgd_at_rpat" / "meta.json").read_text())["objective"] == "pgd_at+rpat"


def test_train_help_lists_every_config_key():
    """The key list of ``rpat train --help`` is made from the config's dataclasses: no key is missing."""
    import dataclasses

    from rpat.cli.train import EXAMPLES_TRAIN
    from rpat.config import Config

    text = " ".join(EXAMPLES_TRAIN.split())  # wrapped lines joined
    flat = text.replace(", ", ",")  # a section broken after a comma, joined again
    for f in dataclasses.fields(Config):
        value = getattr(Config(), f.name)
        if dataclasses.is_dataclass(value):
            assert f"{f.name}.{{{','.join(g.name for g in dataclasses.fields(value))}}}" in flat, f.name
        else:
            assert f" {f.name} " in text, f.name
    assert max(len(line) for line in EXAMPLES_TRAIN.splitlines()) <= 120
