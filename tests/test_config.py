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
        ("model.arch=vgg19", "unknown model 'vgg19'; valid:"),
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


# ---- mistakes a new user makes (issue "Every number honest") ---------------------------------------
def test_a_step_size_above_one_is_refused_with_the_k_over_255_hint():
    hint = r"attack\.step_size=2 is above 1.*did you mean 2/255\? \(attack\.step_size=2/255\)"
    with pytest.raises(InputError, match=hint):
        build_config(None, None, ["attack.step_size=2"])
    with pytest.raises(InputError, match=r"eval\.eps=8 is above 1"):
        build_config(None, None, ["eval.eps=8"])
    build_config(None, None, ["attack.norm=l2", "attack.eps=2", "attack.step_size=0.5"])  # l2 radii may exceed 1


def test_budgets_print_as_written_and_parse_back():
    from rpat.attacks.threat import format_budget, parse_budget

    for value, text in ((8 / 255, "8/255"), (8 / 2550, "0.8/255"), (0.5 / 255, "0.5/255"), (0.0123456789, "0.0123457")):
        assert format_budget(value) == text
        assert parse_budget(text) == pytest.approx(value, rel=1e-5)


def test_warnings_name_a_step_larger_than_eps_and_milestones_past_the_end():
    assert build_config("cifar10_benchmark").warnings() == []
    ws = build_config(None, None, ["attack.step_size=16/255"]).warnings()
    assert any("attack.step_size=16/255 is larger than attack.eps=8/255" in w for w in ws)
    ws = build_config(None, None, ["optim.epochs=2"]).warnings()
    assert ws == [w for w in ws if "optim.milestones [100, 105] are at or beyond the last epoch (2 epochs)" in w] != []


def test_with_epochs_rescales_piecewise_milestones_in_proportion():
    cfg, note = build_config("cifar10_benchmark").with_epochs(22)
    assert cfg.optim.epochs == 22 and cfg.optim.milestones == [20, 21]  # 100/110 and 105/110 of 22, floored
    assert note is not None and "[100, 105]" in note and "[20, 21]" in note
    cfg, note = build_config(None, None, ["optim.schedule=cosine"]).with_epochs(5)
    assert note is None and cfg.optim.epochs == 5
    cfg, _ = build_config("cifar10_benchmark").with_epochs(2)
    assert cfg.optim.milestones == [1, 1] and cfg.warnings() == []  # never past the last epoch


def test_the_banner_shows_the_whole_threat_and_the_label():
    d = build_config("bench/cifar10/resnet18/linf/trades/rpat").describe()
    assert d.startswith("TRADES + RPAT | resnet18 on cifar10 | training attack linf eps=8/255 step=2/255 steps=10")


def test_an_alias_is_stored_by_its_canonical_name_and_config_yaml_has_resolved_budgets():
    import yaml

    from rpat.config import dump_yaml

    cfg = build_config(None, None, ["model.arch=resnet-18"])
    assert cfg.model.arch == "resnet18"
    d = yaml.safe_load(dump_yaml(cfg))
    assert d["attack"]["eps"] == "8/255" and d["attack"]["step_size"] == "2/255" and d["eval"]["eps"] == "8/255"
    assert config_from_dict(d).train_threat() == cfg.train_threat()


def test_the_cpu_quick_preset_is_small_and_its_schedule_fits_its_epochs():
    cfg = build_config("cifar10_cpu_quick")
    assert (cfg.model.arch, cfg.data.train_subset, cfg.optim.epochs) == ("small_cnn", 5000, 5)
    assert max(cfg.optim.milestones) < cfg.optim.epochs and cfg.warnings() == []
