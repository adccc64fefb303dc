"""speed.cuda_graph: the captured training step (rpat.training.cuda_graph).

CPU tests run the capture bookkeeping through the eager stand-in (``speed.cuda_graph=eager``):
it must give exactly the eager trainer's weights, re-capture exactly where the epoch-dependent
parts change, and resume exactly. The GPU tests (skipped without CUDA) check that the real
capture equals the eager step.
"""

from __future__ import annotations

import pytest
import torch

from rpat.checkpoint import load_checkpoint
from rpat.config import build_config
from rpat.data import ArrayDataset
from rpat.errors import InputError
from rpat.training import RunData, Trainer
from rpat.training.cuda_graph import CapturedStep, phase_key, sgd_update_

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")


def _data(n_train: int = 88, n_test: int = 16, chans: int = 1, size: int = 8) -> RunData:
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 4, (n_train + n_test,), generator=g)
    images = (torch.rand(n_train + n_test, chans, size, size, generator=g) * 120 + labels.view(-1, 1, 1, 1) * 40)
    images = images.clamp(0, 255).to(torch.uint8)
    classes = ["a", "b", "c", "d"]
    return RunData(ArrayDataset(images[:n_train], labels[:n_train], classes),
                   ArrayDataset(images[n_train:], labels[n_train:], classes), 4, chans, 1, True, None, None)


def _cfg(graph, device: str = "cpu", epochs: int = 3, method: str = "pgd_at", **extra):
    o = [
        {"data": {"dataset": "digits", "batch_size": 16}, "model": {"arch": "small_cnn"},
         "method": {"name": method},
         "attack": {"eps": "16/255", "step_size": "8/255", "steps": 2},
         "optim": {"epochs": epochs, "lr": 0.05, "milestones": [2], "weight_decay": 5e-4},
         "eval": {"n_examples": 16, "steps": 2}, "device": device, "speed": {"cuda_graph": graph}},
        *[{k: v} for k, v in extra.items()],
    ]
    return build_config(None, None, o)


def _fit(cfg, path, **kw):
    t = Trainer(cfg, path, data=_data(), progress=False, log=lambda m: None, **kw)
    t.fit()
    return t


def _same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def _metrics(path) -> list[dict]:
    import json

    rows = [json.loads(ln) for ln in (path / "metrics.jsonl").read_text().splitlines()]
    for r in rows:
        for k in ("train_seconds", "train_images_per_s"):
            r.pop(k)
    return rows


# ---- pieces ------------------------------------------------------------------------------
@pytest.mark.parametrize("nesterov,momentum", [(False, 0.9), (True, 0.9), (False, 0.0)])
def test_sgd_update_with_a_tensor_lr_equals_torch_sgd_bit_for_bit(nesterov, momentum):
    torch.manual_seed(0)
    ps = [torch.randn(64, 33), torch.randn(7)]
    twins = [p.clone() for p in ps]
    ref = torch.optim.SGD(ps, lr=0.1, momentum=momentum, weight_decay=5e-4, nesterov=nesterov)
    mine = torch.optim.SGD(twins, lr=0.1, momentum=momentum, weight_decay=5e-4, nesterov=nesterov)
    for i, lr in enumerate([0.1, 0.1, 0.0123, 0.0456789]):
        g = [torch.randn_like(p) for p in ps]
        for p, q, gi in zip(ps, twins, g, strict=True):
            p.grad, q.grad = gi.clone(), gi.clone()
        ref.param_groups[0]["lr"] = lr
        ref.step()
        sgd_update_(mine, torch.tensor(lr, dtype=torch.float32))
        for p, q in zip(ps, twins, strict=True):
            assert torch.equal(p, q), i
    _same(ref.state_dict()["state"][0] if momentum else {}, mine.state_dict()["state"][0] if momentum else {})


