"""Failed writes, one writer per directory, atomic overwrite, and readers racing writers."""

from __future__ import annotations

import errno
import multiprocessing
import os
import threading

import pytest
import torch
from conftest import assert_same_state

import ckpt
import ckpt.io.read
import ckpt.io.write
import ckpt.storage
from ckpt.format import MANIFEST_NAME, step_dir_name
from ckpt.manager import LOCK_NAME


def entries(root) -> list[str]:
    return sorted(n for n in os.listdir(root) if n != LOCK_NAME)


class Faults:
    """Make the Nth call of an OS call of the local backend fail with an errno."""

    def __init__(self, monkeypatch, name: str, code: int, nth: int):
        self.calls = 0
        original = getattr(ckpt.storage.SYSCALLS, name)

        def failing(*args, **kwargs):
            self.calls += 1
            if self.calls == nth:
                raise OSError(code, os.strerror(code))
            return original(*args, **kwargs)

        monkeypatch.setattr(ckpt.storage.SYSCALLS, name, failing)


def big_state(step: int) -> dict:
    return {"w": torch.full((64, 64), float(step)), "b": torch.arange(10) + step}


@pytest.mark.parametrize(
    ("function", "code", "nth"),
    [
        ("fsync", errno.EIO, 1),  # the first tensor file
        ("fsync", errno.EIO, 2),  # the manifest
        ("fsync", errno.EIO, 3),  # the temporary directory
        ("fsync", errno.EIO, 4),  # the root, after the rename
        ("rename", errno.ENOSPC, 1),
        ("open", errno.ENOSPC, 1),
        ("mkdir", errno.ENOSPC, 1),
    ],
)
def test_a_failed_write_is_a_clear_error_and_loses_nothing(
    tmp_path, monkeypatch, function, code, nth
):
    mgr = ckpt.CheckpointManager(tmp_path)
    mgr.save(1, data=big_state(1))
    monkeypatch.setattr(ckpt.storage.SYSCALLS, "renameat2", lambda *a: False)  # plain rename
    Faults(monkeypatch, function, code, nth)
    with pytest.raises(ckpt.CheckpointWriteError) as info:
        mgr.save(2, data=big_state(2))
    assert info.value.errno == code and isinstance(info.value, OSError)
    assert "step 2" in str(info.value) and "earlier checkpoints are intact" in str(info.value)
    monkeypatch.undo()
    committed = mgr.all_steps()
    assert 1 in committed and set(committed) <= {1, 2}  # a root fsync failure comes after commit
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".ckpt-tmp")]
    assert_same_state(mgr.read(1)["data"], big_state(1))
    mgr.save(3, data=big_state(3))  # the manager is still usable
    assert mgr.verify(3).step == 3


def test_disk_full_in_the_middle_of_a_tensor_file(tmp_path, monkeypatch):
    mgr = ckpt.CheckpointManager(tmp_path)
    mgr.save(1, data=big_state(1))
    original = ckpt.io.write.write_tensors

    def fill_disk(f, tensors, metadata=None):
        f.write(b"\0" * 100)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt.io.write, "write_tensors", fill_disk)
    with pytest.raises(ckpt.CheckpointWriteError, match="No space left") as info:
        mgr.save(2, data=big_state(2))
    assert info.value.errno == errno.ENOSPC
    monkeypatch.setattr(ckpt.io.write, "write_tensors", original)
    assert mgr.all_steps() == [1] and entries(tmp_path) == [step_dir_name(1)]


def test_a_second_writer_fails_fast_and_names_the_holder(tmp_path):
    first = ckpt.CheckpointManager(tmp_path)
    first.save(1, data={"a": 1})
    second = ckpt.CheckpointManager(tmp_path)
    with pytest.raises(ckpt.CheckpointLockedError, match=f"pid {os.getpid()}") as info:
        second.save(2, data={"a": 2})
    assert isinstance(info.value, BlockingIOError)
    assert second.restore(data={}) is not None  # readers need no lock
    first.close()
    second.save(2, data={"a": 2})
    second.close()


