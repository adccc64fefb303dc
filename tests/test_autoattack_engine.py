"""rpat's AutoAttack loop: equal to pyautoattack's, per-attack records, resume after a kill, 2-process split.

A tiny conv net (4 classes, 3x8x8 blobs) keeps FAB-T and Square quick; ε = 16/255 leaves a few
examples robust after every attack, and the batch size 12 gives several batches per attack.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from rpat.attacks import ThreatModel, run_autoattack
from rpat.attacks.autoattack import AutoAttackResult, adapt_to_classes, autoattack
from rpat.errors import InputError
from rpat.evaluation import (
    RobustnessReport,
    accuracy,
    evaluate_robustness,
    format_per_attack,
    format_table,
    masking_drop,
    pgd_accuracy,
)
from rpat.evaluation.metrics import accuracy_se

K = 4
N = 40
BS = 12
EPS = 16 / 255
THREAT = ThreatModel("linf", EPS, EPS / 4, 5)


class Net(nn.Module):
    def __init__(self, k: int = K):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                 nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(32, k))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def blobs(n: int, seed: int, noise: float = 0.8) -> tuple[torch.Tensor, torch.Tensor]:
    """``(n, 3, 8, 8)`` images in [0, 1]: a fixed random mean per class plus noise."""
    means = torch.rand(K, 3, 8, 8, generator=torch.Generator().manual_seed(123))
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, K, (n,), generator=g)
    return (means[y] + noise * torch.randn(n, 3, 8, 8, generator=g)).clamp(0, 1), y


@pytest.fixture(scope="module")
def problem(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The trained model (also saved, with the images, for subprocesses) and the images."""
    torch.manual_seed(0)
    model = Net()
    x, y = blobs(512, seed=0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(150):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    model.zero_grad(set_to_none=True)
    model.eval()
    x, y = blobs(N, seed=1)
    files = tmp_path_factory.mktemp("aa_problem")
    torch.save({"model": model.state_dict(), "x": x, "y": y}, files / "problem.pt")
    return {"model": model, "x": x, "y": y, "file": files / "problem.pt"}


def _fresh(problem: dict) -> nn.Module:
    model = Net()
    model.load_state_dict(problem["model"].state_dict())
    return model.eval()


def _numbers(per_attack: list[dict]) -> list[tuple[str, float, int]]:
    return [(r["attack"], r["robust"], r["n_robust"]) for r in per_attack]


@pytest.fixture(scope="module")
def standard(problem: dict) -> AutoAttackResult:
    torch.set_num_threads(1)
    return autoattack(_fresh(problem), problem["x"], problem["y"], THREAT, batch_size=BS, seed=0)


class _Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def _reference(problem: dict, attacks: list[str] | None = None) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """pyautoattack's own ``run_standard_evaluation`` (robust flags, x_adv, its log lines)."""
    from pyautoattack import AutoAttack

    model = _fresh(problem)
    adversary = AutoAttack(model, norm="Linf", eps=EPS, seed=0, version="standard", device="cpu")
    if attacks is not None:
        adversary.attacks_to_run = attacks
    adapt_to_classes(adversary, K)
    logger, handler = logging.getLogger("auto-attack"), _Lines()
    old = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        x_adv, y_adv = adversary.run_standard_evaluation(problem["x"], problem["y"], batch_size=BS)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old)
    return y_adv == problem["y"], x_adv, handler.lines


# --- the loop equals pyautoattack's ----------------------------------------------------------------


