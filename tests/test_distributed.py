"""Data-parallel training (DDP, gloo on the CPU): two processes on the 8x8 digits.

One short run with two ranks checks: disjoint data shards covering the
training set, identical weights on both ranks afterwards (gradients were
averaged, although the ranks saw different images), metrics that are the sum
over ranks, and a run directory written once, by rank 0.
"""

from __future__ import annotations

import json
import math
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from rpat.data import ArrayDataset
from rpat.data.loader import shard_order
from rpat.distributed import DistContext, context_from_env, per_rank_batch_size
from rpat.errors import InputError

TRAIN_SUBSET = 256  # divisible by the 2 ranks and the global batch 64: 2 steps per rank per epoch


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    import rpat.training.trainer as trainer_mod
    from rpat.config import build_config
    from rpat.distributed import cleanup
    from rpat.training import Trainer

    reductions = []
    real = trainer_mod.all_reduce_sum

    def recording(values, ctx):
        before = {k: float(v) for k, v in values.items()}
        after = real(values, ctx)
        reductions.append({"before": before, "after": {k: float(v) for k, v in after.items()}})
        return after

    trainer_mod.all_reduce_sum = recording
    cfg = build_config("digits_demo", None, [
        {"data": {"train_subset": TRAIN_SUBSET, "batch_size": 64}, "device": "cpu",
         "attack": {"steps": 2}, "rpat": {"enabled": True},
         "optim": {"epochs": 2, "milestones": [1]}, "eval": {"n_examples": 100, "steps": 3}}])
    t = Trainer(cfg, Path(out) / "run", progress=False, log=lambda m: None)
    shards = []
    for epoch in range(2):
        t.loader.set_epoch(epoch)
        shards.append(t.loader.indices().tolist())
    summary = t.fit()
    weights = {k: v.tolist() for k, v in t.model.state_dict().items() if v.is_floating_point() and "running" not in k}
    Path(out, f"rank{rank}.json").write_text(json.dumps({
        "rank": t.dist.rank, "world": t.dist.world_size, "batch": t.loader.batch_size, "shards": shards,
        "steps": len(t.loader), "weights": weights, "reductions": reductions, "summary": summary}))
    cleanup()


@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict]]:
    out = tmp_path_factory.mktemp("ddp")
    mp.spawn(_worker, args=(2, _free_port(), str(out)), nprocs=2, join=True)
    return out, [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


def test_ranks_see_disjoint_shards_of_each_epoch(two_rank_run):
    _, ranks = two_rank_run
    assert [r["rank"] for r in ranks] == [0, 1] and all(r["world"] == 2 for r in ranks)
    assert all(r["batch"] == 32 and r["steps"] == 4 for r in ranks)  # global batch 64 split in two
    for epoch in range(2):
        a, b = (set(r["shards"][epoch]) for r in ranks)
        assert len(a) == len(b) == TRAIN_SUBSET // 2
        assert a.isdisjoint(b)
        assert a | b == set(range(TRAIN_SUBSET))
    assert ranks[0]["shards"][0] != ranks[0]["shards"][1]  # reshuffled each epoch


def test_gradients_are_averaged_so_weights_stay_identical(two_rank_run):
    _, ranks = two_rank_run
    w0, w1 = ranks[0]["weights"], ranks[1]["weights"]
    assert w0.keys() == w1.keys() and len(w0) > 4
    for k in w0:
        assert torch.allclose(torch.tensor(w0[k]), torch.tensor(w1[k]), atol=1e-6), k


def test_metrics_are_summed_over_ranks_and_written_once(two_rank_run):
    out, ranks = two_rank_run
    r0, r1 = (r["reductions"] for r in ranks)
    assert len(r0) == len(r1) == 2  # one all-reduce per epoch
    for a, b in zip(r0, r1, strict=True):
        for k in a["before"]:
            total = a["before"][k] + b["before"][k]
            assert a["after"][k] == pytest.approx(total, rel=1e-6) == b["after"][k]
        assert a["before"]["loss"] != b["before"]["loss"]  # the ranks really saw different data
    lines = (out / "run" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2  # rank 0 only
    for line, red in zip(lines, r0, strict=True):
        m = json.loads(line)
        assert math.isfinite(m["train_loss"]) and math.isfinite(m["train_rpat"])
        assert m["train_loss"] == pytest.approx(red["after"]["loss"] / TRAIN_SUBSET, rel=1e-5)
        assert 0 <= m["held_out_pgd"] <= m["held_out_clean"] <= 100
    assert (out / "run" / "final.pt").is_file() and (out / "run" / "best.pt").is_file()


def test_shard_order_pads_like_distributed_sampler():
    order = torch.tensor([4, 0, 3, 1, 2])
    s0, s1 = shard_order(order, 0, 2), shard_order(order, 1, 2)
    assert s0.tolist() == [4, 3, 2] and s1.tolist() == [0, 1, 4]  # padded with the first index
    assert shard_order(order, 0, 1) is order


def test_context_and_batch_split_validate_input(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("RANK", raising=False)
    assert context_from_env() == DistContext(0, 1, 0)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "2")
    with pytest.raises(InputError, match="RANK=2"):
        context_from_env()
    with pytest.raises(InputError, match="divisible"):
        per_rank_batch_size(65, DistContext(0, 2, 0))
    ds = ArrayDataset(torch.zeros(4, 1, 2, 2, dtype=torch.uint8), torch.zeros(4, dtype=torch.long), ["a"])
    from rpat.data import DeviceLoader

    with pytest.raises(InputError, match="rank"):
        DeviceLoader(ds, 2, rank=2, world_size=2)
