"""Mean/NRR against the paper, accuracy bookkeeping, PGD-20 and AutoAttack on tiny models."""

from __future__ import annotations

import io
import logging
import re
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from rpat.attacks import ThreatModel, run_autoattack
from rpat.attacks.autoattack import autoattack_plan
from rpat.errors import InputError
from rpat.evaluation import (
    RobustnessReport,
    accuracy,
    evaluate_robustness,
    format_table,
    mean_score,
    nrr,
    pgd_accuracy,
)

PGD20 = ThreatModel("linf", 8 / 255, 2 / 255, 20)

# --- Mean and NRR ------------------------------------------------------------------------

# (clean, AA, Mean, NRR) from NOTES.md (Table 5 and Table 6, "best" columns)
PAPER_ROWS = [
    (82.92, 46.74, 64.83, 59.78),
    (83.20, 48.00, 65.60, 60.88),
    (83.19, 47.89, 65.54, 60.79),
    (83.14, 48.02, 65.58, 60.88),
]
PAPER_ROWS_3DP = [
    (82.09, 50.72, 66.405, 62.700),
    (82.63, 51.00, 66.815, 63.072),
    (77.57, 50.91, 64.240, 61.474),
    (79.25, 51.25, 65.250, 62.246),
]


@pytest.mark.parametrize(("clean", "aa", "mean", "nrr_"), PAPER_ROWS)
def test_mean_and_nrr_reproduce_table5(clean: float, aa: float, mean: float, nrr_: float) -> None:
    assert round(mean_score(clean, aa), 2) == mean
    assert round(nrr(clean, aa), 2) == nrr_


@pytest.mark.parametrize(("clean", "aa", "mean", "nrr_"), PAPER_ROWS_3DP)
def test_mean_and_nrr_reproduce_table6(clean: float, aa: float, mean: float, nrr_: float) -> None:
    assert mean_score(clean, aa) == pytest.approx(mean, abs=1e-9)
    assert nrr(clean, aa) == pytest.approx(nrr_, abs=5e-4)


def test_metric_edge_cases() -> None:
    assert nrr(0, 0) == 0.0
    assert nrr(80, 0) == 0.0
    assert nrr(50, 50) == pytest.approx(50) and mean_score(50, 50) == 50
    assert nrr(90, 30) == pytest.approx(nrr(30, 90))
    assert nrr(90, 30) <= mean_score(90, 30)  # harmonic <= arithmetic mean
    for bad in (-1.0, float("nan"), "x", True):
        with pytest.raises(InputError):
            nrr(bad, 10)
        with pytest.raises(InputError):
            mean_score(10, bad)


# --- tiny models and data ----------------------------------------------------------------


class Constant(nn.Module):
    """Always predicts class ``c`` (has a parameter, so the device check has something to see)."""

    def __init__(self, k: int = 4, c: int = 0):
        super().__init__()
        self.logits = nn.Parameter(F.one_hot(torch.tensor(c), k).float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits.expand(x.shape[0], -1) + 0 * x.flatten(1).sum(1, keepdim=True)


class TinyCNN(nn.Module):
    def __init__(self, k: int):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
            nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(32, k),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def blobs(n: int, k: int, seed: int, noise: float = 0.3) -> tuple[torch.Tensor, torch.Tensor]:
    """``(n, 1, 6, 6)`` images in [0, 1]: a fixed random mean per class plus noise."""
    means = torch.rand(k, 1, 6, 6, generator=torch.Generator().manual_seed(123))
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, k, (n,), generator=g)
    x = (means[y] + noise * torch.randn(n, 1, 6, 6, generator=g)).clamp(0, 1)
    return x, y


_TRAINED: dict[int, nn.Module] = {}


