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
import ckpt.format.checksums
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
    "mid_write": (ckpt.format.checksums.HashingWriter, "write"),
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


# ------------------------------------------------- overwrite without RENAME_EXCHANGE

OVERWRITE_STEP = 5
OVERWRITES = 6

# Points of an overwrite that cannot swap directories: (SYSCALLS attribute, nth call).
OVERWRITE_POINTS = [
    ("open", 1),  # the lock
    ("open", 2),  # the marker, under a temporary name
    ("rename", 1),  # the marker in place
    ("open", 3),  # the new file
    ("fsync", 3),  # the new file is durable
    ("open", 4),  # the manifest, under a temporary name
    ("rename", 2),  # the manifest replaces the old one: the commit point
    ("fsync", 5),  # the directory, after the swap
    ("unlink", 1),  # the old file
    ("unlink", 2),  # the marker
]


def no_exchange() -> None:
    """Make the local backend see a filesystem without renameat2 (no RENAME_EXCHANGE)."""
    ckpt.storage.SYSCALLS.renameat2 = lambda *args: False  # type: ignore[method-assign]


def overwrite_state(version: int) -> dict[str, Any]:
    return {"w": torch.full((64, 64), float(version)), "version": version}


def run_overwrites(root: str, point: tuple[str, int] | None, first: int) -> None:
    """Overwrite OVERWRITE_STEP with versions first..OVERWRITES-1 (renameat2 unavailable).

    With ``point``, SIGKILL at the nth call of that OS call during the first overwrite.
    """
    no_exchange()
    armed = [False]
    if point is not None:
        _arm_syscall(*point, armed)
    mgr = ckpt.CheckpointManager(root)
    for version in range(first, OVERWRITES):
        armed[0] = point is not None and version == first
        mgr.save(OVERWRITE_STEP, data=overwrite_state(version), rng=False, overwrite=True)
    mgr.close()


def _arm_syscall(name: str, nth: int, armed: list[bool]) -> None:
    original = getattr(ckpt.storage.SYSCALLS, name)
    calls = [0]

    def wrapped(*args: Any, **kwargs: Any) -> Any:
        if armed[0]:
            calls[0] += 1
            if calls[0] == nth:
                os.kill(os.getpid(), signal.SIGKILL)
        return original(*args, **kwargs)

    setattr(ckpt.storage.SYSCALLS, name, wrapped)


# ------------------------------------------------------------ resource limits


def save_over_file_size_limit(root: str, report: str) -> None:
    """Save with RLIMIT_FSIZE below the file's size; write what happened to ``report``."""
    import resource

    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of death
    mgr = ckpt.CheckpointManager(root)
    mgr.save(1, data={"w": torch.zeros(10)}, rng=False)
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, resource.RLIM_INFINITY))
    try:
        mgr.save(2, data={"w": torch.zeros(2**20)}, rng=False)
        outcome = "saved"
    except ckpt.CheckpointWriteError as e:
        outcome = f"CheckpointWriteError errno={e.errno} path={e.path}"
    except BaseException as e:
        outcome = f"{type(e).__name__}: {e}"
    resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
    with open(report, "w") as f:
        f.write(f"{outcome}\nsteps={mgr.all_steps()}\n")
    mgr.close()


ITEMS = 200


def restore_many_items_with_few_descriptors(root: str, report: str) -> None:
    """Save and restore 200 module items under RLIMIT_NOFILE=64, in place."""
    import resource

    torch.manual_seed(0)
    saved = {f"m{i}": torch.nn.Linear(8, 8) for i in range(ITEMS)}
    live = {f"m{i}": torch.nn.Linear(8, 8) for i in range(ITEMS)}
    pointers = {n: m.weight.data_ptr() for n, m in live.items()}
    resource.setrlimit(resource.RLIMIT_NOFILE, (64, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
    try:
        mgr = ckpt.CheckpointManager(root)
        mgr.save(1, rng=False, **saved)
        mgr.restore(rng=False, **live)
        same = all(
            torch.equal(live[n].weight, saved[n].weight)
            and torch.equal(live[n].bias, saved[n].bias)
            and live[n].weight.data_ptr() == pointers[n]
            for n in saved
        )
        outcome = "ok" if same else "values differ"
        mgr.close()
    except BaseException as e:
        outcome = f"{type(e).__name__}: {e}"
    with open(report, "w") as f:
        f.write(outcome)
