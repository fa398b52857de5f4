"""A process that saves with a second tier, for the kill-during-copy trials.

``run(first, second, more)`` resumes after the newest step of either tier and
saves ``more`` steps with contents known in advance (:func:`state`), each copied
to ``second`` in the background, then closes the manager (finishing the copies);
the trials SIGKILL it at a random time long before.
Runs in a child of a fork server.
"""

from __future__ import annotations

from typing import Any

import torch

import ckpt

KEEP_FIRST = 2
KEEP_SECOND = 3
MAX_BACKLOG = 4


def state(step: int) -> dict[str, Any]:
    """What step ``step`` holds: 512 KiB, so that a kill often lands mid-copy."""
    return {"w": torch.full((128, 1024), float(step)), "v": torch.arange(100) * step, "step": step}


def tiers(second: str, options: dict[str, Any] | None = None) -> list[ckpt.Tier]:
    return [
        ckpt.Tier(second, keep_last=KEEP_SECOND, max_backlog=MAX_BACKLOG, storage_options=options)
    ]


def run(
    first: str,
    second: str,
    more: int,
    started: Any = None,
    options: dict[str, Any] | None = None,
) -> None:
    """Save ``more`` steps after the newest; set ``started`` once the first has committed."""
    mgr = ckpt.CheckpointManager(first, keep_last=KEEP_FIRST, tiers=tiers(second, options))
    newest = max((s for s in mgr.latest_steps() if s is not None), default=-1)
    for step in range(newest + 1, newest + 1 + more):
        mgr.save(step, data=state(step))
        if started is not None:
            started.set()
    mgr.close()
