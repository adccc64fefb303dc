"""The recipe ingredients: lr warm-up and scaling, the ε ramp, the AWP presets and grid variants, bad input;
and that a resumed run with warm-up + ramp + EMA warm-up + label smoothing equals an uninterrupted one."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from rpat.attacks.ramp import ramp_factor
from rpat.checkpoint import load_checkpoint
from rpat.cli import main
from rpat.config import build_config
from rpat.presets import GRID_VARIANTS, PRESET_DESCRIPTIONS, grid_names, grid_preset, list_presets
from rpat.training import Trainer
from rpat.training.schedules import lr_at, lr_scaling_line, scaled_lr

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_cuda_graph import _cfg as _graph_cfg  # noqa: E402  (the tiny configs of the CUDA-graph and trainer tests)
from test_cuda_graph import _fit as _fit_graph  # noqa: E402
from test_cuda_graph import _same  # noqa: E402
from test_trainer import _cfg, _data  # noqa: E402


# ---- schedules ---------------------------------------------------------------------------
def test_lr_warmup_in_front_of_piecewise_and_constant():
    lr = [lr_at("piecewise", 0.1, e, f, 10, [5], 0.1, warmup_epochs=2) for e, f in
          [(0, 0.0), (0, 0.5), (1, 0.0), (1, 0.5), (2, 0.0), (4, 0.9), (5, 0.0)]]
    assert lr == pytest.approx([0.0, 0.025, 0.05, 0.075, 0.1, 0.1, 0.01])
    assert lr_at("constant", 0.3, 0, 0.25, 10, warmup_epochs=1) == pytest.approx(0.075)
    # a milestone inside the warm-up: the ramp goes to the schedule's lr at the warm-up's end
    assert lr_at("piecewise", 0.1, 1, 0.0, 10, [1], 0.1, warmup_epochs=2) == pytest.approx(0.005)
    # no warm-up: the old values
    assert lr_at("piecewise", 0.1, 0, 0.0, 10, [5], 0.1) == 0.1


def test_cosine_after_warmup_spans_the_rest_of_training():
    def at(p):
        return lr_at("cosine", 0.2, int(p), p - int(p), 12, warmup_epochs=2)
    assert at(1.0) == pytest.approx(0.1)  # half-way up the warm-up
    assert at(2.0) == pytest.approx(0.2)  # the peak right after it
    assert at(7.0) == pytest.approx(0.1)  # half-way down the remaining 10 epochs
    assert at(11.999) == pytest.approx(0.0, abs=1e-6)


def test_linear_scaling_rule():
    assert scaled_lr(0.1, 512, "linear") == pytest.approx(0.2)
    assert scaled_lr(0.1, 128, "linear") == pytest.approx(0.05)
    assert scaled_lr(0.1, 512, "none") == 0.1
    assert lr_scaling_line(0.1, 1024, "none") is None
    line = lr_scaling_line(0.1, 1024, "linear")
    assert "base lr 0.4 = optim.lr 0.1 x batch 1024/256" in line


# ---- the ε ramp ----------------------------------------------------------------------------
def test_eps_ramp_values_and_composition_with_the_strong_adversary():
    assert [ramp_factor(e, 4) for e in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert ramp_factor(0, 0) == 1.0
    cfg = build_config(None, None, ["attack.eps=8/255", "attack.step_size=2/255", "attack.eps_ramp_epochs=4",
                                    "optim.epochs=10", "optim.milestones=[2, 8]", "attack.strong_after_decay=true",
                                    "attack.strong_eps=12/255"])
    eps = [cfg.train_threat_at(e).eps * 255 for e in range(5)]
    assert eps == pytest.approx([2.0, 4.0, 9.0, 12.0, 12.0])  # from the milestone 2 on: the strong ε, ramped
    steps = [cfg.train_threat_at(e).step_size * 255 for e in range(4)]
    assert steps == pytest.approx([0.5, 1.0, 1.5, 2.0])
    assert cfg.eval_threat().eps * 255 == pytest.approx(8.0)  # evaluation is not ramped


# ---- resume ------------------------------------------------------------------------------
RECIPE = {"optim": {"warmup_epochs": 1, "lr_scaling": "linear"}, "attack": {"eps_ramp_epochs": 2},
          "averaging": {"enabled": True, "decay": 0.9, "warmup": True, "bn": "copy"},
          "method": {"label_smoothing": 0.1}}


def test_resume_with_recipes_on_equals_uninterrupted(tmp_path, monkeypatch):
    cfg = _cfg(epochs=2, **RECIPE)
    lines: list[str] = []
    Trainer(cfg, tmp_path / "a", data=_data(), progress=False, log=lines.append).fit()
    assert "lr scaling linear: base lr 0.00625 = optim.lr 0.05 x batch 32/256 (optim.lr is the lr at batch 256)" \
        in lines

    t = Trainer(cfg, tmp_path / "b", data=_data(), progress=False, log=lambda m: None)
    keys = [t.phase_key(e) for e in range(3)]
    assert keys[0] != keys[1] == keys[2]  # the cuda-graph key follows the ramped ε
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
    monkeypatch.undo()
    resumed = Trainer(cfg, tmp_path / "b", resume=True, data=_data(), progress=False, log=lambda m: None)
    assert resumed.start_epoch == 1
    resumed.fit()
    la, lb = load_checkpoint(tmp_path / "a" / "last.pt"), load_checkpoint(tmp_path / "b" / "last.pt")
    for part in ("model", "averaged"):
        assert la[part].keys() == lb[part].keys()
        assert all(torch.equal(la[part][k], lb[part][k]) for k in la[part]), part
    assert float(la["averaged"]["_wa_ema_steps"]) == 6  # 2 epochs x 3 steps
    ra = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    rb = [json.loads(x) for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    for x, y in zip(ra, rb, strict=True):
        for key in ("train_loss", "train_lr", "train_eps", "held_out_pgd", "online_held_out_pgd"):
            assert x[key] == y[key], key
    assert [r["train_eps"] * 255 for r in ra] == pytest.approx([8.0, 16.0])
    assert [r["train_lr"] for r in ra] == pytest.approx([0.0, 0.05 * 32 / 256])  # the linear scaling rule


def test_cuda_graph_stand_in_with_recipes_gives_the_eager_weights(tmp_path):
    """The EMA warm-up's decay is a device tensor and the ramped ε re-captures per ramp epoch:
    ``speed.cuda_graph=eager`` (the capture bookkeeping on the CPU) equals the eager trainer exactly."""
    extra = {k: v for k, v in RECIPE.items() if k != "method"}

    def cfg(mode):
        c = _graph_cfg(mode, epochs=2, **extra)
        c.method.label_smoothing = RECIPE["method"]["label_smoothing"]  # _graph_cfg's method= is the name
        return c.validate()

    _fit_graph(cfg(False), tmp_path / "eager")
    graph = _fit_graph(cfg("eager"), tmp_path / "graph")
    for f in ("last.pt", "final.pt"):
        a, b = load_checkpoint(tmp_path / "eager" / f), load_checkpoint(tmp_path / "graph" / f)
        _same(a["model"], b["model"])
        if "averaged" in a:
            _same(a["averaged"], b["averaged"])
    keys = [graph.phase_key(e) for e in range(2)]
    assert keys[0] != keys[1] and graph.graph_step.captured.capture_keys == keys  # ε/2, then the full ε


# ---- presets and grid variants -------------------------------------------------------------
def test_awp_presets_are_the_published_recipes():
    assert {"cifar10_trades_awp", "cifar10_pgdat_awp"} <= set(list_presets())
    t = build_config("cifar10_trades_awp")
    assert (t.model.arch, t.method.name, t.awp.enabled, t.awp.gamma) == ("wrn34_10", "trades", True, 5e-3)
    assert (t.optim.epochs, t.optim.lr, t.optim.milestones, t.optim.weight_decay) == (200, 0.1, [99, 149], 5e-4)
    assert t.awp.warmup_epochs == 9 and "from epoch 10" in t.describe()  # the script's 1-based epoch 10
    assert t.objective().method.beta == 6.0
    a = build_config("cifar10_pgdat_awp")
    assert (a.model.arch, a.model.normalize, a.method.name, a.awp.gamma, a.awp.warmup_epochs) == \
        ("preact_resnet18", True, "pgd_at", 0.01, 0)
    assert (a.optim.epochs, a.optim.milestones, a.optim.weight_decay, a.awp.proxy_lr) == (200, [100, 150], 5e-4, 0.01)
    for name in ("cifar10_trades_awp", "cifar10_pgdat_awp"):
        assert "csdongxian/AWP" in PRESET_DESCRIPTIONS[name]


def test_list_presets_names_the_sources(capsys):
    assert main(["list", "presets"]) == 0
    out = capsys.readouterr().out
    assert "cifar10_trades_awp" in out and "trades_AWP/train_trades_cifar.py" in out
    assert "cifar10_pgdat_awp" in out and "AT_AWP/train_cifar10.py" in out


def test_grid_awp_variants_and_the_default_grid_unchanged():
    assert len(grid_names()) == 144 and not any("awp" in n for n in grid_names())
    assert {"awp", "awp-rpat"} <= set(GRID_VARIANTS)
    assert "awp" not in grid_preset("bench/cifar10/resnet18/linf/pgd_at/rpat")
    awp = build_config("bench/cifar10/preact_resnet18/linf/pgd_at/awp")
    assert awp.awp.enabled and not awp.rpat.enabled and awp.awp.gamma == 0.01
    both = build_config("bench/cifar10/preact_resnet18/linf/trades/awp-rpat")
    assert both.awp.enabled and both.rpat.enabled and (both.awp.gamma, both.awp.warmup_epochs) == (5e-3, 9)
    assert both.label() == "TRADES + RPAT + AWP"
    for method in ("mart", "consistency_at"):  # every method of the grid has its γ set
        assert build_config(f"bench/cifar10/resnet18/linf/{method}/awp").awp.gamma > 0
    assert len(grid_names(("awp", "awp-rpat"))) == 144


# ---- bad input: one line, exit 2, at config time ------------------------------------------------
@pytest.mark.parametrize("override, message", [
    ("method.label_smoothing=1.0", "method.label_smoothing must be a number in [0, 1)"),
    ("method.label_smoothing=-0.1", "method.label_smoothing must be a number in [0, 1)"),
    ("optim.warmup_epochs=110", "optim.warmup_epochs=110 is not shorter than training (optim.epochs=110)"),
    ("attack.eps_ramp_epochs=111", "attack.eps_ramp_epochs=111 is longer than training (optim.epochs=110)"),
    ("optim.lr_scaling=sqrt", "unknown optim.lr_scaling 'sqrt'; valid: none, linear"),
    ("averaging.bn=mean", "unknown averaging.bn 'mean'; valid: average, copy"),
    ("optim.warmup_epochs=-1", "optim.warmup_epochs must be an integer >= 0"),
])
def test_bad_input_one_line_exit_2(override, message, capsys, tmp_path):
    code = main(["train", "--dataset", "cifar10", "--data-root", str(tmp_path / "nothing"), override])
    err = capsys.readouterr().err
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("rpat: error: ") and message in lines[0], lines
