"""The extra evaluations of ``rpat eval``: CW-20 (margin loss), random noise, transfer, AutoAttack+/rand
columns, ART's CW (missing extra), their settings, table columns and sanity checks."""

from __future__ import annotations

import json
import math
import sys

import pytest
import torch
from torch import nn

import rpat.evaluation.checkpoint_eval as ce
from rpat.attacks.cw import cw_margin, cw_margin_sum, cw_pgd
from rpat.attacks.threat import ThreatModel
from rpat.cli import main
from rpat.errors import InputError
from rpat.evaluation.extra import (
    ART_MISSING,
    ExtraEvals,
    art_cw_adversarial,
    gaussian_noise,
    run_extra_evals,
    uniform_noise,
)
from rpat.evaluation.metrics import accuracy_se
from rpat.evaluation.robustness import format_table, pgd_accuracy
from rpat.evaluation.sanity import (
    SANITY_CHECKS,
    cw_vs_pgd_check,
    run_sanity_checks,
    transfer_vs_whitebox_check,
)
from rpat.models import create_model

FAST = ["--arch", "small_cnn", "--dataset", "digits", "--n-examples", "20", "--eps", "32/255",
        "--step-size", "8/255", "--steps", "3", "--autoattack", "none", "--no-sanity", "--no-progress"]


# ---- the CW margin loss and CW-PGD -------------------------------------------------------
def test_cw_margin_by_hand():
    logits = torch.tensor([[1.0, 3.0, 2.0], [1.0, 3.0, 2.0], [0.5, -1.0, 0.25]])
    y = torch.tensor([0, 1, 2])
    # row 0: max(3, 2) - 1 = 2 (wrong class wins); row 1: the true class is the max: max(1, 2) - 3 = -1;
    # row 2: max(0.5, -1) - 0.25 = 0.25
    assert cw_margin(logits, y).tolist() == [2.0, -1.0, 0.25]
    assert cw_margin_sum(logits, y).item() == pytest.approx(1.25)
    with pytest.raises(InputError, match="K >= 2"):
        cw_margin(torch.zeros(2, 1), torch.zeros(2, dtype=torch.long))


def _trained_linear(seed: int = 0) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """A logistic regression trained on 4x4 one-channel images whose class is which half is brighter."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(64, 1, 4, 4, generator=g)
    y = (x[:, 0, :2].mean((1, 2)) > x[:, 0, 2:].mean((1, 2))).long()
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 2))
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    for _ in range(200):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model.eval(), x, y


def test_cw_pgd_deterministic_and_stronger_with_more_steps():
    model, x, y = _trained_linear()
    clean = (model(x).argmax(1) == y).float().mean().item()
    assert clean > 0.9  # trained-ish
    threat = ThreatModel("linf", 0.08, 0.02, 10)
    a = cw_pgd(model, x, y, threat, start="none")
    b = cw_pgd(model, x, y, threat, start="none")
    assert torch.equal(a, b)
    assert (a - x).abs().max() <= 0.08 + 1e-6 and a.min() >= 0 and a.max() <= 1
    one = cw_pgd(model, x, y, threat.with_steps(1), start="none")

    def acc(z):
        with torch.no_grad():
            return (model(z).argmax(1) == y).float().mean().item()

    assert acc(a) <= acc(one) <= clean
    assert acc(a) < clean  # the attack does something


# ---- random noise ------------------------------------------------------------------------
def test_noise_stays_in_the_ball_and_range_and_follows_the_seed():
    x = torch.rand(8, 3, 5, 5, generator=torch.Generator().manual_seed(0))
    x[0] = 0.0
    x[1] = 1.0
    linf = ThreatModel("linf", 8 / 255, 2 / 255, 20)
    l2 = ThreatModel("l2", 0.5, 0.1, 20)
    for threat in (linf, l2):
        out = uniform_noise(x, threat, torch.Generator().manual_seed(3))
        again = uniform_noise(x, threat, torch.Generator().manual_seed(3))
        other = uniform_noise(x, threat, torch.Generator().manual_seed(4))
        assert torch.equal(out, again) and not torch.equal(out, other)
        assert out.min() >= 0 and out.max() <= 1
        d = (out - x).flatten(1)
        if threat.norm == "linf":
            assert d.abs().max() <= 8 / 255 + 1e-6
        else:
            assert d.norm(dim=1).max() <= 0.5 + 1e-5
    g = gaussian_noise(x, 8 / 255, torch.Generator().manual_seed(3))
    assert torch.equal(g, gaussian_noise(x, 8 / 255, torch.Generator().manual_seed(3)))
    assert g.min() >= 0 and g.max() <= 1 and not torch.equal(g, x)


class _Constant(nn.Module):
    """Ignores its input: always the logits (0, 1, 0), i.e. class 1."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tensor([0.0, 1.0, 0.0]).expand(x.shape[0], 3) + 0 * self.w + 0 * x.flatten(1)[:, :1]