def test_captured_step_warms_up_captures_once_per_key_and_replays():
    calls = []
    cs = CapturedStep(lambda: calls.append(1), capture=False, warmup=2)
    for key in ["a"] * 5 + ["b"] * 3 + ["a"]:
        cs.run(key)
    assert len(calls) == 9  # the stand-in runs the function exactly once per call
    assert cs.capture_keys == ["a", "b"]  # the last "a" is still warming up again
    assert (cs.n_eager, cs.n_captures, cs.n_replays) == (5, 2, 4)
    with pytest.raises(ValueError, match="warmup"):
        CapturedStep(lambda: None, capture=False, warmup=0)


def _key(cfg, epoch):
    """The capture key from a config alone, the way the trainer builds it (``Trainer.phase_key``)."""
    a = cfg.averaging
    return phase_key(cfg.objective(), epoch, threat=cfg.train_threat_at(epoch),
                     averaging_start=a.start_epoch if a.enabled else None)


def test_phase_key_changes_exactly_at_the_epoch_switches():
    cfg = build_config(None, None, [
        {"optim": {"epochs": 12, "milestones": [6, 9]},
         "rpat": {"enabled": True, "start_epoch": 2},
         "averaging": {"enabled": True, "start_epoch": 4},
         "rebat": {"enabled": True, "start_epoch": 5, "beta_growth": 2.0},
         "attack": {"strong_after_decay": True}}])
    keys = [_key(cfg, e) for e in range(12)]
    changes = [e for e in range(1, 12) if keys[e] != keys[e - 1]]
    # rpat on at 2, WA at 4, teacher at 5, "$" and beta x2 at 6, beta x4 at 9
    assert changes == [2, 4, 5, 6, 9]
    plain = build_config(None, None, [{"optim": {"epochs": 5, "milestones": [3]}}])
    assert len({_key(plain, e) for e in range(5)}) == 1  # lr decays need no re-capture


def test_config_and_device_errors():
    with pytest.raises(InputError, match="speed.cuda_graph must be"):
        _cfg("yes")
    with pytest.raises(InputError, match="exclude each other"):
        build_config(None, None, ["speed.cuda_graph=true", "speed.compile=true"])
    if not CUDA:
        with pytest.raises(InputError, match="needs a CUDA device"):
            Trainer(_cfg(True), "unused", data=_data(), progress=False, log=lambda m: None)


# ---- the stand-in against the eager trainer ---------------------------------------------------
@pytest.mark.parametrize("extra", [
    {"rpat": {"enabled": True, "start_epoch": 1}},
    {"method": {"name": "consistency_at"}, "rpat": {"enabled": True}, "nonfinite": "skip"},
    {"rpat": {"enabled": True}, "averaging": {"enabled": True, "decay": 0.5, "start_epoch": 1},
     "rebat": {"enabled": True, "target": "robust_perception", "beta_growth": 2.0},
     "attack": {"eps": "16/255", "step_size": "8/255", "steps": 2, "strong_after_decay": True,
                "strong_eps": "20/255", "strong_steps": 3}},
], ids=["pgd_at+rpat", "consistency+rpat+skip", "rpat++ strong"])
def test_stand_in_gives_exactly_the_eager_trainers_weights(tmp_path, extra):
    """88 images, batch 16: five full batches (warm-up, capture, replays) and a partial one per epoch."""
    extra = dict(extra)
    method = extra.pop("method", {"name": "pgd_at"})["name"]
    _fit(_cfg(False, method=method, **extra), tmp_path / "eager")
    graph = _fit(_cfg("eager", method=method, **extra), tmp_path / "graph")
    for f in ("last.pt", "final.pt", "best.pt"):
        a, b = load_checkpoint(tmp_path / "eager" / f), load_checkpoint(tmp_path / "graph" / f)
        _same(a["model"], b["model"])
        if "averaged" in a:
            _same(a["averaged"], b["averaged"])
    a, b = load_checkpoint(tmp_path / "eager" / "last.pt"), load_checkpoint(tmp_path / "graph" / "last.pt")
    _same(a["optimizer"]["state"][0], b["optimizer"]["state"][0])
    assert a["optimizer"]["param_groups"][0]["lr"] == b["optimizer"]["param_groups"][0]["lr"]
    assert _metrics(tmp_path / "eager") == _metrics(tmp_path / "graph")  # loss sums, guard, held-out
    cs = graph.graph_step.captured
    keys = [graph.phase_key(e) for e in range(3)]
    assert cs.capture_keys == [k for i, k in enumerate(keys) if i == 0 or k != keys[i - 1]]
    # per epoch 5 full batches + 1 partial (eager, not counted); warm-up 3 steps per new phase
    assert cs.n_eager + cs.n_replays == 15 and cs.n_eager == 3 * len(cs.capture_keys)


