"""PGD: the ε-ball and [0, 1] at every step, optimality on linear models, side effects."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from rpat.attacks import PGD, ThreatModel, default_threat, eval_mode, pgd
from rpat.attacks.pgd import random_start
from rpat.errors import InputError

LINF = ThreatModel("linf", 8 / 255, 2 / 255, 10)
L2 = ThreatModel("l2", 0.5, 0.2, 10)


class Linear(nn.Module):
    """logits = W·flatten(x) + b."""

    def __init__(self, d: int, k: int, scale: float = 1.0, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.fc = nn.Linear(d, k)
        with torch.no_grad():
            self.fc.weight.copy_(scale * torch.randn(k, d, generator=g))
            self.fc.bias.copy_(0.1 * torch.randn(k, generator=g))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.flatten(1))


class SmallCNN(nn.Module):
    """conv-BN-ReLU x2, dropout, pooled linear head."""

    def __init__(self, k: int = 4, c: int = 1, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.features = nn.Sequential(
            nn.Conv2d(c, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        )
        self.drop = nn.Dropout(0.5)
        self.head = nn.Linear(8 * 4, k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = F.adaptive_avg_pool2d(self.features(x), 2).flatten(1)
        return self.head(self.drop(z))


class Recorder(nn.Module):
    """Wraps a model and keeps a copy of every input it is called with (every PGD iterate)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.inputs: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.inputs.append(x.detach().clone())
        return self.model(x)


