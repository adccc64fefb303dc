"""Config resolution, presets, overrides and validation."""

from __future__ import annotations

import pytest

from rpat.config import build_config, config_from_dict, parse_override
from rpat.errors import InputError
from rpat.presets import list_presets


def test_presets_match_the_paper():
    assert {"cifar10_benchmark", "cifar10_benchmark_rpat", "cifar10_sota", "digits_demo"} <= set(list_presets())
    cfg = build_config("cifar10_benchmark")
    assert cfg.optim.epochs == 110 and cfg.optim.milestones == [100, 105] and cfg.optim.lr == 0.1
    assert cfg.optim.momentum == 0.9 and cfg.optim.weight_decay == 5e-4 and cfg.data.batch_size == 128
    t = cfg.train_threat()
    assert (t.norm, t.eps, t.step_size, t.steps) == ("linf", 8 / 255, 2 / 255, 10)
    assert cfg.eval_threat().steps == 20 and cfg.eval_threat().eps == 8 / 255
    assert not cfg.rpat.enabled
    r = build_config("cifar10_benchmark_rpat").rpat
    assert r.enabled and r.lam == 1.0 and r.alpha == 0.5 and r.proxy == "logits"
    sota = build_config("cifar10_sota")
    assert sota.optim.epochs == 200 and sota.optim.milestones == [100, 150]
    assert sota.model.arch == "preact_resnet18"
    l2 = build_config("cifar10_benchmark_l2").train_threat()
    assert (l2.norm, l2.eps, l2.step_size) == ("l2", 128 / 255, 32 / 255)


def test_override_order_and_types(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("optim: {lr: 0.05, epochs: 7}\nrpat: {enabled: true}\n")
    cfg = build_config("cifar10_benchmark", f, ["optim.lr=0.02", "attack.eps=4/255", "rpat.alpha=0.3"])
    assert cfg.optim.lr == 0.02 and cfg.optim.epochs == 7 and cfg.rpat.enabled
    assert cfg.train_threat().eps == pytest.approx(4 / 255)
    assert cfg.rpat.alpha == 0.3
    assert parse_override("optim.milestones=[3, 4]") == {"optim": {"milestones": [3, 4]}}


def test_round_trip_through_dict():
    cfg = build_config("cifar10_benchmark_rpat", None, ["seed=3"])
    again = config_from_dict(cfg.to_dict()).validate()
    assert again == cfg


@pytest.mark.parametrize(
    "override, message",
    [
        ("data.dataset=imagenet", "unknown dataset 'imagenet'; valid: cifar10"),
        ("model.arch=vgg16", "unknown model 'vgg16'; valid:"),
        ("method.name=fgsm", "unknown method 'fgsm'; valid:"),
        ("attack.eps=8", "did you mean 8/255"),
        ("attack.eps=abc", "must be a number such as 8/255"),
        ("rpat.alpha=1.5", "alpha must be in [0, 1]"),
        ("rpat.proxy=pixels", "unknown proxy"),
        ("optim.epochs=0", "optim.epochs must be an integer >= 1"),
        ("optim.epochs=2.5", "must be an integer"),
        ("data.batch_size=-3", "data.batch_size must be an integer >= 1"),
        ("optim.lr=-0.1", "optim.lr must be a finite number >= 0"),
        ("optim.schedule=step", "unknown optim.schedule"),
        ("rpat.enabled=maybe", "must be true or false"),
        ("optim.lrr=0.1", "unknown config key 'optim.lrr'"),
        ("nonsense", "must look like section.key=value"),
    ],
)
def test_bad_values_are_one_clear_line(override, message):
    with pytest.raises(InputError) as e:
        build_config("cifar10_benchmark", None, [override])
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_eps_as_written_is_accepted():
    cfg = build_config(None, None, ["attack.eps=8/255"])
    assert cfg.train_threat().eps == 8 / 255
    cfg = build_config(None, None, ["attack.eps=0.0313"])
    assert cfg.train_threat().eps == pytest.approx(0.0313)


def test_bad_files(tmp_path):
    with pytest.raises(InputError, match="not found"):
        build_config(None, tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim: {lr: [\n")
    with pytest.raises(InputError, match="not valid YAML"):
        build_config(None, bad)
    with pytest.raises(InputError, match="unknown preset"):
        build_config("cifar11")
