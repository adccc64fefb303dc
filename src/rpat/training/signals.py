"""Stopping a run safely: SIGINT/SIGTERM raise :class:`TrainingInterrupted`, deferred while a critical
section (the epoch-boundary checkpoint writes) runs."""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


class TrainingInterrupted(KeyboardInterrupt):
    """SIGINT/SIGTERM stopped :meth:`Trainer.fit`; ``last.pt`` holds the last finished epoch.

    The unfinished epoch is discarded, so ``--resume`` continues bit for bit like
    an uninterrupted run. ``exit_code`` is 128 + the signal number (130, 143).
    """

    def __init__(self, signum: int, message: str = ""):
        super().__init__(message)
        self.signum = int(signum)
        self.message = message

    @property
    def exit_code(self) -> int:
        return 128 + self.signum

    def __str__(self) -> str:
        return self.message or f"interrupted by {signal.Signals(self.signum).name}"


class TrainingPreempted(TrainingInterrupted):
    """A *save signal* (:meth:`SignalGuard.save_on`, e.g. SLURM's SIGUSR2 before a preemption or the time
    limit) stopped :meth:`Trainer.fit` at the next safe point, after ``last.pt`` was written there: mid-epoch
    (the step position, loss sums, guard counters and generator states with it) or at an epoch end.
    ``--resume`` continues bit for bit; nothing is lost."""


class SignalGuard:
    """``with guard.installed():`` SIGINT/SIGTERM raise :class:`TrainingInterrupted` at once, except inside
    ``with guard.critical():``, where the signal waits until the section's writes are done.

    Signals named by :meth:`save_on` raise nothing: they set :attr:`save_requested`, which the trainer reads
    (a Python attribute, no device sync) after each step and at each epoch end, and acts on by saving and
    raising :class:`TrainingPreempted`."""

    def __init__(self) -> None:
        self._critical = False
        self._pending: int | None = None
        self.save_signals: tuple[int, ...] = ()
        #: the save signal received (its number), not yet acted on; None without one
        self.save_requested: int | None = None

    def save_on(self, *signums: int) -> None:
        """Make these signals (SIGTERM too, if named) requests to save at the next safe point."""
        self.save_signals = tuple(int(s) for s in signums)

    @contextmanager
    def installed(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def handler(signum: int, frame: Any) -> None:
            if signum in self.save_signals:
                self.save_requested = signum
            elif self._critical:
                self._pending = signum
            else:
                raise TrainingInterrupted(signum)

        old = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, *self.save_signals)}
        for s in old:
            signal.signal(s, handler)
        try:
            yield
        finally:
            for s, h in old.items():
                signal.signal(s, h)
            if self.save_requested is not None:  # not acted on (e.g. it came after the last epoch): pass it on
                signum, self.save_requested = self.save_requested, None
                signal.raise_signal(signum)

    @contextmanager
    def critical(self) -> Iterator[None]:
        """The writes inside run to the end; a signal received meanwhile is raised after them."""
        self._critical = True
        try:
            yield
        finally:
            self._critical = False
        if self._pending is not None:
            signum, self._pending = self._pending, None
            raise TrainingInterrupted(signum)
