"""``rpat sweep --launcher slurm|local``: a sweep as one submitit job array, one task per run.

Each array task runs :func:`rpat.experiments.sweep.train_and_evaluate` on its run (train or resume,
then evaluate best.pt and final.pt), exactly as the local sweep does; the table
(``results.md``/``results.csv``) is written by :func:`collect`, i.e. ``rpat sweep ... --collect`` or the
same command again once the jobs are done. ``--launcher local`` runs the same tasks through submitit's
LocalExecutor (real subprocesses, no cluster), ``max_parallel`` at a time, and waits for them.

Preemption and time limits: SLURM sends SIGUSR2 ``signal_delay_s`` before the time limit (and on
preemption, SIGTERM). While a task trains, both are *save signals* of its trainer: it saves ``last.pt``
after the current step (mid-epoch; :mod:`rpat.training.preemption`) and the task is requeued through
submitit (``checkpoint()`` returns the same task); the requeued task resumes from there bit for bit.
Outside training (data loading, evaluation) submitit requeues at once; an interrupted AutoAttack
continues from its state file. A run longer than the time limit thus chains itself over jobs
(``max_requeue`` times at most).

submitit is an optional dependency (``pip install 'rpat[slurm]'``), imported only here and only when used.
"""

from __future__ import annotations

import json
import math
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import InputError
from ..training import Trainer
from ..training.signals import TrainingPreempted
from .sweep import SweepRun, collect_runs, is_finished, train_and_evaluate, write_tables

LAUNCHERS = ("slurm", "local")
SUBMITIT_DIR = "_submitit"  #: under the sweep directory: submitit's pickles and logs, jobs.json
_PARTITION = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]*(,[A-Za-z0-9][A-Za-z0-9_.\-]*)*")
_SLURM_TIME = re.compile(r"(?:(?P<d>\d+)-)?(?P<a>\d+)(?::(?P<b>\d+))?(?::(?P<c>\d+))?")


def _submitit() -> Any:
    try:
        import submitit
    except ImportError:
        raise InputError("--launcher slurm/local needs submitit: pip install 'rpat[slurm]'") from None
    return submitit


# ---- the parameters, checked before anything is submitted --------------------------------------------
def parse_slurm_time(text: str | int) -> int:
    """SLURM's ``--time`` in whole minutes (rounded up): ``"90"``, ``"1:30:00"``, ``"2-00:00:00"``,
    ``"1-12"``, ``"45:30"`` (minutes:seconds), as sbatch reads them."""
    m = _SLURM_TIME.fullmatch(str(text).strip())
    if m is None:
        raise InputError(f"--slurm-time must be minutes (90) or [D-]HH:MM:SS (1:30:00, 2-00:00:00), got {text!r}")
    d, a, b, c = (int(v) if v is not None else None for v in m.group("d", "a", "b", "c"))
    if d is None:  # M, M:S, H:M:S
        seconds = a * 60 if b is None else (a * 60 + b if c is None else a * 3600 + b * 60 + c)
    else:  # D-H, D-H:M, D-H:M:S
        seconds = d * 86400 + a * 3600 + (b or 0) * 60 + (c or 0)
    if seconds <= 0:
        raise InputError(f"--slurm-time must be positive, got {text!r}")
    return math.ceil(seconds / 60)


def check_partition(partition: str | None, known: list[str] | None = None) -> str | None:
    """The partition name(s) (``gpu`` or ``gpu,gpu-long``), checked: a SLURM name, and one that ``sinfo``
    lists when ``known`` (the cluster's partitions) is given."""
    if partition is None:
        return None
    if not _PARTITION.fullmatch(partition):
        raise InputError(f"--slurm-partition must be a SLURM partition name such as gpu (or gpu,gpu-long), "
                         f"got {partition!r}")
    if known is not None:
        bad = [p for p in partition.split(",") if p not in known]
        if bad:
            raise InputError(f"--slurm-partition {bad[0]!r} is not a partition of this cluster; sinfo lists: "
                             f"{', '.join(known)}")
    return partition


def cluster_partitions() -> list[str] | None:
    """The partitions ``sinfo`` lists (default one unstarred), or None without ``sinfo`` on this machine."""
    if shutil.which("sinfo") is None:
        return None
    out = subprocess.run(["sinfo", "-h", "-o", "%P"], capture_output=True, text=True, timeout=60)
    return sorted({p.strip().rstrip("*") for p in out.stdout.split() if p.strip()}) if out.returncode == 0 else None


