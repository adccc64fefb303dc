"""The generated-data presets (``cifar10_generated_trades`` and its ``_rpat`` variant) and ``method.trades_beta``.

The constants are Wang et al. 2023's published 1M-image recipe, read off their public code
(github.com/wzekai99/DM-Improves-AT: README.md training command, core/utils/parser.py defaults,
train-wa.py, gowal21uncovering/utils/watrain.py, core/utils/train.py); the YAML cites each file.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import rpat.training.run_data as run_data
from rpat.cli import main
from rpat.config import build_config
from rpat.errors import InputError
from rpat.presets import GENERATED_CIFAR10_1M, PRESET_DESCRIPTIONS, list_presets, preset_dict

PRESETS = ("cifar10_generated_trades", "cifar10_generated_trades_rpat")


def _npz(tmp_path: Path, n: int = 16) -> str:
    """A stand-in for ``1m.npz``: the released format (``image`` N x 32 x 32 x 3 uint8, ``label`` N ints)."""
    rng = np.random.default_rng(0)
    path = tmp_path / "1m.npz"
    np.savez(path, image=rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8), label=rng.integers(0, 10, n))
    return str(path)


@pytest.mark.parametrize("name", PRESETS)
def test_preset_without_data_extra_is_one_clear_error(name):
    with pytest.raises(InputError) as err:
        build_config(name)
    msg = str(err.value)
    assert "\n" not in msg and "data.extra" in msg and GENERATED_CIFAR10_1M in msg and name in msg
    with pytest.raises(InputError, match="needs data.extra"):
        build_config(name, overrides=["data.extra="])  # an empty value is no better


def test_missing_extra_fails_the_cli_before_any_data_is_read(monkeypatch, capsys):
    def no_data(*a, **k):
        raise AssertionError("data was read before the config was checked")

    monkeypatch.setattr(run_data, "load_dataset", no_data)
    code = main(["train", "--preset", "cifar10_generated_trades", "--data-root", "/nonexistent"])
    err = capsys.readouterr().err
    assert code == 2 and "needs data.extra" in err and "1m.npz" in err


def test_the_published_constants(tmp_path):
    cfg = build_config("cifar10_generated_trades", overrides=[f"data.extra={_npz(tmp_path)}"])
    d, o, m, av = cfg.data, cfg.optim, cfg.method, cfg.averaging
    assert cfg.model.arch == "dm_wrn28_10_swish" and cfg.model.normalize  # WRN-28-10 Swish, normalizing inside
    assert (m.name, m.trades_beta, m.label_smoothing) == ("trades", 5.0, 0.1)  # --beta 5.0 --ls 0.1
    assert (d.batch_size, d.extra_fraction, d.augment) == (512, 0.7, True)  # --batch-size 512 --unsup-fraction 0.7
    assert (av.enabled, av.decay, av.warmup, av.start_epoch, av.bn) == (True, 0.995, True, 10, "copy")  # --tau
    assert (o.epochs, o.lr, o.schedule, o.warmup_epochs) == (400, 0.2, "cosine", 10)  # cosinew, pct_start 0.025
    assert (o.weight_decay, o.momentum, o.nesterov) == (5e-4, 0.9, True)
    t = cfg.train_threat()
    assert (t.norm, t.eps, t.step_size, t.steps) == ("linf", 8 / 255, 2 / 255, 10)
    objective = cfg.objective()
    assert objective.method.name == "trades" and objective.method.beta == 5.0 and objective.rpat is None
    assert cfg.label() == "TRADES"
    rp = build_config("cifar10_generated_trades_rpat", overrides=[f"data.extra={_npz(tmp_path)}"])
    assert rp.label() == "TRADES + RPAT" and (rp.rpat.lam, rp.rpat.alpha, rp.rpat.proxy) == (1.0, 0.5, "logits")
    assert {k: v for k, v in preset_dict(PRESETS[1]).items() if k != "rpat"} == preset_dict(PRESETS[0])


def test_presets_are_listed_with_their_sources():
    assert set(PRESETS) <= set(list_presets())
    for name in PRESETS:
        assert "DM-Improves-AT" in PRESET_DESCRIPTIONS[name] and "data.extra" in PRESET_DESCRIPTIONS[name]
    text = (Path(__file__).resolve().parents[1] / "src/rpat/configs/cifar10_generated_trades.yaml").read_text()
    for source in ("README.md", "core/utils/parser.py", "train-wa.py", "watrain.py", "core/utils/train.py",
                   GENERATED_CIFAR10_1M):
        assert source in text


def test_trades_beta_key():
    assert build_config(overrides=["method.name=trades"]).objective().method.beta == 6.0  # TRADES' default
    assert build_config(overrides=["method.name=trades", "method.trades_beta=3"]).objective().method.beta == 3.0
    with pytest.raises(InputError, match="applies to method.name=trades only"):
        build_config(overrides=["method.name=pgd_at", "method.trades_beta=5"])
    for bad in ("-1", "nan", "true", "five"):
        with pytest.raises(InputError, match="method.trades_beta must be a finite number"):
            build_config(overrides=["method.name=trades", f"method.trades_beta={bad}"])
