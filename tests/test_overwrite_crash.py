"""Overwrite where directories cannot be swapped (no ``RENAME_EXCHANGE``), killed anywhere.

The local backend then writes the new files next to the old ones and renames
the manifest over the old one. A SIGKILL at any point leaves the step listed,
intact and holding the old version or the new one; the next save finishes the
cleanup, so no old file is stranded. ``renameat2`` is made unavailable through
the backend (``ckpt.storage.SYSCALLS``), in the worker processes only.
"""

from __future__ import annotations

import os
import random
import signal
import threading
import time

import crash_worker
import pytest
from conftest import assert_same_state
from crash_worker import OVERWRITE_POINTS, OVERWRITE_STEP, OVERWRITES, overwrite_state

import ckpt
import ckpt.storage
from ckpt.format import MANIFEST_NAME, step_dir_name

SEED = int(os.environ.get("CKPT_KILL_SEED", random.SystemRandom().randrange(2**32)))
TRIALS = 12


def launch(context, root, point, first: int, kill_after: float | None = None) -> int:
    process = context.Process(target=crash_worker.run_overwrites, args=(str(root), point, first))
    process.start()
    process.join(timeout=kill_after)
    if process.exitcode is None and kill_after is not None:
        process.kill()
    process.join(timeout=120)
    assert process.exitcode is not None, "worker hung"
    return process.exitcode


def check(root, context: str) -> int:
    """The step is listed and intact; return the version it holds."""
    mgr = ckpt.CheckpointManager(root)
    assert mgr.all_steps() == [OVERWRITE_STEP], context
    mgr.verify(OVERWRITE_STEP)
    data = mgr.read(OVERWRITE_STEP)["data"]
    assert_same_state(data, overwrite_state(data["version"]))
    return data["version"]


def files_left(root) -> list[str]:
    return sorted(os.listdir(root / step_dir_name(OVERWRITE_STEP)))


def first_version(root) -> None:
    mgr = ckpt.CheckpointManager(root)
    mgr.save(OVERWRITE_STEP, data=overwrite_state(0), rng=False)
    mgr.close()


@pytest.mark.parametrize(
    ("name", "nth"), OVERWRITE_POINTS, ids=[f"{n}-{k}" for n, k in OVERWRITE_POINTS]
)
def test_a_kill_at_each_point_of_an_overwrite_leaves_the_step_listed(
    tmp_path, forkserver, name, nth
):
    first_version(tmp_path)
    assert launch(forkserver, tmp_path, (name, nth), first=1) == -signal.SIGKILL
    version = check(tmp_path, f"killed at {name} #{nth}")
    assert version in (0, 1)
    assert launch(forkserver, tmp_path, None, first=OVERWRITES - 1) == 0
    assert check(tmp_path, "after the next save") == OVERWRITES - 1
    left = files_left(tmp_path)
    assert len(left) == 2 and MANIFEST_NAME in left, left  # nothing stranded
    assert [n for n in os.listdir(tmp_path) if n.startswith(".ckpt-tmp")] == []


def test_kills_at_random_moments_of_overwrites(tmp_path, forkserver):
    rng = random.Random(SEED)
    first_version(tmp_path / "timing")
    began = time.monotonic()
    assert launch(forkserver, tmp_path / "timing", None, first=1) == 0
    duration = time.monotonic() - began
    root = tmp_path / "run"
    first_version(root)
    version, killed = 0, 0
    for trial in range(TRIALS):
        code = launch(forkserver, root, None, version + 1, rng.uniform(0, duration))
        killed += code == -signal.SIGKILL
        now = check(root, f"trial {trial}, seed {SEED}")
        assert now >= version, f"trial {trial}: went back from {version} to {now}"
        version = now if now < OVERWRITES - 1 else 0
    assert killed >= 1
    assert launch(forkserver, root, None, first=OVERWRITES - 1) == 0
    assert len(files_left(root)) == 2, files_left(root)


def test_readers_never_see_neither_while_overwrites_cannot_swap(tmp_path, monkeypatch):
    monkeypatch.setattr(ckpt.storage.SYSCALLS, "renameat2", lambda *args: False)
    mgr = ckpt.CheckpointManager(tmp_path)
    mgr.save(OVERWRITE_STEP, data=overwrite_state(0), rng=False)
    seen, errors, stop = set(), [], threading.Event()

    def reader():
        other = ckpt.CheckpointManager(tmp_path)
        while not stop.is_set():
            try:
                seen.add(other.read(OVERWRITE_STEP)["data"]["version"])
            except Exception as e:  # any error is a failure of the guarantee
                errors.append(e)
                return

    thread = threading.Thread(target=reader)
    thread.start()
    for version in range(1, 20):
        mgr.save(OVERWRITE_STEP, data=overwrite_state(version), overwrite=True, rng=False)
    stop.set()
    thread.join()
    assert errors == []
    assert len(files_left(tmp_path)) == 2
    assert_same_state(mgr.read(OVERWRITE_STEP)["data"], overwrite_state(19))
    mgr.close()
