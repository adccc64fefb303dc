"""Label smoothing (``method.label_smoothing``): the one CE of the training losses, against F.cross_entropy
and hand computations; hard and soft targets, per-example smoothing, every method, with RPAT."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from rpat.attacks.threat import ThreatModel
from rpat.config import build_config
from rpat.errors import InputError
from rpat.models.base import ImageClassifier
from rpat.objectives import RPATTerm, build_objective, robust_perception_loss
from rpat.objectives.losses import cross_entropy

K = 5


def _logits(b: int = 6, seed: int = 0) -> torch.Tensor:
    return torch.randn(b, K, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _soft(b: int = 6, seed: int = 1) -> torch.Tensor:
    return torch.rand(b, K, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).softmax(1)


def _hand(logits: torch.Tensor, target: torch.Tensor, s: list[float]) -> torch.Tensor:
    """mean_i −Σ_k ((1 − s_i)·t_ik + s_i/K)·log p_ik, one example at a time."""
    logp = logits.log_softmax(1)
    total = 0.0
    for i in range(logits.shape[0]):
        t = target[i] if target.is_floating_point() else F.one_hot(target[i], K).double()
        q = (1 - s[i]) * t + s[i] / K
        total += -(q * logp[i]).sum()
    return total / logits.shape[0]


@pytest.mark.parametrize("s", [0.0, 0.1, 0.5])
def test_hard_labels_equal_torch_label_smoothing(s):
    logits, y = _logits(), torch.tensor([0, 1, 2, 3, 4, 0])
    assert torch.equal(cross_entropy(logits, y, s), F.cross_entropy(logits, y, label_smoothing=s))
    assert cross_entropy(logits, y, s).item() == pytest.approx(_hand(logits, y, [s] * 6).item(), rel=1e-12)


@pytest.mark.parametrize("s", [0.0, 0.1, 0.3])
def test_soft_targets_equal_torch_label_smoothing(s):
    logits, t = _logits(), _soft()
    assert torch.equal(cross_entropy(logits, t, s), F.cross_entropy(logits, t, label_smoothing=s))
    assert cross_entropy(logits, t, s).item() == pytest.approx(_hand(logits, t, [s] * 6).item(), rel=1e-12)


@pytest.mark.parametrize("soft", [False, True])
def test_per_example_smoothing_is_the_hand_computation(soft):
    logits = _logits().requires_grad_(True)
    target = _soft() if soft else torch.tensor([4, 3, 2, 1, 0, 0])
    s = [0.0, 0.1, 0.0, 0.1, 0.5, 0.0]  # e.g. smoothing on the generated rows only
    got = cross_entropy(logits, target, torch.tensor(s, dtype=torch.float64))
    want = _hand(logits, target, s)
    assert got.item() == pytest.approx(want.item(), rel=1e-12)
    (g1,) = torch.autograd.grad(got, logits)
    (g2,) = torch.autograd.grad(want, logits)
    assert torch.allclose(g1, g2, rtol=1e-12, atol=1e-15)
    # a constant tensor is the float case
    const = cross_entropy(logits, target, torch.full((6,), 0.1, dtype=torch.float64))
    assert const.item() == pytest.approx(F.cross_entropy(logits, target, label_smoothing=0.1).item(), rel=1e-12)


def test_shape_errors():
    logits = _logits()
    with pytest.raises(ValueError, match="soft targets"):
        cross_entropy(logits, torch.rand(6, K + 1))
    with pytest.raises(ValueError, match="per-example smoothing"):
        cross_entropy(logits, torch.zeros(6, dtype=torch.long), torch.zeros(5))


class MLP(ImageClassifier):
    def __init__(self):
        super().__init__(num_classes=K, in_chans=1)
        self.fc1 = nn.Linear(4, 8)
        self.fc2 = nn.Linear(8, K)

    def forward_stages(self, x):
        z = x.flatten(1)
        return z, torch.tanh(self.fc1(z))

    def forward_head(self, feats):
        return self.fc2(feats)


def _batch(b: int = 6):
    g = torch.Generator().manual_seed(3)
    x = torch.rand(b, 1, 2, 2, generator=g)
    return x, torch.randint(0, K, (b,), generator=g), (x + 0.05).clamp(0, 1)


THREAT = ThreatModel("linf", 0.1, 0.05, 2)


@pytest.mark.parametrize("method, ce_key, key_logits", [
    ("pgd_at", "ce_adv", "adv"), ("trades", "ce_clean", "clean"), ("consistency_at", "ce_adv", "adv"),
])
def test_every_method_smooths_its_ce_and_only_it(method, ce_key, key_logits):
    torch.manual_seed(0)
    m = MLP().train()
    x, y, xa = _batch()
    plain = build_objective(method, THREAT)
    smooth = build_objective(method, THREAT, label_smoothing=0.2)
    _, t0 = plain.loss(m, x, y, xa, 0)
    _, t1 = smooth.loss(m, x, y, xa, 0)
    logits = m(xa if key_logits == "adv" else x)
    assert t1[ce_key].item() == pytest.approx(F.cross_entropy(logits, y, label_smoothing=0.2).item(), rel=1e-6)
    assert t0[ce_key].item() == pytest.approx(F.cross_entropy(logits, y).item(), rel=1e-6)
    for k in set(t0) - {ce_key, "loss"}:  # the KL / JS terms are untouched
        assert torch.equal(t0[k], t1[k]), k


def test_mart_smooths_the_ce_part_of_its_boosted_ce():
    torch.manual_seed(0)
    m = MLP().train()
    x, y, xa = _batch()
    _, t0 = build_objective("mart", THREAT).loss(m, x, y, xa, 0)
    _, t1 = build_objective("mart", THREAT, label_smoothing=0.1).loss(m, x, y, xa, 0)
    logits = m(xa)
    diff = F.cross_entropy(logits, y, label_smoothing=0.1) - F.cross_entropy(logits, y)  # the margin is unchanged
    assert (t1["bce_adv"] - t0["bce_adv"]).item() == pytest.approx(diff.item(), rel=1e-5, abs=1e-7)
    assert torch.equal(t0["kl_weighted"], t1["kl_weighted"])
    with pytest.raises(InputError, match="MART needs hard labels"):
        build_objective("mart", THREAT).loss(m, x, F.one_hot(y, K).float(), xa, 0)


def test_composes_with_rpat_and_leaves_the_rpat_term_unchanged():
    torch.manual_seed(0)
    m = MLP().train()
    x, y, xa = _batch()
    total0, t0 = build_objective("pgd_at", THREAT, RPATTerm(lam=2.0)).loss(m, x, y, xa, 0)
    total1, t1 = build_objective("pgd_at", THREAT, RPATTerm(lam=2.0), label_smoothing=0.1).loss(m, x, y, xa, 0)
    assert torch.equal(t0["rpat"], t1["rpat"])
    r = robust_perception_loss(m, x, xa)
    ce = F.cross_entropy(m(xa), y, label_smoothing=0.1)
    assert total1.item() == pytest.approx(ce.item() + 2.0 * r.item(), rel=1e-6)
    assert total1.item() != pytest.approx(total0.item(), rel=1e-6)


def test_per_example_smoothing_through_objective_step_and_loss():
    torch.manual_seed(0)
    m = MLP().train()
    x, y, xa = _batch()
    s = torch.tensor([0.1, 0.1, 0.1, 0.0, 0.0, 0.0])  # the first half "generated"
    obj = build_objective("pgd_at", THREAT, label_smoothing=0.3)  # the keyword overrides the configured 0.3
    _, terms = obj.loss(m, x, y, xa, 0, smoothing=s)
    want = _hand(m(xa).double(), y, s.tolist())
    assert terms["ce_adv"].item() == pytest.approx(want.item(), rel=1e-6)
    g = torch.Generator().manual_seed(0)
    loss, terms = obj.step(m, x, y, 0, torch.Generator().manual_seed(0), smoothing=s)
    x_adv = obj.method.attack(m, x, y, g)
    assert terms["ce_adv"].item() == pytest.approx(_hand(m(x_adv).double(), y, s.tolist()).item(), rel=1e-6)


def test_not_in_the_attack():
    torch.manual_seed(0)
    m = MLP().train()
    x, y, _ = _batch()
    for method in ("pgd_at", "trades", "mart", "consistency_at"):
        plain, smooth = build_objective(method, THREAT), build_objective(method, THREAT, label_smoothing=0.4)
        a = plain.method.attack(m, x, y, torch.Generator().manual_seed(1))
        b = smooth.method.attack(m, x, y, torch.Generator().manual_seed(1))
        assert torch.equal(a, b), method


def test_config_plumbing_and_bad_values():
    cfg = build_config(None, None, ["method.name=trades", "method.label_smoothing=0.1"])
    assert cfg.objective().method.label_smoothing == 0.1
    assert build_config(None, None, ["method.name=trades"]).method_options() == {}  # default unchanged
    mart = build_config(None, None, ["method.name=mart", "method.label_smoothing=0.1", "method.mart_exact=true"])
    assert mart.method_options() == {"exact": True, "label_smoothing": 0.1}
    for bad in ("1.0", "-0.1", "1.5"):
        with pytest.raises(InputError, match=r"method.label_smoothing must be a number in \[0, 1\)"):
            build_config(None, None, [f"method.label_smoothing={bad}"])


def test_per_example_path_runs_in_fp32_under_bf16_autocast():
    torch.manual_seed(0)
    lin, x, y = nn.Linear(3, K), torch.randn(8, 3), torch.randint(0, K, (8,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z = lin(x)
        per = cross_entropy(z, y, torch.full((8,), 0.1))
        ref = F.cross_entropy(z, y, label_smoothing=0.1)  # autocast runs it in fp32
    assert z.dtype == torch.bfloat16 and per.dtype == ref.dtype == torch.float32
    assert per.item() == pytest.approx(ref.item(), rel=1e-6)
