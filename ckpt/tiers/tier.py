"""A tier: one more root receiving copies of committed steps, with its own cadence and retention."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from ckpt.policies.retention import RetentionPolicy

__all__ = ["Tier"]


@dataclass(frozen=True)
class Tier:
    """A slower, more durable root that committed steps are copied to in the background.

    Passed to :class:`~ckpt.CheckpointManager` as ``tiers=[...]``, fastest first;
    the manager's ``directory`` is the first tier. Every committed step its
    cadence selects is copied there (verified, committed atomically), oldest
    first. Retention applies per tier with the tier's own rules (as the
    manager's ``keep_*``). See ``docs/tiers.md``.

    Args:
        url: A local path or fsspec URL (``s3://bucket/run``).
        every_steps: Copy the steps that complete a multiple of this many steps
            (``(step + 1) % every_steps == 0``); every committed step when ``None``.
        keep_last: Keep this many newest copies here.
        keep_every: Also keep every copy that completes a multiple of this many steps.
        keep_best: Also keep this many copies with the best ``best_metric``.
        best_metric: The metric ranking ``keep_best``.
        best_mode: ``"min"`` or ``"max"``.
        storage_options: Passed to the fsspec filesystem.
        max_backlog: At most this many steps wait to be copied here; beyond it the
            oldest waiting one is dropped (with a warning), never the newest.
    """

    url: str | os.PathLike[str]
    every_steps: int | None = None
    keep_last: int | None = None
    keep_every: int | None = None
    keep_best: int | None = None
    best_metric: str | None = None
    best_mode: str = "min"
    storage_options: dict[str, Any] | None = field(default=None, compare=False)
    max_backlog: int = 64

    def __post_init__(self) -> None:
        if not isinstance(self.url, str | os.PathLike):
            raise TypeError(f"Tier.url must be a path or URL string, got {type(self.url).__name__}")
        if not os.fspath(self.url):
            raise ValueError("Tier.url must not be empty")
        for name in ("every_steps", "max_backlog"):
            value = getattr(self, name)
            optional = name == "every_steps" and value is None
            bad = isinstance(value, bool) or not isinstance(value, int) or value < 1
            if not optional and bad:
                raise ValueError(f"Tier.{name} must be a positive int, got {value!r}")
        if self.storage_options is not None and not isinstance(self.storage_options, dict):
            raise TypeError("Tier.storage_options must be a dict")
        self.retention  # validates the keep_* rules  # noqa: B018

    @property
    def retention(self) -> RetentionPolicy:
        """The tier's retention rules."""
        return RetentionPolicy(
            self.keep_last, self.keep_every, self.keep_best, self.best_metric, self.best_mode
        )

    def selects(self, step: int) -> bool:
        """Whether the tier's cadence copies ``step``."""
        return self.every_steps is None or (step + 1) % self.every_steps == 0