def trained_cnn(k: int) -> nn.Module:
    """A TinyCNN fit to ``blobs`` (100 Adam steps, < 0.2 s); a fresh copy per call."""
    if k not in _TRAINED:
        torch.manual_seed(0)
        model = TinyCNN(k)
        x, y = blobs(256, k, seed=0)
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        for _ in range(100):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
        model.zero_grad(set_to_none=True)
        _TRAINED[k] = model
    model = TinyCNN(k)
    model.load_state_dict(_TRAINED[k].state_dict())
    return model


def _modes(model: nn.Module) -> dict[str, bool]:
    return {name: m.training for name, m in model.named_modules()}


# --- accuracy and PGD accuracy -----------------------------------------------------------


def test_constant_model_accuracy_is_share_of_class0() -> None:
    x, y = blobs(103, 4, seed=1)
    share = 100.0 * (y == 0).sum().item() / len(y)
    for bs in (7, 500):
        assert accuracy(Constant(4, 0), x, y, batch_size=bs) == pytest.approx(share)
    assert accuracy(Constant(4, 2), x, y) == pytest.approx(100.0 * (y == 2).float().mean().item())


def test_accuracy_matches_argmax_and_restores_mode() -> None:
    model = trained_cnn(4).train()
    x, y = blobs(64, 4, seed=2)
    modes = _modes(model)
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    with torch.no_grad():
        expected = 100.0 * (model.eval()(x).argmax(1) == y).float().mean().item()
    model.train()
    assert accuracy(model, x, y, batch_size=10) == pytest.approx(expected)
    assert _modes(model) == modes
    for n, b in model.named_buffers():
        assert torch.equal(b, buffers[n]), n


def test_zero_eps_pgd_accuracy_equals_clean() -> None:
    model = trained_cnn(4)
    x, y = blobs(64, 4, seed=3)
    clean = accuracy(model, x, y)
    for norm in ("linf", "l2"):
        assert pgd_accuracy(model, x, y, ThreatModel(norm, 0.0, 2 / 255, 20)) == clean


def test_pgd_accuracy_is_seeded_and_below_clean() -> None:
    model = trained_cnn(4)
    x, y = blobs(64, 4, seed=3)
    threat = ThreatModel("linf", 16 / 255, 4 / 255, 10)
    a = pgd_accuracy(model, x, y, threat, batch_size=16, seed=5)
    assert a == pgd_accuracy(model, x, y, threat, batch_size=16, seed=5)
    assert a < accuracy(model, x, y)
    assert all(p.grad is None for p in model.parameters())


def test_input_checks() -> None:
    model = Constant()
    x, y = blobs(8, 4, seed=0)
    with pytest.raises(InputError):
        accuracy(model, x, y[:4])
    with pytest.raises(InputError):
        accuracy(model, x[:0], y[:0])
    with pytest.raises(InputError):
        accuracy(model, x, y, batch_size=0)
    with pytest.raises(InputError, match="model.to"):
        accuracy(model, x, y, device="meta")
    with pytest.raises(InputError):
        evaluate_robustness(model, x, y, "8/255", progress=False)  # type: ignore[arg-type]


# --- evaluate_robustness -----------------------------------------------------------------