def test_stand_in_resumed_equals_uninterrupted(tmp_path, monkeypatch):
    cfg = _cfg("eager", rpat={"enabled": True, "start_epoch": 1})
    _fit(cfg, tmp_path / "a")
    t = Trainer(cfg, tmp_path / "b", data=_data(), progress=False, log=lambda m: None)
    real = t.graph_step.train_step
    calls = {"n": 0}

    class Flaky:  # the one TrainStep, failing on its 11th call
        def __getattr__(self, name):
            return getattr(real, name)

        def __call__(self, *args):
            calls["n"] += 1
            if calls["n"] == 11:  # second epoch (6 steps each), a replay after its phase's re-capture
                raise KeyboardInterrupt
            return real(*args)

    monkeypatch.setattr(t.graph_step, "train_step", Flaky())
    with pytest.raises(KeyboardInterrupt):
        t.fit()
    _fit(cfg, tmp_path / "b", resume=True)
    for f in ("last.pt", "final.pt", "best.pt"):
        _same(load_checkpoint(tmp_path / "a" / f)["model"], load_checkpoint(tmp_path / "b" / f)["model"])
    assert _metrics(tmp_path / "a") == _metrics(tmp_path / "b")


def test_stand_in_copies_batches_into_static_buffers_and_keeps_them(tmp_path):
    cfg = _cfg("eager", epochs=2, optim={"schedule": "cosine"})
    t = Trainer(cfg, tmp_path / "r", data=_data(), progress=False, log=lambda m: None)
    gs = t.graph_step
    t.train_epoch(0)
    x_ptr, lr_ptr = gs.x.data_ptr(), gs.lr.data_ptr()
    assert gs.x.shape[0] == 16  # full batches only; the partial batch of 8 ran on its own tensors
    t.train_epoch(1)
    assert (gs.x.data_ptr(), gs.lr.data_ptr()) == (x_ptr, lr_ptr)  # a graph would still read them
    assert gs.lr.item() == pytest.approx(t.lr(1, 5 / 6))  # the last step's lr reached the tensor
    assert t.lr(1, 5 / 6) != t.lr(1, 4 / 6)


# ---- GPU: the real capture against the eager step ---------------------------------------------------
GPU_CASES = {
    "pgd_at+rpat": ("pgd_at", {"rpat": {"enabled": True}}),
    "trades+rpat": ("trades", {"rpat": {"enabled": True}}),
    "mart+rpat": ("mart", {"rpat": {"enabled": True}}),
    "consistency_at+rpat": ("consistency_at", {"rpat": {"enabled": True}}),
    "rpat++": ("pgd_at", {"rpat": {"enabled": True},
                          "averaging": {"enabled": True, "decay": 0.5, "start_epoch": 1},
                          "rebat": {"enabled": True, "target": "robust_perception"}}),
}


@pytest.fixture
def strict_fp32():
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    torch.use_deterministic_algorithms(True, warn_only=True)
    yield
    torch.use_deterministic_algorithms(False)
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


