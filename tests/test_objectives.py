"""The RPAT regularizer and the objective interface, against hand computations."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from rpat.attacks.threat import ThreatModel
from rpat.errors import InputError
from rpat.models.base import ImageClassifier
from rpat.objectives import (
    MART,
    METHODS,
    PGDAT,
    TRADES,
    ConsistencyAT,
    Objective,
    RPATTerm,
    TeacherTerm,
    build_objective,
    method_label,
    robust_perception_loss,
)


class Quadratic(ImageClassifier):
    """h(x) = w · x² per pixel; one scalar 'logit' per pixel. Proxies: x and w·x²."""

    def __init__(self, w: float = 1.0):
        super().__init__(num_classes=1, in_chans=1)
        self.w = nn.Parameter(torch.tensor(w))

    def forward_stages(self, x):
        z = x.flatten(1)
        return z, z**2

    def forward_head(self, feats):
        return self.w * feats


class Affine(ImageClassifier):
    def __init__(self):
        super().__init__(num_classes=3, in_chans=1)
        self.fc = nn.Linear(4, 3)

    def forward_stages(self, x):
        z = x.flatten(1)
        return z, z

    def forward_head(self, feats):
        return self.fc(feats)


class MLP(ImageClassifier):
    def __init__(self, bn: bool = False):
        super().__init__(num_classes=3, in_chans=1)
        self.fc1 = nn.Linear(4, 16)
        self.bn = nn.BatchNorm1d(16) if bn else nn.Identity()
        self.fc2 = nn.Linear(16, 3)

    def forward_stages(self, x):
        z = x.flatten(1)
        return z, torch.relu(self.bn(self.fc1(z)))

    def forward_head(self, feats):
        return self.fc2(feats)


def test_hand_computation_default_alpha():
    # x = 1, x_adv = 3: h = 1, 9; midpoint 2 -> 4; target (1 + 9) / 2 = 5; R = (4 - 5)^2 = 1
    m = Quadratic()
    x, xa = torch.ones(1, 1, 1, 1), torch.full((1, 1, 1, 1), 3.0)
    r = robust_perception_loss(m, x, xa)
    assert r.item() == pytest.approx(1.0)


def test_hand_computation_alpha_is_measured_from_benign():
    # alpha = 0.25: x_mid = 1 + 0.25*2 = 1.5 -> 2.25; target 0.75*1 + 0.25*9 = 3; R = 0.5625
    m = Quadratic()
    x, xa = torch.ones(1, 1, 1, 1), torch.full((1, 1, 1, 1), 3.0)
    assert robust_perception_loss(m, x, xa, alpha=0.25).item() == pytest.approx(0.5625)
    # the authors' r-convention r*x + (1-r)*x_adv with r = 0.25 is our alpha = 0.75
    # x_mid = 2.5 -> 6.25; target 0.25*1 + 0.75*9 = 7; R = 0.5625 as well by symmetry of this h,
    # so check a non-symmetric point instead: x = 0, x_adv = 2, alpha 0.25: x_mid=0.5 -> 0.25, target 1
    x0, xa2 = torch.zeros(1, 1, 1, 1), torch.full((1, 1, 1, 1), 2.0)
    assert robust_perception_loss(m, x0, xa2, alpha=0.25).item() == pytest.approx(0.5625)
    assert robust_perception_loss(m, x0, xa2, alpha=0.75).item() == pytest.approx((2.25 - 3.0) ** 2)


def test_gradient_flows_through_all_three_passes():
    # R(w) = (w*4 - w*5)^2 = w^2 -> dR/dw = 2w = 2 at w = 1. Detaching the target passes would give -8.
    m = Quadratic(1.0)
    x, xa = torch.ones(1, 1, 1, 1), torch.full((1, 1, 1, 1), 3.0)
    robust_perception_loss(m, x, xa).backward()
    assert m.w.grad.item() == pytest.approx(2.0)


def test_mean_over_batch_and_outputs():
    m = Quadratic()
    x = torch.tensor([1.0, 0.0]).view(2, 1, 1, 1)
    xa = torch.tensor([3.0, 2.0]).view(2, 1, 1, 1)
    # per-element squared errors: 1 and (1 - 2)^2 = 1 -> mean 1; with a second pixel of zeros: mean 0.5
    assert robust_perception_loss(m, x, xa).item() == pytest.approx(1.0)
    x2 = torch.cat([x, torch.zeros_like(x)], dim=3)
    xa2 = torch.cat([xa, torch.zeros_like(xa)], dim=3)
    assert robust_perception_loss(m, x2, xa2).item() == pytest.approx(0.5)


def test_zero_for_affine_positive_for_nonlinear():
    torch.manual_seed(0)
    x = torch.rand(8, 1, 2, 2)
    xa = (x + 0.3 * torch.randn_like(x)).clamp(0, 1)
    assert robust_perception_loss(Affine(), x, xa).item() == pytest.approx(0.0, abs=1e-12)
    assert robust_perception_loss(MLP(), x, xa).item() > 1e-6


@pytest.mark.parametrize("proxy", ["second_to_last", "third_to_last"])
def test_other_proxies(proxy):
    torch.manual_seed(0)
    m = MLP()
    x = torch.rand(4, 1, 2, 2)
    xa = (x + 0.2).clamp(0, 1)
    got = robust_perception_loss(m, x, xa, proxy=proxy)
    p = lambda z: m.forward_proxies(z)[proxy]  # noqa: E731
    want = F.mse_loss(p((x + xa) / 2), (p(x) + p(xa)) / 2)
    assert got.item() == pytest.approx(want.item(), rel=1e-6)
    if proxy == "third_to_last":  # the input itself for this model: affine -> zero
        assert got.item() == pytest.approx(0.0, abs=1e-12)


def test_runs_in_train_mode_and_restores_mode():
    torch.manual_seed(0)
    m = MLP(bn=True).eval()
    before = m.bn.running_mean.clone()
    x = torch.rand(8, 1, 2, 2)
    robust_perception_loss(m, x, (x + 0.1).clamp(0, 1))
    assert not m.training and not m.bn.training
    assert not torch.equal(before, m.bn.running_mean)  # BatchNorm ran in train mode


def test_bad_alpha_and_proxy():
    m = MLP()
    x = torch.rand(2, 1, 2, 2)
    with pytest.raises(InputError, match="alpha"):
        robust_perception_loss(m, x, x, alpha=1.5)
    with pytest.raises(InputError, match="proxy"):
        robust_perception_loss(m, x, x, proxy="embedding")
    with pytest.raises(InputError, match="lambda"):
        RPATTerm(lam=-1)


class Counting(MLP):
    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward_stages(self, x):
        self.calls += 1
        return super().forward_stages(x)


def _threat():
    return ThreatModel("linf", 0.1, 0.05, 3)


def test_objective_pgd_at_plus_rpat_total_and_passes():
    torch.manual_seed(0)
    m = Counting().train()
    x = torch.rand(6, 1, 2, 2)
    y = torch.randint(0, 3, (6,))
    xa = (x + 0.1).clamp(0, 1)
    obj = build_objective("pgd_at", _threat(), RPATTerm(lam=2.0))
    total, terms = obj.loss(m, x, y, xa, epoch=0)
    assert m.calls == 3  # f(x_adv) is shared by CE and the RPAT term
    ce = F.cross_entropy(m(xa), y)
    r = robust_perception_loss(m, x, xa)
    assert total.item() == pytest.approx(ce.item() + 2.0 * r.item(), rel=1e-6)
    assert set(terms) == {"ce_adv", "rpat", "loss"}
    assert all(not t.requires_grad for t in terms.values())
    assert obj.name == "pgd_at+rpat"


def test_rpat_start_epoch_and_plain_pgd_at():
    torch.manual_seed(0)
    m = Counting().train()
    x = torch.rand(6, 1, 2, 2)
    y = torch.randint(0, 3, (6,))
    xa = (x + 0.1).clamp(0, 1)
    obj = build_objective("pgd_at", _threat(), RPATTerm(start_epoch=2))
    total, terms = obj.loss(m, x, y, xa, epoch=1)
    assert "rpat" not in terms and m.calls == 1
    assert total.item() == pytest.approx(F.cross_entropy(m(xa), y).item())
    _, terms = obj.loss(m, x, y, xa, epoch=2)
    assert "rpat" in terms


def test_objective_step_attacks_then_trains():
    torch.manual_seed(0)
    m = MLP(bn=True).train()
    m(torch.rand(32, 1, 2, 2))  # give BatchNorm some running statistics
    x = torch.rand(8, 1, 2, 2)
    y = torch.randint(0, 3, (8,))
    obj = build_objective("pgd_at", _threat())
    x_adv = obj.method.attack(m, x, y, torch.Generator().manual_seed(0))
    assert m.training  # the attack restored train mode
    assert (x_adv - x).abs().max() <= 0.1 + 1e-6
    m.eval()
    with torch.no_grad():
        assert F.cross_entropy(m(x_adv), y) > F.cross_entropy(m(x), y)
    m.train()
    loss, terms = obj.step(m, x, y, epoch=0, generator=torch.Generator().manual_seed(0))
    assert loss.requires_grad and torch.equal(terms["loss"], loss.detach())


def test_unknown_method():
    with pytest.raises(InputError, match="valid: consistency_at, mart, pgd_at, trades"):
        build_objective("fgsm", _threat())


def test_phase_changes_exactly_where_loss_adds_the_terms():
    # RPAT from epoch 2; teacher from epoch 3 with beta 0.5, x2 at milestones 4 and 6
    torch.manual_seed(0)
    m = MLP().train()
    teacher = MLP().eval()
    x = torch.rand(6, 1, 2, 2)
    y = torch.randint(0, 3, (6,))
    xa = (x + 0.1).clamp(0, 1)
    obj = build_objective("pgd_at", _threat(), RPATTerm(lam=2.0, start_epoch=2),
                          TeacherTerm(beta=0.5, start_epoch=3, beta_growth=2.0, milestones=(4, 6)))
    obj.teacher.bind(teacher)
    want_beta = {3: 0.5, 4: 1.0, 5: 1.0, 6: 2.0, 7: 2.0}
    ce = F.cross_entropy(m(xa), y).item()
    phases = []
    for e in range(8):
        key = obj.phase(e)
        hash(key)
        phases.append(key)
        assert key == (e >= 2, e >= 3, want_beta.get(e, 0.0))
        total, terms = obj.loss(m, x, y, xa, epoch=e)
        assert set(terms) == {"ce_adv", "loss"} | ({"rpat"} if key[0] else set()) | ({"boat"} if key[1] else set())
        hand = ce + (2.0 * terms["rpat"].item() if e >= 2 else 0.0) + want_beta.get(e, 0.0) * (
            terms["boat"].item() if e >= 3 else 0.0)
        assert total.item() == pytest.approx(hand, rel=1e-6)
        if e >= 3:
            assert terms["boat"].item() > 1e-6  # a nonzero KL, so the beta used is visible in the total
    changes = [e for e in range(1, 8) if phases[e] != phases[e - 1]]
    assert changes == [2, 3, 4, 6]


def test_phase_of_a_plain_method():
    obj = build_objective("trades", _threat())
    assert [obj.phase(e) for e in (0, 5)] == [(False, False, 0.0)] * 2
    assert isinstance(obj, Objective)


def test_one_label_per_class():
    assert {n: c.label for n, c in METHODS.items()} == {
        "pgd_at": "PGD-AT", "trades": "TRADES", "mart": "MART", "consistency_at": "Consistency-AT"}
    labels = (PGDAT.label, TRADES.label, MART.label, ConsistencyAT.label)
    assert labels == ("PGD-AT", "TRADES", "MART", "Consistency-AT")
    assert RPATTerm.label == RPATTerm().label == "RPAT"
    assert TeacherTerm().label == "ReBAT"
    assert TeacherTerm(target="robust_perception").label == "RPAT++"


@pytest.mark.parametrize("method, rpat, want", [
    ("pgd_at", False, "PGD-AT"), ("pgd_at", True, "PGD-AT + RPAT"),
    ("trades", False, "TRADES"), ("trades", True, "TRADES + RPAT"),
    ("mart", False, "MART"), ("mart", True, "MART + RPAT"),
    ("consistency_at", False, "Consistency-AT"), ("consistency_at", True, "Consistency-AT + RPAT"),
])
def test_method_label(method, rpat, want):
    assert method_label(method, rpat) == want


def test_method_label_proxy_and_teacher_runs():
    assert method_label("pgd_at", True, "second_to_last") == "PGD-AT + RPAT (second_to_last)"
    assert method_label("mart", True, "third_to_last") == "MART + RPAT (third_to_last)"
    assert method_label("pgd_at", False, "second_to_last") == "PGD-AT"  # proxy only matters with RPAT
    assert method_label("pgd_at", teacher_target="adversarial") == "ReBAT"
    assert method_label("pgd_at", teacher_target="robust_perception") == "RPAT++"
    assert method_label("trades", teacher_target="adversarial") == "ReBAT (TRADES)"
    assert method_label("pgd_at", True, teacher_target="adversarial") == "ReBAT + RPAT"


def test_method_label_bad_names():
    with pytest.raises(InputError, match="valid: consistency_at, mart, pgd_at, trades"):
        method_label("fgsm")
    with pytest.raises(InputError, match="valid: consistency_at, mart, pgd_at, trades"):
        method_label("consistency")
    with pytest.raises(InputError, match="rebat.target"):
        method_label("pgd_at", teacher_target="boat")
    with pytest.raises(InputError, match="proxy"):
        method_label("pgd_at", True, "embedding")
