"""``speed.cuda_graph``: the whole training step captured once as a CUDA graph and replayed.

On a GPU, rpat's step at CIFAR size is bound by kernel launches and Python dispatch,
not by arithmetic (measurements: ``benchmarks/README.md``). Since the step makes no host
sync, all of it (:class:`rpat.training.step.TrainStep`) can be recorded once with
``torch.cuda.graph`` and replayed per batch:

    attack (PGD with its random start) → loss (base + RPAT + teacher term) → backward
    → non-finite guard (on-device flags) → SGD update → skip-restore → weight averaging
    → on-device loss sums

What reaches the graph, and how:

- **inputs**: each full batch is copied into static buffers ``x``, ``y`` (one device
  copy each, no host sync); the replay reads them.
- **learning rate**: a 0-dim device tensor, refreshed before every replay from the
  epoch's table of per-step rates (the schedule is a pure function of ``(epoch, step)``).
  ``torch.optim.SGD`` reads a tensor ``lr`` back to the host (``.item()``), which a
  capture forbids, so :func:`sgd_update_` does SGD's update itself: the same foreach
  weight decay and momentum ops, then ``p.addcmul_(d_p, lr, value=-1)``; on the CPU this
  gives bit for bit ``SGD.step()``'s weights (``tests/test_cuda_graph.py``). The
  momentum buffers stay in ``optimizer.state``, so checkpoints do not change.
- **epoch-dependent parts** (RPAT ``start_epoch``, the ReBAT/RPAT++ teacher's start and
  β growth, the "$" stronger adversary, the start of weight averaging) are Python-level
  choices baked into a capture: :func:`phase_key` maps an epoch to a key of all of them,
  built from ``Objective.phase(epoch)`` (the same calls the loss makes, so key and loss cannot
  disagree), and the step is re-captured whenever the key changes.
- **random starts**: the attack's generator is one persistent device generator,
  re-seeded at every epoch start with ``derived_seed(seed, epoch, 1)`` exactly like the
  eager trainer's fresh per-epoch generator; it is registered with the graph
  (``CUDAGraph.register_generator_state``), so every replay draws the numbers the eager
  step would have drawn. Being a function of ``(seed, epoch)``, it needs no entry in the
  checkpoint: a run resumed at an epoch boundary continues exactly.

The first ``warmup`` steps after each (re)capture point run eagerly (on a side stream on
CUDA: lazy initialization, momentum buffers, cuDNN choices, the loss-sum and guard
tensors), then the step is captured and replayed; the **last partial batch** of an epoch
(when the batch size does not divide the training set) runs eagerly through the same
step function, so no image is dropped and the result equals the eager trainer's.

Not captured: the held-out PGD-20 evaluation (far less launch-bound than the training step:
batch 500 against 128; ``tools/gpu_check.py`` reports its share of the epoch), the data
loader, and under DDP nothing (refused: the all-reduce hooks have not been shown capture-safe).

The CPU has no graphs: ``speed.cuda_graph=eager`` runs this module's bookkeeping (static
buffers, lr tensor, phase keys and their re-capture points, in-place sums and guard)
with the "capture" replaced by running the same step function eagerly, which is what
the CPU tests exercise; it gives exactly the eager trainer's weights.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ..attacks.threat import ThreatModel
from ..errors import InputError
from ..models.averaging import WeightAverage
from ..objectives import Objective
from .step import TrainStep


def phase_key(objective: Objective, epoch: int, *, threat: ThreatModel,
              averaging_start: int | None = None) -> tuple[Hashable, ...]:
    """Everything epoch-dependent that a captured step bakes in, for 0-based ``epoch``.

    ``(objective.phase(epoch), weight averaging running, training threat)``;
    ``averaging_start`` is the first epoch of the EMA (None: no averaging). The trainer
    re-captures the step whenever the key of the current epoch differs from the captured one.
    """
    wa = averaging_start is not None and epoch >= averaging_start
    return (objective.phase(epoch), wa, threat)


@torch.no_grad()
def sgd_update_(optimizer: torch.optim.SGD, lr: Tensor) -> None:
    """``optimizer.step()`` of ``torch.optim.SGD`` with the learning rate a 0-dim device tensor.

    Same arithmetic as SGD's foreach / single-tensor paths (weight decay added to the
    gradient, momentum ``buf ← m·buf + (1 − dampening)·d_p``, first buffer a copy of
    ``d_p``, Nesterov), then ``p ← p − lr·d_p`` as ``p.addcmul_(d_p, lr, value=-1)``.
    No host sync; the momentum buffers live in ``optimizer.state`` as SGD keeps them.
    A buffer must not be created while capturing (the warm-up steps create them).
    """
    for group in optimizer.param_groups:
        if group.get("maximize", False):
            raise ValueError("sgd_update_: maximize=True is not supported")
        params = [p for p in group["params"] if p.grad is not None]
        if not params:
            continue
        grads = [p.grad for p in params]
        wd, m = group["weight_decay"], group["momentum"]
        if wd != 0:
            grads = torch._foreach_add(grads, params, alpha=wd)
        if m != 0:
            bufs = [optimizer.state[p].get("momentum_buffer") for p in params]
            if all(b is not None for b in bufs):
                torch._foreach_mul_(bufs, m)
                torch._foreach_add_(bufs, grads, alpha=1 - group["dampening"])
            else:
                if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
                    raise RuntimeError("sgd_update_: momentum buffers must exist before a capture")
                for i, (p, g) in enumerate(zip(params, grads, strict=True)):
                    if bufs[i] is None:
                        bufs[i] = optimizer.state[p]["momentum_buffer"] = g.detach().clone()
                    else:
                        bufs[i].mul_(m).add_(g, alpha=1 - group["dampening"])
            grads = torch._foreach_add(grads, bufs, alpha=m) if group["nesterov"] else bufs
        for p, g in zip(params, grads, strict=True):
            p.addcmul_(g, lr, value=-1)


class CapturedStep:
    """Runs a step function of no arguments (it reads static buffers) as a replayed CUDA graph.

    ``run(key)``: if ``key`` differs from the captured one the graph is dropped; then the
    first ``warmup`` calls run ``fn`` eagerly (on a side stream on CUDA), the next one
    captures ``fn`` (``torch.cuda.graph``, with ``generators`` registered) and every call
    from then on replays it. With ``capture=False`` (the stand-in) the "capture" is only
    counted and every call runs ``fn`` eagerly: same bookkeeping, any device.

    Counters for tests and logs: ``n_eager`` (warm-up calls), ``n_captures``,
    ``n_replays`` (calls after a capture, the capturing one included), ``capture_keys``.
    """

    def __init__(self, fn: Callable[[], None], *, capture: bool, warmup: int = 3,
                 generators: Sequence[torch.Generator] = ()):
        if warmup < 1:
            raise ValueError("warmup must be >= 1 (the warm-up creates the sums, guard flags and momentum)")
        self.fn = fn
        self.capture = capture
        self.warmup = int(warmup)
        self.generators = list(generators)
        self.key: Hashable | None = None
        self.graph: Any = None
        self._warm = 0
        self._side: Any = None
        self.n_eager = self.n_captures = self.n_replays = 0
        self.capture_keys: list[Hashable] = []

    def reset(self) -> None:
        """Forget the captured graph; the next calls warm up and capture again."""
        if self.graph is not None and self.capture:
            self.graph.reset()
        self.graph = None
        self._warm = 0

    def run(self, key: Hashable) -> None:
        if key != self.key:
            self.reset()
            self.key = key
        if self.graph is None and self._warm < self.warmup:
            self._eager()
            self._warm += 1
            self.n_eager += 1
            return
        if self.graph is None:
            self.graph = self._capture() if self.capture else "stand-in"
            self.n_captures += 1
            self.capture_keys.append(key)
        if self.capture:
            self.graph.replay()
        else:
            self.fn()
        self.n_replays += 1

    def _eager(self) -> None:
        if not self.capture:
            self.fn()
            return
        if self._side is None:
            self._side = torch.cuda.Stream()
        side = self._side
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self.fn()
        torch.cuda.current_stream().wait_stream(side)

    def _capture(self) -> Any:
        graph = torch.cuda.CUDAGraph()
        for g in self.generators:
            graph.register_generator_state(g)
        torch.cuda.synchronize()
        with torch.cuda.graph(graph):
            self.fn()
        return graph


class GraphTrainStep:
    """The trainer's step for ``speed.cuda_graph`` (true: captured; ``"eager"``: the stand-in).

    Wraps the one :class:`~rpat.training.step.TrainStep` (built with the tensor-lr SGD update and no
    autocast cache) and owns what a captured graph keeps pointing at: the static buffers (``x``,
    ``y``, the lr and step tensors) and, through the TrainStep, the attack generator, the guard and
    the in-place loss sums. Per epoch: :meth:`start_epoch`, then :meth:`step` for every batch.
    """

    def __init__(self, *, model: nn.Module, step_model: nn.Module, objective: Objective,
                 optimizer: torch.optim.SGD, averager: WeightAverage | None, device: torch.device,
                 nonfinite: str, amp: bool, channels_last: bool, capture: bool, warmup: int = 3):
        if capture and device.type != "cuda":
            raise InputError("speed.cuda_graph=true needs a CUDA device; use speed.cuda_graph=eager to run "
                             "its bookkeeping without capture, or false")
        if capture and not hasattr(torch.cuda.CUDAGraph, "register_generator_state"):
            raise InputError(f"speed.cuda_graph needs a torch with CUDAGraph.register_generator_state "
                             f"(this is {torch.__version__})")
        self.optimizer, self.averager, self.device = optimizer, averager, device
        self.lr = torch.zeros((), device=device)
        self.train_step = TrainStep(model=model, step_model=step_model, objective=objective, optimizer=optimizer,
                                    averager=averager, nonfinite=nonfinite, device=device, amp=amp,
                                    channels_last=channels_last, update=lambda: sgd_update_(optimizer, self.lr),
                                    cast_cache=False)  # no cast cache across a capture
        self.step_t = torch.zeros((), dtype=torch.long, device=device)
        self.x: Tensor | None = None
        self.y: Tensor | None = None
        ts = self.train_step
        self.captured = CapturedStep(self._static_step, capture=capture, warmup=warmup,
                                     generators=[ts.generator] if capture else [])
        self._lrs: Tensor | None = None
        self._steps: Tensor | None = None

    def start_epoch(self, epoch: int, seed: int, lrs: Sequence[float]) -> None:
        """Reset sums and guard in place, re-seed the attack generator, load the epoch's lr table."""
        self.train_step.start_epoch(epoch, seed)
        # lr as float32, the precision SGD's float lr is applied in to fp32 weights
        self._lrs = torch.tensor(list(lrs), dtype=torch.float32).to(self.device)
        self._steps = torch.arange(len(lrs), dtype=torch.long).to(self.device)

    def step(self, x: Tensor, y: Tensor, step: int, lr: float, key: Hashable) -> None:
        """One training step on batch ``x`` ``(B, C, H, W)`` in [0, 1], labels ``y`` ``(B,)``."""
        ts = self.train_step
        ts.set_lr(lr)  # what the checkpoint's optimizer state records, as in the eager trainer
        x = ts.prepare(x)
        if self.x is None:
            self.x, self.y = torch.empty_like(x), torch.empty_like(y)
        self.lr.copy_(self._lrs[step])
        if x.shape != self.x.shape:  # the last partial batch: the same step, eagerly, on its own tensors
            ts(x, y, step)
            return
        self.x.copy_(x)
        self.y.copy_(y)
        self.step_t.copy_(self._steps[step])
        self.captured.run(key)

    def _static_step(self) -> None:
        self.train_step(self.x, self.y, self.step_t)