def test_noise_on_a_model_that_ignores_its_input_keeps_its_accuracy():
    x = torch.rand(10, 1, 3, 3)
    y = torch.tensor([1, 1, 1, 0, 2, 1, 0, 1, 2, 1])  # 6 of 10 are class 1: 60%
    threat = ThreatModel("linf", 8 / 255, 2 / 255, 20)
    for evals in (ExtraEvals(noise="uniform"), ExtraEvals(noise="gaussian", noise_sigma="8/255")):
        values, extras = run_extra_evals(_Constant(), x, y, threat, evals, batch_size=3, progress=False)
        assert values == {"noise": 60.0}
        assert extras["noise_kind"] == evals.noise
    assert extras["noise_sigma"] == pytest.approx(8 / 255)


def test_extra_evals_argument_errors():
    with pytest.raises(InputError, match="needs --noise-sigma"):
        ExtraEvals(noise="gaussian")
    with pytest.raises(InputError, match="--cw-steps must be >= 1"):
        ExtraEvals(cw_steps=0)
    with pytest.raises(InputError, match="give --transfer-from"):
        ExtraEvals(transfer_arch="resnet18")
    assert not ExtraEvals().any() and ExtraEvals(cw_steps=20).any()


# ---- transfer ----------------------------------------------------------------------------
def test_transfer_from_itself_is_white_box_pgd_and_from_another_model_is_weaker():
    model, x, y = _trained_linear()
    threat = ThreatModel("linf", 0.1, 0.025, 10)
    white = pgd_accuracy(model, x, y, threat, batch_size=16, seed=5)
    ev = ExtraEvals(transfer_from="self.pt")
    values, _ = run_extra_evals(model, x, y, threat, ev, source=model, batch_size=16, seed=5, progress=False)
    assert values["transfer"] == white
    torch.manual_seed(123)
    other = nn.Sequential(nn.Flatten(), nn.Linear(16, 2)).eval()
    values, _ = run_extra_evals(model, x, y, threat, ev, source=other, batch_size=16, seed=5, progress=False)
    assert values["transfer"] >= white
    assert white < 50.0  # the white-box attack works, so the comparison means something


# ---- AutoAttack versions in tables -------------------------------------------------------
def _row(**kw) -> dict:
    base = {"clean": 80.0, "pgd": 50.0, "aa": None, "mean": None, "nrr": None, "n_examples": 1000,
            "pgd_steps": 20, "extras": {}}
    base.update(kw)
    return base


def test_plus_and_rand_have_their_own_columns():
    plus = _row(aa=45.0, mean=62.5, nrr=56.47, extras={"aa_version": "plus"})
    table = format_table([("m", plus)])
    head = table.splitlines()[0]
    cells = [c.strip() for c in head.strip("|").split("|")]
    assert "AA+" in cells and "AA" not in cells
    assert "45.00 ± 1.57" in table
    rand = _row(aa=40.0, mean=60.0, nrr=53.33, extras={"aa_version": "rand"})
    std = _row(aa=44.0, mean=62.0, nrr=56.0, extras={"aa_version": "standard"})
    cells = [c.strip() for c in format_table([("a", std), ("b", rand)]).splitlines()[0].strip("|").split("|")]
    assert "AA" in cells and "AA-rand" in cells and "AA+" not in cells


def test_eval_cli_accepts_plus_and_rand():
    from rpat.cli import build_parser

    for v in ("plus", "rand"):
        assert build_parser().parse_args(["eval", "x.pt", "--autoattack", v]).autoattack == v


# ---- table columns -----------------------------------------------------------------------
def test_extra_columns_only_when_some_row_has_them():
    plain = _row()
    assert "CW" not in format_table([("a", plain)]) and "Noise" not in format_table([("a", plain)])
    cw = _row(cw=48.0, noise=79.0, transfer=70.0, extras={"cw_steps": 20})
    table = format_table([("a", plain), ("b", cw)])
    cells = [c.strip() for c in table.splitlines()[0].strip("|").split("|")]
    assert cells == ["model", "Clean", "PGD-20", "CW-20", "Noise", "Transfer", "AA", "Mean", "NRR"]
    se = accuracy_se(48.0, 1000)  # sqrt(0.48 * 0.52 / 1000) = 1.58 points
    assert f"48.00 ± {se:.2f}" in table and "48.00 ± 1.58" in table
    steps5 = _row(cw=48.0, extras={"cw_steps": 5})
    assert "CW-5" in format_table([("c", steps5)])


