"""Weight averaging's EMA warm-up (``averaging.warmup``) and BatchNorm mode (``averaging.bn``), by hand."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

from rpat.config import build_config
from rpat.errors import InputError
from rpat.models.averaging import STEPS_KEY, WeightAverage


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(2, 2)
        self.bn = nn.BatchNorm1d(2)

    def forward(self, x):
        return self.bn(self.fc(x))


def _nudge(model: nn.Module, t: int) -> None:
    """Move every parameter and BN statistic to a new, step-dependent value (as a training step would)."""
    with torch.no_grad():
        for i, p in enumerate(model.parameters()):
            p.add_(0.1 * (t + 1) * (i + 1))
        model.bn.running_mean.add_(0.5)
        model.bn.running_var.mul_(1.5)
        model.bn.num_batches_tracked.add_(1)


def test_decay_sequence_min_decay_and_tf_style():
    wa = WeightAverage(Tiny(), decay=0.995, warmup=True)
    got = []
    for _ in range(5):
        got.append(float(wa.decay_now()))
        wa.update(Tiny(), epoch=0)
    assert got == pytest.approx([1 / 10, 2 / 11, 3 / 12, 4 / 13, 5 / 14], rel=1e-15)
    assert float(wa.steps) == 5
    wa.steps.fill_(1790)  # (1 + t)/(10 + t) first exceeds 0.995 at t = 1791
    assert float(wa.decay_now()) == pytest.approx(1791 / 1800)
    wa.steps.fill_(1791)
    assert float(wa.decay_now()) == 0.995
    assert WeightAverage(Tiny(), decay=0.995).decay_now() == 0.995  # off: the constant


def test_ema_values_by_hand_and_start_epoch_does_not_count():
    torch.manual_seed(0)
    online = Tiny()
    wa = WeightAverage(online, decay=0.9, start_epoch=1, warmup=True)
    _nudge(online, 0)
    wa.update(online, epoch=0)  # before start_epoch: a copy, t stays 0
    assert float(wa.steps) == 0 and torch.equal(wa.model.fc.weight, online.fc.weight)
    avg = {k: v.clone().double() for k, v in wa.model.state_dict().items()}
    for t in range(4):
        _nudge(online, t + 1)
        wa.update(online, epoch=1)
        d = min(0.9, (1 + t) / (10 + t))
        for k, v in online.state_dict().items():
            avg[k] = v.double().clone() if not v.is_floating_point() else d * avg[k] + (1 - d) * v.double()
    for k, v in wa.model.state_dict().items():
        assert torch.allclose(v.double(), avg[k], rtol=1e-6, atol=1e-6), k


@pytest.mark.parametrize("warmup", [False, True])
def test_bn_copy_versus_average(warmup):
    torch.manual_seed(0)
    online = Tiny()
    copy_wa = WeightAverage(online, decay=0.5, bn="copy", warmup=warmup)
    avg_wa = WeightAverage(online, decay=0.5, bn="average", warmup=warmup)
    start = {k: v.clone() for k, v in online.state_dict().items()}
    _nudge(online, 0)
    copy_wa.update(online, epoch=0)
    avg_wa.update(online, epoch=0)
    d = 0.1 if warmup else 0.5
    for name in ("bn.running_mean", "bn.running_var", "bn.num_batches_tracked"):
        assert torch.equal(copy_wa.model.state_dict()[name], online.state_dict()[name]), name
    for name in ("bn.running_mean", "bn.running_var"):
        want = d * start[name] + (1 - d) * online.state_dict()[name]
        assert torch.allclose(avg_wa.model.state_dict()[name], want, rtol=1e-6), name
    for name in ("fc.weight", "bn.weight"):  # parameters are averaged in both modes
        want = d * start[name] + (1 - d) * online.state_dict()[name]
        assert torch.allclose(copy_wa.model.state_dict()[name], want, rtol=1e-6), name
        assert torch.equal(copy_wa.model.state_dict()[name], avg_wa.model.state_dict()[name]), name


def test_state_dict_keeps_t_and_loads_with_weights_only():
    online = Tiny()
    wa = WeightAverage(online, decay=0.99, warmup=True)
    for t in range(3):
        _nudge(online, t)
        wa.update(online, epoch=0)
    buf = io.BytesIO()
    torch.save(wa.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    assert float(state[STEPS_KEY]) == 3
    again = WeightAverage(Tiny(), decay=0.99, warmup=True)
    again.load_state_dict(state)
    assert float(again.steps) == 3 and float(again.decay_now()) == float(wa.decay_now())
    assert all(torch.equal(again.model.state_dict()[k], v) for k, v in wa.model.state_dict().items())
    assert STEPS_KEY not in WeightAverage(Tiny()).state_dict()  # off: the plain model state, as before
    with pytest.raises(InputError, match="no EMA step count"):
        WeightAverage(Tiny(), warmup=True).load_state_dict(WeightAverage(Tiny()).state_dict())


def test_bad_bn_mode():
    with pytest.raises(InputError, match="unknown averaging.bn 'mean'; valid: average, copy"):
        build_config(None, None, ["averaging.bn=mean"])
    with pytest.raises(InputError, match="averaging.bn"):
        WeightAverage(Tiny(), bn="median")
