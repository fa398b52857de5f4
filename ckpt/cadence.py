"""When to save: every N steps and/or every T seconds (a pure policy)."""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["SaveCadence"]


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