# ---- sanity checks -----------------------------------------------------------------------
def test_cw_vs_pgd_check_both_sides():
    # n = 1000: SE(50%) = 1.581, SE(52%) = 1.580 -> noise 2*sqrt(1.581^2 + 1.580^2) = 4.47 points
    ok = cw_vs_pgd_check(_row(cw=52.0, extras={"cw_steps": 20}))
    assert ok["passed"] and ok["gap"] == pytest.approx(2.0)
    assert ok["noise"] == pytest.approx(2 * math.hypot(accuracy_se(52, 1000), accuracy_se(50, 1000)))
    assert ok["noise"] == pytest.approx(4.47, abs=0.01)
    bad = cw_vs_pgd_check(_row(cw=60.0, extras={"cw_steps": 20}))
    assert not bad["passed"] and "gradient masking" in bad["detail"] and "CW-20 60.00%" in bad["detail"]
    assert cw_vs_pgd_check(_row())["skipped"]


def test_transfer_vs_whitebox_check_both_sides():
    ok = transfer_vs_whitebox_check(_row(transfer=70.0))  # above white-box: the normal case
    assert ok["passed"] and ok["gap"] == pytest.approx(-20.0)
    bad = transfer_vs_whitebox_check(_row(transfer=40.0))  # 10 points below, noise ~4.3
    assert not bad["passed"] and "black-box attack beats the white-box" in bad["detail"]
    near = transfer_vs_whitebox_check(_row(transfer=47.0))  # 3 points below: within noise
    assert near["passed"]
    assert transfer_vs_whitebox_check(_row())["skipped"]


def test_run_sanity_checks_includes_the_new_checks():
    model, x, y = _trained_linear()
    threat = ThreatModel("linf", 0.1, 0.025, 3)
    report = _row(clean=100.0, pgd=1.0, cw=30.0, n_examples=64, pgd_steps=3, extras={"cw_steps": 3})
    res = run_sanity_checks(model, x, y, threat, report=report, batch_size=32)
    assert set(res["checks"]) == set(SANITY_CHECKS)
    assert "cw_vs_pgd" in res["failed"] and "transfer_vs_whitebox" in res["skipped"]


# ---- ART -----------------------------------------------------------------------------------
def test_cw_art_without_art_is_one_line(tmp_path, monkeypatch, capsys):
    pytest.importorskip("sklearn")
    torch.manual_seed(0)
    path = tmp_path / "m.pt"
    torch.save(create_model("small_cnn", num_classes=10, in_chans=1).state_dict(), path)
    monkeypatch.setitem(sys.modules, "art", None)  # `import art` raises ImportError
    code = main(["eval", str(path), *FAST, "--cw-art"])
    err = capsys.readouterr().err
    assert code == 2 and err == f"rpat: error: {ART_MISSING}\n"
    assert ART_MISSING == "--cw-art needs the ART extra: pip install 'rpat[art]'"


def test_art_cw_on_a_tiny_model():
    pytest.importorskip("art")
    model, x, y = _trained_linear()
    threat = ThreatModel("linf", 0.1, 0.025, 10)
    adv = art_cw_adversarial(model, x[:16], threat, num_classes=2)
    assert adv.shape == x[:16].shape and adv.min() >= 0 and adv.max() <= 1
    assert (adv - x[:16]).abs().max() <= 0.1 + 1e-5
    with torch.no_grad():
        assert (model(adv).argmax(1) == y[:16]).sum() <= (model(x[:16]).argmax(1) == y[:16]).sum()


