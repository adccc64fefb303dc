"""Cluster runs: SLURM through submitit (``rpat sweep --launcher slurm|local``), preemption-safe requeue with
mid-epoch saves, and DDP ranks from SLURM's variables. The submitit tests run real subprocesses through
submitit's LocalExecutor (no cluster needed)."""

from __future__ import annotations

import json
import os
import signal

import pytest
import torch

from rpat.checkpoint import load_checkpoint
from rpat.config import build_config
from rpat.data import ArrayDataset
from rpat.distributed import context_from_env, first_slurm_host, slurm_master_addr, slurm_master_port
from rpat.errors import InputError
from rpat.training import RunData, Trainer
from rpat.training.signals import TrainingPreempted

WALL = {"train_seconds", "train_images_per_s"}  # wall-clock numbers differ between any two runs


def _data(n_train: int = 96, n_test: int = 32) -> RunData:
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 4, (n_train + n_test,), generator=g)
    images = (torch.rand(n_train + n_test, 1, 8, 8, generator=g) * 120 + labels.view(-1, 1, 1, 1) * 40)
    images = images.clamp(0, 255).to(torch.uint8)
    classes = ["a", "b", "c", "d"]
    return RunData(ArrayDataset(images[:n_train], labels[:n_train], classes),
                   ArrayDataset(images[n_train:], labels[n_train:], classes), 4, 1, 1, False, None, None)


def _cfg(**extra):
    o = [{"data": {"dataset": "digits", "batch_size": 16, "augment": True}, "model": {"arch": "small_cnn"},
          "attack": {"eps": "16/255", "step_size": "8/255", "steps": 2},
          "optim": {"epochs": 2, "lr": 0.05, "milestones": [1]}, "log_interval": 4,
          "eval": {"n_examples": 32, "steps": 2}, "device": "cpu"}, *[{k: v} for k, v in extra.items()]]
    return build_config(None, None, o)


def _rows(run) -> list[dict]:
    return [{k: v for k, v in json.loads(x).items() if k not in WALL}
            for x in (run / "metrics.jsonl").read_text().splitlines()]


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def assert_same_run(a, b) -> None:
    """final.pt, best.pt and last.pt tensors (model, momentum, averaged model) and metrics.jsonl bit-equal."""
    for name in ("final.pt", "best.pt", "last.pt"):
        ca, cb = load_checkpoint(a / name), load_checkpoint(b / name)
        assert ca["epoch"] == cb["epoch"] and _same(ca["model"], cb["model"]), name
    la, lb = load_checkpoint(a / "last.pt"), load_checkpoint(b / "last.pt")
    assert la["best"] == lb["best"] and "mid_epoch" not in lb
    for pa, pb in zip(la["optimizer"]["state"].values(), lb["optimizer"]["state"].values(), strict=True):
        assert torch.equal(pa["momentum_buffer"], pb["momentum_buffer"])
    if "averaged" in la:
        assert _same(la["averaged"], lb["averaged"])
    assert _rows(a) == _rows(b)