def test_evaluate_robustness_end_to_end() -> None:
    model = trained_cnn(4).train()
    x, y = blobs(64, 4, seed=4)
    threat = ThreatModel("linf", 16 / 255, 4 / 255, 20)
    modes = _modes(model)
    lines: list[str] = []
    report = evaluate_robustness(model, x, y, threat, batch_size=32, progress=False,
                                 log=lines.append)
    assert _modes(model) == modes
    assert all(p.grad is None for p in model.parameters())
    assert report.clean >= report.pgd >= report.aa
    assert report.clean > report.aa  # the attack does something on this model
    assert report.clean == pytest.approx(accuracy(model, x, y))
    assert report.pgd == pytest.approx(pgd_accuracy(model, x, y, threat, seed=0))
    for value in (report.clean, report.pgd, report.aa):
        assert (value * 64 / 100) == pytest.approx(round(value * 64 / 100))  # whole examples
    assert report.mean == pytest.approx(mean_score(report.clean, report.aa))
    assert report.nrr == pytest.approx(nrr(report.clean, report.aa))
    assert report.n_examples == 64 and report.pgd_steps == 20
    assert report.threat == threat.describe() == "linf eps=16/255 step=4/255 steps=20"
    assert report.seconds > 0
    assert report.extras["aa_attacks"] == ["apgd-ce", "apgd-t", "fab-t", "square"]
    assert report.extras["aa_n_target_classes"] == 3 and report.extras["num_classes"] == 4
    assert any(line.startswith("robust accuracy after APGD-T") for line in lines)
    assert any(line.startswith("clean:") for line in lines)

    d = report.to_dict()
    assert set(d) == {"clean", "pgd", "aa", "mean", "nrr", "n_examples", "threat", "pgd_steps",
                      "seconds", "extras", "cw", "noise", "transfer", "cw_art"}
    assert d["cw"] is d["noise"] is d["transfer"] is d["cw_art"] is None  # extra evaluations not asked for
    assert RobustnessReport(**d) == report
    table = report.table("tiny")
    assert f"{report.aa:.2f}" in table and f"{report.nrr:.2f}" in table and "tiny" in table


def test_evaluate_without_autoattack() -> None:
    model = trained_cnn(4)
    x, y = blobs(32, 4, seed=5)
    report = evaluate_robustness(model, x, y, PGD20, autoattack=False, progress=False)
    assert report.aa is None and report.mean is None and report.nrr is None
    assert report.clean >= report.pgd
    row = report.table().splitlines()[-1]
    assert row.count("-") == 3  # AA, Mean, NRR


def test_format_table() -> None:
    rows = [("best", {"clean": 82.92, "pgd": 50.0, "aa": 46.74, "mean": 64.83, "nrr": 59.7822,
                      "pgd_steps": 20}),
            ("final (no AA)", {"clean": 100.0, "pgd": 5.0, "aa": None, "mean": None, "nrr": None,
                               "pgd_steps": 20})]
    table = format_table(rows)
    lines = table.splitlines()
    assert len(lines) == 4
    assert len({len(line) for line in lines}) == 1  # aligned
    assert [c.strip() for c in lines[0].strip("|").split("|")] == [
        "model", "Clean", "PGD-20", "AA", "Mean", "NRR"]
    assert [c.strip() for c in lines[2].strip("|").split("|")] == [
        "best", "82.92", "50.00", "46.74", "64.83", "59.78"]
    assert [c.strip() for c in lines[3].strip("|").split("|")][3:] == ["-", "-", "-"]
    report = RobustnessReport(1.0, 2.0, None, None, None, 10, "t", 10, 0.1)
    assert "PGD-10" in format_table([("r", report)])


# --- AutoAttack --------------------------------------------------------------------------


def test_run_autoattack_four_classes() -> None:
    model = trained_cnn(4)
    model.net[5].weight.grad = torch.ones_like(model.net[5].weight)
    model.train()
    modes = _modes(model)
    x, y = blobs(32, 4, seed=6)
    threat = ThreatModel("linf", 16 / 255, 4 / 255, 20)
    rng = torch.random.get_rng_state()
    lines: list[str] = []
    x_adv, robust = run_autoattack(model, x, y, threat, batch_size=16, log=lines.append)

    assert torch.equal(torch.random.get_rng_state(), rng)  # the attacks' reseeding is contained
    assert _modes(model) == modes
    assert torch.equal(model.net[5].weight.grad, torch.ones_like(model.net[5].weight))
    assert all(p.grad is None for n, p in model.named_parameters() if n != "net.5.weight")
    assert all(p.requires_grad for p in model.parameters())
    assert x_adv.shape == x.shape and x_adv.device.type == "cpu" and x_adv.dtype == torch.float32
    assert robust.shape == (32,) and robust.dtype == torch.bool
    assert (x_adv - x).abs().max().item() <= threat.eps + 1e-5
    assert x_adv.min().item() >= 0 and x_adv.max().item() <= 1
    with torch.no_grad():
        model.eval()
        pred_adv, pred_clean = model(x_adv).argmax(1), model(x).argmax(1)
    assert torch.equal(robust, pred_adv == y)
    assert not (robust & (pred_clean != y)).any()  # robust implies clean-correct
    assert (pred_clean == y).sum() > robust.sum()  # it broke something
    assert any("3 target classes" in line for line in lines)
    assert any(line.startswith("robust accuracy after SQUARE") for line in lines)
    assert not logging.getLogger("auto-attack").handlers  # routing removed