def _hold_lock_then_die(root: str, ready) -> None:
    ckpt.CheckpointManager(root).save(1, data={"a": 1})
    ready.set()
    os.kill(os.getpid(), 9)


def test_the_lock_of_a_killed_writer_is_free(tmp_path):
    context = multiprocessing.get_context("fork")
    ready = context.Event()
    child = context.Process(target=_hold_lock_then_die, args=(str(tmp_path), ready))
    child.start()
    child.join(60)
    assert ready.is_set() and child.exitcode == -9
    mgr = ckpt.CheckpointManager(tmp_path)
    mgr.save(2, data={"a": 2})
    assert mgr.all_steps() == [1, 2]


def test_overwrite_replaces_a_step_and_readers_never_see_neither(tmp_path):
    mgr = ckpt.CheckpointManager(tmp_path)
    mgr.save(5, data=big_state(0))
    with pytest.raises(ckpt.CheckpointExistsError, match="overwrite=True"):
        mgr.save(5, data=big_state(1))
    seen, errors, stop = set(), [], threading.Event()

    def reader():
        other = ckpt.CheckpointManager(tmp_path)
        while not stop.is_set():
            try:
                value = other.read(5)["data"]["w"][0, 0].item()
            except Exception as e:  # any error is a failure of the guarantee
                errors.append(e)
                return
            seen.add(value)

    thread = threading.Thread(target=reader)
    thread.start()
    for version in range(1, 30):
        mgr.save(5, data=big_state(version), overwrite=True)
    stop.set()
    thread.join()
    assert errors == []
    assert seen <= set(map(float, range(30))) and len(seen) > 1
    assert mgr.all_steps() == [5] and entries(tmp_path) == [step_dir_name(5)]
    assert_same_state(mgr.read(5)["data"], big_state(29))


def test_a_restore_racing_retention_gets_a_retryable_error_or_the_newer_step(tmp_path, monkeypatch):
    mgr = ckpt.CheckpointManager(tmp_path)
    mgr.save(1, data=big_state(1))
    mgr.save(2, data=big_state(2))
    original = ckpt.io.read.load_tensors
    deleted = []

    def delete_first(storage, directory, *args, **kwargs):
        if not deleted:  # another process's retention removes this step now
            deleted.append(directory)
            storage.remove_file(directory, MANIFEST_NAME)
            storage.remove_tree(directory)
        return original(storage, directory, *args, **kwargs)

    monkeypatch.setattr(ckpt.io.read, "load_tensors", delete_first)
    monkeypatch.setattr("ckpt.restoring.pipeline.load_tensors", delete_first)
    live: dict = {}
    with pytest.raises(ckpt.CheckpointNotFoundError, match="deleted while being restored"):
        mgr.restore(1, data=live)
    assert live == {}

    deleted.clear()
    mgr.save(3, data=big_state(3))
    info = mgr.restore(data=live)  # latest (3) vanishes mid-restore: the list is read again
    assert info is not None and info.step == 2
    assert_same_state(live, big_state(2))


def test_a_forked_child_of_a_killed_writer_does_not_keep_the_lock(tmp_path):
    """A DataLoader worker (a forked child) may outlive a killed trainer for a while."""
    read_end, write_end = os.pipe()
    writer = os.fork()
    if writer == 0:  # the trainer: takes the lock, forks a worker, dies
        try:
            mgr = ckpt.CheckpointManager(tmp_path)
            mgr.save(1, data={"a": 1})
            worker = os.fork()
            if worker == 0:
                os.close(write_end)
                os.read(read_end, 1)  # lingers until the test is done
                os._exit(0)
        finally:
            os.kill(os.getpid(), 9)
    os.close(read_end)
    _, status = os.waitpid(writer, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == 9
    try:
        mgr = ckpt.CheckpointManager(tmp_path)
        mgr.save(2, data={"a": 2})  # the worker is still alive, and the lock is free
        mgr.close()
    finally:
        os.close(write_end)  # lets the worker exit
