"""The process group: data-parallel training (``torchrun``, DistributedDataParallel) and split evaluation.

Launch the ordinary ``rpat train`` command under ``torchrun``; the trainer
notices the environment variables torchrun sets and switches to data
parallelism::

    torchrun --nproc-per-node 4 -m rpat train --preset cifar10_benchmark --rpat \\
        --run-dir runs/pgd_at_rpat_ddp

What changes with ``W`` processes:

- the process group is initialized from ``RANK``, ``WORLD_SIZE``,
  ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` (NCCL on GPUs, gloo on
  the CPU); on GPUs each process uses ``cuda:LOCAL_RANK``;
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


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise InputError(f"environment variable {name}={raw!r} must be an integer") from None


def context_from_env() -> DistContext:
    """Read ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` (as torchrun sets them); one process without them."""
    world = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local = _env_int("LOCAL_RANK", rank)
    if world < 1 or not 0 <= rank < world:
        raise InputError(f"bad torchrun environment: RANK={rank} WORLD_SIZE={world}")
    return DistContext(rank, world, local)


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
