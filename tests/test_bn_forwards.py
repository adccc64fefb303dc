"""rpat's one-forward-per-input steps against the published code's extra train-mode forwards.

The official TRADES code forwards x twice in train mode, the RPAT release x_adv twice. A train-mode
BatchNorm normalizes with the batch's own statistics, so the loss and the gradient are the same as
rpat's; only the running statistics (one more update per step) differ. Checked here on small_cnn.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from rpat.attacks import ThreatModel
from rpat.models import create_model
from rpat.objectives import TRADES, Objective, RPATTerm, build_objective, interpolate, kl_div

THREAT = ThreatModel("linf", 8 / 255, 2 / 255, 2)


def _setup(seed: int = 0):
    torch.manual_seed(seed)
    model = create_model("small_cnn", num_classes=10).double().train()  # float64: sums in another order agree
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.rand(8, 3, 32, 32, generator=g, dtype=torch.float64)
    x_adv = (x + (torch.rand(x.shape, generator=g) * 2 - 1) * 8 / 255).clamp(0, 1)
    y = torch.randint(0, 10, (8,), generator=g)
    return model, x, y, x_adv


def _bn(model):
    return [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]


def _grads(model):
    return [p.grad.clone() for p in model.parameters()]


def _compare(model_a, loss_a, model_b, loss_b, updates_a, updates_b):
    loss_a.backward()
    loss_b.backward()
    assert torch.allclose(loss_a, loss_b, rtol=1e-12, atol=0)
    for ga, gb in zip(_grads(model_a), _grads(model_b), strict=True):
        assert torch.allclose(ga, gb, rtol=1e-9, atol=1e-12)
    assert [int(m.num_batches_tracked) for m in _bn(model_a)] == [updates_a] * len(_bn(model_a))
    assert [int(m.num_batches_tracked) for m in _bn(model_b)] == [updates_b] * len(_bn(model_b))
    assert not torch.allclose(_bn(model_a)[0].running_mean, _bn(model_b)[0].running_mean)


def test_trades_official_double_forward_of_x_same_loss_and_gradient_one_more_bn_update():
    model, x, y, x_adv = _setup()
    official = copy.deepcopy(model)
    ours, _ = Objective(TRADES(THREAT)).loss(model, x, y, x_adv, epoch=0)
    # the official code: logits = model(x); CE(logits, y) + β·KL(softmax(model(x)) ‖ softmax(model(x_adv)))
    logits = official(x)
    logits_adv = official(x_adv)
    theirs = F.cross_entropy(logits, y) + 6.0 * kl_div(official(x), logits_adv)
    _compare(model, ours, official, theirs, updates_a=2, updates_b=3)


def test_rpat_release_double_forward_of_x_adv_same_loss_and_gradient_one_more_bn_update():
    model, x, y, x_adv = _setup(3)
    release = copy.deepcopy(model)
    ours, _ = build_objective("pgd_at", THREAT, RPATTerm()).loss(model, x, y, x_adv, epoch=0)
    # the release: CE(model(x_adv), y), then R from its own passes of x, x_mid and x_adv
    ce = F.cross_entropy(release(x_adv), y)
    h_x, h_mid, h_adv = release(x), release(interpolate(x, x_adv, 0.5)), release(x_adv)
    theirs = ce + F.mse_loss(h_mid, 0.5 * h_x + 0.5 * h_adv)
    _compare(model, ours, release, theirs, updates_a=3, updates_b=4)
