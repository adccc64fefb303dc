"""Analyses: the theorems' measurements against exact references, consistency statistics, ablation grids."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from rpat.analysis.consistency import (
    consistency_of_model,
    consistency_of_run,
    group_statistics,
    perception_distances,
)
from rpat.analysis.smoothness import (
    directional_second_derivative,
    jacobian_drift,
    jacobian_rows,
    second_difference,
    smoothness_of_model,
    spectral_norm,
)
from rpat.attacks.threat import ThreatModel
from rpat.cli import main
from rpat.errors import InputError
from rpat.experiments.ablation import ablation_grid, parse_grid, write_ablation
from rpat.models.base import ImageClassifier

SHAPE = (2, 4, 4)  # (C, H, W) of the toy images: d = 32


def _flat(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(1)


class TinyTanh(ImageClassifier):
    """A smooth rpat model: flatten -> tanh(W1) -> tanh(W2) -> W3 (third, second, logits proxies)."""

    def __init__(self, num_classes: int = 3, hidden: int = 6, affine: bool = False):
        super().__init__(num_classes, in_chans=SHAPE[0])
        d = SHAPE[0] * SHAPE[1] * SHAPE[2]
        self.l1, self.l2, self.head = nn.Linear(d, hidden), nn.Linear(hidden, hidden), nn.Linear(hidden, num_classes)
        self.act = nn.Identity() if affine else nn.Tanh()

    def forward_stages(self, x):
        third = self.act(self.l1(_flat(x)))
        return third, self.act(self.l2(third))

    def forward_head(self, features):
        return self.head(features)


def _model(affine: bool = False, seed: int = 0) -> TinyTanh:
    torch.manual_seed(seed)
    return TinyTanh(affine=affine).double().eval()


def _points(n: int = 5, scale: float = 0.05, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand((n, *SHAPE), generator=g, dtype=torch.float64)
    delta = scale * (2 * torch.rand((n, *SHAPE), generator=g, dtype=torch.float64) - 1)
    return x, delta


def _explicit_jacobian(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """(B, K, d) from torch.autograd.functional.jacobian, one example at a time."""
    return torch.stack([torch.autograd.functional.jacobian(lambda v: model(v.unsqueeze(0))[0], xi).flatten(1)
                        for xi in x])


# ---- Theorem 1: curvature along Δ ------------------------------------------------------
def test_affine_model_has_zero_curvature_and_zero_drift():
    model = _model(affine=True)
    x, delta = _points(scale=0.5)
    f = lambda v: model(v)  # noqa: E731
    assert second_difference(f, x, delta).abs().max() < 1e-12
    assert directional_second_derivative(f, x, delta).abs().max() < 1e-12
    drift, jf, exact = jacobian_drift(f, x, delta, (0.25, 1.0))
    assert exact and drift.abs().max() < 1e-12 and (jf > 0).all()
    # and the whole report says so: zero curvature, zero γ, Lipschitz estimate = ‖W‖₂ of the affine map
    rep = smoothness_of_model(model, x, (x + delta), power_iters=50, batch_size=2)
    assert rep["curvature_fd"]["mean"] < 1e-10 and rep["curvature_hvp"]["mean"] < 1e-10 and rep["gamma"] < 1e-10
    assert rep["relative_drift"]["1"]["mean"] < 1e-10 and rep["nonlinearity"]["mean"] < 1e-10
    w = (model.head.weight @ model.l2.weight @ model.l1.weight).detach()
    assert rep["lipschitz_estimate"] == pytest.approx(float(torch.linalg.matrix_norm(w, 2)), rel=1e-6)


def test_hvp_form_matches_explicit_hessian():
    model = _model()
    x, delta = _points(n=2, scale=0.3)
    q = directional_second_derivative(lambda v: model(v), x, delta, at=0.5)
    for b in range(2):
        for k in range(3):
            hess = torch.autograd.functional.hessian(lambda v, k=k: model(v.view(1, *SHAPE))[0, k],
                                                     (x[b] + 0.5 * delta[b]).flatten())
            d = delta[b].flatten()
            assert q[b, k].item() == pytest.approx((d @ hess @ d).item(), rel=1e-9, abs=1e-12)


def test_second_difference_approximates_hvp_form_on_smooth_net():
    model = _model()
    x, delta = _points(scale=0.02)
    fd = 4 * second_difference(lambda v: model(v), x, delta)
    q = directional_second_derivative(lambda v: model(v), x, delta)
    assert q.abs().max() > 1e-6  # the net is curved: the check is not 0 == 0
    assert (fd - q).norm() / q.norm() < 1e-3
    # the error shrinks like ‖Δ‖²: halving Δ quarters the relative gap
    fd2 = 4 * second_difference(lambda v: model(v), x, delta / 2)
    q2 = directional_second_derivative(lambda v: model(v), x, delta / 2)
    assert (fd2 - q2).norm() / q2.norm() < 0.35 * (fd - q).norm() / q.norm()


# ---- Theorem 2: Jacobian drift, spectral norm --------------------------------------------
def test_power_iteration_matches_matrix_2_norm():
    model = _model()
    x, _ = _points(n=4)
    jac = _explicit_jacobian(model, x)
    want = torch.linalg.matrix_norm(jac, 2)
    got = spectral_norm(lambda v: model(v), x, iters=200, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-9)


def test_jacobian_rows_and_exact_drift_match_autograd():
    model = _model()
    x, delta = _points(n=3, scale=0.4)
    torch.testing.assert_close(jacobian_rows(lambda v: model(v), x).flatten(2), _explicit_jacobian(model, x))
    drift, jf, exact = jacobian_drift(lambda v: model(v), x, delta, (0.5, 1.0))
    j0 = _explicit_jacobian(model, x)
    for j, a in enumerate((0.5, 1.0)):
        want = (_explicit_jacobian(model, x + a * delta) - j0).flatten(1).norm(dim=1)
        torch.testing.assert_close(drift[:, j], want)
    assert exact
    torch.testing.assert_close(jf, j0.flatten(1).norm(dim=1))
    assert (drift[:, 1] > 0).all()


def test_hutchinson_drift_estimate_is_close_to_exact():
    model = _model()
    x, delta = _points(n=3, scale=0.4)
    exact, _, _ = jacobian_drift(lambda v: model(v), x, delta, (1.0,))
    est, _, was_exact = jacobian_drift(lambda v: model(v), x, delta, (1.0,), exact_max_outputs=0, probes=4000,
                                       generator=torch.Generator().manual_seed(0))
    assert not was_exact
    torch.testing.assert_close(est, exact, rtol=0.08, atol=0)


# ---- consistency -----------------------------------------------------------------------
def test_perception_distances_hand_computed_and_affine_midpoint():
    model = _model(affine=True).float()
    x, delta = (t.float() for t in _points(n=6, scale=0.2))
    d = perception_distances(model, x, x + delta, ["logits", "second_to_last", "third_to_last"], batch_size=4)
    with torch.no_grad():
        hc, ha = model(x), model(x + delta)
    torch.testing.assert_close(d["logits"]["clean_adv"], ((hc - ha) ** 2).mean(1).double())
    # an affine h maps the midpoint to the midpoint: both halves are a quarter of the whole
    for p in d:
        torch.testing.assert_close(d[p]["clean_mid"], d[p]["clean_adv"] / 4, rtol=1e-4, atol=1e-10)
        torch.testing.assert_close(d[p]["mid_adv"], d[p]["clean_adv"] / 4, rtol=1e-4, atol=1e-10)


def test_group_statistics_split_and_summaries():
    vals = torch.tensor([1.0, 2.0, 3.0, 10.0, 20.0], dtype=torch.float64)
    dist = {"logits": {m: vals for m in ("clean_adv", "clean_mid", "mid_adv")}}
    st = group_statistics(dist, torch.tensor([True, True, True, False, False]))["logits"]
    assert st["defended"]["clean_adv"] == {"mean": 2.0, "std": 1.0, "median": 2.0, "count": 3}
    assert st["failed"]["clean_adv"]["mean"] == 15.0 and st["failed"]["clean_adv"]["median"] == 15.0
    assert st["all"]["mid_adv"]["count"] == 5


def test_consistency_split_matches_predictions_on_adversarial_images():
    torch.manual_seed(0)
    model = TinyTanh().eval()
    x = torch.rand(40, *SHAPE)
    y = torch.randint(0, 3, (40,))
    threat = ThreatModel("linf", 0.1, 0.03, 5)
    res = consistency_of_model(model, x, y, threat, ["logits"], batch_size=16, keep_values=True, seed=3)
    assert res["n_defended"] + res["n_failed"] == 40
    st = res["stats"]["logits"]
    assert st["defended"]["clean_adv"]["count"] == res["n_defended"]
    assert st["failed"]["clean_adv"]["count"] == res["n_failed"]
    # the same seeded attack reproduces the split exactly
    again = consistency_of_model(model, x, y, threat, ["logits"], batch_size=16, keep_values=True, seed=3)
    assert again["defended"] == res["defended"] and again["values"] == res["values"]
    assert 0 < res["n_defended"] < 40  # both groups are populated for this toy problem


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    """A 2-epoch small_cnn PGD-AT run on 200 digits with per-epoch checkpoints."""
    pytest.importorskip("sklearn")
    from rpat.config import build_config
    from rpat.training import Trainer

    run = tmp_path_factory.mktemp("digits") / "run"
    cfg = build_config("digits_demo", None, [{"device": "cpu", "save_every": 1, "data": {"train_subset": 200},
                                               "optim": {"epochs": 2}, "eval": {"n_examples": 50}}])
    Trainer(cfg, run, progress=False, log=lambda m: None).fit()
    return run


def test_consistency_of_run_trend_and_final(digits_run):
    res = consistency_of_run(digits_run, n_examples=40, proxies=["logits", "third_to_last"])
    assert [e["epoch"] for e in res["epochs"]] == [1, 2]
    fin = res["final"]
    assert fin["epoch"] == 2 and fin["n_examples"] == 40 and len(fin["defended"]) == 40
    # final.pt holds the epoch-2 weights: same seed, same images -> identical statistics
    assert fin["stats"] == res["epochs"][1]["stats"] and res["epochs"][1]["same_as"].endswith("final.pt")
    assert "values" not in res["epochs"][0] and res["epochs"][0]["stats"] != fin["stats"]
    # measured separately (other image count), epoch 2 still agrees with final on the shared first images
    sep = consistency_of_run(digits_run, n_examples=40, trend_examples=20, proxies=["logits"])
    assert "same_as" not in sep["epochs"][1] and sep["epochs"][1]["n_examples"] == 20
    assert sep["final"]["stats"]["logits"] == res["final"]["stats"]["logits"]


def test_cli_analyze_consistency_and_smoothness(digits_run, tmp_path, capsys):
    out = tmp_path / "a"
    assert main(["analyze", "consistency", str(digits_run), "--n-examples", "30", "--out", str(out)]) == 0
    data = json.loads((out / f"consistency_{digits_run.name}.json").read_text())
    assert data["final"]["n_examples"] == 30 and len(data["epochs"]) == 2
    assert (out / f"consistency_{digits_run.name}.png").stat().st_size > 1000
    assert main(["analyze", "smoothness", str(digits_run / "final.pt"), str(digits_run / "epochs/epoch_0001.pt"),
                 "--labels", "final", "e1", "--n-points", "6", "--power-iters", "5", "--out", str(out)]) == 0
    sm = json.loads((out / "smoothness.json").read_text())["results"]
    assert [r["label"] for r in sm] == ["final", "e1"] and sm[0]["n_points"] == 6
    assert sm[0]["lipschitz_estimate"] == pytest.approx(sm[0]["sup_spectral_norm"] + sm[0]["gamma"])
    assert (out / "smoothness.pdf").stat().st_size > 1000
    text = capsys.readouterr().out
    assert "defended" in text and "Lipschitz" in text


@pytest.mark.parametrize("args, message", [
    (["analyze", "consistency", "nope"], "neither a run directory nor a checkpoint"),
    (["analyze", "smoothness", "x.pt", "--alphas", "0.5,2"], "--alphas must be in (0, 1]"),
    (["analyze", "consistency", "x", "--proxy", "pixels"], "unknown proxy 'pixels'"),
    (["ablation", "--lam", "1,a", "--out", "o"], "--lam must be comma-separated numbers"),
    (["ablation", "--preset", "digits_demo", "--alpha", "1.5", "--out", "o"], "alpha must be in [0, 1]"),
])
def test_bad_input_is_one_line(args, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]


# ---- ablation grid ----------------------------------------------------------------------
def test_parse_grid():
    assert parse_grid("0.5, 1,2,1", "lam") == [0.5, 1.0, 2.0]
    with pytest.raises(InputError):
        parse_grid("0.5,,1", "lam")


def test_ablation_grid_size_values_and_files(tmp_path):
    grid = ablation_grid("pgd_at", [0.5, 1, 2], [0.25, 0.5, 0.75], preset="digits_demo",
                         overrides=["optim.epochs=3"])
    assert len(grid) == 1 + 9
    assert grid[0]["name"] == "pgd_at_base" and not grid[0]["config"].rpat.enabled
    pairs = [(g["config"].rpat.lam, g["config"].rpat.alpha) for g in grid[1:]]
    assert pairs == [(lam, a) for lam in (0.5, 1.0, 2.0) for a in (0.25, 0.5, 0.75)]
    assert all(g["config"].rpat.enabled and g["config"].optim.epochs == 3 for g in grid[1:])
    assert all(g["config"].data.dataset == "digits" for g in grid)
    manifest = json.loads(write_ablation(tmp_path, grid).read_text())
    assert len(manifest["runs"]) == 10 and len(list((tmp_path / "configs").glob("*.yaml"))) == 10
    from rpat.config import build_config

    cfg = build_config(None, tmp_path / "configs" / "pgd_at_rpat_lam2_a0.25.yaml")
    assert (cfg.rpat.lam, cfg.rpat.alpha, cfg.rpat.enabled) == (2.0, 0.25, True)
    assert len(ablation_grid("pgd_at", [1], [0.5], baseline=False)) == 1
