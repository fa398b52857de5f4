"""When to save: every N steps and/or every T seconds, or after a preemption signal."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

from ckpt.policies.preemption import PreemptionWatch

__all__ = ["SaveCadence", "SaveTiming"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SaveCadence:
    """Save after every ``every_steps`` completed steps and/or every ``every_seconds``.

    Steps count from 0 and name the step just completed, so with
    ``every_steps=100`` a save is due after steps 99, 199, ... (100, 200, ...
    steps done). Either condition makes a save due; with neither, none is.
    """

    every_steps: int | None = None
    every_seconds: float | None = None

    def __post_init__(self) -> None:
        steps, seconds = self.every_steps, self.every_seconds
        if steps is not None and (
            isinstance(steps, bool) or not isinstance(steps, int) or steps < 1
        ):
            raise ValueError(f"every_steps must be a positive int or None, got {steps!r}")
        if seconds is not None and (
            isinstance(seconds, bool)
            or not isinstance(seconds, (int, float))
            or not math.isfinite(seconds)
            or seconds <= 0
        ):
            raise ValueError(f"every_seconds must be a positive number or None, got {seconds!r}")

    def due(self, step: int, *, seconds_since_save: float) -> bool:
        """Whether a save is due after completing ``step``."""
        if self.every_steps is not None and (step + 1) % self.every_steps == 0:
            return True
        return self.every_seconds is not None and seconds_since_save >= self.every_seconds


Agree = Callable[[int, list[bool]], list[bool]]
"""Or-s flags across ranks for a step (one small collective that also compares the steps)."""


class SaveTiming:
    """A manager's ``should_save`` / ``should_stop`` bookkeeping, agreed across ranks in a group.

    In one process, a watched signal is acted on as soon as it is seen. With ``agree``
    (a process group whose manager has a clock or watched signals), the rank-local
    inputs (this rank's signal, this rank's clock) are or-ed across ranks on every
    ``agree_every``-th step, so every rank answers alike; a signal that arrives after
    the ranks agreed is picked up at the next agreement. ``every_steps`` needs no
    agreement. Not thread-safe, except :meth:`committed` (called by a background save).

    Args:
        cadence: The save cadence.
        watch: The preemption watch, or ``None``.
        agree: The collective that ors flags across ranks, or ``None`` in one process.
        agree_every: Agree on steps that are multiples of this (1: every step).
    """

    def __init__(
        self,
        cadence: SaveCadence,
        watch: PreemptionWatch | None,
        agree: Agree | None = None,
        agree_every: int = 1,
    ):
        self.cadence = cadence
        self.watch = watch
        self._agree = agree
        self._agree_every = agree_every
        self._stop_agreed = False
        self._asked: tuple[int, bool] | None = None  # (step, the agreed answer)
        self.last_saved_step: int | None = None
        self.last_save_time = time.monotonic()
        self.saved_since_signal = False
        self.requested_after_signal = False

    @property
    def preempted(self) -> bool:
        """This rank got a watched signal, or (in a group) the ranks agreed one came."""
        return self._stop_agreed or (self.watch is not None and self.watch.received is not None)

    def stop_requested(self) -> bool:
        """Whether a save now is the one a stop waits for (the same on every rank in a group)."""
        if self._agree is not None:
            return self._stop_agreed
        return self.watch is not None and self.watch.received is not None

    def should_stop(self) -> bool:
        """A stop was requested and a checkpoint has committed since."""
        return self.stop_requested() and self.saved_since_signal

    def should_save(self, step: int) -> bool:
        """Whether to save after ``step`` (collective on agreement steps; see the class)."""
        if step == self.last_saved_step:
            return False
        elapsed = time.monotonic() - self.last_save_time
        if self._agree is None:
            if self.stop_requested() and not self.saved_since_signal:
                return True
            return self.cadence.due(step, seconds_since_save=elapsed)
        if self._stop_agreed and not self.saved_since_signal:
            return True
        if self._asked is not None and self._asked[0] == step:
            return self._asked[1]  # asked twice: no second collective, the same answer
        steps, seconds = self.cadence.every_steps, self.cadence.every_seconds
        by_steps = steps is not None and (step + 1) % steps == 0
        if step % self._agree_every != 0:
            return by_steps
        by_clock = seconds is not None and elapsed >= seconds
        signalled = self.watch is not None and self.watch.received is not None
        clock_due, stop = self._agree(step, [by_clock, signalled])
        if stop and not self._stop_agreed:
            self._stop_agreed = True
            logger.warning("a rank received a preemption signal: every rank saves step %d", step)
        answer = by_steps or clock_due or self._stop_agreed
        self._asked = (step, answer)
        return answer

    def staged(self, step: int, signalled: bool) -> None:
        """An async save of ``step`` is in flight: do not ask for it again."""
        self.last_saved_step = step
        self.last_save_time = time.monotonic()
        self.requested_after_signal |= signalled

    def committed(self, step: int, signalled: bool) -> None:
        """``step`` has committed: the clock restarts, and a requested stop may now happen."""
        self.last_saved_step = step
        self.last_save_time = time.monotonic()
        if signalled and self.stop_requested():
            if not self.saved_since_signal:
                received = None if self.watch is None else self.watch.received
                name = "a preemption signal" if received is None else received.name
                logger.warning("%s received: step %d is saved; the run should stop now", name, step)
            self.saved_since_signal = True

    def close(self) -> None:
        """Put back the signal handlers."""
        if self.watch is not None:
            self.watch.close()
            self.watch = None
