"""Adversarial weight perturbation (``rpat.training.awp``): the algorithm against a hand-written
reference in float64, what is perturbed, BatchNorm buffers, warm-up, bf16, DDP, resume, bad input."""

from __future__ import annotations

import copy
import os
import socket
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

from rpat.attacks.threat import ThreatModel, default_threat
from rpat.checkpoint import load_checkpoint
from rpat.cli import main
from rpat.config import build_config
from rpat.data import ArrayDataset
from rpat.distributed import DistContext
from rpat.errors import InputError
from rpat.models import create_model
from rpat.objectives import METHODS, BaseMethod, RPATTerm, build_objective
from rpat.training import RunData, Trainer, TrainStep
from rpat.training.awp import WeightPerturbation, perturbed_names

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import train_step as bench  # noqa: E402

THREAT = ThreatModel("linf", 16 / 255, 8 / 255, 2)


def _data(n_train: int = 96, n_test: int = 48) -> RunData:
    """Tiny 8x8 one-channel images of 4 classes (the trainer tests' data): 3 steps of 32 per epoch."""
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 4, (n_train + n_test,), generator=g)
    images = (torch.rand(n_train + n_test, 1, 8, 8, generator=g) * 120 + labels.view(-1, 1, 1, 1) * 40)
    images = images.clamp(0, 255).to(torch.uint8)
    train = ArrayDataset(images[:n_train], labels[:n_train], list("abcd"))
    test = ArrayDataset(images[n_train:], labels[n_train:], list("abcd"))
    return RunData(train, test, 4, 1, 1, False, None, None)


def _cfg(epochs: int = 3, **extra):
    return build_config(None, None, [
        {"data": {"dataset": "digits", "batch_size": 32}, "model": {"arch": "small_cnn"},
         "attack": {"eps": "16/255", "step_size": "8/255", "steps": 2},
         "optim": {"epochs": epochs, "lr": 0.05, "milestones": [2]},
         "eval": {"n_examples": 48, "steps": 3}, "device": "cpu"},
        *[{k: v} for k, v in extra.items()]])


def _model(dtype=torch.float32, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return create_model("small_cnn", num_classes=4, in_chans=1).to(dtype).train()


def _batch(dtype=torch.float32, n: int = 8, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 8, 8, generator=g, dtype=dtype), torch.randint(0, 4, (n,), generator=g)


def _sgd(model: torch.nn.Module) -> torch.optim.SGD:
    return torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)


# ---- the algorithm, written out independently of rpat.training.awp ---------------------------
def _reference_base_loss(method: str, net: torch.nn.Module, x, y, x_adv) -> torch.Tensor:
    if method == "pgd_at":
        return F.cross_entropy(net(x_adv), y)
    clean = net(x)  # TRADES, beta 6: CE(f(x)) + 6 KL(p(x) || p(x_adv))
    kl = F.kl_div(F.log_softmax(net(x_adv), dim=1), F.softmax(clean, dim=1), reduction="batchmean")
    return F.cross_entropy(clean, y) + 6.0 * kl


def _reference_awp_step(method, model, opt, x, y, x_adv, gamma, proxy_lr):
    """One AWP step as the published algorithm states it (the proxy copied from the model, plain SGD)."""
    proxy = copy.deepcopy(model).train()
    proxy_opt = torch.optim.SGD(proxy.parameters(), lr=proxy_lr)
    proxy_opt.zero_grad()
    (-_reference_base_loss(method, proxy, x, y, x_adv)).backward()
    proxy_opt.step()
    old, new = model.state_dict(), proxy.state_dict()
    v = {}
    for k in old:
        if "weight" in k and old[k].dim() > 1:
            d = new[k] - old[k]
            v[k] = old[k].norm() / (d.norm() + 1e-20) * d
    params = dict(model.named_parameters())
    with torch.no_grad():
        for k, d in v.items():
            params[k].add_(gamma * d)
    opt.zero_grad()
    _reference_base_loss(method, model, x, y, x_adv).backward()
    opt.step()
    with torch.no_grad():
        for k, d in v.items():
            params[k].sub_(gamma * d)
    return v