@needs_cuda
@pytest.mark.parametrize("case", list(GPU_CASES))
def test_gpu_captured_step_equals_eager(tmp_path, case, strict_fp32):
    """fp32, TF32 off: the captured run's weights and losses equal those of the same step run eagerly
    (the stand-in, which the CPU tests tie bit for bit to the eager trainer), to 1e-6."""
    method, extra = GPU_CASES[case]
    data = _data(n_train=168, chans=3, size=16)  # 10 full batches of 16 and a partial one
    runs = {}
    for mode in ("eager", True):
        cfg = _cfg(mode, device="cuda", epochs=2, method=method, **extra)
        t = Trainer(cfg, tmp_path / str(mode), data=data, progress=False, log=lambda m: None)
        t.fit()
        runs[mode] = t
    c = runs[True].graph_step.captured
    assert c.n_captures >= 1 and c.n_replays >= 10
    for f in ("last.pt", "final.pt"):
        a, b = load_checkpoint(tmp_path / "eager" / f), load_checkpoint(tmp_path / "True" / f)
        for k in a["model"]:
            if a["model"][k].is_floating_point():
                torch.testing.assert_close(b["model"][k], a["model"][k], rtol=1e-6, atol=1e-6)
            else:
                assert torch.equal(a["model"][k], b["model"][k])
    ma, mb = _metrics(tmp_path / "eager"), _metrics(tmp_path / "True")
    for ra, rb in zip(ma, mb, strict=True):
        for k in ra:
            if k.startswith("train_") and isinstance(ra[k], float):
                assert rb[k] == pytest.approx(ra[k], rel=1e-5, abs=1e-6), k


@needs_cuda
def test_gpu_eager_trainer_and_stand_in_agree(tmp_path, strict_fp32):
    """The eager trainer (torch.optim.SGD) and the stand-in (sgd_update_) on CUDA, a short run. Loose
    tolerance: a last-bit difference of the update could flip a PGD sign later; a wrong lr would not pass."""
    data = _data(n_train=168, chans=3, size=16)
    for mode in (False, "eager"):
        Trainer(_cfg(mode, device="cuda", epochs=1, rpat={"enabled": True}), tmp_path / str(mode), data=data,
                progress=False, log=lambda m: None).fit()
    a, b = load_checkpoint(tmp_path / "False" / "final.pt"), load_checkpoint(tmp_path / "eager" / "final.pt")
    for k in a["model"]:
        if a["model"][k].is_floating_point():
            torch.testing.assert_close(b["model"][k], a["model"][k], rtol=1e-4, atol=1e-4)


@needs_cuda
def test_gpu_sgd_update_equals_torch_sgd():
    torch.manual_seed(0)
    ps = [torch.randn(256, 129, device="cuda"), torch.randn(64, device="cuda")]
    twins = [p.clone() for p in ps]
    ref = torch.optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=5e-4)
    mine = torch.optim.SGD(twins, lr=0.1, momentum=0.9, weight_decay=5e-4)
    lr = torch.full((), 0.1, device="cuda")
    for _ in range(3):
        for p, q in zip(ps, twins, strict=True):
            p.grad = torch.randn_like(p)
            q.grad = p.grad.clone()
        ref.step()
        sgd_update_(mine, lr)
        for p, q in zip(ps, twins, strict=True):
            torch.testing.assert_close(q, p, rtol=1e-7, atol=1e-7)


@needs_cuda
def test_gpu_captured_resumed_equals_uninterrupted(tmp_path, monkeypatch):
    data = _data(n_train=168, chans=3, size=16)  # 10 full batches of 16 and a partial one
    cfg = _cfg(True, device="cuda", epochs=3, rpat={"enabled": True, "start_epoch": 1})
    Trainer(cfg, tmp_path / "a", data=data, progress=False, log=lambda m: None).fit()
    t = Trainer(cfg, tmp_path / "b", data=data, progress=False, log=lambda m: None)
    real = t.train_epoch

    def stop(epoch):
        if epoch == 2:
            raise KeyboardInterrupt
        return real(epoch)

    monkeypatch.setattr(t, "train_epoch", stop)
    with pytest.raises(KeyboardInterrupt):
        t.fit()
    Trainer(cfg, tmp_path / "b", data=data, resume=True, progress=False, log=lambda m: None).fit()
    _same(load_checkpoint(tmp_path / "a" / "final.pt")["model"], load_checkpoint(tmp_path / "b" / "final.pt")["model"])