def test_loop_equals_run_standard_evaluation(problem: dict, standard: AutoAttackResult) -> None:
    robust, x_adv, lines = _reference(problem)
    assert torch.equal(standard.robust, robust)
    assert torch.equal(standard.x_adv, x_adv)  # the attacks' images where they succeeded, x elsewhere
    assert standard.attacks == ["apgd-ce", "apgd-t", "fab-t", "square"] and standard.n_target_classes == 3
    # pyautoattack's log: "robust accuracy after APGD-CE: 30.00% (total time ...)"
    logged = dict(re.findall(r"robust accuracy after (\S+): ([\d.]+)%", "\n".join(lines)))
    records = standard.per_attack
    assert [r["attack"] for r in records] == ["clean", "apgd-ce", "apgd-t", "fab-t", "square"]
    for r in records[1:]:
        assert f"{r['robust']:.2f}" == logged[r["attack"].upper()]
        assert r["robust"] == 100.0 * r["n_robust"] / N and r["seconds"] >= 0
    counts = [r["n_robust"] for r in records]
    assert counts == sorted(counts, reverse=True)
    assert 0 < counts[-1] <= counts[2] < counts[1] < counts[0] < N  # clean errors, APGD-CE and -T work
    assert int(robust.sum()) == counts[-1]


def test_apgd_version_is_standard_after_apgd_t(problem: dict, standard: AutoAttackResult) -> None:
    apgd = autoattack(_fresh(problem), problem["x"], problem["y"], THREAT, version="apgd", batch_size=BS)
    assert apgd.attacks == ["apgd-ce", "apgd-t"]
    assert _numbers(apgd.per_attack) == _numbers(standard.per_attack[:3])
    robust_after_apgd_t, x_adv, _ = _reference(problem, attacks=["apgd-ce", "apgd-t"])
    assert torch.equal(apgd.robust, robust_after_apgd_t) and torch.equal(apgd.x_adv, x_adv)
    assert not (standard.robust & ~apgd.robust).any()  # FAB-T and Square only clear more flags


# --- resume after a kill ---------------------------------------------------------------------------

_CHILD = textwrap.dedent("""
    import sys, time, torch
    sys.path.insert(0, {test_dir!r})
    from test_autoattack_engine import BS, THREAT, Net
    from rpat.attacks.autoattack import autoattack

    class Slow(torch.nn.Module):  # same weights; slow enough that the parent kills it inside APGD-T
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            time.sleep(0.004)
            return self.inner(x)

    torch.set_num_threads(1)
    p = torch.load({problem!r}, weights_only=True)
    model = Net()
    model.load_state_dict(p["model"])
    autoattack(Slow(model.eval()), p["x"], p["y"], THREAT, batch_size=BS, state_path={state!r})
    print("finished")
""")


def test_resume_after_kill_equals_uninterrupted_run(problem: dict, standard: AutoAttackResult,
                                                    tmp_path: Path) -> None:
    state = tmp_path / "aa_state.json"
    script = _CHILD.format(test_dir=str(Path(__file__).parent), problem=str(problem["file"]), state=str(state))
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.monotonic() + 120
    done: list[str] = []
    try:
        while time.monotonic() < deadline and child.poll() is None:
            if state.exists():
                done = json.loads(state.read_text())["done"]
                if "apgd-ce" in done:
                    break
            time.sleep(0.02)
        child.send_signal(signal.SIGKILL)
    finally:
        out, err = child.communicate(timeout=60)
    assert child.returncode == -signal.SIGKILL, err.decode()[-2000:]
    assert done == ["clean", "apgd-ce"]
    assert json.loads(state.read_text())["done"] == done  # killed inside APGD-T

    lines: list[str] = []
    resumed = autoattack(_fresh(problem), problem["x"], problem["y"], THREAT, batch_size=BS, state_path=state,
                         log=lines.append)
    assert resumed.resumed and any("resumed from" in line for line in lines)
    assert not any(line.startswith("robust accuracy after APGD-CE") for line in lines)  # not rerun
    assert torch.equal(resumed.robust, standard.robust)
    assert torch.equal(resumed.x_adv, standard.x_adv)
    assert _numbers(resumed.per_attack) == _numbers(standard.per_attack)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["aa_state.json", "aa_state.json.5.pt"]

    # a finished state is reused as is; one for other settings is refused
    again = autoattack(_fresh(problem), problem["x"], problem["y"], THREAT, batch_size=BS, state_path=state)
    assert again.resumed and again.per_attack == resumed.per_attack and torch.equal(again.robust, standard.robust)
    with pytest.raises(InputError, match="differs in: seed"):
        run_autoattack(_fresh(problem), problem["x"], problem["y"], THREAT, batch_size=BS, seed=1, state_path=state)
    other = _fresh(problem)
    with torch.no_grad():
        other.net[5].bias.add_(0.1)
    with pytest.raises(InputError, match="model_sha256"):
        autoattack(other, problem["x"], problem["y"], THREAT, batch_size=BS, state_path=state)


