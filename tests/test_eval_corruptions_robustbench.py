"""`rpat eval --corruptions DIR` and `rpat eval --robustbench NAME`, end to end on small files in the
official layouts."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from rpat.cli import main
from rpat.models import create_model

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_corruptions import make_cifar_c  # noqa: E402
from test_data import make_cifar10  # noqa: E402

QUICK = ["--dataset", "cifar10", "--steps", "1", "--no-sanity", "--no-progress"]


def _setup(tmp_path: Path) -> tuple[Path, Path]:
    root = tmp_path / "data"
    root.mkdir()
    make_cifar10(root, per_batch=2, n_test=7)
    torch.manual_seed(0)
    ckpt = tmp_path / "m.pt"
    torch.save(create_model("small_cnn", num_classes=10, in_chans=3).state_dict(), ckpt)
    return root, ckpt


def test_eval_corruptions_writes_per_corruption_accuracy_and_mce(tmp_path, capsys):
    root, ckpt = _setup(tmp_path)
    make_cifar_c(root / "CIFAR-10-C", per=4)
    out = tmp_path / "r.json"
    assert main(["eval", str(ckpt), *QUICK, "--data-root", str(root), "--autoattack", "none",
                 "--corruptions", str(root), "--out", str(out)]) == 0
    rep = json.loads(out.read_text())
    assert len(rep["corruptions"]) == 15 and rep["corruption_images"] == 4
    accs = [v["all"] for v in rep["corruptions"].values()]
    assert abs(rep["mce"] - (100 - sum(accs) / 15)) < 1e-6
    assert rep["settings"]["corruptions"]["set"] == "cifar10-c"
    assert "mean corruption accuracy" in capsys.readouterr().out


def test_eval_corruptions_missing_folder_fails_before_any_evaluation(tmp_path, capsys):
    root, ckpt = _setup(tmp_path)
    assert main(["eval", str(ckpt), *QUICK, "--data-root", str(root), "--autoattack", "none",
                 "--corruptions", str(tmp_path / "nowhere"), "--out", str(tmp_path / "r.json")]) == 2
    assert "lacks labels.npy" in capsys.readouterr().err and not (tmp_path / "r.json").exists()


def test_eval_robustbench_writes_the_model_info_file(tmp_path, capsys):
    root, ckpt = _setup(tmp_path)
    rb = tmp_path / "rb"
    args = ["eval", str(ckpt), *QUICK, "--data-root", str(root), "--robustbench", "Rpat2026Test",
            "--robustbench-root", str(rb), "--link", "https://example.org/paper", "--out", str(tmp_path / "r.json")]
    assert main(args) == 2  # 7 test images are not RobustBench's first 10,000
    assert "10000" in capsys.readouterr().err
    assert main([*args, "--robustbench-allow-deviations"]) == 0
    out = capsys.readouterr().out
    path = rb / "model_info" / "cifar10" / "Linf" / "Rpat2026Test.json"
    info = json.loads(path.read_text())
    rep = json.loads((tmp_path / "r.json").read_text())
    assert info["clean_acc"] == f"{rep['clean']:.2f}" and info["autoattack_acc"] == f"{rep['aa']:.2f}"
    assert info["eps"] == "8/255" and info["link"] == "https://example.org/paper" and info["architecture"]
    assert rep["settings"]["batch_size"] == 32 and rep["settings"]["autoattack"] == "standard"
    assert "deviates from RobustBench's protocol" in out and str(path) in out
