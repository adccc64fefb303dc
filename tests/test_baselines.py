"""TRADES, MART and Consistency-AT (each ± RPAT), two-view batches, and the ℓ2 threat model."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from rpat.attacks import ThreatModel
from rpat.attacks.pgd import random_start
from rpat.config import build_config
from rpat.data import ArrayDataset, DeviceLoader
from rpat.objectives import (
    MART,
    TRADES,
    ConsistencyAT,
    Objective,
    RPATTerm,
    build_objective,
    js_divergence,
    kl_div,
)

THREAT = ThreatModel("linf", 8 / 255, 2 / 255, 5)


class Linear(nn.Module):
    """A BatchNorm-free model (so per-view and stacked passes agree) that counts its forward passes."""

    def __init__(self, k: int = 4, d: int = 3 * 4 * 4, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.fc = nn.Linear(d, k)
        with torch.no_grad():
            self.fc.weight.copy_(torch.randn(k, d, generator=g) * 2)
            self.fc.bias.copy_(torch.randn(k, generator=g) * 0.1)
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return torch.tanh(self.fc(x.flatten(1))) * 3  # nonlinear, so R > 0


def _batch(b: int = 6, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(b, 3, 4, 4, generator=g)
    x_adv = (x + (torch.rand(x.shape, generator=g) * 2 - 1) * 0.2).clamp(0, 1)  # large: terms well above fp32 noise
    y = torch.randint(0, 4, (b,), generator=g)
    return x, y, x_adv


def _softmax_rows(z: torch.Tensor) -> list[list[float]]:
    out = []
    for row in z.tolist():
        m = max(row)
        e = [math.exp(v - m) for v in row]
        out.append([v / sum(e) for v in e])
    return out


def _kl(p: list[float], q: list[float]) -> float:
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q, strict=True) if pi > 0)


# ---- base losses against hand computations --------------------------------------------
def test_trades_loss_by_hand():
    model = Linear()
    x, y, x_adv = _batch()
    with torch.no_grad():
        zc, za = model(x), model(x_adv)
    pc, pa = _softmax_rows(zc), _softmax_rows(za)
    ce = sum(-math.log(pc[i][y[i]]) for i in range(len(y))) / len(y)
    kl = sum(_kl(pc[i], pa[i]) for i in range(len(y))) / len(y)
    total, terms = Objective(TRADES(THREAT)).loss(model, x, y, x_adv, epoch=0)
    assert total.item() == pytest.approx(ce + 6 * kl, rel=1e-5)
    assert terms["kl"].item() == pytest.approx(kl, rel=1e-5)
    assert model.calls == 4  # clean + adv in the loss (2) after the 2 reference passes


def _mart_by_hand(zc: torch.Tensor, za: torch.Tensor, y: torch.Tensor, exact: bool) -> float:
    """MART's loss from softmaxes in plain Python: the official code's constants, or the exact formula."""
    pc, pa = _softmax_rows(zc), _softmax_rows(za)
    n = len(y)
    bce = 0.0
    kl = 0.0
    for i in range(n):
        yi = int(y[i])
        wrong = max(p for k, p in enumerate(pa[i]) if k != yi)
        if exact:
            bce += -math.log(pa[i][yi]) - math.log(max(1 - wrong, 1e-12))
            kl += _kl(pc[i], pa[i]) * (1 - pc[i][yi])
        else:  # log(1.0001 - p + 1e-12), weight (1.0000001 - p_true), KL with log(q + 1e-12)
            bce += -math.log(pa[i][yi]) - math.log(1.0001 - wrong + 1e-12)
            kl_i = sum(p * (math.log(p) - math.log(q + 1e-12)) for p, q in zip(pc[i], pa[i], strict=True) if p > 0)
            kl += kl_i * (1.0000001 - pc[i][yi])
    return bce / n + 6 * kl / n


@pytest.mark.parametrize("exact", [False, True])
def test_mart_loss_by_hand(exact):
    """Default (official constants) and ``exact`` both equal their hand computation on ordinary logits."""
    model = Linear()
    x, y, x_adv = _batch()
    with torch.no_grad():
        zc, za = model(x), model(x_adv)
    total, _ = Objective(MART(THREAT, exact=exact)).loss(model, x, y, x_adv, epoch=0)
    assert total.item() == pytest.approx(_mart_by_hand(zc.double(), za.double(), y, exact), rel=1e-5)


class Fixed(nn.Module):
    """Returns fixed logits per input (looked up by the input's first pixel), as a differentiable function."""

    def __init__(self, table: dict[float, list[float]]):
        super().__init__()
        self.table = table

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = [self.table[round(float(v), 3)] for v in x[:, 0, 0, 0]]
        return torch.tensor(rows, dtype=x.dtype) + 0 * x.sum()


def test_mart_confident_wrong_official_and_exact_differ_by_nats():
    """A confident wrong prediction on x_adv: p_wrong = 1 − 1e-9. By hand, the exact margin term is
    −log(1e-9) = 20.72 nats, the official one −log(1.0001 − (1 − 1e-9) + 1e-12) = −log(1.00001e-4) = 9.21."""
    z_wrong = math.log(1 - 1e-9) - math.log(1e-9)  # logits (0, z): p = (1e-9, 1 − 1e-9)
    x, x_adv = torch.full((1, 3, 4, 4), 0.1), torch.full((1, 3, 4, 4), 0.2)
    model = Fixed({0.1: [0.0, 0.0], 0.2: [0.0, z_wrong]})  # clean: p = (0.5, 0.5); adv: confident class 1
    y = torch.tensor([0])
    official, _ = Objective(MART(THREAT)).loss(model, x.double(), y, x_adv.double(), epoch=0)
    exact, _ = Objective(MART(THREAT, exact=True)).loss(model, x.double(), y, x_adv.double(), epoch=0)
    ce = -math.log(1e-9)  # CE on x_adv: −log p_y = −log 1e-9
    kl = 0.5 * math.log(0.5 / 1e-9) + 0.5 * math.log(0.5 / (1 - 1e-9))  # KL((.5,.5) ‖ (1e-9, 1 − 1e-9))
    kl_off = 0.5 * math.log(0.5 / (1e-9 + 1e-12)) + 0.5 * math.log(0.5 / (1 - 1e-9 + 1e-12))
    assert exact.item() == pytest.approx(ce - math.log(1e-9) + 6 * kl * 0.5, rel=1e-6)
    assert official.item() == pytest.approx(ce - math.log(1.0001 - (1 - 1e-9) + 1e-12)
                                            + 6 * kl_off * (1.0000001 - 0.5), rel=1e-6)
    assert exact.item() - official.item() == pytest.approx(11.51, abs=0.01)  # 20.72 − 9.21 nats, by hand


def test_mart_exact_from_config():
    """``method.mart_exact`` reaches the objective; the default is the official constants; it is MART-only."""
    from rpat.errors import InputError
    from rpat.objectives import build_objective

    for exact in (False, True):
        cfg = build_config(None, None, ["method.name=mart", f"method.mart_exact={str(exact).lower()}"]).validate()
        obj = build_objective(cfg.method.name, cfg.train_threat(), None, None, **cfg.method_options())
        assert obj.method.exact is exact
    assert build_config(None, None, ["method.name=mart"]).method.mart_exact is False
    assert build_config(None, None, ["method.name=trades"]).method_options() == {}
    with pytest.raises(InputError, match="mart_exact applies to method.name=mart only"):
        build_config(None, None, ["method.name=trades", "method.mart_exact=true"]).validate()


def _js_by_hand(z1: torch.Tensor, z2: torch.Tensor, t: float) -> float:
    p1, p2 = _softmax_rows(z1 / t), _softmax_rows(z2 / t)
    out = 0.0
    for a, b in zip(p1, p2, strict=True):
        m = [(u + v) / 2 for u, v in zip(a, b, strict=True)]
        out += 0.5 * _kl(a, m) + 0.5 * _kl(b, m)
    return out / len(p1)


def test_consistency_loss_by_hand():
    model = Linear()
    x, y, x_adv = _batch(8)
    yy = torch.cat([y[:4], y[:4]])  # two views of 4 images: labels repeat
    with torch.no_grad():
        za = model(x_adv)
    pa = _softmax_rows(za)
    ce = sum(-math.log(pa[i][yy[i]]) for i in range(8)) / 8
    js = _js_by_hand(za[:4], za[4:], 0.5)
    total, terms = Objective(ConsistencyAT(THREAT)).loss(model, x, yy, x_adv, epoch=0)
    assert terms["js"].item() == pytest.approx(js, rel=1e-4)
    assert total.item() == pytest.approx(ce + js, rel=1e-5)


def test_js_symmetric_zero_on_equal_positive_otherwise():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(5, 7, generator=g), torch.randn(5, 7, generator=g)
    assert js_divergence(a, b).item() == pytest.approx(js_divergence(b, a).item(), rel=1e-6)
    assert js_divergence(a, a).item() == pytest.approx(0.0, abs=1e-7)
    assert js_divergence(a, a + 3.0).item() == pytest.approx(0.0, abs=1e-6)  # softmax is shift-invariant
    assert js_divergence(a, b).item() > 1e-3
    assert js_divergence(a, b).item() <= math.log(2) + 1e-6  # JS is bounded by log 2
    assert kl_div(a, a).item() == pytest.approx(0.0, abs=1e-6)


# ---- the training attacks raise their own objectives ---------------------------------
def _small_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 16, 4))