@pytest.mark.parametrize("method", ["pgd_at", "trades"])
def test_awp_steps_match_a_hand_written_reference_in_float64(method):
    dt = torch.float64
    x, y = _batch(dt)
    model, ref = _model(dt), _model(dt)
    objective = build_objective(method, THREAT)
    opt, ref_opt = _sgd(model), _sgd(ref)
    awp = WeightPerturbation(model, objective, gamma=0.01, proxy_lr=0.01)
    ts = TrainStep(model=model, step_model=model, objective=objective, optimizer=opt, averager=None,
                   nonfinite="stop", device=torch.device("cpu"), awp=awp)
    ts.start_epoch(0, 7)
    gen = torch.Generator().manual_seed(7)  # the same attack starts as the step's generator
    for step in range(2):  # the second step starts from updated weights, momentum and BN statistics
        x_adv = objective.attack(ref, x, y, gen)
        ts(x, y, step)
        v = _reference_awp_step(method, ref, ref_opt, x, y, x_adv, 0.01, 0.01)
        assert sorted(v) == sorted(perturbed_names(model))
        for k, vk in zip(perturbed_names(model), awp.v, strict=True):
            assert torch.allclose(vk, v[k], rtol=1e-10, atol=1e-12), k
        for (k, a), b in zip(model.state_dict().items(), ref.state_dict().values(), strict=True):
            assert torch.allclose(a, b, rtol=1e-10, atol=1e-12), (step, k, (a - b).abs().max())
    assert awp.applied is False


def test_only_conv_and_linear_weights_move_by_gamma_times_their_norm():
    model = _model()
    x, y = _batch()
    objective = build_objective("pgd_at", THREAT)
    awp = WeightPerturbation(model, objective, gamma=0.01)
    names = perturbed_names(model)
    kinds = {n: type(model.get_submodule(n.rsplit(".", 1)[0])).__name__ for n in names}
    assert set(kinds.values()) == {"Conv2d", "Linear"}
    assert len(names) == sum(isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)) for m in model.modules())
    before = {k: v.clone() for k, v in model.named_parameters()}
    awp.perturb(x, y, objective.attack(model, x, y, torch.Generator().manual_seed(0)), 0)
    for k, p in model.named_parameters():
        if k in names:  # ||gamma v_l|| = gamma ||w_l||
            moved = (p - before[k]).norm()
            assert torch.allclose(moved, 0.01 * before[k].norm(), rtol=1e-4), k
        else:  # biases, BatchNorm weights and biases
            assert torch.equal(p, before[k]), k
    awp.restore()
    for k, p in model.named_parameters():
        assert torch.allclose(p, before[k], atol=1e-7), k


def test_batchnorm_buffers_of_the_model_do_not_see_the_proxy_passes():
    model = _model()
    x, y = _batch()
    objective = build_objective("trades", THREAT)
    awp = WeightPerturbation(model, objective, gamma=5e-3)
    buffers = {k: b.clone() for k, b in model.named_buffers()}
    x_adv = objective.attack(model, x, y, torch.Generator().manual_seed(0))
    awp.perturb(x, y, x_adv, 0)
    for k, b in model.named_buffers():
        assert torch.equal(b, buffers[k]), k
    proxy_buffers = dict(awp.proxy.named_buffers())
    assert not torch.equal(proxy_buffers["features.0.1.running_mean"], buffers["features.0.1.running_mean"])
    assert int(proxy_buffers["features.0.1.num_batches_tracked"]) == 2  # x and x_adv, once each
    # the next step's proxy starts again from the model's state, buffers included
    awp.restore()
    awp._load_proxy()
    for k, b in awp.proxy.state_dict().items():
        assert torch.equal(b, model.state_dict()[k]), k


def test_warmup_epochs_without_perturbation_then_with(monkeypatch):
    x, y = _batch()
    objective = build_objective("pgd_at", THREAT)

    def run(with_awp: bool, epoch: int):
        model = _model()
        awp = WeightPerturbation(model, objective, gamma=0.01, warmup_epochs=1) if with_awp else None
        calls = []
        if awp is not None:
            real = awp.compute
            monkeypatch.setattr(awp, "compute", lambda *a: calls.append(a[3]) or real(*a))
        ts = TrainStep(model=model, step_model=model, objective=objective, optimizer=_sgd(model), averager=None,
                       nonfinite="stop", device=torch.device("cpu"), awp=awp)
        ts.start_epoch(epoch, 3)
        ts(x, y, 0)
        return model.state_dict(), calls

    plain0, _ = run(False, 0)
    awp0, calls0 = run(True, 0)
    assert calls0 == [] and all(torch.equal(plain0[k], awp0[k]) for k in plain0)
    plain1, _ = run(False, 1)
    awp1, calls1 = run(True, 1)
    assert calls1 == [1]
    assert not torch.equal(plain1["fc2.weight"], awp1["fc2.weight"])


def test_bf16_loss_is_taken_at_the_perturbed_weights_not_at_cached_casts():
    model = _model()
    x, y = _batch()
    objective = build_objective("pgd_at", THREAT)
    awp = WeightPerturbation(model, objective, gamma=0.05)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the attack caches bf16 casts of the weights
        x_adv = objective.attack(model, x, y, torch.Generator().manual_seed(0))
        awp.perturb(x, y, x_adv, 0)
        in_step, _ = objective.loss(model, x, y, x_adv, 0)
    with torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=False):
        fresh, _ = objective.loss(model, x, y, x_adv, 0)
        awp.restore()
        unperturbed, _ = objective.loss(model, x, y, x_adv, 0)
    assert torch.equal(in_step, fresh) and not torch.equal(in_step, unperturbed)


