"""Preemption: a signal handler that only records that a stop was requested."""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterable
from types import FrameType
from typing import Any

__all__ = ["DEFAULT_PREEMPTION_SIGNALS", "PreemptionWatch", "watched_signals"]

DEFAULT_PREEMPTION_SIGNALS: tuple[signal.Signals, ...] = (signal.SIGTERM, signal.SIGUSR1)
"""What schedulers send before they stop a job (SLURM, Kubernetes, spot instances)."""


class PreemptionWatch:
    """Installs handlers that note the first of ``signals`` received, and nothing else.

    Saving is left to the training loop at its next step boundary: a handler
    runs between two bytecodes of the main thread, where writing a checkpoint
    could see half-updated state. Must be created and closed on the main thread.

    Raises:
        ValueError: Not on the main thread, or an unknown signal.
    """

    def __init__(self, signals: Iterable[int]):
        if threading.current_thread() is not threading.main_thread():
            raise ValueError("preemption signal handlers can only be installed on the main thread")
        watched = tuple(signal.Signals(s) for s in signals)
        if not watched:
            raise ValueError("preemption_signals must name at least one signal")
        self._received: signal.Signals | None = None
        self._previous: dict[signal.Signals, Any] = {}
        for sig in watched:
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self._received is None:
            self._received = signal.Signals(signum)

    @property
    def received(self) -> signal.Signals | None:
        """The first watched signal received, or ``None``."""
        return self._received

    def close(self) -> None:
        """Put back the handlers that were there before (where ours is still installed)."""
        for sig, previous in self._previous.items():
            if signal.getsignal(sig) == self._handle:
                signal.signal(sig, previous)
        self._previous.clear()


def watched_signals(preemption_signals: bool | Iterable[int]) -> tuple[signal.Signals, ...]:
    """The signals a manager's ``preemption_signals`` asks to watch (none for ``False``).

    Raises:
        ValueError: An unknown signal, or an empty collection.
    """
    if preemption_signals is False:
        return ()
    if preemption_signals is True:
        return DEFAULT_PREEMPTION_SIGNALS
    watched = tuple(signal.Signals(s) for s in preemption_signals)
    if not watched:
        raise ValueError("preemption_signals must name at least one signal")
    return watched
