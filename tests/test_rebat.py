"""ReBAT / RPAT++: weight averaging, the teacher KL terms, the stronger adversary, validation splits."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from rpat.checkpoint import load_checkpoint
from rpat.config import build_config
from rpat.data import ArrayDataset
from rpat.errors import InputError
from rpat.models import create_model
from rpat.models.averaging import WeightAverage
from rpat.objectives import PGDAT, Objective, TeacherTerm
from rpat.training import RunData, Trainer, prepare_data
from rpat.training.run_data import split_validation

EPS = 16 / 255


def _model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return create_model("small_cnn", num_classes=4, in_chans=1)


def _batch(n: int = 8, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, 8, 8, generator=g)
    x_adv = (x + (torch.rand(x.shape, generator=g) * 2 - 1) * EPS).clamp(0, 1)
    return x, x_adv, torch.randint(0, 4, (n,), generator=g)


def _sgd_step(model: torch.nn.Module, opt: torch.optim.Optimizer, seed: int) -> None:
    x, _, y = _batch(seed=seed)
    model.train()
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()


# ---- weight averaging ------------------------------------------------------------------
def test_weight_average_copies_during_warmup_then_matches_hand_ema():
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    decay = 0.9
    wa = WeightAverage(model, decay=decay, start_epoch=1)
    for s in range(3):  # warm-up epoch 0: the WA model is the online model after every step
        _sgd_step(model, opt, s)
        wa.update(model, epoch=0)
        for k, v in model.state_dict().items():
            assert torch.equal(wa.model.state_dict()[k], v), k
    hand = {k: v.clone() for k, v in model.state_dict().items()}
    for s in range(3, 7):  # epoch 1: EMA of parameters and float buffers, int buffers copied
        _sgd_step(model, opt, s)
        wa.update(model, epoch=1)
        for k, v in model.state_dict().items():
            hand[k] = decay * hand[k] + (1 - decay) * v if v.is_floating_point() else v.clone()
    avg = wa.model.state_dict()
    assert any("running_var" in k for k in avg) and any("num_batches_tracked" in k for k in avg)
    for k, v in hand.items():
        if v.is_floating_point():
            torch.testing.assert_close(avg[k], v, rtol=1e-6, atol=1e-7)
        else:
            assert torch.equal(avg[k], v) and int(v) == 7, k  # num_batches_tracked: 7 train steps
    online = model.state_dict()
    assert not all(torch.allclose(avg[k], online[k]) for k in avg if avg[k].is_floating_point())  # it lags
    assert not wa.model.training and not any(p.requires_grad for p in wa.model.parameters())


def test_weight_average_rejects_bad_settings():
    with pytest.raises(InputError, match="decay"):
        WeightAverage(_model(), decay=1.0)
    with pytest.raises(InputError, match="start_epoch"):
        WeightAverage(_model(), start_epoch=-1)


# ---- the teacher terms -----------------------------------------------------------------
def _kl(t_logits: torch.Tensor, s_logits: torch.Tensor) -> torch.Tensor:
    p_t = t_logits.softmax(1)
    return (p_t * (p_t.log() - s_logits.log_softmax(1))).sum(1).mean()


def _objective(teacher_model, target: str, alpha: float = 0.5, beta: float = 2.0, start: int = 0):
    from rpat.attacks.threat import ThreatModel

    term = TeacherTerm(beta=beta, start_epoch=start, target=target, alpha=alpha)
    term.bind(teacher_model)
    return Objective(PGDAT(ThreatModel("linf", EPS, EPS / 4, 2)), None, term)


def test_boat_loss_equals_hand_computation():
    student, teacher = _model(0), _model(1)
    teacher.eval()
    x, x_adv, y = _batch()
    student.train()
    total, terms = _objective(teacher, "adversarial").loss(student, x, y, x_adv, epoch=0)
    with torch.no_grad():
        s = student(x_adv)  # train mode, like the loss
        t = teacher(x_adv)  # eval mode
        ce = F.cross_entropy(s, y)
        kl = _kl(t, s)
    torch.testing.assert_close(terms["boat"], kl)
    torch.testing.assert_close(total.detach(), ce + 2.0 * kl)
    total.backward()  # the teacher is a constant: no gradient reaches it
    assert all(p.grad is None for p in teacher.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
    assert not teacher.training


@pytest.mark.parametrize("alpha", [0.5, 0.25])
def test_rpat_pp_loss_equals_hand_computation(alpha):
    student, teacher = _model(0), _model(1)
    teacher.eval()
    x, x_adv, y = _batch()
    student.train()
    total, terms = _objective(teacher, "robust_perception", alpha=alpha).loss(student, x, y, x_adv, epoch=0)
    with torch.no_grad():
        s = student(x_adv)
        x_mid = x + alpha * (x_adv - x)
        target = teacher(x_mid) - (1 - alpha) * teacher(x)
        kl = _kl(target, alpha * s)
    torch.testing.assert_close(terms["rp_teacher"], kl, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(total.detach(), F.cross_entropy(s, y) + 2.0 * kl, rtol=1e-5, atol=1e-6)


def test_teacher_term_off_before_warmup_and_beta_schedule():
    student, teacher = _model(0), _model(1)
    x, x_adv, y = _batch()
    total, terms = _objective(teacher, "adversarial", start=3).loss(student.train(), x, y, x_adv, epoch=2)
    assert "boat" not in terms
    torch.testing.assert_close(total.detach(), terms["ce_adv"])
    term = TeacherTerm(beta=1.5, beta_growth=2.0, milestones=(100, 150))
    assert [term.weight(e) for e in (0, 99, 100, 149, 150)] == [1.5, 1.5, 3.0, 3.0, 6.0]
    with pytest.raises(InputError, match="target"):
        TeacherTerm(target="clean")
    with pytest.raises(RuntimeError, match="bind"):
        TeacherTerm()(None, x, x_adv)  # type: ignore[arg-type]


# ---- config: the stronger adversary, presets, validation -------------------------------
def test_strong_adversary_switches_on_at_the_first_lr_decay():
    cfg = build_config("cifar10_rebat_strong")
    assert cfg.train_threat_at(99).eps == pytest.approx(8 / 255) and cfg.train_threat_at(99).steps == 10
    for e in (100, 150, 199):
        t = cfg.train_threat_at(e)
        assert t.eps == pytest.approx(10 / 255) and t.steps == 12 and t.step_size == pytest.approx(2 / 255)
    assert cfg.eval_threat().eps == pytest.approx(8 / 255) and cfg.eval_threat().steps == 20
    plain = build_config("cifar10_rebat")
    assert plain.train_threat_at(150).eps == pytest.approx(8 / 255)
    with pytest.raises(InputError, match="piecewise"):
        build_config(None, None, ["attack.strong_after_decay=true", "optim.schedule=cosine"])


def test_presets_of_table_6():
    rows = {"cifar10_rebat": ("adversarial", False), "cifar10_rpatpp": ("robust_perception", False),
            "cifar10_rebat_strong": ("adversarial", True), "cifar10_rpatpp_strong": ("robust_perception", True)}
    for name, (target, strong) in rows.items():
        c = build_config(name)
        assert (c.model.arch, c.optim.epochs, c.optim.milestones) == ("preact_resnet18", 200, [100, 150])
        assert c.optim.gamma == pytest.approx(1 / 1.5) and c.data.val_size == 1000
        assert c.averaging.enabled and c.averaging.decay == 0.999 and c.averaging.start_epoch == 105
        term = c.teacher_term()
        assert term is not None and term.target == target and term.start_epoch == 105
        assert c.attack.strong_after_decay is strong


def test_config_errors_are_one_line():
    with pytest.raises(InputError, match="averaging.enabled"):
        build_config(None, None, ["rebat.enabled=true"])
    with pytest.raises(InputError, match="val_size"):
        build_config(None, None, ["data.val_size=0"])
    with pytest.raises(InputError, match="decay"):
        build_config(None, None, ["averaging.decay=1.5"])
    with pytest.raises(InputError, match="rebat.target"):  # checked even with rebat off
        build_config(None, None, ["rebat.target=foo"])


def _numbered(n: int) -> ArrayDataset:
    """Image i holds the number i in its pixels, so images can be traced through splits."""
    ids = torch.arange(n)
    images = torch.stack([ids % 256, ids // 256], 1).view(n, 2, 1, 1).expand(n, 2, 4, 4).to(torch.uint8)
    return ArrayDataset(images.contiguous(), ids % 3, ["a", "b", "c"])


def _ids(ds: ArrayDataset) -> list[int]:
    return (ds.images[:, 0, 0, 0].long() + 256 * ds.images[:, 1, 0, 0].long()).tolist()


def test_validation_split_is_disjoint_and_fixed_by_seed():
    data = _numbered(600)
    rest, val = split_validation(data, 100, seed=0)
    assert len(val) == 100 and len(rest) == 500
    assert set(_ids(rest)).isdisjoint(_ids(val)) and set(_ids(rest)) | set(_ids(val)) == set(range(600))
    assert _ids(split_validation(data, 100, seed=0)[1]) == _ids(val)
    assert _ids(split_validation(data, 100, seed=1)[1]) != _ids(val)
    with pytest.raises(InputError, match="val_size"):
        split_validation(data, 600, seed=0)
    # through prepare_data, with a train subset on top: still disjoint, held-out = the validation split
    cfg = build_config(None, None, [{"data": {"dataset": "digits", "val_size": 50, "train_subset": 200}}])
    run = prepare_data(cfg, train=data, test=_numbered(10), progress=False)
    assert run.selection == "validation" and len(run.held_out) == 50 and len(run.train) == 200
    assert set(_ids(run.train)).isdisjoint(_ids(run.held_out))
    assert prepare_data(cfg, train=data, test=_numbered(10), progress=False).held_out.images.equal(
        run.held_out.images)


# ---- the trainer: WA model evaluated and saved, exact resume ---------------------------
def _data(n_train: int = 96, n_test: int = 48) -> RunData:
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 4, (n_train + n_test,), generator=g)
    images = (torch.rand(n_train + n_test, 1, 8, 8, generator=g) * 120 + labels.view(-1, 1, 1, 1) * 40)
    images = images.clamp(0, 255).to(torch.uint8)
    classes = ["a", "b", "c", "d"]
    return RunData(ArrayDataset(images[:n_train], labels[:n_train], classes),
                   ArrayDataset(images[n_train:], labels[n_train:], classes), 4, 1, 1, False, None, None)


def _cfg(target: str = "robust_perception"):
    return build_config(None, None, [{
        "data": {"dataset": "digits", "batch_size": 32}, "model": {"arch": "small_cnn"},
        "attack": {"eps": "16/255", "step_size": "8/255", "steps": 2, "strong_after_decay": True,
                   "strong_eps": "24/255", "strong_steps": 3},
        "averaging": {"enabled": True, "decay": 0.5, "start_epoch": 1},
        "rebat": {"enabled": True, "target": target, "beta": 1.0},
        "optim": {"epochs": 3, "lr": 0.05, "milestones": [2], "gamma": 1 / 1.5},
        "eval": {"n_examples": 48, "steps": 2}, "device": "cpu"}])


def test_resume_restores_the_averaged_model_bit_for_bit(tmp_path, monkeypatch):
    cfg = _cfg()
    quiet = {"data": _data(), "progress": False, "log": lambda m: None}
    summary = Trainer(cfg, tmp_path / "a", **quiet).fit()

    t = Trainer(cfg, tmp_path / "b", **quiet)
    calls = {"n": 0}
    real_step = t.objective.step

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:  # second step of the second epoch (3 steps per epoch)
            raise KeyboardInterrupt
        return real_step(*args, **kwargs)

    monkeypatch.setattr(t.objective, "step", flaky)
    with pytest.raises(KeyboardInterrupt):
        t.fit()
    monkeypatch.undo()
    resumed = Trainer(cfg, tmp_path / "b", resume=True, **quiet)
    assert resumed.start_epoch == 1
    resumed.fit()

    for f in ("final.pt", "best.pt"):
        wa, wb = load_checkpoint(tmp_path / "a" / f), load_checkpoint(tmp_path / "b" / f)
        assert wa["weights"] == "averaged"
        assert all(torch.equal(wa["model"][k], wb["model"][k]) for k in wa["model"]), f
    la, lb = load_checkpoint(tmp_path / "a" / "last.pt"), load_checkpoint(tmp_path / "b" / "last.pt")
    for part in ("model", "averaged"):
        assert all(torch.equal(la[part][k], lb[part][k]) for k in la[part]), part
    # final.pt is the averaged model, not the online one
    final = load_checkpoint(tmp_path / "a" / "final.pt")["model"]
    assert all(torch.equal(la["averaged"][k], v) for k, v in final.items())
    assert not all(torch.equal(la["averaged"][k], la["model"][k]) for k in la["model"])

    ra = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    rb = [json.loads(x) for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    for x, y in zip(ra, rb, strict=True):
        for key in ("train_loss", "held_out_pgd", "online_held_out_pgd"):
            assert x[key] == y[key], key
    # the teacher term is on from the warm-up's end; the strong adversary from the first lr decay
    assert ["train_rp_teacher" in r for r in ra] == [False, True, True]
    assert [(round(r["train_eps"] * 255), r["train_steps"]) for r in ra] == [(16, 2), (16, 2), (24, 3)]
    meta = json.loads((tmp_path / "a" / "meta.json").read_text())
    assert meta["evaluated_model"].startswith("weight_average") and meta["selection"].startswith("test")
    assert meta["objective"] == "pgd_at+rp_teacher" and summary["selection"] == meta["selection"]