def test_full_loss_adds_the_rpat_term_to_what_the_proxy_ascends():
    model = _model()
    x, y = _batch()
    objective = build_objective("pgd_at", THREAT, RPATTerm(lam=1.0))
    x_adv = objective.attack(model, x, y, torch.Generator().manual_seed(0))
    base = WeightPerturbation(model, objective, gamma=0.01, loss="base")
    full = WeightPerturbation(model, objective, gamma=0.01, loss="full")
    base._load_proxy()
    full._load_proxy()
    lb, lf = base.ascent_loss(x, y, x_adv, 0), full.ascent_loss(x, y, x_adv, 0)
    expected, terms = objective.loss(copy.deepcopy(model), x, y, x_adv, 0)
    assert torch.allclose(lf, expected) and torch.allclose(lb, terms["ce_adv"]) and lf > lb


# ---- DDP: two gloo processes perturb identically, from the averaged proxy gradient ---------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
    model = _model()
    x, y = _batch(seed=10 + rank)  # each rank its own images
    objective = build_objective("pgd_at", THREAT)
    awp = WeightPerturbation(model, objective, gamma=0.01, dist=DistContext(rank, 2, rank))
    x_adv = objective.attack(model, x, y, torch.Generator().manual_seed(rank))
    awp.compute(x, y, x_adv, 0)
    torch.save({"v": [v.clone() for v in awp.v], "x_adv": x_adv}, Path(out) / f"rank{rank}.pt")
    torch.distributed.destroy_process_group()


