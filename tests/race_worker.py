"""A writer for the race trials: saves with ``keep_last=1`` in a loop until told to stop."""

from __future__ import annotations

import torch

import ckpt


def state(step: int) -> dict[str, torch.Tensor]:
    """What step ``step`` holds: every value tells the step it came from."""
    return {"w": torch.full((64,), float(step)), "b": torch.arange(8) + step}


def save_in_a_loop(root: str, committed, stop, url_options: dict | None = None) -> None:
    """Save steps 1, 2, ... into ``root`` with ``keep_last=1`` until ``stop`` is set.

    ``committed`` is set once the first checkpoint has committed.
    """
    with ckpt.CheckpointManager(root, keep_last=1, storage_options=url_options) as mgr:
        step = 1
        while True:
            mgr.save(step, data=state(step), rng=False)
            committed.set()
            if stop.is_set():
                return
            step += 1