# --- split over two gloo processes -----------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _split_worker(rank: int, world: int, port: int, problem_file: str, out: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import torch.distributed as dist

    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        p = torch.load(problem_file, weights_only=True)
        model = Net()
        model.load_state_dict(p["model"])
        report = evaluate_robustness(model, p["x"], p["y"], THREAT, batch_size=BS, progress=False,
                                     aa_state=Path(out) / "state.json")
        Path(out, f"rank{rank}.json").write_text(json.dumps(report.to_dict()))
    finally:
        dist.destroy_process_group()


def test_two_process_split_equals_one_process(problem: dict, standard: AutoAttackResult, tmp_path: Path) -> None:
    mp.spawn(_split_worker, args=(2, _free_port(), str(problem["file"]), str(tmp_path)), nprocs=2, join=True)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    torch.set_num_threads(1)
    model = _fresh(problem)
    clean = accuracy(model, problem["x"], problem["y"], batch_size=BS)
    robust_pgd = pgd_accuracy(model, problem["x"], problem["y"], THREAT, batch_size=BS, seed=0)
    for d in ranks:  # one process: clean and PGD as computed here, AutoAttack as the `standard` fixture
        assert (d["clean"], d["pgd"], d["n_examples"]) == (clean, robust_pgd, N)
        assert d["aa"] == standard.per_attack[-1]["robust"]
        assert _numbers(d["extras"]["aa_per_attack"]) == _numbers(standard.per_attack)
        assert d["extras"]["processes"] == 2
    assert ranks[0]["extras"] == ranks[1]["extras"]  # the same report on every rank, times included
    # the state written by rank 0 holds the merged flags and adversarial images
    doc = json.loads((tmp_path / "state.json").read_text())
    assert doc["robust"] == "".join("1" if b else "0" for b in standard.robust.tolist())
    rows = torch.load(tmp_path / doc["x_adv_file"], weights_only=True)
    x_adv = problem["x"].clone()
    x_adv[rows["index"]] = rows["x_adv"]
    assert torch.equal(x_adv, standard.x_adv)
    # one process reuses the two processes' finished state (the split is exact, so the world size is no setting)
    again = evaluate_robustness(model, problem["x"], problem["y"], THREAT, batch_size=BS, progress=False,
                                aa_state=tmp_path / "state.json")
    assert again.extras["aa_resumed"] is True and again.aa == ranks[0]["aa"]
    assert again.extras["aa_per_attack"] == ranks[0]["extras"]["aa_per_attack"]


# --- report -----------------------------------------------------------------------------------------


def test_evaluate_robustness_per_attack_report(problem: dict, standard: AutoAttackResult) -> None:
    report = evaluate_robustness(_fresh(problem), problem["x"], problem["y"], THREAT, batch_size=BS,
                                 autoattack="apgd", progress=False)
    ex = report.extras
    assert ex["aa_version"] == "apgd" and report.aa_label == "AA(APGD)" and ex["aa_resumed"] is False
    assert _numbers(ex["aa_per_attack"]) == _numbers(standard.per_attack[:3])
    assert report.aa == standard.per_attack[2]["robust"]
    assert masking_drop(report) is None
    line = format_per_attack(report)
    assert line.startswith("AutoAttack (APGD) per attack (robust %, seconds): clean ")
    assert " | APGD-CE " in line and " | APGD-T " in line and "FAB" not in line
    table = report.table("m")
    assert "AA(APGD)" in table.splitlines()[0] and "| AA |" not in table
    with pytest.raises(InputError, match="unknown AutoAttack version"):
        evaluate_robustness(_fresh(problem), problem["x"], problem["y"], THREAT, autoattack="fast")
    off = evaluate_robustness(_fresh(problem), problem["x"], problem["y"], THREAT, autoattack="none",
                              progress=False)
    assert off.aa is None and "aa_per_attack" not in off.extras and masking_drop(off) is None