def parse_slurm_args(items: list[str]) -> dict[str, str]:
    """``--slurm-arg key=value`` (repeatable) -> ``{key: value}``; keys as sbatch spells them (mem, account,
    qos, constraint, cpus-per-task, ...). ``key`` alone (``exclusive``) is a flag."""
    out: dict[str, str] = {}
    for item in items:
        key, eq, value = item.partition("=")
        key = key.strip().lstrip("-")
        if not re.fullmatch(r"[a-z][a-z0-9_\-]*", key) or (eq and not value):
            raise InputError(f"--slurm-arg must be key=value with an sbatch option as key (mem=64G, "
                             f"account=proj, cpus-per-task=8), got {item!r}")
        out[key] = value if eq else "true"
    return out


@dataclass
class ClusterPlan:
    """How a sweep goes to the cluster: what each job asks for (minutes, GPUs/processes per node, nodes)."""

    launcher: str = "slurm"
    partition: str | None = None
    time_min: int = 60
    gpus_per_run: int = 1  #: GPUs (one DDP process each) per node of one run; 0: one CPU process
    nodes: int = 1
    max_parallel: int | None = None  #: runs at once (the array's %K); None: all
    slurm_args: dict[str, str] = field(default_factory=dict)
    signal_delay_s: int = 120  #: SIGUSR2 this long before the time limit
    max_requeue: int = 100  #: time-limit requeues per run at most (preemptions do not count)

    def check(self) -> ClusterPlan:
        if self.launcher not in LAUNCHERS:
            raise InputError(f"--launcher must be one of {', '.join(LAUNCHERS)}, got {self.launcher!r}")
        for name, v, low in (("--gpus-per-run", self.gpus_per_run, 0), ("--nodes", self.nodes, 1),
                             ("--max-parallel", self.max_parallel or 1, 1)):
            if v < low:
                raise InputError(f"{name} must be >= {low}, got {v}")
        if self.launcher == "local" and self.nodes > 1:
            raise InputError("--launcher local runs on this machine: --nodes must be 1")
        if self.nodes > 1 and self.gpus_per_run == 0:
            raise InputError("--nodes > 1 needs --gpus-per-run >= 1 (one DDP process per GPU)")
        check_partition(self.partition)
        if self.signal_delay_s >= self.time_min * 60:
            raise InputError(f"--slurm-time {self.time_min} min leaves no time before the {self.signal_delay_s} s "
                             "warning signal; ask for more minutes")
        return self

    @property
    def tasks_per_node(self) -> int:
        return max(1, self.gpus_per_run)

    def sbatch_parameters(self, n_runs: int) -> dict[str, Any]:
        """submitit's SlurmExecutor parameters (sbatch options; ``--slurm-arg`` ones last, they win)."""
        p: dict[str, Any] = {"job_name": "rpat-sweep", "time": self.time_min, "nodes": self.nodes,
                             "ntasks_per_node": self.tasks_per_node, "signal_delay_s": self.signal_delay_s,
                             "array_parallelism": min(self.max_parallel or n_runs, n_runs)}
        if self.partition:
            p["partition"] = self.partition
        if self.gpus_per_run:
            p["gpus_per_node"] = self.gpus_per_run
        if self.slurm_args:
            p["additional_parameters"] = dict(self.slurm_args)
        return p


# ---- one array task ----------------------------------------------------------------------------------
def _task_environment(env: Any) -> None:
    """DDP across the job's tasks: SLURM's variables (``RPAT_DIST=slurm``, :func:`rpat.distributed.context_from_env`),
    or for the local executor torchrun's, from submitit's JobEnvironment."""
    if env.num_tasks <= 1:
        return
    if env.cluster == "slurm":
        os.environ["RPAT_DIST"] = "slurm"
        return
    port = 20000 + int(re.sub(r"\D", "", str(env.job_id)) or 0) % 20000
    os.environ.update(RANK=str(env.global_rank), WORLD_SIZE=str(env.num_tasks), LOCAL_RANK=str(env.local_rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))