def test_trades_attack_raises_kl_over_its_start():
    model = _small_cnn().eval()
    x, y, _ = _batch(16)
    x_adv = TRADES(THREAT).attack(model, x, y, torch.Generator().manual_seed(3))
    start = random_start(x, THREAT, "normal", torch.Generator().manual_seed(3))
    with torch.no_grad():
        zc = model(x)
        kl_adv = kl_div(zc, model(x_adv), "none")
        kl_start = kl_div(zc, model(start), "none")
    assert kl_adv.sum() > 10 * kl_start.sum()
    assert (kl_adv >= kl_start - 1e-7).float().mean() >= 0.9
    assert (x_adv - x).abs().max() <= 8 / 255 + 1e-6
    assert (start - x).abs().max() < 0.01  # the 0.001·N(0, I) start


def test_mart_attack_raises_ce_over_its_start():
    model = _small_cnn().eval()
    x, y, _ = _batch(16)
    x_adv = MART(THREAT).attack(model, x, y, torch.Generator().manual_seed(3))
    start = random_start(x, THREAT, "normal", torch.Generator().manual_seed(3))
    with torch.no_grad():
        ce_adv = F.cross_entropy(model(x_adv), y, reduction="none")
        ce_start = F.cross_entropy(model(start), y, reduction="none")
    assert ce_adv.mean() > ce_start.mean() + 0.01
    assert (ce_adv >= ce_start - 1e-6).all()
    assert (x_adv - x).abs().max() <= 8 / 255 + 1e-6


