"""bf16 autocast training (``speed.amp=bf16``) and the other speed options of the trainer.

A short digits run trained in bf16 reaches the same PGD-20 accuracy as the
fp32 run within sampling noise, the master weights stay fp32, and evaluation
runs in fp32.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from rpat.config import build_config
from rpat.errors import InputError
from rpat.training import Trainer

N_EVAL = 599  # the whole digits test split


def _cfg(**speed):
    return build_config("digits_demo", None, [
        {"device": "cpu", "data": {"batch_size": 32}, "attack": {"steps": 5, "eps": "16/255", "step_size": "4/255"},
         "optim": {"epochs": 4, "lr": 0.1, "milestones": [3]},
         "eval": {"n_examples": N_EVAL, "steps": 20}, "speed": speed}])


def _run(tmp_path, name, **speed):
    t = Trainer(_cfg(**speed), tmp_path / name, progress=False, log=lambda m: None)
    dtypes = {"train": set(), "eval": set()}
    phase = {"now": "train"}
    hook = t.model.register_forward_hook(lambda m, i, o: dtypes[phase["now"]].add(o.dtype))
    real_eval = t.evaluate_held_out

    def eval_and_mark(*a, **k):
        phase["now"] = "eval"
        try:
            return real_eval(*a, **k)
        finally:
            phase["now"] = "train"

    t.evaluate_held_out = eval_and_mark
    t.fit()
    hook.remove()
    rows = [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    return t, rows[-1], dtypes


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("amp")
    torch.set_num_threads(1)  # tiny 8x8 model: more threads only add overhead on a shared machine
    return {"fp32": _run(tmp, "fp32"), "bf16": _run(tmp, "bf16", amp="bf16")}


def test_bf16_training_matches_fp32_pgd20_accuracy_within_noise(runs):
    (_, m32, _), (_, m16, _) = runs["fp32"], runs["bf16"]
    for m in (m32, m16):
        assert m["held_out_pgd"] > 50  # both learned something robust (chance is 10%)
        assert math.isfinite(m["train_loss"])
    # binomial standard error of an accuracy near 50% on 599 images: ~2 points; allow 3 s.e.
    se = 100 * math.sqrt(0.25 / N_EVAL)
    assert abs(m16["held_out_pgd"] - m32["held_out_pgd"]) <= 3 * se + 1.0
    assert abs(m16["held_out_clean"] - m32["held_out_clean"]) <= 3 * se + 1.0


def test_bf16_runs_the_step_in_bf16_with_fp32_weights_and_fp32_evaluation(runs):
    t16, _, d16 = runs["bf16"]
    _, _, d32 = runs["fp32"]
    assert d16["train"] == {torch.bfloat16} and d16["eval"] == {torch.float32}
    assert d32["train"] == {torch.float32} and d32["eval"] == {torch.float32}
    assert all(p.dtype == torch.float32 for p in t16.model.parameters())
    assert all(s["momentum_buffer"].dtype == torch.float32 for s in t16.optimizer.state.values())


def test_channels_last_gives_the_same_first_step(tmp_path):
    cfg = build_config("digits_demo", None, [{"device": "cpu", "attack": {"steps": 2}, "optim": {"epochs": 1}}])
    cl = build_config("digits_demo", None, [{"device": "cpu", "attack": {"steps": 2}, "optim": {"epochs": 1},
                                             "speed": {"channels_last": True}}])
    a = Trainer(cfg, tmp_path / "a", progress=False, log=lambda m: None)
    b = Trainer(cl, tmp_path / "b", progress=False, log=lambda m: None)
    conv = next(p for p in b.model.parameters() if p.dim() == 4)
    assert conv.is_contiguous(memory_format=torch.channels_last)
    a.loader.set_epoch(0)
    x, y = next(iter(a.loader))
    g1, g2 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    la, _ = a.objective.step(a.step_model, x, y, 0, g1)
    lb, _ = b.objective.step(b.step_model, x.contiguous(memory_format=torch.channels_last), y, 0, g2)
    assert torch.allclose(la, lb, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("override, match", [
    ("speed.amp=fp16", "speed.amp"),
    ("speed.channels_last=yes please", "speed.channels_last"),
    ("speed.compile=3", "speed.compile"),
])
def test_bad_speed_options_are_input_errors(override, match):
    with pytest.raises(InputError, match=match):
        build_config("digits_demo", None, [override])
