"""A newcomer's path: threads on a shared machine, progress in logs, labeled "best", finished runs left alone."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from rpat.cli import main
from rpat.config import build_config
from rpat.data import ArrayDataset
from rpat.training import RunData, Trainer

PROBE = "import os, rpat, torch; print(os.environ.get('OMP_WAIT_POLICY'))"


def _probe(env_policy: str | None) -> str:
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if env_policy is not None:
        env["OMP_WAIT_POLICY"] = env_policy
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True)
    return out.stdout.strip()


def test_importing_rpat_sets_passive_waiting_unless_the_user_chose():
    assert _probe(None) == "PASSIVE"
    assert _probe("ACTIVE") == "ACTIVE"


def test_rpat_module_sets_it_before_torch_loads():
    """`python -m rpat` goes through rpat/__init__.py before anything imports torch."""
    code = ("import sys, os; import rpat; assert os.environ['OMP_WAIT_POLICY'] == 'PASSIVE';"
            "print('torch' in sys.modules)")
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    # rpat/__init__ sets the variable first thing; torch is then loaded by its imports
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "True"
    src = open(os.path.join(os.path.dirname(__import__("rpat").__file__), "__init__.py")).read()
    assert src.index("os.environ.setdefault(\"OMP_WAIT_POLICY\"") < src.index("from .")


def test_threads_flag_sets_torch_threads(capsys):
    before = torch.get_num_threads()
    try:
        assert main(["--threads", "1", "list", "proxies"]) == 0
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    assert main(["--threads", "0", "list"]) == 2
    assert "--threads must be >= 1" in capsys.readouterr().err


class _FakeStream:
    def __init__(self, tty: bool):
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty


def _data(n_train: int = 64, n_test: int = 32) -> RunData:
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 4, (n_train + n_test,), generator=g)
    images = (torch.rand(n_train + n_test, 1, 8, 8, generator=g) * 120 + labels.view(-1, 1, 1, 1) * 40)
    images = images.clamp(0, 255).to(torch.uint8)
    cl = ["a", "b", "c", "d"]
    return RunData(ArrayDataset(images[:n_train], labels[:n_train], cl),
                   ArrayDataset(images[n_train:], labels[n_train:], cl), 4, 1, 1, False, None, None)


def _cfg(epochs: int = 2):
    return build_config(None, None, [
        {"data": {"dataset": "digits", "batch_size": 32}, "model": {"arch": "small_cnn"},
         "attack": {"eps": "16/255", "step_size": "8/255", "steps": 2},
         "optim": {"epochs": epochs, "lr": 0.05, "milestones": [1]}, "eval": {"n_examples": 32, "steps": 2},
         "device": "cpu"}])


def test_no_bars_without_a_terminal_one_line_per_epoch_naming_the_selection_set(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "stderr", _FakeStream(False))
    lines: list[str] = []
    t = Trainer(_cfg(), tmp_path / "run", data=_data(), progress=True, log=lines.append)
    assert t.progress is False  # asked for, but stderr is not a terminal
    t.fit()
    epochs = [ln for ln in lines if ln.startswith("epoch ")]
    assert len(epochs) == 2
    assert all("held-out (first 32 test images)" in ln and "held-out eval" in ln for ln in epochs)
    assert "*best so far*" in epochs[0]
    meta = json.loads((tmp_path / "run" / "meta.json").read_text())
    assert meta["selection"] == "test: the first 32 test images" and meta["held_out_images"] == 32
    monkeypatch.setattr(sys, "stderr", _FakeStream(True))
    assert Trainer(_cfg(), tmp_path / "r2", data=_data(), progress=True, log=lines.append).progress is True


def test_resuming_a_finished_run_changes_no_file(tmp_path):
    run = tmp_path / "run"
    Trainer(_cfg(), run, data=_data(), progress=False, log=lambda m: None).fit()
    (run / "final.eval.json").write_text("{}\n")
    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in run.iterdir() if p.is_file()}
    lines: list[str] = []
    t = Trainer(_cfg(), run, resume=True, data=_data(), progress=False, log=lines.append)
    summary = t.fit()
    after = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in run.iterdir() if p.is_file()}
    assert after == before
    assert summary["already_finished"] is True and summary["epochs"] == 2
    assert any("already finished" in ln and "no file changed" in ln for ln in lines)


@pytest.mark.parametrize("what, expected", [
    ("methods", ["consistency_at", "mart", "pgd_at", "trades"]),
])
def test_list_methods_explains_rebat(what, expected, capsys):
    assert main(["list", what]) == 0
    out = capsys.readouterr().out
    for m in expected:
        assert m in out
    assert "ReBAT" in out and "rebat.enabled" in out and "RPAT++" in out


def test_list_presets_one_line_descriptions(capsys):
    from rpat.presets import list_presets

    assert main(["list", "presets"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    names = list_presets()
    described = {ln.split()[0]: ln for ln in lines if ln.split() and ln.split()[0] in names}
    assert set(described) == set(names)
    for ln in described.values():
        assert len(ln.split(maxsplit=1)) == 2 and len(ln.split(maxsplit=1)[1]) > 10, ln
    assert "digits" in described["digits_demo"] and "110 epochs" in described["cifar10_benchmark"]
    assert any(ln.startswith("bench/") for ln in lines)


def test_train_subset_decodes_only_the_images_used(cifar10_jpeg_subset, tmp_path, monkeypatch):
    import shutil

    import rpat.data.formats as formats
    from rpat.data import load_dataset
    from rpat.training import prepare_data

    root = tmp_path / "f"
    # without the decode cache that other tests may have left in the shared fixture folder
    shutil.copytree(cifar10_jpeg_subset, root, ignore=shutil.ignore_patterns(".rpat-cache"))
    cfg = build_config(None, None, [{"data": {"dataset": "imagefolder", "root": str(root), "train_subset": 50,
                                              "val_size": 30}, "model": {"arch": "small_cnn"}, "device": "cpu"}])
    calls: list[str] = []
    real = formats._decode_image
    monkeypatch.setattr(formats, "_decode_image", lambda src, where: calls.append(where) or real(src, where))
    part = prepare_data(cfg, progress=False)
    assert len(calls) == 80 == len(set(calls))  # 50 training + 30 validation images of 400, no test images
    full = load_dataset("imagefolder", root, "train", cache_dir=tmp_path / "other-cache", progress=False)
    ref = prepare_data(cfg, train=full, progress=False)  # decode everything, then cut: the same images
    assert torch.equal(part.train.images, ref.train.images) and torch.equal(part.train.labels, ref.train.labels)
    assert torch.equal(part.held_out.images, ref.held_out.images) and part.selection == "validation"
    calls.clear()
    again = prepare_data(cfg, progress=False)  # from the cached subset
    assert calls == [] and torch.equal(again.train.images, part.train.images)
