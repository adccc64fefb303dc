"""The process group: data-parallel training (``torchrun``, DistributedDataParallel) and split evaluation.

Launch the ordinary ``rpat train`` command under ``torchrun``; the trainer
notices the environment variables torchrun sets and switches to data
parallelism::

    torchrun --nproc-per-node 4 -m rpat train --preset cifar10_benchmark --rpat \\
        --run-dir runs/pgd_at_rpat_ddp

What changes with ``W`` processes:

- the process group is initialized from ``RANK``, ``WORLD_SIZE``,
  ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` (NCCL on GPUs, gloo on
  the CPU); on GPUs each process uses ``cuda:LOCAL_RANK``; with ``RPAT_DIST=slurm``
  (and no ``WORLD_SIZE``) from SLURM's ``SLURM_PROCID``/``SLURM_NTASKS``/``SLURM_LOCALID``,
  the master being the first host of ``SLURM_JOB_NODELIST`` (docs/cluster.md);
- ``data.batch_size`` stays the *global* batch: each rank takes
  ``batch_size / W`` images per step (it must divide), from its own shard of
  each epoch's permutation (``rpat.data.loader.shard_order``), so the ranks see
  different images and the optimization matches a single-process run with the
  same global batch (up to BatchNorm statistics, which are per rank unless
  ``speed.sync_bn=true``);
- the model is wrapped in ``DistributedDataParallel`` for the training loss
  (gradients are averaged across ranks during the backward pass); the attack
  runs through the same wrapper, and since it takes gradients with respect to
  the input only, it triggers no gradient communication;
- the training metrics (loss terms) are summed over ranks before averaging;
  held-out evaluation runs on every rank (identical weights), and only rank 0
  writes the run directory (config, metrics, checkpoints) and logs.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from .errors import InputError


@dataclass(frozen=True)
class DistContext:
    """Where this process stands: ``rank`` of ``world_size`` (``local_rank`` on its machine)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def active(self) -> bool:
        """More than one process: gradients and metrics are all-reduced."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0, the only one that writes files and logs."""
        return self.rank == 0


def _env_int(name: str, default: int, env: Mapping[str, str] | None = None) -> int:
    raw = (os.environ if env is None else env).get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise InputError(f"environment variable {name}={raw!r} must be an integer") from None


def context_from_env(env: Mapping[str, str] | None = None) -> DistContext:
    """Read ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` (as torchrun sets them); one process without them.

    Without ``WORLD_SIZE`` but with ``RPAT_DIST=slurm`` the ranks come from SLURM's task variables
    (:func:`slurm_context`). ``env`` defaults to ``os.environ``.
    """
    env = os.environ if env is None else env
    if not env.get("WORLD_SIZE") and env.get(SLURM_OPT_IN) == "slurm":
        return slurm_context(env)
    world = _env_int("WORLD_SIZE", 1, env)
    rank = _env_int("RANK", 0, env)
    local = _env_int("LOCAL_RANK", rank, env)
    if world < 1 or not 0 <= rank < world:
        raise InputError(f"bad torchrun environment: RANK={rank} WORLD_SIZE={world}")
    return DistContext(rank, world, local)


#: ``RPAT_DIST=slurm`` makes :func:`context_from_env` read SLURM's task variables. It is opt-in (``rpat sweep
#: --launcher slurm`` sets it for a run of several tasks; put it in your own ``srun`` lines): a batch script with
#: ``--ntasks 4`` that runs one plain ``rpat train`` must not wait for three ranks that never come.
SLURM_OPT_IN = "RPAT_DIST"


def slurm_context(env: Mapping[str, str]) -> DistContext:
    """``SLURM_PROCID``/``SLURM_NTASKS``/``SLURM_LOCALID`` (one task per GPU, as ``srun`` starts them) as a context."""
    world = _env_int("SLURM_NTASKS", 1, env)
    rank = _env_int("SLURM_PROCID", 0, env)
    local = _env_int("SLURM_LOCALID", 0, env)
    if world < 1 or not 0 <= rank < world or local < 0:
        raise InputError(f"bad SLURM environment: SLURM_PROCID={rank} SLURM_NTASKS={world} SLURM_LOCALID={local}")
    return DistContext(rank, world, local)


def first_slurm_host(nodelist: str) -> str:
    """The first host of a SLURM node list: ``"gpu[07-09,12],cpu1"`` -> ``"gpu07"`` (what rank 0 runs on:
    SLURM gives task 0 to the first node), ``"node3"`` -> ``"node3"``."""
    m = re.match(r"([^,\[]*)(?:\[([^\]]*)\])?([^,]*)", nodelist.strip())
    if m is None or not (m.group(1) or m.group(2)):
        raise InputError(f"cannot read the SLURM node list {nodelist!r}; set MASTER_ADDR to rank 0's host")
    prefix, ranges, suffix = m.groups()
    first = (ranges or "").split(",")[0].split("-")[0]
    return f"{prefix}{first}{suffix}"


def slurm_master_addr(env: Mapping[str, str]) -> str:
    """Rank 0's host from ``SLURM_JOB_NODELIST`` (``SLURM_NODELIST`` on old SLURM versions)."""
    nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    if not nodelist:
        raise InputError("RPAT_DIST=slurm but SLURM_JOB_NODELIST is not set: run under srun, or set MASTER_ADDR")
    return first_slurm_host(nodelist)


