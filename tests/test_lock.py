"""The writer lock cannot be bypassed: deleted or replaced while held, or used from a fork."""

from __future__ import annotations

import os
import uuid

import pytest
import torch

import ckpt
import ckpt.saving.commit
from ckpt.format import step_dir_name
from ckpt.manager import LOCK_NAME


def state(step: int) -> dict:
    return {"w": torch.full((4, 4), float(step))}


def test_a_lock_file_deleted_while_held_refuses_the_next_commit(tmp_path):
    first = ckpt.CheckpointManager(tmp_path)
    first.save(1, data=state(1))
    os.unlink(tmp_path / LOCK_NAME)
    second = ckpt.CheckpointManager(tmp_path)
    second.save(2, data=state(2))  # the lock file is gone, so a second writer got in
    with pytest.raises(ckpt.CheckpointLockedError, match="was replaced while held"):
        first.save(3, data=state(3))
    assert second.all_steps() == [1, 2]
    second.save(3, data=state(3))
    second.close()
    first.close()


def test_a_lock_file_deleted_while_held_and_not_recreated_refuses_too(tmp_path):
    first = ckpt.CheckpointManager(tmp_path)
    first.save(1, data=state(1))
    os.unlink(tmp_path / LOCK_NAME)
    with pytest.raises(ckpt.CheckpointLockedError, match="deleted while held"):
        first.save(2, data=state(2))
    first.close()


def test_a_lock_file_replaced_while_held_refuses_the_next_commit(tmp_path):
    first = ckpt.CheckpointManager(tmp_path)
    first.save(1, data=state(1))
    (tmp_path / "other").write_text("someone else")
    os.replace(tmp_path / "other", tmp_path / LOCK_NAME)
    with pytest.raises(ckpt.CheckpointLockedError, match="replaced while held"):
        first.save(2, data=state(2))
    assert first.all_steps() == [1]
    first.close()


@pytest.mark.parametrize("where", ["local", "memory"])
def test_a_lock_deleted_during_a_save_refuses_its_commit(tmp_path, monkeypatch, where):
    url = str(tmp_path) if where == "local" else f"memory://lock-{uuid.uuid4().hex}"
    mgr = ckpt.CheckpointManager(url)
    mgr.save(1, data=state(1))
    original = ckpt.saving.commit.write_checkpoint_files

    def delete_lock_first(*args, **kwargs):
        mgr._storage.remove_file(LOCK_NAME)  # another process breaks the lock mid-save
        return original(*args, **kwargs)

    monkeypatch.setattr(ckpt.saving.commit, "write_checkpoint_files", delete_lock_first)
    with pytest.raises(ckpt.CheckpointLockedError):
        mgr.save(2, data=state(2))
    monkeypatch.undo()
    assert mgr.all_steps() == [1]
    assert not [n for n in mgr._storage.list_dir() if n.startswith(".ckpt-tmp")]
    assert mgr._storage.list_dir(step_dir_name(2)) == []
    mgr.close()


def test_a_forked_child_refuses_to_save_and_closes_nothing_it_does_not_own(tmp_path):
    mgr = ckpt.CheckpointManager(tmp_path)
    mgr.save(1, data=state(1))
    pid = os.fork()
    if pid == 0:  # the child: exit codes tell the parent what happened
        code = 0
        try:
            fd = os.open(os.devnull, os.O_RDONLY)  # likely the number the lock had
            try:
                mgr.save(2, data=state(2))
                code = 3
            except ckpt.CheckpointLockedError as e:
                code = 0 if "forked child" in str(e) else 4
            mgr.close()
            os.fstat(fd)  # still open: close() did not touch it
        except BaseException:
            code = 5
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert mgr.all_steps() == [1]
    mgr.save(2, data=state(2))  # the parent still holds its lock
    with pytest.raises(ckpt.CheckpointLockedError):
        ckpt.CheckpointManager(tmp_path).save(3, data=state(3))
    mgr.close()


def test_a_lock_file_hard_linked_to_a_file_outside_the_root_is_left_untouched(tmp_path):
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    victim = outside / "victim"
    victim.write_bytes(b"IMPORTANT DATA, must not change\n" * 3)
    before = victim.read_bytes()
    os.link(victim, root / LOCK_NAME)
    manager = ckpt.CheckpointManager(root)
    with pytest.raises(ckpt.CheckpointWriteError, match="2 hard links") as info:
        manager.save(0, data=state(0))
    assert info.value.path is not None and LOCK_NAME in str(info.value.path)
    assert "nothing was written" in str(info.value)
    assert victim.read_bytes() == before
    assert manager.all_steps() == []
    manager.close()


def test_the_lock_file_is_never_opened_with_o_trunc(tmp_path, monkeypatch):
    from ckpt.storage.syscalls import SYSCALLS

    flags: list[int] = []
    real_open = SYSCALLS.open

    def spy(path, flag, *args, **kwargs):
        if os.fsdecode(path) == LOCK_NAME:
            flags.append(flag)
        return real_open(path, flag, *args, **kwargs)

    monkeypatch.setattr(SYSCALLS, "open", spy)
    with ckpt.CheckpointManager(tmp_path) as manager:
        manager.save(0, data=state(0))
    assert flags and all(not flag & os.O_TRUNC for flag in flags)
