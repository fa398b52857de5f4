"""A process that saves checkpoints in a loop, for the kill-during-save trials.

``run(root, point)`` resumes after the latest checkpoint in ``root`` and saves
steps with contents known in advance (:func:`state`). With ``point = (name,
nth)`` it SIGKILLs itself at the ``nth`` call of that step of the commit
protocol during the save of step ARMED_STEP; with ``point = None`` it just
saves until killed from outside or done. Runs in a child of a fork server.
"""

from __future__ import annotations

import os
import signal
from typing import Any

import torch

import ckpt
import ckpt.integrity
import ckpt.storage

STEPS = 40
BIG_STEPS = 8
ARMED_STEP = 5
KEEP_LAST = 3


def state(step: int, big: bool = False) -> dict[str, Any]:
    """What step ``step`` holds: enough bytes that a kill often lands mid-write.

    ``big`` (12 MiB) spans several parts of a multipart upload.
    """
    return {
        "w": torch.full((3 * 2**20,) if big else (128, 256), float(step)),
        "v": torch.arange(1000, dtype=torch.int64) * step,
        "step": step,
    }


# Each named point of the commit protocol: (object, attribute) to wrap. OS calls are
# wrapped where the local backend makes them all: ckpt.storage.SYSCALLS.
POINTS: dict[str, tuple[Any, str]] = {
    "makedirs": (ckpt.storage.LocalStorage, "makedirs"),
    "write_file": (ckpt.storage.LocalStorage, "write_file"),
    "mid_write": (ckpt.integrity.HashingWriter, "write"),
    "fsync": (ckpt.storage.SYSCALLS, "fsync"),
    "rename": (ckpt.storage.SYSCALLS, "renameat2"),
    "remove_manifest": (ckpt.storage.LocalStorage, "remove_file"),
    "remove_tree": (ckpt.storage.LocalStorage, "remove_tree"),
}


def _arm(name: str, nth: int, armed: list[bool]) -> None:
    owner, attribute = POINTS[name]
    original = getattr(owner, attribute)
    calls = [0]

    def wrapped(*args: Any, **kwargs: Any) -> Any:
        if armed[0]:
            calls[0] += 1
            if calls[0] == nth:
                os.kill(os.getpid(), signal.SIGKILL)
        return original(*args, **kwargs)

    setattr(owner, attribute, wrapped)


def run(
    root: str,
    point: tuple[str, int] | None,
    storage_options: dict[str, Any] | None = None,
    big: bool = False,
) -> None:
    armed = [False]
    if point is not None:
        _arm(*point, armed)
    mgr = ckpt.CheckpointManager(root, keep_last=KEEP_LAST, storage_options=storage_options)
    latest = mgr.latest_step()
    for step in range(0 if latest is None else latest + 1, BIG_STEPS if big else STEPS):
        armed[0] = point is not None and step == ARMED_STEP
        mgr.save(step, data=state(step, big), rng=False)
    mgr.close()
