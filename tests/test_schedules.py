import pytest

from rpat.training.schedules import cosine_lr, lr_at, piecewise_lr


def test_paper_benchmark_schedule():
    lrs = [piecewise_lr(0.1, e, [100, 105], 0.1) for e in range(110)]
    assert lrs[0] == lrs[99] == 0.1
    assert lrs[100] == pytest.approx(0.01) and lrs[104] == pytest.approx(0.01)
    assert lrs[105] == pytest.approx(0.001) and lrs[109] == pytest.approx(0.001)


def test_cosine_endpoints_and_mid():
    assert cosine_lr(0.1, 0, 10) == pytest.approx(0.1)
    assert cosine_lr(0.1, 5, 10) == pytest.approx(0.05)
    assert cosine_lr(0.1, 10, 10) == pytest.approx(0.0)
    assert lr_at("cosine", 0.1, 4, 0.5, 9) == pytest.approx(0.05)
    assert lr_at("constant", 0.3, 50, 0.2, 9) == 0.3