# ---- a mid-epoch save and its resume, in one process -----------------------------------------------
@pytest.mark.parametrize("extra", [
    {"rpat": {"enabled": True}},
    {"averaging": {"enabled": True, "decay": 0.5}, "nonfinite": "skip", "method": {"name": "trades"}},
])
def test_mid_epoch_save_and_resume_equal_an_uninterrupted_run(extra, tmp_path, monkeypatch):
    cfg = _cfg(**extra)
    quiet = {"data": _data(), "progress": False, "log": lambda m: None}
    Trainer(cfg, tmp_path / "a", **quiet).fit()

    b = tmp_path / "b"
    t = Trainer(cfg, b, **quiet)
    t.signals.save_on(signal.SIGUSR2, signal.SIGTERM)
    real_step, calls = t.objective.step, {"n": 0}

    def step(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 9:  # SLURM's signal arrives during step 3 of epoch 2 (6 steps per epoch)
            os.kill(os.getpid(), signal.SIGUSR2)
        return real_step(*args, **kwargs)

    monkeypatch.setattr(t.objective, "step", step)
    with pytest.raises(TrainingPreempted) as e:
        t.fit()
    assert "stopped by SIGUSR2 after step 3/6 of epoch 2/2 (mid-epoch" in str(e.value)
    monkeypatch.undo()
    ck = load_checkpoint(b / "last.pt")  # loads with weights_only=True
    mid = ck["mid_epoch"]
    assert (ck["epoch"], mid["epoch"], mid["step"], mid["n_steps"], mid["seen"], mid["world_size"]) == (1, 1, 3, 6,
                                                                                                        48, 1)
    assert set(mid["ranks"][0]) >= {"attack_rng", "cpu_rng", "sums", "keys", "n_good", "guard"}
    assert [r["epoch"] for r in _rows(b)] == [0]  # epoch 2 has no row yet

    lines: list[str] = []
    resumed = Trainer(cfg, b, resume=True, data=_data(), progress=False, log=lines.append)
    assert resumed.start_epoch == 1 and "at epoch 2/2 step 4/6" in lines[0]
    resumed.fit()
    assert_same_run(tmp_path / "a", b)


def test_a_save_signal_at_an_epoch_end_stops_there_and_resume_is_exact(tmp_path, monkeypatch):
    cfg = _cfg(optim={"epochs": 3, "milestones": [2]})
    quiet = {"data": _data(), "progress": False, "log": lambda m: None}
    Trainer(cfg, tmp_path / "a", **quiet).fit()
    b = tmp_path / "b"
    t = Trainer(cfg, b, **quiet)
    t.signals.save_on(signal.SIGUSR2)
    real_eval = t.evaluate_held_out

    def evaluate(*args, **kwargs):  # the signal comes during epoch 1's held-out evaluation
        if not t.signals.save_requested and t._epoch == 0:
            os.kill(os.getpid(), signal.SIGUSR2)
        return real_eval(*args, **kwargs)

    monkeypatch.setattr(t, "evaluate_held_out", evaluate)
    with pytest.raises(TrainingPreempted, match="at the end of epoch 1/3"):
        t.fit()
    monkeypatch.undo()
    ck = load_checkpoint(b / "last.pt")
    assert ck["epoch"] == 1 and "mid_epoch" not in ck and "held_out_pending" not in ck
    Trainer(cfg, b, resume=True, **quiet).fit()
    assert_same_run(tmp_path / "a", b)


def test_mid_epoch_resume_refuses_another_world_size():
    from rpat.distributed import DistContext
    from rpat.training.preemption import check_resumable

    mid = {"epoch": 1, "step": 3, "n_steps": 6, "world_size": 2, "ranks": [{}, {}]}
    with pytest.raises(InputError, match="saved mid-epoch by 2 processes; resume it with 2"):
        check_resumable(mid, 1, 6, DistContext(0, 4, 0))
    with pytest.raises(InputError, match="was data.* changed"):
        check_resumable(mid, 1, 7, DistContext(0, 2, 0))
    assert check_resumable(mid, 1, 6, DistContext(1, 2, 1)) is mid["ranks"][1]


# ---- DDP ranks from SLURM's variables ----------------------------------------------------------------
def test_slurm_variables_give_rank_world_local_rank_and_master():
    env = {"RPAT_DIST": "slurm", "SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1",
           "SLURM_JOB_NODELIST": "gpu[07-08,12]", "SLURM_JOB_ID": "123456"}
    ctx = context_from_env(env)
    assert (ctx.rank, ctx.world_size, ctx.local_rank, ctx.active, ctx.is_main) == (5, 8, 1, True, False)
    assert slurm_master_addr(env) == "gpu07" and slurm_master_port(env) == 20000 + 123456 % 20000
    # without the opt-in SLURM's variables are ignored (a batch script with --ntasks 4 running one process)
    plain = {k: v for k, v in env.items() if k != "RPAT_DIST"}
    assert context_from_env(plain).world_size == 1
    # torchrun's variables win
    assert context_from_env({**env, "WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1"}).world_size == 2
    assert [first_slurm_host(n) for n in ("node3", "n[1-3],m2", "a-[09,11]-ib", "x1,x2")] == [
        "node3", "n1", "a-09-ib", "x1"]
    with pytest.raises(InputError, match="bad SLURM environment"):
        context_from_env({**env, "SLURM_PROCID": "8"})
    with pytest.raises(InputError, match="SLURM_JOB_NODELIST is not set"):
        slurm_master_addr({"RPAT_DIST": "slurm"})


# ---- rpat sweep --launcher: parameters, --dry-run ----------------------------------------------------
def _listing(tmp_path, *overrides: str):
    listing = tmp_path / "two.yaml"
    listing.write_text(
        "runs:\n  - {name: a, preset: bench/cifar10/resnet18/linf/pgd_at/base}\n"
        "  - {name: b, preset: bench/cifar10/resnet18/linf/trades/rpat}\n"
        "overrides: [data.dataset=digits, model.arch=small_cnn, data.train_subset=64, data.batch_size=32,\n"
        "  attack.steps=1, optim.epochs=1, eval.n_examples=10, eval.steps=1, device=cpu, seed=1"
        + "".join(f", {o}" for o in overrides) + "]\n")
    return listing


def test_slurm_time_strings():
    from rpat.experiments.slurm import parse_slurm_time

    assert [parse_slurm_time(t) for t in ("90", "45:30", "1:30:00", "2-00:00:00", "1-12", "0-0:30", " 5 ")] == [
        90, 46, 90, 2880, 2160, 30, 5]
    for bad in ("", "1h", "1:2:3:4", "-5", "0", "1.5"):
        with pytest.raises(InputError, match="--slurm-time must be"):
            parse_slurm_time(bad)


@pytest.mark.parametrize("args, msg", [
    (["--slurm-partition", "gpu;rm -rf"], "--slurm-partition must be a SLURM partition name"),
    (["--slurm-partition", ""], "--slurm-partition must be a SLURM partition name"),
    (["--slurm-time", "1h30"], "--slurm-time must be minutes (90) or [D-]HH:MM:SS"),
    (["--slurm-time", "2"], "leaves no time before the 120 s warning signal"),
    (["--slurm-arg", "mem"], None),  # a flag: fine (reaches the next check: the missing srun)
    (["--slurm-arg", "=64G"], "--slurm-arg must be key=value"),
    (["--nodes", "0"], "--nodes must be >= 1"),
])
def test_bad_cluster_parameters_are_one_clear_error_before_anything_is_submitted(args, msg, tmp_path, capsys):
    from rpat.cli import main

    out = tmp_path / "sweep"
    rc = main(["sweep", str(_listing(tmp_path)), "--out", str(out), "--launcher", "slurm", *args])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1, err
    assert (msg or "--launcher slurm needs SLURM's sbatch and srun on this machine") in err
    assert not out.exists()  # nothing written, nothing submitted


def test_a_partition_sinfo_does_not_list_is_refused():
    from rpat.experiments.slurm import check_partition

    assert check_partition("gpu,long", ["cpu", "gpu", "long"]) == "gpu,long"
    with pytest.raises(InputError, match="'gpus' is not a partition of this cluster; sinfo lists: cpu, gpu"):
        check_partition("gpus", ["cpu", "gpu"])


def test_dry_run_prints_the_sbatch_script_and_the_task_list(tmp_path, capsys):
    from rpat.cli import main

    out = tmp_path / "sweep"
    assert main(["sweep", str(_listing(tmp_path)), "--out", str(out), "--launcher", "slurm", "--slurm-partition",
                 "gpu", "--slurm-time", "1:30:00", "--gpus-per-run", "4", "--nodes", "2", "--max-parallel", "1",
                 "--slurm-arg", "mem=64G", "--slurm-arg", "account=proj", "--dry-run"]) == 0
    text = capsys.readouterr().out
    lines = text.splitlines()
    assert lines[0] == "#!/bin/bash"
    for flag in ("--partition=gpu", "--time=90", "--array=0-1%1", "--gpus-per-node=4", "--ntasks-per-node=4",
                 "--nodes=2", "--signal=USR2@120", "--mem=64G", "--account=proj", "--open-mode=append"):
        assert f"#SBATCH {flag}" in lines, flag
    assert any(ln.startswith("srun --unbuffered") and "-m submitit.core._submit" in ln for ln in lines)
    assert "2 array task(s), 8 process(es) each (2 node(s) x 4):" in lines
    assert any(ln.startswith("  [0] a: PGD-AT | small_cnn on digits") for ln in lines)
    assert any(ln.startswith("  [1] b: TRADES + RPAT | small_cnn on digits") for ln in lines)
    assert not out.exists()


# ---- through submitit's LocalExecutor: real subprocesses ---------------------------------------------
def _same_final(a, b) -> None:
    for name in ("a", "b"):
        assert _same(load_checkpoint(a / name / "final.pt")["model"], load_checkpoint(b / name / "final.pt")["model"])


@pytest.mark.slow
def test_local_launcher_gives_the_results_of_the_plain_sweep(tmp_path, monkeypatch, capsys):
    pytest.importorskip("sklearn")
    pytest.importorskip("submitit")
    from rpat.cli import main
    from rpat.experiments.sweep import run_sweep

    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the job processes: one thread, as this one below
    listing = _listing(tmp_path)
    sub, plain = tmp_path / "sub", tmp_path / "plain"
    assert main(["sweep", str(listing), "--out", str(sub), "--launcher", "local", "--gpus-per-run", "0",
                 "--slurm-time", "10", "--n-examples", "10", "--no-autoattack"]) == 0
    said = capsys.readouterr().out
    assert "[a] trained (job " in said and "[b] trained (job " in said
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run_sweep([str(listing)], plain, n_examples=10, autoattack=False, progress=False, log=lambda m: None)
    finally:
        torch.set_num_threads(threads)
    assert (sub / "results.md").read_text() == (plain / "results.md").read_text()
    assert (sub / "results.csv").read_text() == (plain / "results.csv").read_text()
    _same_final(sub, plain)
    # the same command again: nothing to submit, the table is written again
    assert main(["sweep", str(listing), "--out", str(sub), "--launcher", "local", "--gpus-per-run", "0",
                 "--n-examples", "10", "--no-autoattack"]) == 0
    assert "local jobs" not in capsys.readouterr().out
    md = (sub / "results.md").read_text()
    (sub / "results.md").unlink()
    assert main(["sweep", str(listing), "--out", str(sub), "--collect", "--n-examples", "10", "--no-autoattack"]) == 0
    assert (sub / "results.md").read_text() == md and md in capsys.readouterr().out


def _task_pids(folder) -> list[int]:
    """The submitit task processes (``python -m submitit.core._submit <folder>``) of one sweep."""
    pids = []
    for proc in os.listdir("/proc"):
        if proc.isdigit():
            try:
                cmd = open(f"/proc/{proc}/cmdline", "rb").read().split(b"\0")
            except OSError:
                continue
            if b"submitit.core._submit" in cmd and any(str(folder).encode() in c for c in cmd):
                pids.append(int(proc))
    return pids


@pytest.mark.slow
def test_a_preempted_local_job_requeues_and_ends_bit_identical(tmp_path, monkeypatch):
    """SIGUSR2 (SLURM's warning signal) to the running task: it saves mid-epoch, submitit requeues it (local
    executor: a new process), the new process resumes; final.pt, last.pt and metrics.jsonl equal a run never
    stopped."""
    pytest.importorskip("sklearn")
    pytest.importorskip("submitit")
    import threading
    import time

    from rpat.experiments.slurm import ClusterPlan, submit_sweep
    from rpat.experiments.sweep import run_sweep

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    listing = tmp_path / "one.yaml"
    listing.write_text(
        "runs:\n  - {name: a, preset: bench/cifar10/resnet18/linf/pgd_at/rpat}\n"
        "overrides: [data.dataset=digits, model.arch=small_cnn, data.train_subset=256, data.batch_size=16,\n"
        "  attack.steps=4, optim.epochs=2, 'optim.milestones=[1]', eval.n_examples=16, eval.steps=2, device=cpu,"
        " seed=2]\n")
    sub, plain = tmp_path / "sub", tmp_path / "plain"
    sent: list[int] = []

    def preempt() -> None:  # once training has started (last.pt exists), signal the task process
        deadline = time.time() + 300
        while time.time() < deadline and not sent:
            if (sub / "a" / "last.pt").is_file():
                for pid in _task_pids(sub):
                    os.kill(pid, signal.SIGUSR2)
                    sent.append(pid)
            time.sleep(0.05)

    watcher = threading.Thread(target=preempt, daemon=True)
    watcher.start()
    logs: list[str] = []
    submit_sweep([str(listing)], sub, ClusterPlan(launcher="local", gpus_per_run=0, time_min=20), n_examples=16,
                 autoattack=False, log=logs.append)
    watcher.join()
    assert len(sent) == 1
    out = "".join(p.read_text() for p in sorted((sub / "_submitit").rglob("*_log.*")))
    assert "stopped by SIGUSR2" in out and "requeueing" in out and "Requeued job" in out, out
    assert "mid-epoch" in out and "[a] resuming" in out  # the requeued process continued from last.pt
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run_sweep([str(listing)], plain, n_examples=16, autoattack=False, progress=False, log=lambda m: None)
    finally:
        torch.set_num_threads(threads)
    assert_same_run(plain / "a", sub / "a")
    assert (sub / "results.md").read_text() == (plain / "results.md").read_text()


# ---- two DDP ranks set up from SLURM's variables, stopped mid-epoch, resumed exactly -----------------
def _slurm_ddp_worker(rank: int, world: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR"):
        os.environ.pop(k, None)
    os.environ.update(RPAT_DIST="slurm", SLURM_PROCID=str(rank), SLURM_NTASKS=str(world), SLURM_LOCALID=str(rank),
                      SLURM_JOB_NODELIST="127.0.0.1", SLURM_JOB_ID="77", MASTER_PORT=str(port))
    from pathlib import Path

    from rpat.distributed import cleanup

    cfg = _cfg(rpat={"enabled": True}, log_interval=2)
    quiet = {"data": _data(), "progress": False, "log": lambda m: None}
    t = Trainer(cfg, Path(out) / "a", **quiet)
    assert (t.dist.rank, t.dist.world_size, os.environ["MASTER_ADDR"]) == (rank, 2, "127.0.0.1")
    t.fit()
    t = Trainer(cfg, Path(out) / "b", **quiet)
    t.signals.save_on(signal.SIGUSR2)
    real_step, calls = t.objective.step, {"n": 0}

    def step(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 8 and rank == 0:  # the signal reaches rank 0 only, in epoch 2's second step
            os.kill(os.getpid(), signal.SIGUSR2)
        return real_step(*args, **kwargs)

    t.objective.step = step
    try:
        t.fit()
        raise AssertionError("not preempted")
    except TrainingPreempted as e:
        Path(out, f"stopped{rank}.txt").write_text(str(e))
    Trainer(cfg, Path(out) / "b", resume=True, **quiet).fit()
    # the array task's path (rpat.experiments.slurm.SweepTask): train and evaluate one run, both ranks
    from rpat.experiments.sweep import SweepRun, train_and_evaluate

    small = build_config(None, None, [cfg.to_dict(), {"data": {"train_subset": 64}}])
    did = train_and_evaluate(SweepRun("c", small), Path(out), n_examples=16, autoattack=False, progress=False,
                             log=lambda m: None)
    Path(out, f"did{rank}.txt").write_text(did)
    cleanup()


@pytest.mark.slow
def test_ddp_from_slurm_variables_stops_mid_epoch_on_every_rank_and_resumes_exactly(tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_slurm_ddp_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    for r in range(2):  # both ranks agreed on the step (6 steps per rank and epoch; the log interval is 2)
        assert "after step 2/6 of epoch 2/2 (mid-epoch" in (tmp_path / f"stopped{r}.txt").read_text()
    assert_same_run(tmp_path / "a", tmp_path / "b")
    assert [(tmp_path / f"did{r}.txt").read_text() for r in range(2)] == ["trained", "trained"]
    best, final = (json.loads((tmp_path / "c" / f"eval_{w}.json").read_text()) for w in ("best", "final"))
    assert best["n_examples"] == final["n_examples"] == 16 and 0 <= final["pgd"] <= final["clean"] <= 100