class SweepTask:
    """One run of the array: ``task(run, out, **evaluation settings)`` trains and evaluates it.

    Checkpointable the submitit way (``checkpoint()`` returns a DelayedSubmission of itself with the same
    arguments): on SIGUSR2/SIGTERM during training the trainer saves at the next safe point, then submitit's
    handler requeues; the requeued task resumes from last.pt (or skips what is finished)."""

    def __call__(self, run: SweepRun, out: str, n_examples: int | None, autoattack: bool | str,
                 device: str | None, extra_evals: str | None = None) -> dict[str, str]:
        submitit = _submitit()
        env = submitit.JobEnvironment()
        _task_environment(env)
        usr = env._usr_sig()  # SIGUSR2 unless SUBMITIT_PREEMPT_SIGNAL says otherwise
        requeue = signal.getsignal(usr)  # submitit's checkpoint-and-requeue handler, installed before the call

        def save_signals(trainer: Trainer) -> None:
            trainer.signals.save_on(usr, signal.SIGTERM)

        try:
            did = train_and_evaluate(run, Path(out), n_examples=n_examples, autoattack=autoattack, device=device,
                                     progress=False, log=lambda m: print(m, flush=True), extra_evals=extra_evals,
                                     trainer_setup=save_signals)
        except TrainingPreempted as e:
            print(f"[{run.name}] {e}; requeueing", flush=True)
            if not callable(requeue):
                raise
            requeue(e.signum, None)  # rank 0: checkpoint() + requeue + exit; other ranks return here
            sys.exit(0)
        return {"run": run.name, "did": did}

    def checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        """The same task with the same arguments, for the requeued job."""
        return _submitit().helpers.DelayedSubmission(self, *args, **kwargs)


# ---- the sweep ----------------------------------------------------------------------------------------
def _jobs_file(out: Path) -> Path:
    return out / SUBMITIT_DIR / "jobs.json"


def submitit_command(folder: Path) -> str:
    """The command each task runs (what submitit's executors put in the script)."""
    return " ".join([shlex.quote(sys.executable), "-u -m submitit.core._submit", shlex.quote(str(folder))])


def sbatch_script(plan: ClusterPlan, out: Path, n_runs: int) -> str:
    """The sbatch script submitit submits for this array (submitit renders it; nothing is submitted)."""
    from_submitit = _submitit().slurm.slurm._make_sbatch_string  # the very function SlurmExecutor uses
    folder = (out / SUBMITIT_DIR / "%j").resolve()
    return from_submitit(command=submitit_command(folder), folder=folder, map_count=n_runs,
                         **plan.sbatch_parameters(n_runs))


def task_list(runs: list[SweepRun], out: Path, plan: ClusterPlan) -> str:
    """One line per array task: index, run name, what it trains, where."""
    per = plan.tasks_per_node * plan.nodes
    head = f"{len(runs)} array task(s), {per} process(es) each ({plan.nodes} node(s) x {plan.tasks_per_node}):"
    return "\n".join([head, *(f"  [{i}] {r.name}: {r.cfg.describe()} -> {out / r.name}" for i, r in enumerate(runs))])


def _executor(plan: ClusterPlan, out: Path, n_runs: int) -> Any:
    submitit = _submitit()
    folder = out / SUBMITIT_DIR / "%j"
    if plan.launcher == "local":
        ex = submitit.LocalExecutor(folder=folder, max_num_timeout=plan.max_requeue)
        ex.update_parameters(timeout_min=plan.time_min, tasks_per_node=plan.tasks_per_node,
                             gpus_per_node=plan.gpus_per_run, signal_delay_s=plan.signal_delay_s)
        return ex
    try:
        ex = submitit.SlurmExecutor(folder=folder, max_num_timeout=plan.max_requeue)
    except RuntimeError as e:  # no srun on this machine
        raise InputError(f"--launcher slurm: {e}; run it on the cluster's login node, or see the script with "
                         "--dry-run, or use --launcher local") from None
    ex.update_parameters(**plan.sbatch_parameters(n_runs))
    return ex


def _in_flight(out: Path, launcher: str) -> set[str]:
    """Runs whose recorded SLURM job is still pending or running (not submitted again)."""
    path = _jobs_file(out)
    if launcher != "slurm" or not path.is_file():
        return set()
    submitit = _submitit()
    busy = set()
    for name, job_id in json.loads(path.read_text()).items():
        job = submitit.SlurmJob(folder=out / SUBMITIT_DIR / "%j", job_id=job_id)
        if job.state in ("PENDING", "RUNNING", "REQUEUED", "CONFIGURING", "COMPLETING", "SUSPENDED"):
            busy.add(name)
    return busy