def test_ddp_ranks_perturb_identically_from_the_averaged_gradient(tmp_path):
    mp.spawn(_ddp_worker, args=(_free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    for a, b in zip(ranks[0]["v"], ranks[1]["v"], strict=True):
        assert torch.equal(a, b)
    # reference: the published proxy step (plain SGD of lr 0.01 on -CE) with the mean of the ranks' gradients
    model = _model()
    proxy = copy.deepcopy(model).train()
    grads = []
    for r in range(2):
        _, y = _batch(seed=10 + r)
        grads.append(torch.autograd.grad(-F.cross_entropy(proxy(ranks[r]["x_adv"]), y), list(proxy.parameters())))
    for p, g0, g1 in zip(proxy.parameters(), *grads, strict=True):
        p.grad = (g0 + g1) / 2
    torch.optim.SGD(proxy.parameters(), lr=0.01).step()
    w, pw = dict(model.named_parameters()), dict(proxy.named_parameters())
    for i, n in enumerate(perturbed_names(model)):
        d = pw[n].detach() - w[n].detach()
        v = w[n].detach().norm() / (d.norm() + 1e-20) * d
        assert torch.allclose(ranks[0]["v"][i], v, rtol=1e-5, atol=1e-7), (n, (ranks[0]["v"][i] - v).abs().max())


# ---- through the trainer: exact resume, config errors ---------------------------------------
def test_awp_run_resumed_equals_uninterrupted(tmp_path, monkeypatch):
    cfg = _cfg(rpat={"enabled": True}, awp={"enabled": True, "warmup_epochs": 1, "loss": "full"})
    Trainer(cfg, tmp_path / "a", data=_data(), progress=False, log=lambda m: None).fit()
    t = Trainer(cfg, tmp_path / "b", data=_data(), progress=False, log=lambda m: None)
    assert t.train_step.awp is t.awp and t.awp.warmup_epochs == 1 and t.awp.gamma == 0.01
    calls = {"n": 0}
    real_step = t.objective.step

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:  # second step of the second epoch (3 steps per epoch), AWP on
            raise KeyboardInterrupt
        return real_step(*args, **kwargs)

    monkeypatch.setattr(t.objective, "step", flaky)
    with pytest.raises(KeyboardInterrupt):
        t.fit()
    monkeypatch.undo()
    resumed = Trainer(cfg, tmp_path / "b", resume=True, data=_data(), progress=False, log=lambda m: None)
    assert resumed.start_epoch == 1
    resumed.fit()
    wa = load_checkpoint(tmp_path / "a" / "final.pt")["model"]
    wb = load_checkpoint(tmp_path / "b" / "final.pt")["model"]
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    # and AWP changed the run: the same config without it ends elsewhere
    off = _cfg(rpat={"enabled": True})
    Trainer(off, tmp_path / "c", data=_data(), progress=False, log=lambda m: None).fit()
    wc = load_checkpoint(tmp_path / "c" / "final.pt")["model"]
    assert not torch.equal(wa["fc2.weight"], wc["fc2.weight"])


class _NoLoss(BaseMethod):
    name, label = "noloss", "No-loss"

    def attack(self, model, x, y, generator):
        return x


@pytest.mark.parametrize("awp, extra, message", [
    ({"gamma": -0.01}, {}, "awp.gamma must be a finite number >= 0, got -0.01"),
    ({"warmup_epochs": 3}, {}, "awp.warmup_epochs=3 is not shorter than training (optim.epochs=3)"),
    ({}, {"method": {"name": "trades"}}, "awp.warmup_epochs=9 is not shorter than training"),
    ({"loss": "all"}, {}, "unknown awp.loss 'all'; valid: base, full"),
    ({"proxy_lr": 0}, {}, "awp.proxy_lr must be > 0"),
    ({}, {"method": {"name": "mart"}}, "awp.gamma has no published default for method.name=mart"),
    ({}, {"speed": {"cuda_graph": "eager"}}, "awp.enabled does not run under speed.cuda_graph"),
    ({}, {"method": {"name": "noloss"}}, "method.name=noloss has none"),
])
def test_bad_awp_settings_are_one_line_input_errors(awp, extra, message, monkeypatch):
    monkeypatch.setitem(METHODS, "noloss", _NoLoss)
    with pytest.raises(InputError) as e:
        _cfg(awp={"enabled": True, **awp}, **extra)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_defaults_are_the_published_values():
    assert _cfg(awp={"enabled": True}).awp_settings() == (0.01, 0)
    cfg = _cfg(epochs=11, method={"name": "trades"}, awp={"enabled": True})
    assert cfg.awp_settings() == (5e-3, 9)  # the script's --awp-warmup 10 counts epochs from 1
    assert cfg.label() == "TRADES + AWP" and "AWP gamma=0.005 from epoch 10" in cfg.describe()  # 1-based, as the script
    assert _cfg(method={"name": "mart"}, awp={"enabled": True, "gamma": 0.005}).awp_settings() == (0.005, 0)


def test_cli_bad_gamma_exits_2_before_reading_data(tmp_path, capsys):
    code = main(["train", "--dataset", "imagefolder", "--data-root", str(tmp_path / "missing"),
                 "--run-dir", str(tmp_path / "run"), "awp.enabled=true", "awp.gamma=-1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("rpat: error: ") and "awp.gamma" in err[0]
    assert not (tmp_path / "run").exists()


def test_benchmark_awp_variant_costs_one_more_forward_and_backward():
    """``benchmarks/train_step.py --variants rpat,rpat+awp``: AWP adds the proxy's forward (F) and its backward
    to the weights (2F, less the first conv's unneeded input gradient), at PGD-3 9F -> 12F."""
    p = bench.Problem("small_cnn", 8, torch.device("cpu"), default_threat("linf", steps=3), None, image_size=8,
                      in_chans=1)
    plain, awp = (bench.count_flops(bench.make_step(p, v)) for v in ("rpat", "rpat+awp"))
    with bench.FlopCounter() as c:
        p.model()(p.x)
    assert 8.9 < plain / c.flops < 9.0 and 2.9 < (awp - plain) / c.flops < 3.0
    with pytest.raises(InputError, match="awp does not run under the captured step"):
        bench.parse_variant("rpat+graph+awp")


def test_the_proxy_ascends_the_label_smoothed_loss_that_is_trained():
    model = _model()
    x, y = _batch()
    objective = build_objective("pgd_at", THREAT, label_smoothing=0.1)
    x_adv = objective.attack(model, x, y, torch.Generator().manual_seed(0))
    awp = WeightPerturbation(model, objective, gamma=0.01)
    awp._load_proxy()
    expected = F.cross_entropy(copy.deepcopy(model)(x_adv), y, label_smoothing=0.1)
    assert torch.allclose(awp.ascent_loss(x, y, x_adv, 0), expected)
    override = F.cross_entropy(copy.deepcopy(model)(x_adv), y, label_smoothing=0.3)
    assert torch.allclose(awp.ascent_loss(x, y, x_adv, 0, smoothing=0.3), override)


def test_a_skipped_nonfinite_step_leaves_the_weights_exactly_unperturbed(monkeypatch):
    model = _model()
    x, y = _batch()
    objective = build_objective("pgd_at", THREAT)
    awp = WeightPerturbation(model, objective, gamma=0.01)
    ts = TrainStep(model=model, step_model=model, objective=objective, optimizer=_sgd(model), averager=None,
                   nonfinite="skip", device=torch.device("cpu"), awp=awp)
    ts.start_epoch(0, 3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    real = objective.loss
    monkeypatch.setattr(objective, "loss", lambda *a, **k: (lambda lt: (lt[0] * float("nan"), lt[1]))(real(*a, **k)))
    ts(x, y, 0)
    assert int(ts.guard.n_bad) == 1 and awp.applied is False
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