def images(n: int = 16, shape: tuple[int, ...] = (1, 6, 6), seed: int = 0) -> torch.Tensor:
    """Random images in [0, 1] with some pixels exactly 0 or 1 (to exercise the clipping)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, *shape, generator=g)
    x[x < 0.1] = 0.0
    x[x > 0.9] = 1.0
    return x


def labels(n: int, k: int) -> torch.Tensor:
    return torch.arange(n) % k


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def assert_in_ball(x_adv: torch.Tensor, x: torch.Tensor, threat: ThreatModel) -> None:
    delta = (x_adv - x).flatten(1)
    if threat.norm == "linf":
        assert delta.abs().max().item() <= threat.eps + 1e-6
    else:
        assert delta.norm(dim=1).max().item() <= threat.eps + 1e-6
    assert x_adv.min().item() >= 0.0 and x_adv.max().item() <= 1.0


def per_example_ce(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return F.cross_entropy(model.eval()(x), y, reduction="none")


def random_point_in_ball(x: torch.Tensor, threat: ThreatModel, seed: int) -> torch.Tensor:
    return random_start(x, threat, "uniform", gen(seed))


# --- the ε-ball and [0, 1] ---------------------------------------------------------


@pytest.mark.parametrize("threat", [LINF, L2, ThreatModel("linf", 0.1, 0.3, 6),
                                    ThreatModel("l2", 1.0, 2.0, 6)], ids=str)
@pytest.mark.parametrize("start", ["uniform", "normal", "none"])
def test_every_iterate_in_ball_and_box(threat: ThreatModel, start: str) -> None:
    x = images()
    y = labels(len(x), 4)
    model = Recorder(SmallCNN())
    x_adv = pgd(model, x, y, threat, start=start, generator=gen())
    # the model sees the start and every intermediate iterate, one forward per step
    assert len(model.inputs) == threat.steps
    for xi in [*model.inputs, x_adv]:
        assert xi.shape == x.shape
        assert_in_ball(xi, x, threat)
    assert x_adv.shape == x.shape and x_adv.dtype == x.dtype and not x_adv.requires_grad


@pytest.mark.parametrize("threat", [LINF, L2], ids=str)
def test_truncated_runs_are_prefixes_and_stay_in_ball(threat: ThreatModel) -> None:
    x = images()
    y = labels(len(x), 4)
    model = SmallCNN()
    full = Recorder(model)
    pgd(full, x, y, threat.with_steps(6), generator=gen(3))
    for k in range(1, 7):
        x_k = pgd(model, x, y, threat.with_steps(k), generator=gen(3))
        assert_in_ball(x_k, x, threat)
        if k < 6:  # the k-step result is the (k+1)-th iterate of the longer run
            torch.testing.assert_close(x_k, full.inputs[k], rtol=0, atol=0)


# --- the attack is an attack ----------------------------------------------------------


@pytest.mark.parametrize("threat", [LINF, L2], ids=str)
def test_binary_linear_beats_clean_and_every_random_point(threat: ThreatModel) -> None:
    # interior images: the ℓ2 optimum is then ε·d/‖d‖ (see the test below), not cut by the box
    x = 0.4 + 0.2 * torch.rand(32, 1, 4, 4, generator=gen(9))
    y = labels(32, 2)
    model = Linear(16, 2, scale=0.3)
    x_adv = pgd(model, x, y, threat.with_steps(30))
    loss_adv = per_example_ce(model, x_adv, y)
    assert (loss_adv > per_example_ce(model, x, y)).all()
    for seed in range(5):  # the optimum is certain for a binary linear model: per example
        loss_rand = per_example_ce(model, random_point_in_ball(x, threat, seed), y)
        assert (loss_adv >= loss_rand - 1e-6).all()


@pytest.mark.parametrize("threat", [LINF, L2], ids=str)
def test_cnn_loss_raised_on_average(threat: ThreatModel) -> None:
    x = images(64)
    y = labels(64, 4)
    model = SmallCNN()
    x_adv = pgd(model, x, y, threat)
    loss_adv = per_example_ce(model, x_adv, y)
    loss_clean = per_example_ce(model, x, y)
    loss_rand = per_example_ce(model, random_point_in_ball(x, threat, 1), y)
    assert loss_adv.mean() > loss_clean.mean() + 1e-3
    assert loss_adv.mean() > loss_rand.mean() + 1e-3
    assert (loss_adv >= loss_clean - 1e-4).float().mean() > 0.9


def test_binary_linear_linf_reaches_closed_form_optimum() -> None:
    # CE of a 2-class linear model grows with the margin (w_other - w_y)·x, so the
    # ℓ∞ optimum in the box is x + ε·sign(w_other - w_y), clipped to [0, 1].
    x = images(32, (1, 4, 4))
    y = labels(32, 2)
    model = Linear(16, 2, scale=0.3)
    w = model.fc.weight.detach()
    direction = (w[1 - y] - w[y]).sign().view_as(x)
    expected = (x + LINF.eps * direction).clamp(0, 1)
    x_adv = pgd(model, x, y, LINF.with_steps(20), generator=gen())  # 20 steps x 2/255 >= 2ε
    torch.testing.assert_close(x_adv, expected, rtol=0, atol=1e-6)


def test_binary_linear_l2_reaches_analytic_worst_case() -> None:
    # Worst case in the ℓ2 ball: δ = ε·d/‖d‖ with d = w_other - w_y, raising the
    # margin by exactly ε·‖d‖ (x is interior, so the box does not bind).
    g = gen(5)
    x = 0.3 + 0.4 * torch.rand(16, 1, 8, 8, generator=g)
    y = labels(16, 2)
    model = Linear(64, 2, scale=0.2)
    w = model.fc.weight.detach()
    d = w[1 - y] - w[y]  # (B, D)
    threat = ThreatModel("l2", 0.5, 0.1, 10)
    x_adv = pgd(model, x, y, threat, start="none")
    expected_delta = threat.eps * d / d.norm(dim=1, keepdim=True)
    torch.testing.assert_close((x_adv - x).flatten(1), expected_delta, rtol=0, atol=1e-5)

    def margin(z: torch.Tensor) -> torch.Tensor:
        logits = model(z).detach()
        return logits[torch.arange(len(y)), 1 - y] - logits[torch.arange(len(y)), y]

    torch.testing.assert_close(margin(x_adv) - margin(x), threat.eps * d.norm(dim=1),
                               rtol=1e-4, atol=1e-5)
    # from a random start in the ball it gets there too (geometrically fast)
    x_adv_rand = pgd(model, x, y, threat.with_steps(60), generator=gen(1))
    assert ((margin(x_adv_rand) - margin(x)) / (threat.eps * d.norm(dim=1)) > 0.999).all()


def test_custom_objective_is_maximized() -> None:
    """A TRADES-style closure: KL(p(x) ‖ p(x_adv)), started at x + 0.001·N(0, I)."""
    x = images(32)
    y = labels(32, 4)
    model = SmallCNN()
    with torch.no_grad():
        p_clean = F.softmax(model.eval()(x), dim=1)

    def kl(logits_adv: torch.Tensor, _y: torch.Tensor) -> torch.Tensor:
        return F.kl_div(F.log_softmax(logits_adv, dim=1), p_clean, reduction="sum")

    x0 = pgd(model, x, y, LINF.with_steps(0), start="normal", generator=gen())
    x_adv = pgd(model, x, y, LINF, loss_fn=kl, start="normal", generator=gen())
    with torch.no_grad():
        assert kl(model(x_adv), y) > 10 * kl(model(x0), y)


# --- side effects: gradients, BatchNorm, modes -------------------------------------------


def test_parameter_grads_untouched() -> None:
    model = SmallCNN()
    preset = torch.full_like(model.head.weight, 0.5)
    model.head.weight.grad = preset.clone()
    x, y = images(), labels(16, 4)
    pgd(model, x, y, LINF)
    pgd(model, x, y, L2, loss_fn=lambda out, t: out.logsumexp(1).sum())
    for name, p in model.named_parameters():
        if name == "head.weight":
            assert torch.equal(p.grad, preset)
        else:
            assert p.grad is None, name


def test_input_gradient_and_no_grad_context() -> None:
    model = SmallCNN()
    x = images().requires_grad_(True)
    y = labels(16, 4)
    with torch.no_grad():  # e.g. called from an evaluation loop
        x_adv = pgd(model, x, y, LINF, generator=gen())
    assert x.grad is None and not x_adv.requires_grad
    assert not torch.equal(x_adv, pgd(model, x, y, LINF.with_steps(0), generator=gen()))


def _modes(model: nn.Module) -> dict[str, bool]:
    return {name: m.training for name, m in model.named_modules()}


def _buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: b.clone() for name, b in model.named_buffers()}


def _mixed_mode_cnn() -> SmallCNN:
    model = SmallCNN()
    model.train()
    model.features[4].eval()  # a frozen BatchNorm inside a model in train mode
    return model


def test_batchnorm_frozen_and_modes_restored() -> None:
    model = _mixed_mode_cnn()
    modes, buffers = _modes(model), _buffers(model)
    seen: list[dict[str, bool]] = []

    def ce(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        seen.append(_modes(model))
        return F.cross_entropy(logits, y, reduction="sum")

    x, y = images(), labels(16, 4)
    x1 = pgd(model, x, y, LINF, loss_fn=ce, generator=gen())
    x2 = pgd(model, x, y, LINF, loss_fn=ce, generator=gen())
    assert torch.equal(x1, x2)  # eval mode: dropout off, deterministic
    assert seen and all(not any(s.values()) for s in seen)  # all eval during the attack
    assert _modes(model) == modes
    for name, b in model.named_buffers():
        assert torch.equal(b, buffers[name]), name


def test_modes_and_stats_restored_after_exception() -> None:
    model = _mixed_mode_cnn()
    modes, buffers = _modes(model), _buffers(model)

    def boom(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        pgd(model, images(), labels(16, 4), LINF, loss_fn=boom)
    assert _modes(model) == modes
    for name, b in model.named_buffers():
        assert torch.equal(b, buffers[name]), name
    with pytest.raises(RuntimeError), eval_mode(model):
        raise RuntimeError
    assert _modes(model) == modes


# --- starts, seeds, degenerate budgets --------------------------------------------------


@pytest.mark.parametrize("threat", [LINF, L2], ids=str)
def test_same_generator_state_same_output(threat: ThreatModel) -> None:
    x, y, model = images(), labels(16, 4), SmallCNN()
    a = pgd(model, x, y, threat, generator=gen(7))
    b = pgd(model, x, y, threat, generator=gen(7))
    c = pgd(model, x, y, threat, generator=gen(8))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    torch.manual_seed(11)
    d = pgd(model, x, y, threat)
    torch.manual_seed(11)
    assert torch.equal(d, pgd(model, x, y, threat))


def test_normal_start_is_near_x() -> None:
    x = 0.25 + 0.5 * torch.rand(64, 3, 8, 8, generator=gen())
    x0 = pgd(SmallCNN(c=3), x, labels(64, 4), LINF.with_steps(0), start="normal",
             generator=gen())
    delta = x0 - x
    assert 0 < delta.abs().max().item() < 0.006
    assert delta.std().item() == pytest.approx(0.001, rel=0.05)
    assert delta.mean().abs().item() < 1e-4


def test_steps_zero_returns_the_start() -> None:
    x, y, model = images(), labels(16, 4), SmallCNN()
    assert torch.equal(pgd(model, x, y, LINF.with_steps(0), start="none"), x)
    x0 = pgd(model, x, y, LINF.with_steps(0), generator=gen(2))
    torch.testing.assert_close(x0, random_start(x, LINF, "uniform", gen(2)), rtol=0, atol=0)
    assert_in_ball(x0, x, LINF)
    assert not torch.equal(x0, x)


def test_linf_uniform_start_fills_the_cube() -> None:
    x = torch.full((4000, 1, 2, 2), 0.5)
    delta = (random_start(x, LINF, "uniform", gen()) - x).flatten()
    assert delta.abs().max().item() <= LINF.eps + 1e-6
    assert delta.abs().max().item() > 0.99 * LINF.eps
    assert delta.mean().abs().item() < 0.02 * LINF.eps
    assert delta.abs().mean().item() == pytest.approx(LINF.eps / 2, rel=0.03)


def test_l2_uniform_start_is_uniform_in_the_ball() -> None:
    # uniform in the d-ball: P(‖δ‖ < ε/2) = 2^-d; with d = 2 that is 1/4
    threat = ThreatModel("l2", 0.4, 0.1, 0)
    x = torch.full((20000, 1, 1, 2), 0.5)
    r = (random_start(x, threat, "uniform", gen()) - x).flatten(1).norm(dim=1)
    assert r.max().item() <= threat.eps + 1e-6
    assert (r < threat.eps / 2).float().mean().item() == pytest.approx(0.25, abs=0.015)
    # in high dimension the radius concentrates near ε
    x_big = torch.full((64, 3, 16, 16), 0.5)
    r_big = (random_start(x_big, threat, "uniform", gen()) - x_big).flatten(1).norm(dim=1)
    assert r_big.min().item() > 0.98 * threat.eps


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_zero_budget_returns_x(norm: str) -> None:
    x, y, model = images(), labels(16, 4), SmallCNN()
    threat = ThreatModel(norm, 0.0, 2 / 255, 5)
    for start in ("uniform", "normal", "none"):
        assert torch.equal(pgd(model, x, y, threat, start=start, generator=gen()), x)


def test_pgd_class_and_errors() -> None:
    x, y, model = images(), labels(16, 4), SmallCNN()
    attack = PGD(default_threat("l2", steps=3), generator=gen(4))
    assert "l2" in repr(attack)
    torch.testing.assert_close(attack(model, x, y),
                               pgd(model, x, y, default_threat("l2", steps=3), generator=gen(4)))
    with pytest.raises(InputError, match="start"):
        pgd(model, x, y, LINF, start="gaussian")
    with pytest.raises(InputError, match="start"):
        PGD(LINF, start="zero")
    with pytest.raises(InputError, match="float"):
        pgd(model, (x * 255).to(torch.uint8), y, LINF)
    with pytest.raises(InputError, match="examples"):
        pgd(model, x, y[:3], LINF)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_no_host_sync_in_loop_on_gpu() -> None:
    model = SmallCNN().cuda()
    x, y = images().cuda(), labels(16, 4).cuda()
    g = torch.Generator(device="cuda").manual_seed(0)
    pgd(model, x, y, LINF, generator=g)  # warm-up (cuDNN autotuning etc.)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for threat in (LINF, L2):
            x_adv = pgd(model, x, y, threat, generator=g)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert_in_ball(x_adv, x, L2)
