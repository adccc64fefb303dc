"""Non-finite loss / gradient detection without a per-step host sync.

Each training step, :meth:`NonFiniteGuard.observe` computes on the device
whether the total loss and the gradient norm are finite and folds the result
into a few 0-dim device tensors (first bad step, number of bad steps, which
loss terms were non-finite at the first bad step). Nothing is read back to the
host until :meth:`NonFiniteGuard.check`, which the trainer calls once per
``log_interval`` steps and at the end of each epoch (one small ``.tolist()``).

Two policies (``Config.nonfinite``):

``stop``
    ``check`` raises :class:`NonFiniteLossError` naming the epoch, the first bad
    step and the non-finite loss terms. The weights in memory may already be
    non-finite by then (up to ``log_interval`` steps later), but nothing is
    saved: ``last.pt`` keeps the last good epoch boundary.
``skip``
    Bad batches are skipped exactly, still without a sync: before the step the
    guard snapshots parameters, buffers (BatchNorm statistics) and the SGD
    momentum buffers; after ``optimizer.step()`` every tensor is reset with
    ``torch.where(ok, new, old)`` where ``ok`` is the on-device flag. The cost
    is one copy of the parameters, buffers and momentum per step.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

NONFINITE_POLICIES = ("stop", "skip")


class NonFiniteLossError(FloatingPointError):
    """Training produced a non-finite loss or gradient (message names epoch, step and terms)."""


class NonFiniteGuard:
    """Device-side bookkeeping of non-finite steps for one epoch (see the module docstring)."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, policy: str,
                 device: torch.device):
        if policy not in NONFINITE_POLICIES:
            raise ValueError(f"unknown non-finite policy {policy!r}")
        self.skip = policy == "skip"
        self.model = model
        self.optimizer = optimizer
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.buffers = [b for b in model.buffers() if b.is_floating_point() or b.dtype == torch.long]
        self.first_bad = torch.full((), -1, dtype=torch.long, device=device)
        self.n_bad = torch.zeros((), dtype=torch.long, device=device)
        self.grad_bad = torch.zeros((), dtype=torch.bool, device=device)
        self.term_bad: dict[str, Tensor] = {}
        self._saved: tuple[list[Tensor], list[Tensor], list[tuple[Tensor, Tensor]]] | None = None

    def snapshot(self) -> None:
        """``skip`` only: remember the state the step may have to be undone to (call before the forward)."""
        if not self.skip:
            return
        params = [p.detach().clone() for p in self.params]
        buffers = [b.detach().clone() for b in self.buffers]
        momenta = []
        for p in self.params:
            buf = self.optimizer.state.get(p, {}).get("momentum_buffer")
            if isinstance(buf, Tensor):
                momenta.append((buf, buf.clone()))
        self._saved = (params, buffers, momenta)

    def reset(self) -> None:
        """Clear the flags in place (a guard kept across epochs, e.g. by a captured CUDA graph)."""
        self.first_bad.fill_(-1)
        self.n_bad.zero_()
        self.grad_bad.zero_()
        for v in self.term_bad.values():
            v.zero_()

    def observe(self, step: int | Tensor, loss: Tensor, terms: dict[str, Tensor]) -> Tensor:
        """After ``backward()``: the on-device flag ``ok`` (0-dim bool) for this step; no sync.

        ``step`` (0-based) may be a 0-dim long device tensor (a captured step). The flags are
        updated in place, so a captured graph accumulates them across replays.
        """
        grads = [p.grad for p in self.params if p.grad is not None]
        if grads:
            gnorm = torch.stack(torch._foreach_norm(grads)).sum()
            grad_ok = torch.isfinite(gnorm)
        else:
            grad_ok = torch.ones((), dtype=torch.bool, device=self.n_bad.device)
        ok = torch.isfinite(loss.detach()) & grad_ok
        newly = (self.first_bad < 0) & ~ok
        for k, v in terms.items():
            bad_k = newly & ~torch.isfinite(v)
            if k in self.term_bad:
                self.term_bad[k] |= bad_k
            else:
                self.term_bad[k] = bad_k.clone()
        self.grad_bad |= newly & ~grad_ok
        step_t = step if isinstance(step, Tensor) else torch.full_like(self.first_bad, step)
        self.first_bad.copy_(torch.where(newly, step_t, self.first_bad))
        self.n_bad += (~ok).long()
        return ok

    def restore_if_bad(self, ok: Tensor) -> None:
        """``skip`` only, after ``optimizer.step()``: undo the step where ``ok`` is False (no sync)."""
        if not self.skip or self._saved is None:
            return
        params, buffers, momenta = self._saved
        with torch.no_grad():
            for p, old in zip(self.params, params, strict=True):
                p.copy_(torch.where(ok, p, old))
            for b, old in zip(self.buffers, buffers, strict=True):
                b.copy_(torch.where(ok, b, old))
            for buf, old in momenta:
                buf.copy_(torch.where(ok, buf, old))
            # a momentum buffer created by this very step (first step) must not keep NaNs either
            for p in self.params:
                buf = self.optimizer.state.get(p, {}).get("momentum_buffer")
                if isinstance(buf, Tensor) and not any(buf is m for m, _ in momenta):
                    buf.copy_(torch.where(ok, buf, torch.zeros_like(buf)))
        self._saved = None

    def check(self, epoch: int, n_steps: int) -> int:
        """One host read. ``stop``: raise NonFiniteLossError if a step was bad; returns the bad-step count."""
        names = list(self.term_bad)
        flags = torch.stack([self.first_bad, self.n_bad, self.grad_bad.long(),
                             *[self.term_bad[k].long() for k in names]]).tolist()
        first, n_bad, grad_bad = flags[0], flags[1], flags[2]
        if first >= 0 and not self.skip:
            bad_terms = [k for k, f in zip(names, flags[3:], strict=True) if f]
            what = []
            if bad_terms:
                what.append("loss term(s) " + ", ".join(bad_terms))
            if grad_bad:
                what.append("the gradient")
            raise NonFiniteLossError(
                f"non-finite {' and '.join(what) or 'loss'} at epoch {epoch + 1}, step {first + 1}/{n_steps}; "
                "stopped without saving (last.pt keeps the last finished epoch). Lower optim.lr, or set "
                "nonfinite=skip to skip such batches"
            )
        return n_bad