def submit_sweep(
    specs: list[str],
    out: str | Path,
    plan: ClusterPlan,
    *,
    overrides: list[str] | None = None,
    n_examples: int | None = 1000,
    autoattack: bool | str = True,
    extra_evals: str | None = None,
    device: str | None = None,
    only: list[str] | None = None,
    dry_run: bool = False,
    collect_only: bool = False,
    log: Callable[[str], None] = print,
) -> list[dict[str, Any]] | None:
    """Submit the sweep's unfinished runs as one job array (or, ``dry_run``, print the sbatch script and the
    task list; or, ``collect_only``, only write the table). Returns the table rows when it wrote the table:
    with ``collect_only``, when every run is finished, and after a ``local`` launch (which waits)."""
    plan.check()
    if plan.launcher == "slurm" and not dry_run and not collect_only:
        if shutil.which("sbatch") is None or shutil.which("srun") is None:
            raise InputError("--launcher slurm needs SLURM's sbatch and srun on this machine: run it on the cluster's "
                             "login node (see the script with --dry-run), or use --launcher local")
        check_partition(plan.partition, cluster_partitions())
    out = Path(out)
    runs = collect_runs(specs, overrides)
    if only:
        missing = sorted(set(only) - {r.name for r in runs})
        if missing:
            raise InputError(f"--only names a run that is not in the sweep: {missing[0]!r}")
    todo = [r for r in runs if (not only or r.name in only) and not is_finished(out / r.name, n_examples,
                                                                               autoattack, extra_evals)]
    if collect_only or not todo:
        if todo:
            log(f"{len(todo)} run(s) not finished yet: {', '.join(r.name for r in todo)}; the table lists what is done")
        return write_tables(runs, out)
    if dry_run:
        log(sbatch_script(plan, out, len(todo)) if plan.launcher == "slurm" else
            f"--launcher local: {len(todo)} submitit LocalExecutor job(s), {plan.max_parallel or len(todo)} at a time")
        log(task_list(todo, out, plan))
        return None
    busy = _in_flight(out, plan.launcher)
    if busy:
        log(f"still queued or running, not submitted again: {', '.join(sorted(busy))}")
        todo = [r for r in todo if r.name not in busy]
        if not todo:
            return None
    out.mkdir(parents=True, exist_ok=True)
    args = (str(out), n_examples, autoattack, device, extra_evals)
    if plan.launcher == "slurm":
        ex = _executor(plan, out, len(todo))
        jobs = ex.map_array(SweepTask(), todo, *([a] * len(todo) for a in args))
        record = json.loads(_jobs_file(out).read_text()) if _jobs_file(out).is_file() else {}
        record.update({r.name: j.job_id for r, j in zip(todo, jobs, strict=True)})
        _jobs_file(out).write_text(json.dumps(record, indent=1) + "\n")
        log(f"submitted array {jobs[0].job_id.split('_')[0]}: {len(jobs)} task(s) "
            f"({plan.tasks_per_node * plan.nodes} process(es) each), logs in {out / SUBMITIT_DIR}")
        log(f"when they are done: the same command again, or with --collect, writes {out / 'results.md'}")
        return None
    step = plan.max_parallel or len(todo)
    failed = []
    for k in range(0, len(todo), step):  # the local executor starts every job at once: K at a time
        group = todo[k:k + step]
        ex = _executor(plan, out, len(group))
        jobs = ex.map_array(SweepTask(), group, *([a] * len(group) for a in args))
        log(f"local jobs {', '.join(j.job_id for j in jobs)}: {', '.join(r.name for r in group)}")
        for r, j in zip(group, jobs, strict=True):
            try:
                log(f"[{r.name}] {j.result()['did']} (job {j.job_id})")
            except Exception:  # noqa: BLE001 - submitit re-raises the task's error with its traceback
                failed.append((r.name, j))
    if failed:
        name, job = failed[0]
        raise InputError(f"run {name} failed in job {job.job_id}; see {job.paths.stderr}")
    return write_tables(runs, out)
