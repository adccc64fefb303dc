"""What a new user meets: the README's public-checkpoint route, `rpat train` flags that used to mislead
(--print-config, --epochs, --resume with other flags, extending a finished run), and `rpat eval` notes."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rpat.checkpoint import load_checkpoint
from rpat.cli import main
from rpat.data import DATASETS

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_data import make_cifar10  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
#: A tiny digits run: small CNN, 128 training images, 2-step attacks, 50 held-out images.
TINY = ["--preset", "digits_demo", "--device", "cpu", "--no-progress", "data.train_subset=128", "attack.steps=2",
        "eval.n_examples=50", "eval.steps=2", "optim.schedule=constant"]


def _readme_block() -> list[str]:
    text = (ROOT / "README.md").read_text()
    marker = text.index("<!-- public-checkpoint commands")
    block = text[marker:].split("```bash\n", 1)[1].split("```", 1)[0]
    return [ln for ln in block.splitlines() if ln.strip()]


def test_the_readme_public_checkpoint_route_runs_as_written(tmp_path, monkeypatch, capsys):
    lines = _readme_block()
    assert lines[0].startswith("cp ") and lines[1].startswith("rpat eval model_test.pt")
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    subprocess.run(["bash", "-c", lines[0]], cwd=tmp_path, env=env, check=True)  # the copy, as written
    assert (tmp_path / "model_test.pt").stat().st_size > 40_000_000
    # a local copy of the archive, served from a file:// mirror (a tiny CIFAR-10 in the official format)
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    archive, src = make_cifar10(mirror, per_batch=2, n_test=6)
    monkeypatch.setenv("RPAT_MIRROR", mirror.as_uri() + "/")
    monkeypatch.setitem(DATASETS, "cifar10", dataclasses.replace(
        DATASETS["cifar10"], md5=hashlib.md5(archive.read_bytes()).hexdigest()))
    monkeypatch.chdir(tmp_path)
    argv = shlex.split(lines[1])[1:]
    assert main([*argv, "--no-progress", "--no-sanity", "--autoattack", "none"]) == 0
    out, err = capsys.readouterr()
    assert (tmp_path / "data" / "cifar-10-python.tar.gz").is_file()  # --download fetched it
    assert "architecture inferred from the weights: resnet18" in out + err
    assert "unverified" in out + err
    rep = json.loads((tmp_path / "model_test.eval.json").read_text())
    assert rep["arch"] == "resnet18" and rep["n_examples"] == 6 and 0 <= rep["pgd"] <= rep["clean"] <= 100


def test_eval_says_when_n_examples_is_more_than_the_test_set(tmp_path, capsys):
    torch.manual_seed(0)
    from rpat.models import create_model

    torch.save(create_model("small_cnn", num_classes=10, in_chans=1).state_dict(), tmp_path / "m.pt")
    assert main(["eval", str(tmp_path / "m.pt"), "--dataset", "digits", "--n-examples", "20000", "--steps", "1",
                 "--autoattack", "none", "--no-sanity", "--no-progress", "--out", str(tmp_path / "r.json")]) == 0
    out, err = capsys.readouterr()
    assert "--n-examples 20000 is more than the 599 test images of digits: evaluating all 599" in out + err
    assert json.loads((tmp_path / "r.json").read_text())["n_examples"] == 599


def test_print_config_shows_the_resolved_config_and_writes_nothing(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--preset", "cifar10_benchmark", "--epochs", "10", "--run-dir", str(run),
                 "--print-config"]) == 0
    out = capsys.readouterr().out
    assert "--epochs 10: lr milestones [100, 105] of 110 epochs rescaled to [9, 9]" in out
    assert re.search(r"^  eps: 8/255$", out, re.M) and "milestones:\n  - 9\n  - 9" in out
    assert "training attack linf eps=8/255 step=2/255 steps=10" in out
    assert not run.exists()


def test_train_help_shows_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    assert "(default: 1000)" in capsys.readouterr().out


def test_resume_says_which_flags_it_ignores_and_epochs_extends_a_finished_run(tmp_path, capsys):
    """--resume --epochs 2 on a finished 1-epoch run (constant lr) continues it: it ends equal to a 2-epoch run."""
    assert main(["train", *TINY, "--epochs", "1", "--run-dir", str(tmp_path / "a")]) == 0
    capsys.readouterr()
    assert main(["train", "--run-dir", str(tmp_path / "a"), "--resume", "optim.lr=0.01"]) == 0
    out = capsys.readouterr().out
    assert "ignored: optim.lr=0.01" in out and "already finished" in out
    assert main(["train", "--run-dir", str(tmp_path / "a"), "--resume", "--epochs", "2", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "extending" in out and "from 1 to 2 epochs" in out
    assert main(["train", *TINY, "--epochs", "2", "--run-dir", str(tmp_path / "b")]) == 0
    a, b = load_checkpoint(tmp_path / "a" / "final.pt"), load_checkpoint(tmp_path / "b" / "final.pt")
    assert a["epoch"] == b["epoch"] == 2
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    rows = [json.loads(ln) for ln in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["epoch"], r["epoch_number"]) for r in rows] == [(0, 1), (1, 2)]
    assert main(["train", "--run-dir", str(tmp_path / "a"), "--resume", "--epochs", "1"]) == 2  # only extends
    assert "can only extend it" in capsys.readouterr().err


def test_a_cosine_run_is_not_extended(tmp_path, capsys):
    assert main(["train", *TINY[:-1], "optim.schedule=cosine", "--epochs", "1", "--run-dir", str(tmp_path / "c")]) == 0
    assert main(["train", "--run-dir", str(tmp_path / "c"), "--resume", "--epochs", "2"]) == 2
    assert "cannot extend a cosine schedule" in capsys.readouterr().err


def test_ctrl_c_in_an_evaluation_says_how_to_resume(tmp_path, monkeypatch, capsys):
    import rpat.evaluation.checkpoint_eval as ce
    from rpat.models import create_model

    torch.manual_seed(0)
    torch.save(create_model("small_cnn", num_classes=10, in_chans=1).state_dict(), tmp_path / "m.pt")

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(ce, "evaluate_robustness", interrupted)
    assert main(["eval", str(tmp_path / "m.pt"), "--dataset", "digits", "--n-examples", "10", "--no-progress",
                 "--out", str(tmp_path / "r.json")]) == 130
    assert "run the same command again to resume" in capsys.readouterr().err
