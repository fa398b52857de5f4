"""Processes for the incremental-checkpoint trials: a writer killed at a counted call, or racing.

``state(step)`` is known in advance: a frozen tensor (the same bytes every step), an
EMA-like copy of it (the same bytes again: one blob), a tensor changing every step,
one changing every third step, and small tensors that stay in the step's own files.
"""

from __future__ import annotations

import os
import signal
from typing import Any

import torch

import ckpt
import ckpt.format.checksums
import ckpt.storage

STEPS = 10
KEEP_LAST = 2


def state(step: int) -> dict[str, Any]:
    """What step ``step`` holds (every large tensor is at least 64 KiB)."""
    frozen = torch.arange(128 * 256, dtype=torch.float32).reshape(128, 256)
    return {
        "frozen": frozen,
        "ema": frozen.clone(),
        "w": torch.full((64, 256), float(step)),
        "slow": torch.full((16384,), step // 3, dtype=torch.int64),
        "small": torch.arange(100, dtype=torch.int64) * step,
        "step": step,
    }


# Every call that makes a save or a retention durable or destroys something.
COUNTED: list[tuple[Any, str]] = [
    (ckpt.format.checksums.HashingWriter, "write"),
    (ckpt.storage.SYSCALLS, "fsync"),
    (ckpt.storage.SYSCALLS, "rename"),
    (ckpt.storage.SYSCALLS, "renameat2"),
    (ckpt.storage.LocalStorage, "remove_file"),
    (ckpt.storage.LocalStorage, "remove_tree"),
]


def _arm(kill_at: int) -> None:
    calls = [0]
    for owner, attribute in COUNTED:
        original = getattr(owner, attribute)

        def wrapped(*args: Any, _original: Any = original, **kwargs: Any) -> Any:
            calls[0] += 1
            if calls[0] == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            return _original(*args, **kwargs)

        setattr(owner, attribute, wrapped)


def run(root: str, kill_at: int | None) -> None:
    """Resume after the latest step of ``root``, save up to STEPS; SIGKILL at call ``kill_at``."""
    if kill_at is not None:
        _arm(kill_at)
    mgr = ckpt.CheckpointManager(root, keep_last=KEEP_LAST, incremental=True)
    latest = mgr.latest_step()
    for step in range(0 if latest is None else latest + 1, STEPS):
        mgr.save(step, data=state(step), rng=False)
    mgr.close()


def save_in_a_loop(root: str, committed: Any, stop: Any) -> None:
    """Save incremental steps with ``keep_last=1`` until ``stop`` is set."""
    with ckpt.CheckpointManager(root, keep_last=1, incremental=True) as mgr:
        step = 0
        while not stop.is_set():
            mgr.save(step, data=state(step), rng=False)
            committed.set()
            step += 1