# ---- rpat eval end to end ------------------------------------------------------------------
def test_eval_cli_extra_evaluations_keys_columns_and_reuse(tmp_path, monkeypatch, capsys):
    pytest.importorskip("sklearn")  # the 8x8 digits
    torch.manual_seed(0)
    target, source = tmp_path / "target.pt", tmp_path / "source.pt"
    torch.save(create_model("small_cnn", num_classes=10, in_chans=1).state_dict(), target)
    torch.manual_seed(1)
    torch.save(create_model("small_cnn", num_classes=10, in_chans=1).state_dict(), source)
    out = tmp_path / "r.json"
    extra = ["--cw", "--cw-steps", "3", "--noise", "--transfer-from", str(source)]
    assert main(["eval", str(target), *FAST, *extra, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    rep = json.loads(out.read_text())
    for key in ("cw", "noise", "transfer"):
        assert 0.0 <= rep[key] <= 100.0
    assert rep["cw_art"] is None and rep["extras"]["cw_steps"] == 3
    assert rep["settings"]["extra"]["cw_steps"] == 3 and rep["settings"]["extra"]["noise"] == "uniform"
    assert rep["settings"]["extra"]["transfer"]["arch"] == "small_cnn"
    line = next(ln for ln in printed.splitlines() if ln.startswith("| model"))
    head = [c.strip() for c in line.strip("|").split("|")]
    assert head[:6] == ["model", "Clean", "PGD-3", "CW-3", "Noise", "Transfer"]

    calls = []
    real = ce.evaluate_robustness
    monkeypatch.setattr(ce, "evaluate_robustness", lambda *a, **k: calls.append(1) or real(*a, **k))
    assert main(["eval", str(target), *FAST, *extra, "--out", str(out)]) == 0  # same settings: reused
    assert calls == [] and "reused" in capsys.readouterr().out
    assert main(["eval", str(target), *FAST, "--out", str(out)]) == 0  # without the extras: not reused
    assert calls == [1] and "extra" not in json.loads(out.read_text())["settings"]
    capsys.readouterr()


def test_transfer_arch_mismatch_is_one_line(tmp_path, capsys):
    pytest.importorskip("sklearn")
    torch.manual_seed(0)
    target, source = tmp_path / "target.pt", tmp_path / "source.pt"
    torch.save(create_model("small_cnn", num_classes=10, in_chans=1).state_dict(), target)
    torch.save(create_model("small_cnn", num_classes=10, in_chans=1).state_dict(), source)
    code = main(["eval", str(target), *FAST, "--transfer-from", str(source), "--transfer-arch", "resnet18"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert "holds a small_cnn, not the --transfer-arch resnet18" in err
    code = main(["eval", str(target), *FAST, "--noise-sigma", "8/255"])
    assert code == 2 and "--noise-sigma is for --noise" in capsys.readouterr().err


def test_an_eval_stopped_inside_an_extra_evaluation_recomputes_only_that_one(tmp_path, monkeypatch, capsys):
    """Stopped during the noise evaluation (after Clean + PGD and CW finished), the same command takes
    Clean, PGD and CW from ``<report>.stages.json``, runs only noise and transfer, and gives the
    uninterrupted numbers; the stages file is gone once the report is written."""
    pytest.importorskip("sklearn")
    import rpat.evaluation.extra as ex
    import rpat.evaluation.robustness as rb
    from rpat.run_dir import stages_path

    torch.manual_seed(0)
    target, source = tmp_path / "target.pt", tmp_path / "source.pt"
    torch.save(create_model("small_cnn", num_classes=10, in_chans=1).state_dict(), target)
    torch.manual_seed(1)
    torch.save(create_model("small_cnn", num_classes=10, in_chans=1).state_dict(), source)
    extra = ["--cw", "--cw-steps", "3", "--noise", "--transfer-from", str(source)]
    whole = tmp_path / "whole.json"
    assert main(["eval", str(target), *FAST, *extra, "--out", str(whole)]) == 0
    out = tmp_path / "r.json"
    runs: list[str] = []
    real_cw, real_noise, real_count = ex.cw_pgd, ex.uniform_noise, rb._count_correct
    monkeypatch.setattr(ex, "cw_pgd", lambda *a, **k: runs.append("cw") or real_cw(*a, **k))
    counting = lambda *a, **k: runs.append(k.get("desc")) or real_count(*a, **k)  # noqa: E731
    monkeypatch.setattr(rb, "_count_correct", counting)
    monkeypatch.setattr(ex, "_count_correct", counting)

    def stopped(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(ex, "uniform_noise", stopped)
    assert main(["eval", str(target), *FAST, *extra, "--out", str(out)]) == 130
    assert "run the same command again to resume" in capsys.readouterr().err
    assert not out.exists() and "cw" in runs and "clean" in runs
    saved = json.loads(stages_path(out).read_text())
    assert sorted(saved["stages"]) == ["clean_pgd", "cw"]
    runs.clear()
    capsys.readouterr()
    monkeypatch.setattr(ex, "uniform_noise", real_noise)
    assert main(["eval", str(target), *FAST, *extra, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "cw" not in runs and "clean" not in runs and "PGD-3" not in runs
    assert runs.count("noise") == 1 and runs.count("transfer") == 1
    assert "finished stages of an interrupted run reused: clean_pgd, cw" in printed
    assert not stages_path(out).exists()
    a, b = (json.loads(p.read_text()) for p in (whole, out))
    for key in ("clean", "pgd", "cw", "noise", "transfer"):
        assert a[key] == b[key], key
    assert b["extras"]["stages_resumed"] == ["clean_pgd", "cw"]