def test_consistency_attack_attacks_both_views_and_keeps_train_mode():
    model = _small_cnn().train()
    x, y, _ = _batch(8)
    x_adv = ConsistencyAT(THREAT).attack(model, x, y, torch.Generator().manual_seed(0))
    assert x_adv.shape == x.shape and model.training
    assert ((x_adv - x).flatten(1).abs().amax(1) > 4 / 255).all()  # every row of both views moved


# ---- RPAT on top of each method = base + λ·R by hand ----------------------------------
def _r_by_hand(model: nn.Module, x: torch.Tensor, x_adv: torch.Tensor, a: float) -> float:
    with torch.no_grad():
        hc, ha, hm = model(x), model(x_adv), model(x + a * (x_adv - x))
    return ((hm - ((1 - a) * hc + a * ha)) ** 2).mean().item()


@pytest.mark.parametrize("method", ["pgd_at", "trades", "mart", "consistency_at"])
def test_rpat_adds_lambda_r_to_each_method(method):
    model = Linear()
    x, y, x_adv = _batch(8)
    if method == "consistency_at":
        y = torch.cat([y[:4], y[:4]])
    base, _ = build_objective(method, THREAT).loss(model, x, y, x_adv, epoch=0)
    model.calls = 0
    term = RPATTerm(lam=0.7, alpha=0.3)
    total, terms = build_objective(method, THREAT, term).loss(model, x, y, x_adv, epoch=0)
    assert model.calls == 3  # clean, adv, mid: the base loss's passes are shared with R
    if method == "consistency_at":  # R on each benign view with its own x_adv, averaged
        r = 0.5 * (_r_by_hand(model, x[:4], x_adv[:4], 0.3) + _r_by_hand(model, x[4:], x_adv[4:], 0.3))
    else:
        r = _r_by_hand(model, x, x_adv, 0.3)
    assert r > 1e-4
    assert terms["rpat"].item() == pytest.approx(r, rel=1e-5)
    assert total.item() == pytest.approx(base.item() + 0.7 * r, rel=1e-5)