def slurm_master_port(env: Mapping[str, str]) -> int:
    """A port in [20000, 40000) from ``SLURM_JOB_ID``: the same on every task of a job, different between the
    jobs of an array (each array task has its own job id), so two runs on one node do not collide."""
    return 20000 + _env_int("SLURM_JOB_ID", 0, env) % 20000


def setup(device: torch.device) -> tuple[DistContext, torch.device]:
    """Initialize the process group when launched by torchrun; returns the context and this rank's device.

    With one process (no ``WORLD_SIZE`` > 1) nothing happens and ``device`` is
    returned as is. On CUDA each rank takes ``cuda:LOCAL_RANK``. A process group
    that is already initialized (e.g. by a test) is reused.
    """
    ctx = context_from_env()
    if not ctx.active:
        return ctx, device
    if device.type == "cuda":
        if ctx.local_rank >= torch.cuda.device_count():
            raise InputError(f"LOCAL_RANK={ctx.local_rank} but only {torch.cuda.device_count()} GPUs are visible")
        device = torch.device("cuda", ctx.local_rank)
        torch.cuda.set_device(device)
    elif device.type != "cpu":
        raise InputError(f"distributed training supports cpu (gloo) and cuda (nccl), not {device.type}")
    if not dist.is_initialized():
        if not os.environ.get("WORLD_SIZE") and os.environ.get(SLURM_OPT_IN) == "slurm":
            os.environ.setdefault("MASTER_ADDR", slurm_master_addr(os.environ))  # rank 0's node, the same on
            os.environ.setdefault("MASTER_PORT", str(slurm_master_port(os.environ)))  # every rank of the job
        for var in ("MASTER_ADDR", "MASTER_PORT"):
            if not os.environ.get(var):
                raise InputError(f"WORLD_SIZE={ctx.world_size} but {var} is not set: launch with torchrun")
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=ctx.rank,
                                world_size=ctx.world_size)
    elif dist.get_world_size() != ctx.world_size:
        raise InputError(f"process group has {dist.get_world_size()} ranks but WORLD_SIZE={ctx.world_size}")
    return ctx, device


def per_rank_batch_size(batch_size: int, ctx: DistContext) -> int:
    """The images each rank takes per step: ``batch_size / world_size`` (must divide)."""
    if batch_size % ctx.world_size:
        raise InputError(f"data.batch_size={batch_size} must be divisible by the {ctx.world_size} processes")
    return batch_size // ctx.world_size


class _Forward(nn.Module):
    """Lets DDP run either ``model(x)`` or ``model.forward_proxies(x)`` through its forward hook."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, proxies: bool = False) -> torch.Tensor | dict[str, torch.Tensor]:
        return self.model.forward_proxies(x) if proxies else self.model(x)


def wrap_model(model: nn.Module, ctx: DistContext, device: torch.device) -> nn.Module:
    """The model the training step runs: ``model`` itself with one process, else a DDP wrapper.

    The wrapper is called like the model (``(B, C, H, W)`` -> logits) and also has
    ``forward_proxies`` (routed through DDP, so RPAT's proxy passes synchronize
    gradients too). Parameters are shared with ``model``: save ``model``, not the wrapper.
    """
    if not ctx.active:
        return model
    ddp = DistributedDataParallel(_Forward(model), device_ids=[device.index] if device.type == "cuda" else None)
    ddp.forward_proxies = lambda x: ddp(x, proxies=True)  # plain attribute: Forwards calls it
    return ddp


def convert_sync_batchnorm(model: nn.Module, ctx: DistContext) -> nn.Module:
    """BatchNorm layers -> SyncBatchNorm (batch statistics over all ranks); a no-op with one process."""
    return nn.SyncBatchNorm.convert_sync_batchnorm(model) if ctx.active else model


def all_reduce_sum(values: dict[str, torch.Tensor], ctx: DistContext) -> dict[str, torch.Tensor]:
    """Sum each 0-dim tensor over the ranks (one collective); identity with one process."""
    if not ctx.active or not values:
        return values
    stacked = torch.stack([v.detach().float() for v in values.values()])
    dist.all_reduce(stacked, op=dist.ReduceOp.SUM)
    return dict(zip(values.keys(), stacked.unbind(0), strict=True))


def all_reduce_mean_(tensors: list[torch.Tensor], ctx: DistContext) -> None:
    """Average each tensor over the ranks, in place (one collective on a flat copy); no-op with one process."""
    if not ctx.active or not tensors:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat.div_(ctx.world_size)
    for t, v in zip(tensors, flat.split([t.numel() for t in tensors]), strict=True):
        t.copy_(v.view_as(t))


def barrier(ctx: DistContext) -> None:
    """Wait for every rank (no-op with one process)."""
    if ctx.active:
        dist.barrier()


def cleanup() -> None:
    """Destroy the process group if this module's ``setup`` (or anyone) created one."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def world() -> tuple[int, int]:
    """``(rank, world_size)`` of the initialized ``torch.distributed`` group, else ``(0, 1)``."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def comm_device(device: torch.device) -> torch.device:
    """Where collectives run: the GPU under NCCL, the CPU otherwise (gloo)."""
    if dist.is_available() and dist.is_initialized() and dist.get_backend() == "nccl":
        return device
    return torch.device("cpu")
