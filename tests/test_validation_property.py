"""Property tests: whatever a config holds, validation yields a valid Config or one InputError line.

Random configs (random types, values, unknown keys, nested garbage) go through
``config_from_dict(...).validate()``, ``build_config(overrides=[dict])`` and
``build_config(overrides=["key=value"])``; nothing but ``InputError`` may come
out, and an accepted config must satisfy the documented ranges.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rpat.cli import main
from rpat.config import Config, build_config, config_from_dict
from rpat.errors import InputError

SECTIONS = {f.name: [g.name for g in dataclasses.fields(f.default_factory())]
            for f in dataclasses.fields(Config) if f.default_factory is not dataclasses.MISSING}
TOP_KEYS = [f.name for f in dataclasses.fields(Config) if f.name not in SECTIONS]

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-10**6, max_value=10**6), st.integers(),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12),
    st.sampled_from(["8/255", "1/0", "-2/255", "nan", "inf", "1e400", "linf", "l2", "logits", "cifar10",
                     "small_cnn", "pgd_at", "stop", "skip", "cosine", "[1, 2]", "{a: 1}", "0", "-1", "0.5"]),
)
garbage = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.one_of(st.text(max_size=6), st.integers()), inner, max_size=4)),
    max_leaves=8)


@st.composite
def configs(draw: st.DrawFn) -> dict:
    """A dict shaped like a config: mostly real keys, sometimes unknown ones, values of any type."""
    out: dict = {}
    for section in draw(st.lists(st.sampled_from([*SECTIONS, "bogus"]), max_size=4, unique=True)):
        if section == "bogus" or draw(st.integers(0, 9)) == 0:
            out[section] = draw(garbage)
            continue
        keys = draw(st.lists(st.sampled_from([*SECTIONS[section], "nope"]), max_size=4, unique=True))
        out[section] = {k: draw(garbage) for k in keys}
    for k in draw(st.lists(st.sampled_from([*TOP_KEYS, "unknown_top"]), max_size=3, unique=True)):
        out[k] = draw(garbage)
    if draw(st.booleans()):
        out[draw(st.one_of(st.integers(), st.none(), st.text(max_size=4)))] = draw(garbage)
    return out


def _check_ranges(cfg: Config) -> None:
    """An accepted config satisfies the documented ranges."""
    assert isinstance(cfg, Config)
    t, e = cfg.train_threat(), cfg.eval_threat()
    for threat in (t, e):
        assert threat.eps > 0 and math.isfinite(threat.eps)
        assert threat.step_size > 0 and math.isfinite(threat.step_size)
    assert cfg.rpat.lam >= 0 and 0 <= cfg.rpat.alpha <= 1
    for v in (cfg.optim.epochs, cfg.data.batch_size, cfg.eval.batch_size, cfg.eval.n_examples):
        assert isinstance(v, int) and v >= 1
    assert cfg.optim.lr > 0 and math.isfinite(cfg.optim.lr)
    assert cfg.nonfinite in ("stop", "skip")


def _accepts_or_input_error(make) -> None:
    try:
        cfg = make()
    except InputError as e:
        msg = str(e)
        assert msg and "\n" not in msg, repr(msg)
        return
    _check_ranges(cfg)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(configs())
def test_random_config_dicts(d):
    _accepts_or_input_error(lambda: config_from_dict(d).validate())
    _accepts_or_input_error(lambda: build_config(None, None, [d]))


@settings(max_examples=200, deadline=None)
@given(st.sampled_from([f"{s}.{k}" for s, keys in SECTIONS.items() for k in keys] + TOP_KEYS + ["x.y", "", "a..b"]),
       st.text(max_size=16))
def test_random_override_strings(key, value):
    _accepts_or_input_error(lambda: build_config(None, None, [f"{key}={value}"]))


@settings(max_examples=100, deadline=None)
@given(st.text(max_size=20))
def test_override_without_equals_or_garbage(text):
    _accepts_or_input_error(lambda: build_config(None, None, [text]))


def test_non_config_to_trainer_is_input_error(tmp_path):
    from rpat.training import Trainer

    with pytest.raises(InputError, match="must be an rpat Config"):
        Trainer({"optim": {"lr": 0.1}}, tmp_path / "run")


@pytest.mark.parametrize(
    "args, message",
    [
        (["train", "--dataset", "digits", "optim.lr=-1"], "optim.lr"),
        (["train", "--dataset", "digits", "optim.lr=.nan"], "optim.lr"),
        (["train", "--dataset", "digits", "rpat.alpha=2"], "alpha"),
        (["train", "--dataset", "digits", "rpat.lam=-0.5"], "lam"),
        (["train", "--dataset", "digits", "attack.step_size=0"], "attack.step_size"),
        (["train", "--dataset", "digits", "attack.eps=0"], "attack.eps"),
        (["train", "--dataset", "digits", "--epochs", "0"], "optim.epochs"),
        (["train", "--dataset", "digits", "data.batch_size=-3"], "data.batch_size"),
        (["train", "--dataset", "digits", "nonfinite=maybe"], "nonfinite"),
        (["train", "--dataset", "digits", "data={a: [1, {b: 2}]}"], "data"),
        (["train", "--dataset", "digits", "bogus.key=1"], "unknown config key"),
        (["train", "--dataset", "digits", "--run-dir", "x", "--resume", "--overwrite"], "exclude each other"),
        (["eval", "/nonexistent/ck.pt"], "not found"),
    ],
)
def test_cli_bad_input_exit_2_single_line(args, message, capsys, tmp_path):
    if args[0] == "train":  # were the input wrongly accepted, train something tiny in tmp_path
        args = [*args, "--arch", "small_cnn", "--no-progress"]
        args += [] if "--epochs" in args else ["--epochs", "1"]
        args += [] if "--run-dir" in args else ["--run-dir", str(tmp_path / "run")]
    code = main(args)
    _, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("rpat: error: ") and message in lines[0], err


def test_cli_bad_config_file_exit_2(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    for text in ("optim: [1, 2\n", "- just\n- a list\n", "optim: {lr: {nested: [garbage]}}\n", "data: 3\n"):
        bad.write_text(text)
        code = main(["train", "--config", str(bad), "--run-dir", str(tmp_path / "r")])
        _, err = capsys.readouterr()
        assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, (text, err)