def test_objective_step_trains_with_each_method():
    model = _small_cnn().train()
    x, y, _ = _batch(8)
    for method in ("trades", "mart", "consistency_at"):
        obj = build_objective(method, THREAT, RPATTerm())
        loss, terms = obj.step(model, x, y, epoch=0, generator=torch.Generator().manual_seed(0))
        loss.backward()
        assert math.isfinite(loss.item()) and "rpat" in terms
        assert all(p.grad is not None for p in model.parameters())
        model.zero_grad()
    assert build_objective("consistency_at", THREAT).method.views == 2
    assert build_objective("trades", THREAT).method.views == 1


# ---- two views -----------------------------------------------------------------------
def _dataset(n: int = 20) -> ArrayDataset:
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 3, 8, 8), generator=g, dtype=torch.uint8)
    labels = torch.arange(n) % 3
    return ArrayDataset(images, labels, ["a", "b", "c"])


def test_two_views_differ_and_are_deterministic_per_seed():
    ds = _dataset()

    def batches(seed: int, views: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        loader = DeviceLoader(ds, 8, augment=True, padding=2, seed=seed, views=views)
        loader.set_epoch(1)
        return list(loader)

    two = batches(0, 2)
    assert [x.shape[0] for x, _ in two] == [16, 16, 8]
    for x, y in two:
        b = y.shape[0] // 2
        assert torch.equal(y[:b], y[b:])
        assert not torch.equal(x[:b], x[b:])  # independent crops/flips
        # both views come from the same images: zero padding aside, the same pixel values
        assert torch.allclose(x[:b].sum((1, 2, 3)) * 0, x[b:].sum((1, 2, 3)) * 0)
    again = batches(0, 2)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(two, again, strict=True))
    other = batches(1, 2)
    assert not all(torch.equal(a[0], b[0]) for a, b in zip(two, other, strict=True))
    one = batches(0, 1)
    plain = DeviceLoader(ds, 8, augment=True, padding=2, seed=0)
    plain.set_epoch(1)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(one, plain, strict=True))  # views=1 unchanged


def test_two_views_hold_the_same_images():
    ds = _dataset()
    loader = DeviceLoader(ds, 20, augment=True, padding=0, flip=True, seed=0, views=2)
    loader.set_epoch(0)
    x, y = next(iter(loader))
    v1, v2 = x[:20], x[20:]
    same = torch.equal(v1, v2) or all(torch.equal(a, b) or torch.equal(a, b.flip(-1))
                                      for a, b in zip(v1, v2, strict=True))
    assert same  # without crops a view is the image or its mirror


def test_bad_views():
    from rpat.errors import InputError

    with pytest.raises(InputError, match="views"):
        DeviceLoader(_dataset(), 4, views=0)


# ---- the ℓ2 threat model -------------------------------------------------------------
def test_l2_defaults_from_one_config_value():
    cfg = build_config(None, None, ["attack.norm=l2"])
    t = cfg.train_threat()
    assert (t.norm, t.eps, t.step_size, t.steps) == ("l2", 128 / 255, 32 / 255, 10)
    e = cfg.eval_threat()
    assert (e.norm, e.eps, e.step_size, e.steps) == ("l2", 128 / 255, 32 / 255, 20)
    t = build_config(None, None, []).train_threat()
    assert (t.norm, t.eps, t.step_size) == ("linf", 8 / 255, 2 / 255)
    t = build_config(None, None, ["attack.norm=l2", "attack.eps=0.25"]).train_threat()
    assert (t.eps, t.step_size) == (0.25, 32 / 255)


def test_autoattack_l2_passes_norm_and_respects_budget(monkeypatch):
    import pyautoattack

    from rpat.attacks import run_autoattack

    seen = []
    real = pyautoattack.AutoAttack

    def recording(*args, **kwargs):
        seen.append(kwargs.get("norm"))
        return real(*args, **kwargs)

    monkeypatch.setattr(pyautoattack, "AutoAttack", recording)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 3)).eval()
    x = torch.rand(6, 3, 8, 8)  # Square's ℓ2 version needs images of >= 5 pixels a side
    with torch.no_grad():
        y = model(x).argmax(1)  # all clean-correct, so every example is attacked
    eps = 0.5
    x_adv, robust = run_autoattack(model, x, y, ThreatModel("l2", eps, 0.1, 10), version="standard")
    assert seen == ["L2"]
    norms = (x_adv - x).flatten(1).norm(dim=1)
    assert (norms <= eps + 1e-4).all()
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    with torch.no_grad():
        assert torch.equal(model(x_adv).argmax(1) == y, robust)
    assert not robust.all()  # a linear 3-class model on 8x8 images is breakable at ℓ2 0.5