@pytest.mark.parametrize("k", [2, 3])
def test_run_autoattack_two_and_three_classes(k: int) -> None:
    model = trained_cnn(k)
    x, y = blobs(16, k, seed=7)
    if k == 2:
        threat = ThreatModel("l2", 0.5, 0.1, 20)
    else:
        threat = ThreatModel("linf", 16 / 255, 4 / 255, 20)
    x_adv, robust = run_autoattack(model, x, y, threat, batch_size=16)
    with torch.no_grad():
        assert torch.equal(robust, model.eval()(x_adv).argmax(1) == y)
    if threat.norm == "l2":
        assert (x_adv - x).flatten(1).norm(dim=1).max().item() <= threat.eps + 1e-4


def test_autoattack_plan_for_few_classes() -> None:
    standard = ["apgd-ce", "apgd-t", "fab-t", "square"]
    assert autoattack_plan(10) == {"attacks": standard, "n_target_classes": 9}
    assert autoattack_plan(200) == {"attacks": standard, "n_target_classes": 9}
    assert autoattack_plan(4, "l2") == {"attacks": standard, "n_target_classes": 3}
    assert autoattack_plan(3)["attacks"] == ["apgd-ce", "fab-t", "square"]
    assert autoattack_plan(2) == {"attacks": ["apgd-ce", "fab-t", "square"], "n_target_classes": 1}
    assert "apgd-dlr" not in autoattack_plan(2, version="plus")["attacks"]
    assert "apgd-dlr" in autoattack_plan(3, version="plus")["attacks"]
    with pytest.raises(InputError):
        autoattack_plan(1)
    with pytest.raises(InputError):
        autoattack_plan(10, version="fast")


def test_run_autoattack_zero_eps_and_bad_input() -> None:
    model = trained_cnn(4)
    x, y = blobs(16, 4, seed=8)
    x_adv, robust = run_autoattack(model, x, y, ThreatModel("linf", 0.0, 0.0, 0))
    assert torch.equal(x_adv, x)
    with torch.no_grad():
        assert torch.equal(robust, model.eval()(x).argmax(1) == y)
    with pytest.raises(InputError):
        run_autoattack(model, x, y, PGD20, version="custom")
    with pytest.raises(InputError):
        run_autoattack(model, x[0], y, PGD20)


# --- progress bars count images ----------------------------------------------------------


class _Terminal(io.StringIO):
    """A stderr that says it is a terminal, so ``progress_enabled`` draws the bars into it."""

    def isatty(self) -> bool:
        return True


def _totals(out: str, desc: str) -> set[int]:
    """The totals ``k/N`` that the bars named ``desc`` showed."""
    return {int(m) for m in re.findall(rf"{re.escape(desc)}:[^\r]*?\| *\d+/(\d+) \[", out)}