def _report(version: str, records: list[tuple[str, float, float]]) -> dict:
    per = [{"attack": a, "robust": r, "n_robust": int(r), "seconds": s} for a, r, s in records]
    return {"clean": 52.0, "pgd": 31.0, "aa": records[-1][1], "mean": 40.0, "nrr": 35.0, "n_examples": 100,
            "pgd_steps": 20, "extras": {"aa_version": version, "aa_per_attack": per}}


def test_format_per_attack_masking_drop_and_mixed_tables() -> None:
    std = _report("standard", [("clean", 52.0, 0.1), ("apgd-ce", 30.1, 4.0), ("apgd-t", 28.0, 58.1),
                               ("fab-t", 28.0, 396.0), ("square", 27.0, 522.0)])
    assert format_per_attack(std) == ("AutoAttack per attack (robust %, seconds): clean 52.00 | APGD-CE 30.10 "
                                      "(4.0 s) | APGD-T 28.00 (58.1 s) | FAB-T 28.00 (6.6 min) | "
                                      "Square 27.00 (8.7 min)")
    assert masking_drop(std) == pytest.approx(1.0)
    assert format_per_attack({"aa": None, "extras": {}}) == ""
    apgd = _report("apgd", [("clean", 52.0, 0.1), ("apgd-ce", 30.0, 4.0), ("apgd-t", 29.0, 50.0)])
    assert masking_drop(apgd) is None
    assert RobustnessReport(**{k: v for k, v in std.items()} | {"threat": "t", "seconds": 1.0}).aa_label == "AA"

    def cells(line: str) -> list[str]:
        return [c.strip() for c in line.strip("|").split("|")]

    lines = format_table([("a", std), ("b", apgd), ("c", {**std, "aa": None, "mean": None, "nrr": None})]).splitlines()
    assert cells(lines[0]) == ["model", "Clean", "PGD-20", "AA", "Mean", "NRR", "AA(APGD)", "Mean(APGD)",
                               "NRR(APGD)"]
    def values(cs: list[str]) -> list[str]:  # each cell without its "± standard error"
        return [c.split(" ± ")[0] for c in cs]

    assert values(cells(lines[2])[3:]) == ["27.00", "40.00", "35.00", "-", "-", "-"]
    assert values(cells(lines[3])[3:]) == ["-", "-", "-", "29.00", "40.00", "35.00"]
    assert cells(lines[2])[3] == f"27.00 ± {accuracy_se(27.0, std['n_examples']):.2f}"
    assert cells(lines[4])[3:] == ["-"] * 6
    only_apgd = cells(format_table([("b", apgd)]).splitlines()[0])
    assert only_apgd == ["model", "Clean", "PGD-20", "AA(APGD)", "Mean(APGD)", "NRR(APGD)"]


# --- the overhead benchmark -------------------------------------------------------------------------


def test_overhead_benchmark_tiny(tmp_path: Path) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import autoattack_overhead as bench

    torch.set_num_threads(1)
    out = tmp_path / "overhead.json"
    result = bench.main(["--tiny", "--variants", "direct,rpat", "--out", str(out)])  # exits if results differ
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    assert result["same_results"] and set(result["seconds"]) == {"direct", "rpat"}
    assert all(len(v) == 1 and v[0] > 0 for v in result["seconds"].values())
    assert result["ratio_to_direct"]["direct"]["of_medians"] == 1.0
    assert 0 <= result["setting"]["robust_accuracy"] <= 100
