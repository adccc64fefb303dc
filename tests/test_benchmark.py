"""The training-step benchmark: the release-style reference step computes the same losses, costs more FLOPs,
and the harness reports consistent figures."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import train_step as bench  # noqa: E402

from rpat.attacks.threat import ThreatModel, default_threat  # noqa: E402
from rpat.errors import InputError  # noqa: E402
from rpat.objectives import RPATTerm  # noqa: E402

RPAT = RPATTerm()


def _problem(rpat: RPATTerm | None = RPAT, threat: ThreatModel | None = None) -> bench.Problem:
    return bench.Problem("small_cnn", 8, torch.device("cpu"), threat or default_threat("linf", steps=3), rpat,
                         image_size=8, in_chans=1)


@pytest.mark.parametrize("rpat, threat", [
    (RPATTerm(), None),
    (None, None),
    (RPATTerm(lam=2.0, alpha=0.3, proxy="second_to_last"), default_threat("l2", steps=3)),
])
def test_reference_step_gives_the_same_losses_and_update(rpat, threat):
    torch.set_num_threads(1)
    diffs = bench.check_same_losses(_problem(rpat, threat), tol=1e-5)
    assert set(diffs) >= {"abs_diff_loss", "abs_diff_ce_adv"}
    assert ("abs_diff_rpat" in diffs) == (rpat is not None)
    assert max(diffs.values()) <= 1e-5  # losses and every updated parameter


def test_reference_step_is_not_trivially_equal_to_a_different_start():
    p = _problem()
    m1, m2 = p.model(), p.model()
    o1 = torch.optim.SGD(m1.parameters(), lr=0.01)
    o2 = torch.optim.SGD(m2.parameters(), lr=0.01)
    a = bench.reference_step(m1, o1, p.x, p.y, p.threat, p.rpat, torch.Generator().manual_seed(1))
    b = bench.reference_step(m2, o2, p.x, p.y, p.threat, p.rpat, torch.Generator().manual_seed(2))
    assert a["rpat"] != b["rpat"]  # the check above compares like with like: the start matters


def test_project_step_counts_fewer_flops_than_the_reference():
    """Attack: input-only gradients skip the weight gradients; loss: f(x_adv) runs once, not twice.

    With F the forward FLOPs and every backward half input-, half weight-gradient,
    PGD-k + PGD-AT + RPAT costs (2k + 9)F for rpat and (3k + 12)F for the reference.
    """
    torch.set_num_threads(1)
    p = _problem()
    k = p.threat.steps
    f_rpat = bench.count_flops(bench.make_step(p, "rpat"))
    f_ref = bench.count_flops(bench.make_step(p, "reference"))
    model = p.model()
    with bench.FlopCounter() as c:
        model(p.x)
    expected = (2 * k + 9) / (3 * k + 12)
    assert f_rpat < f_ref
    assert f_rpat / f_ref == pytest.approx(expected, abs=0.03)
    assert f_ref == pytest.approx((3 * k + 12) * c.flops, rel=0.05)


def test_run_benchmark_reports_medians_ratios_and_flops():
    torch.set_num_threads(1)
    p = _problem()
    logs: list[str] = []
    rep = bench.run_benchmark(p, ["rpat", "reference", "rpat+cl"], reps=3, warmup=0, memory=False,
                              peak_tflops=1.0, log=logs.append)
    assert rep["loss_check"]["abs_diff_loss"] <= 1e-5
    rows = {r["variant"]: r for r in rep["results"]}
    assert set(rows) == {"rpat", "reference", "rpat+cl"} and len(logs) == 3
    for v, r in rows.items():
        assert len(r["times_s"]) == 3
        med = sorted(r["times_s"])[1]
        assert r["ms_per_step"]["median"] == pytest.approx(med * 1000)
        assert r["ms_per_step"]["min"] <= r["ms_per_step"]["median"] <= r["ms_per_step"]["max"]
        assert r["images_per_s"]["median"] == pytest.approx(p.batch_size / med)
        assert r["mfu"] == pytest.approx(r["achieved_tflops"] / 1.0)
        if v != "reference":
            s = r["speedup_vs_reference"]
            assert s["of_medians"] == pytest.approx(sorted(rows["reference"]["times_s"])[1] / med)
            assert s["paired_min"] <= s["paired_median"] <= s["paired_max"]
    assert rows["rpat+cl"]["gflop_per_step"] == rows["rpat"]["gflop_per_step"]


def test_cli_writes_json_and_rejects_bad_variants(tmp_path, capsys):
    out = tmp_path / "r.json"
    rc = bench.main(["--arch", "small_cnn", "--batch-size", "4", "--image-size", "8", "--in-chans", "1",
                     "--attack-steps", "1", "--reps", "1", "--warmup", "0", "--no-memory", "--threads", "1",
                     "--out", str(out)])
    assert rc == 0
    data = json.loads(out.read_text())
    assert data["arch"] == "small_cnn" and data["batch_size"] == 4 and len(data["results"]) == 2
    assert "x" in capsys.readouterr().out  # the ratio line
    assert bench.main(["--variants", "rpat+fp16"]) == 2
    assert "unknown variant" in capsys.readouterr().err
    with pytest.raises(InputError):
        bench.parse_variant("reference+bf16")


def test_graph_variant_runs_the_same_step_as_rpat():
    """On the CPU ``rpat+graph`` is the eager stand-in of the captured step: same weights as ``rpat``."""
    torch.set_num_threads(1)
    p = _problem()
    plain, graph = bench.make_step(p, "rpat"), bench.make_step(p, "rpat+graph")  # graph: 4 steps done (warm-up)
    for _ in range(4):
        plain()
    for _ in range(2):
        a, b = plain(), graph()
        assert torch.equal(a.detach(), b)
    with pytest.raises(InputError, match="exclude"):
        bench.parse_variant("rpat+graph+compile")
    rep = bench.run_benchmark(p, ["rpat", "rpat+graph"], reps=1, warmup=0, memory=False, log=lambda m: None)
    assert [r["variant"] for r in rep["results"]] == ["rpat", "rpat+graph"]