def test_evaluation_bars_count_images_not_batches(monkeypatch) -> None:
    model = trained_cnn(4)
    x, y = blobs(40, 4, seed=4)  # 40 images, one batch of 500: a batch bar would sit at 0/1
    term = _Terminal()
    monkeypatch.setattr(sys, "stderr", term)
    threat = ThreatModel("linf", 8 / 255, 2 / 255, 5)
    report = evaluate_robustness(model, x, y, threat, autoattack="apgd", batch_size=500, progress=True)
    out = term.getvalue()
    assert _totals(out, "clean") == {40} and _totals(out, "PGD-5") == {40}
    # each attack's bar counts the images it attacks: those still robust before it
    per = report.extras["aa_per_attack"]
    assert [r["attack"] for r in per] == ["clean", "apgd-ce", "apgd-t"] and per[1]["n_robust"] > 0
    assert _totals(out, "AutoAttack APGD-CE") == {per[0]["n_robust"]}
    assert _totals(out, "AutoAttack APGD-T") == {per[1]["n_robust"]}
    assert "img/s" in out and "batch" not in out and "/1 [" not in out

    term.seek(0)
    term.truncate()
    # the trainer's held-out calls: bars as asked (the caller decided), over images at any batch size
    accuracy(model, x, y, batch_size=16, progress=True)
    pgd_accuracy(model, x, y, threat, batch_size=16, progress=True)
    out = term.getvalue()
    assert _totals(out, "clean") == {40} and _totals(out, "PGD-5") == {40}
    monkeypatch.setattr(sys, "stderr", _Terminal())
    evaluate_robustness(model, x, y, threat, autoattack=False, progress=False)  # no bars when not asked
    assert sys.stderr.getvalue() == ""


# --- the late_attacks sanity check: a count and a rate threshold ----------------------------


def _late_report(n: int, after_apgd: int, final: int) -> dict:
    """A standard-AutoAttack report on ``n`` images: ``after_apgd`` robust after APGD-T, ``final`` at the end."""
    per = [{"attack": "clean", "robust": 100.0 * n / n, "n_robust": n, "seconds": 0.0},
           {"attack": "apgd-ce", "robust": 100.0 * after_apgd / n, "n_robust": after_apgd, "seconds": 1.0},
           {"attack": "apgd-t", "robust": 100.0 * after_apgd / n, "n_robust": after_apgd, "seconds": 1.0},
           {"attack": "fab-t", "robust": 100.0 * after_apgd / n, "n_robust": after_apgd, "seconds": 1.0},
           {"attack": "square", "robust": 100.0 * final / n, "n_robust": final, "seconds": 1.0}]
    return {"clean": 100.0, "pgd": 100.0 * after_apgd / n, "aa": 100.0 * final / n, "n_examples": n,
            "extras": {"aa_version": "standard", "aa_per_attack": per}}


