"""Mid-epoch safe points: what ``last.pt`` holds so that an epoch continues exactly from step ``k``.

A *save signal* (:meth:`rpat.training.signals.SignalGuard.save_on`; ``rpat sweep --launcher slurm|local``
makes SLURM's SIGUSR2 and SIGTERM save signals) is acted on after the training step it arrived in: the
trainer writes ``last.pt`` there and raises :class:`~rpat.training.signals.TrainingPreempted`. Besides
what an epoch-end ``last.pt`` holds (model, optimizer with its momentum, averaged model, best so far),
a mid-epoch one has the key ``mid_epoch``::

    {"epoch": e,          # the unfinished epoch, 0-based (the checkpoint's "epoch" is e: e epochs are done)
     "step": k,           # the next step, 0-based: steps 0 .. k-1 of epoch e are trained
     "n_steps": n,        # steps per epoch (checked on resume)
     "seen": images,      # images this rank trained on in epoch e so far
     "seconds": s,        # wall time of epoch e so far (the epoch's img/s stays right)
     "world_size": W,     # processes; a resume needs the same number
     "ranks": [           # one entry per rank (rank 0 first)
        {"attack_rng": ..., "cpu_rng": ..., "cuda_rng": ... (CUDA only),   # generator states (uint8)
         "sums": {term: Σ term·batch}, "keys": [terms], "n_good": images of good steps,
         "guard": {"first_bad", "n_bad", "grad_bad", "term_bad": {term: flag}}}]}

All values are tensors, numbers, strings, lists and dicts: it loads with ``weights_only=True``.

The loader's shuffle and augmentation generators are not stored: they are seeded by ``(seed, epoch)``
(:class:`rpat.data.loader.DeviceLoader`), and the resume replays the epoch's first ``k`` batches
through the loader (index gather and crop/flip, no training step), which leaves the loader exactly
where it was. That costs the preparation of ``k`` batches (far less than one adversarial step each).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from ..distributed import DistContext
from ..errors import InputError
from .step import TrainStep


def _cpu(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to("cpu", copy=True)


def rank_state(ts: TrainStep, device: torch.device) -> dict[str, Any]:
    """This rank's part of a mid-epoch save: generator states, loss sums, good-step count, guard flags."""
    g = ts.guard
    state: dict[str, Any] = {
        "attack_rng": ts.generator.get_state(), "cpu_rng": torch.get_rng_state(),
        "sums": {k: _cpu(v) for k, v in ts.sums.items()}, "keys": list(ts.keys), "n_good": _cpu(ts.n_good),
        "guard": {"first_bad": _cpu(g.first_bad), "n_bad": _cpu(g.n_bad), "grad_bad": _cpu(g.grad_bad),
                  "term_bad": {k: _cpu(v) for k, v in g.term_bad.items()}}}
    if device.type == "cuda":
        state["cuda_rng"] = torch.cuda.get_rng_state(device)
    return state


def restore_rank_state(ts: TrainStep, state: dict[str, Any], device: torch.device) -> None:
    """Put :func:`rank_state`'s values back into a TrainStep that :meth:`TrainStep.start_epoch` just reset
    (all but the global generators: :func:`restore_global_rng`, after the loader's replay)."""
    ts.generator.set_state(state["attack_rng"])
    ts.sums = {k: v.to(device) for k, v in state["sums"].items()}
    ts.keys = list(state["keys"])
    ts.n_good.copy_(state["n_good"])
    g, saved = ts.guard, state["guard"]
    g.first_bad.copy_(saved["first_bad"])
    g.n_bad.copy_(saved["n_bad"])
    g.grad_bad.copy_(saved["grad_bad"])
    g.term_bad = {k: v.to(device) for k, v in saved["term_bad"].items()}


def restore_global_rng(state: dict[str, Any], device: torch.device) -> None:
    """The global CPU (and CUDA) generator states of :func:`rank_state`; set after the replayed batches, so
    that whatever the loader draws while replaying does not move them."""
    torch.set_rng_state(state["cpu_rng"])
    if "cuda_rng" in state and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda_rng"], device)


def gather_states(state: dict[str, Any], ctx: DistContext) -> list[dict[str, Any]]:
    """Every rank's :func:`rank_state`, in rank order (a collective under DDP: every rank calls it)."""
    if not ctx.active:
        return [state]
    out: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(out, state)
    return out


def mid_epoch_record(epoch: int, step: int, n_steps: int, seen: int, seconds: float,
                     states: list[dict[str, Any]]) -> dict[str, Any]:
    """The ``mid_epoch`` entry of last.pt (see the module docstring)."""
    return {"epoch": int(epoch), "step": int(step), "n_steps": int(n_steps), "seen": int(seen),
            "seconds": float(seconds), "world_size": len(states), "ranks": states}


def check_resumable(mid: dict[str, Any], epoch: int, n_steps: int, ctx: DistContext) -> dict[str, Any]:
    """This rank's state of a mid-epoch save, after checking it belongs to ``epoch`` and this launch."""
    if int(mid["epoch"]) != epoch or int(mid["n_steps"]) != n_steps:
        raise InputError(f"last.pt was saved in epoch {int(mid['epoch']) + 1} of {int(mid['n_steps'])} steps, "
                         f"but the resume starts epoch {epoch + 1} of {n_steps} steps; was data.* changed?")
    if int(mid["world_size"]) != ctx.world_size:
        raise InputError(f"last.pt was saved mid-epoch by {int(mid['world_size'])} processes; resume it with "
                         f"{int(mid['world_size'])} (got {ctx.world_size}), or finish that epoch first")
    return mid["ranks"][ctx.rank]
