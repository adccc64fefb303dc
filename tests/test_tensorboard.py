"""TensorBoard logging (``logging.tensorboard``): the event files, read back with TensorBoard's own reader,
hold exactly the numbers of metrics.jsonl and the report; a resume shows no step twice; without the
tensorboard package the option is one clear error at config time."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("tensorboard")

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402
from tensorboard.backend.event_processing.event_file_loader import EventFileLoader  # noqa: E402
from tensorboard.plugins.hparams import plugin_data_pb2  # noqa: E402
from tensorboard.util import tensor_util  # noqa: E402

from rpat.cli import main  # noqa: E402
from rpat.config import build_config, dump_yaml  # noqa: E402
from rpat.data import ArrayDataset  # noqa: E402
from rpat.errors import InputError  # noqa: E402
from rpat.training import RunData, Trainer  # noqa: E402
from rpat.training.tensorboard import epoch_scalars, epoch_tag, log_report, report_scalars  # noqa: E402


def _data(n_train: int = 64, n_test: int = 24) -> RunData:
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 4, (n_train + n_test,), generator=g)
    images = (torch.rand(n_train + n_test, 1, 8, 8, generator=g) * 120 + labels.view(-1, 1, 1, 1) * 40)
    images = images.clamp(0, 255).to(torch.uint8)
    classes = ["a", "b", "c", "d"]
    return RunData(ArrayDataset(images[:n_train], labels[:n_train], classes),
                   ArrayDataset(images[n_train:], labels[n_train:], classes), 4, 1, 1, False, None, None)


def _cfg(epochs: int = 3, **extra):
    o = [{"data": {"dataset": "digits", "batch_size": 32}, "model": {"arch": "small_cnn"},
          "attack": {"eps": "16/255", "step_size": "8/255", "steps": 1},
          "optim": {"epochs": epochs, "lr": 0.05, "milestones": [2]}, "rpat": {"enabled": True},
          "eval": {"n_examples": 24, "steps": 2}, "device": "cpu", "logging": {"tensorboard": True}},
         *[{k: v} for k, v in extra.items()]]
    return build_config(None, None, o)


def _rows(run):
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def _accumulator(run) -> EventAccumulator:
    ea = EventAccumulator(str(run / "tb"), size_guidance={"scalars": 0, "tensors": 0})
    ea.Reload()
    return ea


def _f32(v: float) -> float:
    """What TensorBoard stores of a Python float (a float32 simple_value)."""
    return float(np.float32(v))


def test_tags_by_hand():
    assert epoch_tag("train_loss") == "loss/loss" and epoch_tag("train_rpat") == "loss/rpat"
    assert epoch_tag("train_lr") == "train/lr" and epoch_tag("train_images_per_s") == "train/images_per_s"
    assert epoch_tag("held_out_pgd") == "held_out/pgd" and epoch_tag("online_held_out_clean") == "held_out_online/clean"
    row = {"epoch": 0, "epoch_number": 1, "train_loss": 1.5, "train_lr": 0.1, "held_out_pgd": 25.0, "best": True}
    assert epoch_scalars(row) == {"loss/loss": 1.5, "train/lr": 0.1, "held_out/pgd": 25.0}
    rep = {"epoch": 3, "clean": 50.0, "pgd": 30.0, "aa": None, "threat": "linf", "settings": {"seed": 0},
           "n_examples": 100, "pgd_steps": 20,
           "extras": {"aa_seconds": 1.5, "seed": 0, "aa_per_attack": [{"attack": "clean", "robust": 50.0},
                                                                      {"attack": "apgd-ce", "robust": 28.0}]}}
    # SE by hand: 100·sqrt(0.5·0.5/100) = 5, 100·sqrt(0.3·0.7/100) = 4.5826
    assert report_scalars(rep) == pytest.approx({
        "clean": 50.0, "pgd": 30.0, "n_examples": 100.0, "clean_se": 5.0, "pgd_se": 4.58257569,
        "extras/aa_seconds": 1.5, "aa_per_attack/0_clean": 50.0, "aa_per_attack/1_apgd-ce": 28.0})


def test_event_file_holds_the_metrics_rows_config_and_hparams(tmp_path):
    cfg = _cfg(epochs=2, averaging={"enabled": True, "decay": 0.5})
    run = tmp_path / "run"
    Trainer(cfg, run, data=_data(), progress=False, log=lambda m: None).fit()
    rows = _rows(run)
    assert len(rows) == 2
    ea = _accumulator(run)
    tags = set(ea.Tags()["scalars"])
    for must in ("loss/loss", "loss/rpat", "train/lr", "train/images_per_s", "held_out/clean", "held_out/pgd",
                 "held_out_online/pgd"):
        assert must in tags
    for tag in tags:
        events = ea.Scalars(tag)
        assert [e.step for e in events] == [1, 2], tag  # step = epoch_number, each once
    for row in rows:
        for key, value in row.items():
            if key in ("epoch", "epoch_number") or isinstance(value, bool):
                continue
            (event,) = [e for e in ea.Scalars(epoch_tag(key)) if e.step == row["epoch_number"]]
            assert event.value == _f32(value), key
    # by hand: the lr of epoch 1 and the held-out accuracies are those of the console line / metrics row
    assert ea.Scalars("train/lr")[0].value == _f32(0.05)
    assert ea.Scalars("held_out/pgd")[1].value == _f32(rows[1]["held_out_pgd"])
    # the config as text, once, at step 0, and the hparams of the run's own folder
    (text,) = ea.Tensors("config/text_summary")
    assert text.step == 0
    assert tensor_util.make_ndarray(text.tensor_proto).item().decode().replace("\n    ", "\n").strip() \
        == dump_yaml(cfg).strip()
    content = ea.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    hp = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info.hparams
    assert hp["optim.lr"].number_value == 0.05 and hp["attack.eps"].string_value == "16/255"
    assert hp["rpat.enabled"].number_value == 1  # torch's hparams writes booleans as numbers


def test_resume_appends_to_the_same_folder_without_a_step_twice(tmp_path, monkeypatch):
    cfg = _cfg(epochs=3)
    run = tmp_path / "run"
    t = Trainer(cfg, run, data=_data(), progress=False, log=lambda m: None)
    real = t._save_last

    def killed_after_the_row(done, held_out_pending=None):  # the process dies after epoch 2's row is logged
        if done == 2 and held_out_pending is None:
            raise RuntimeError("killed")
        return real(done, held_out_pending)

    monkeypatch.setattr(t, "_save_last", killed_after_the_row)
    with pytest.raises(RuntimeError, match="killed"):
        t.fit()
    assert [r["epoch_number"] for r in _rows(run)] == [1, 2]
    first_row2 = _rows(run)[1]
    resumed = Trainer(cfg, run, resume=True, data=_data(), progress=False, log=lambda m: None)
    assert resumed.start_epoch == 2 and resumed.held_out_pending is not None  # epoch 2 is evaluated again
    resumed.fit()
    rows = _rows(run)
    assert [r["epoch_number"] for r in rows] == [1, 2, 3]
    assert rows[1] == first_row2  # epoch 2's row written again, from the training stats last.pt kept
    # raw files: epoch 2 was written twice (once by each process) ...
    raw = [ev.step for f in sorted((run / "tb").glob("events.out.tfevents.*"))
           for ev in EventFileLoader(str(f)).Load()
           if any(v.tag == "train/seconds" for v in ev.summary.value)]
    assert sorted(raw) == [1, 2, 2, 3]
    # ... and TensorBoard's reader shows each step once, with the values of metrics.jsonl
    ea = _accumulator(run)
    for tag in ea.Tags()["scalars"]:
        assert [e.step for e in ea.Scalars(tag)] == [1, 2, 3], tag
    for row in rows:
        for key in ("train_loss", "train_rpat", "train_seconds", "held_out_clean", "held_out_pgd"):
            (event,) = [e for e in ea.Scalars(epoch_tag(key)) if e.step == row["epoch_number"]]
            assert event.value == _f32(row[key]), (key, row["epoch_number"])
    assert len(ea.Tensors("config/text_summary")) == 1  # the config is not logged again on resume


def test_overwrite_starts_a_fresh_tb_folder(tmp_path):
    cfg = _cfg(epochs=1)
    run = tmp_path / "run"
    Trainer(cfg, run, data=_data(), progress=False, log=lambda m: None).fit()
    Trainer(cfg, run, overwrite=True, data=_data(), progress=False, log=lambda m: None).fit()
    ea = _accumulator(run)
    assert [e.step for e in ea.Scalars("held_out/pgd")] == [1]
    assert len(list((run / "tb").glob("events.out.tfevents.*"))) == 1


def test_off_by_default_no_tb_folder(tmp_path):
    cfg = _cfg(epochs=1, logging={"tensorboard": False})
    Trainer(cfg, tmp_path / "run", data=_data(), progress=False, log=lambda m: None).fit()
    assert not (tmp_path / "run" / "tb").exists()


def test_log_report_writes_every_number_at_the_checkpoint_epoch(tmp_path):
    rep = {"epoch": 3, "clean": 50.0, "pgd": 30.0, "aa": 25.0, "mean": 37.5, "nrr": 33.33, "n_examples": 20,
           "extras": {"aa_per_attack": [{"attack": "clean", "robust": 50.0}, {"attack": "apgd-ce", "robust": 28.0}]}}
    log_report(tmp_path, "best", rep)
    ea = EventAccumulator(str(tmp_path / "tb"))
    ea.Reload()
    got = {t: [(e.step, e.value) for e in ea.Scalars(t)] for t in ea.Tags()["scalars"]}
    assert got == {f"eval_best/{k}": [(3, _f32(v))] for k, v in report_scalars(rep).items()}
    assert "eval_best/aa" in got and got["eval_best/aa_per_attack/1_apgd-ce"] == [(3, 28.0)]
    (text,) = ea.Tensors("eval_best/text_summary")
    assert "| 50.00" in tensor_util.make_ndarray(text.tensor_proto).item().decode()


def test_sweep_runs_share_one_tensorboard_root_with_their_reports(tmp_path):
    pytest.importorskip("sklearn")
    listing = tmp_path / "two.yaml"
    listing.write_text(
        "runs:\n  - {name: a, preset: bench/cifar10/resnet18/linf/pgd_at/base}\n"
        "  - {name: b, preset: bench/cifar10/resnet18/linf/pgd_at/rpat}\n"
        "overrides: [data.dataset=digits, model.arch=small_cnn, data.train_subset=64, data.batch_size=32,\n"
        "  attack.steps=1, optim.epochs=1, eval.n_examples=10, eval.steps=1, device=cpu, logging.tensorboard=true]\n")
    out = tmp_path / "sweep"
    assert main(["sweep", str(listing), "--out", str(out), "--n-examples", "8", "--autoattack", "none",
                 "--no-progress"]) == 0
    for name in ("a", "b"):
        ea = _accumulator(out / name)
        assert "held_out/pgd" in ea.Tags()["scalars"]
        for which in ("best", "final"):
            rep = json.loads((out / name / f"eval_{which}.json").read_text())
            (ev,) = ea.Scalars(f"eval_{which}/clean")
            assert (ev.step, ev.value) == (rep["epoch"], _f32(rep["clean"]))
            (ev,) = ea.Scalars(f"eval_{which}/pgd")
            assert ev.value == _f32(rep["pgd"])
    # one root: `tensorboard --logdir out` finds both runs (and nothing else) as runs
    from tensorboard.backend.event_processing.event_multiplexer import EventMultiplexer
    mux = EventMultiplexer().AddRunsFromDirectory(str(out))
    mux.Reload()
    assert sorted(mux.Runs()) == ["a/tb", "b/tb"]


def test_without_the_extra_one_error_at_config_time(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # as if `pip install 'rpat[tensorboard]'` was not run
    with pytest.raises(InputError, match=r"pip install 'rpat\[tensorboard\]'"):
        _cfg()
    build_config(None, None, [{"logging": {"tensorboard": False}}])  # off: no tensorboard needed
    assert main(["train", "--dataset", "digits", "--run-dir", str(tmp_path / "r"), "logging.tensorboard=true"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("rpat: error: logging.tensorboard=true needs the tensorboard")
    assert not (tmp_path / "r").exists()  # refused before anything was written or read


def test_require_tensorboard_names_the_extra(monkeypatch):
    from rpat.training.tensorboard import require_tensorboard

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with pytest.raises(InputError, match=r"pip install 'rpat\[tensorboard\]'"):
        require_tensorboard()


def test_only_rank_0_writes(tmp_path, monkeypatch):
    import rpat.training.trainer as trainer_module
    from rpat.distributed import DistContext

    monkeypatch.setattr(trainer_module, "context_from_env", lambda: DistContext(rank=1, world_size=2))
    t = Trainer(_cfg(epochs=1), tmp_path / "run", data=_data(), progress=False, log=lambda m: None)
    assert t.tb is None
    t.fit()
    assert not (tmp_path / "run" / "tb").exists()