@pytest.mark.parametrize("n, broken, fails", [
    (300, 1, False),     # the user's case: 1 image, 0.33%: noise
    (300, 2, False),     # 0.67%: under both floors
    (300, 3, True),      # 3 images and exactly 1%: both floors reached
    (100, 2, False),     # 2% but only 2 images
    (100, 3, True),      # 3 images, 3%
    (10000, 10, False),  # 10 images but 0.1%
    (10000, 99, False),  # 0.99%
    (10000, 100, True),  # 1%
])
def test_late_attacks_fails_only_beyond_both_thresholds(n: int, broken: int, fails: bool) -> None:
    from rpat.evaluation.sanity import LATE_MIN_IMAGES, LATE_MIN_PERCENT, late_attacks_check

    assert (LATE_MIN_IMAGES, LATE_MIN_PERCENT) == (3, 1.0)
    res = late_attacks_check(_late_report(n, n // 2, n // 2 - broken))
    assert res["broken"] == broken and res["n_examples"] == n
    assert res["drop"] == pytest.approx(100.0 * broken / n)
    assert res["passed"] is not fails and bool(res.get("warning")) is not fails
    pct = f"{100.0 * broken / n:.2f}%"
    if fails:
        assert res["detail"] == (f"FAB-T/Square broke {broken} of {n} images that APGD missed ({pct}), at least 3 "
                                 "images and 1% of them: a possible sign of gradient masking")
    else:
        assert res["detail"] == (f"warning: FAB-T/Square broke {broken} of {n} images that APGD missed ({pct}); "
                                 "within noise (gradient masking is flagged from at least 3 images and 1% of them)")


def test_late_attacks_nothing_found_or_no_record() -> None:
    from rpat.evaluation.sanity import late_attacks_check

    res = late_attacks_check(_late_report(300, 150, 150))
    assert res["passed"] and not res.get("warning") and res["broken"] == 0
    assert res["detail"] == "FAB-T/Square found nothing APGD-CE/APGD-T missed"
    assert late_attacks_check(None)["skipped"]
    apgd = _late_report(300, 150, 150)
    apgd["extras"]["aa_version"] = "apgd"
    assert late_attacks_check(apgd)["skipped"]


def test_sanity_run_reports_a_late_attack_warning_not_a_failure() -> None:
    from rpat.evaluation.sanity import run_sanity_checks, summarize

    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 4)).eval()
    x, y = torch.rand(12, 1, 4, 4), torch.randint(0, 4, (12,))
    warned: list[str] = []
    logged: list[str] = []
    report = _late_report(300, 150, 149)
    report["pgd"] = 0.5  # skips the attack checks: only the bookkeeping is under test
    report["aa"] = 0.0
    res = run_sanity_checks(model, x, y, ThreatModel("linf", 8 / 255, 2 / 255, 2), report=report,
                            warn=warned.append, log=logged.append)
    assert "late_attacks" not in res["failed"] and res["warnings"] == ["late_attacks"]
    assert res["checks"]["late_attacks"]["passed"] and res["checks"]["late_attacks"]["warning"]
    assert warned == ["rpat: warning: sanity check late_attacks: FAB-T/Square broke 1 of 300 images that APGD "
                      "missed (0.33%); within noise (gradient masking is flagged from at least 3 images and 1% of "
                      "them)"]
    line = next(m for m in logged if m.startswith("sanity late_attacks"))
    assert "FAILED" not in line and ": warning: FAB-T/Square broke 1 of 300 images" in line
    assert "FAILED" not in summarize(res) and "1 warning (late_attacks)" in summarize(res)
    # beyond both thresholds it fails, with the counts
    res = run_sanity_checks(model, x, y, ThreatModel("linf", 8 / 255, 2 / 255, 2),
                            report={**_late_report(300, 150, 140), "pgd": 0.5, "aa": 0.0}, warn=warned.append)
    assert res["failed"] == ["late_attacks"] and res["checks"]["late_attacks"]["drop"] == pytest.approx(10 / 3)
    assert "broke 10 of 300 images" in warned[-1] and "gradient masking" in warned[-1]


# --- eval settings of a plain state_dict: the architecture from the weights ------------------


def test_eval_settings_infers_the_architecture_before_any_data(tmp_path, monkeypatch) -> None:
    import rpat.evaluation.checkpoint_eval as ce
    from rpat.models import create_model

    def no_data(*a, **k):
        raise AssertionError("eval_settings read the dataset")

    monkeypatch.setattr(ce, "load_dataset", no_data)
    path = tmp_path / "plain.pt"
    torch.manual_seed(0)
    torch.save(create_model("small_cnn", num_classes=10, in_chans=1).state_dict(), path)
    _, settings = ce.eval_settings(path, dataset="digits", autoattack="none")
    assert settings["arch"] == "small_cnn" and settings["dataset"] == "digits"
    # the weights take 1 channel, CIFAR-10 has 3: no model fits, and --arch is asked for
    with pytest.raises(InputError, match=r"plain state_dict and its keys and shapes fit none of rpat's models with "
                                         r"10 classes and 3 input channel\(s\): name its architecture with --arch"):
        ce.eval_settings(path, dataset="cifar10", autoattack="none")
