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


class SignalGuard:
    """``with guard.installed():`` SIGINT/SIGTERM raise :class:`TrainingInterrupted` at once, except inside
    ``with guard.critical():``, where the signal waits until the section's writes are done."""

    def __init__(self) -> None:
        self._critical = False
        self._pending: int | None = None

    @contextmanager
    def installed(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def handler(signum: int, frame: Any) -> None:
            if self._critical:
                self._pending = signum
            else:
                raise TrainingInterrupted(signum)

        old = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
        for s in old:
            signal.signal(s, handler)
        try:
            yield
        finally:
            for s, h in old.items():
                signal.signal(s, h)

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
