"""A hostile environment: read-only mounts, no inodes, no space, refused calls, low limits.

Each failure is a ``CheckpointWriteError`` naming the path, with nothing left
behind and earlier checkpoints intact. Real tmpfs mounts where this process
may mount (root on Linux; skipped elsewhere, never left mounted); other errno
values are injected through the local backend's one seam, ``SYSCALLS``.
"""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess

import crash_worker
import pytest
import torch
from conftest import assert_same_state

import ckpt
import ckpt.storage
from ckpt.format import step_dir_name
from ckpt.manager import LOCK_NAME


def state(step: int, n: int = 64) -> dict:
    return {"w": torch.full((n,), float(step))}


def mount(path, options: str) -> None:
    path.mkdir(exist_ok=True)
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)],
        capture_output=True,
        check=False,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount tmpfs here: {done.stderr.decode().strip()}")


@contextlib.contextmanager
def tmpfs(path, options: str):
    """A tmpfs at ``path`` for the block, always unmounted after."""
    mount(path, options)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def remount_read_only(path) -> None:
    subprocess.run(["mount", "-o", "remount,ro", str(path)], check=True)


def leftovers(root) -> list[str]:
    return [n for n in os.listdir(root) if n.startswith(".ckpt-") and n != LOCK_NAME]


def test_a_read_only_filesystem_refuses_saves_clearly_and_still_restores(tmp_path):
    with tmpfs(tmp_path / "m", "size=4m") as m:
        mgr = ckpt.CheckpointManager(m / "run")
        mgr.save(1, data=state(1))
        mgr.close()
        remount_read_only(m)
        again = ckpt.CheckpointManager(m / "run")
        with pytest.raises(ckpt.CheckpointWriteError, match="writer lock") as info:
            again.save(2, data=state(2))
        assert info.value.errno == errno.EROFS and info.value.path == str(m / "run" / LOCK_NAME)
        with pytest.raises(ckpt.CheckpointWriteError, match="writer lock"):
            again.save(1, data=state(2), overwrite=True)  # probing for RENAME_EXCHANGE too
        live: dict = {}
        assert again.restore(data=live).step == 1
        assert_same_state(live, state(1))
        with pytest.raises(ckpt.CheckpointWriteError) as missing:
            ckpt.CheckpointManager(m / "missing" / "run")
        assert missing.value.errno == errno.EROFS and "missing" in str(missing.value)


@pytest.mark.parametrize(
    ("options", "code"), [("size=1m", errno.ENOSPC), ("nr_inodes=12", errno.ENOSPC)]
)
def test_no_space_or_no_inodes_is_a_clear_error_and_leaves_nothing(tmp_path, options, code):
    with tmpfs(tmp_path / "m", options) as m:
        mgr = ckpt.CheckpointManager(m)
        mgr.save(1, data=state(1))
        filler = 0
        with contextlib.suppress(OSError):  # use up the inodes (or leave the space alone)
            while "nr_inodes" in options:
                (m / f"filler{filler}").touch()
                filler += 1
        if filler:
            (m / "filler0").unlink()  # room for a temporary directory, not for its files
        with pytest.raises(ckpt.CheckpointWriteError, match="step 2") as info:
            mgr.save(2, data=state(2, n=2**19))  # 2 MiB: more than 1 MiB of space
        assert info.value.errno == code and info.value.path.startswith(str(m))
        assert mgr.all_steps() == [1] and leftovers(m) == []
        assert_same_state(mgr.read(1)["data"], state(1))
        mgr.close()


CODES = [errno.EACCES, errno.EDQUOT, errno.EROFS, errno.ENOSPC, errno.EMFILE, errno.EIO]


@pytest.mark.parametrize("code", CODES, ids=[errno.errorcode[c] for c in CODES])
@pytest.mark.parametrize("nth", [1, 2, 3], ids=["lock", "data file", "manifest"])
def test_each_refused_call_is_a_clear_error_naming_the_path(tmp_path, monkeypatch, code, nth):
    first = ckpt.CheckpointManager(tmp_path)
    first.save(1, data=state(1))
    first.close()
    original = ckpt.storage.SYSCALLS.open
    calls = [0]

    def refusing(*args, **kwargs):
        calls[0] += 1
        if calls[0] == nth:
            raise OSError(code, os.strerror(code))
        return original(*args, **kwargs)

    monkeypatch.setattr(ckpt.storage.SYSCALLS, "open", refusing)
    mgr = ckpt.CheckpointManager(tmp_path)
    with pytest.raises(ckpt.CheckpointWriteError) as info:
        mgr.save(2, data=state(2))
    monkeypatch.undo()
    assert info.value.errno == code and info.value.path.startswith(str(tmp_path))
    assert os.strerror(code) in str(info.value)
    assert mgr.all_steps() == [1] and leftovers(tmp_path) == []
    mgr.close()


def run_worker(forkserver, function, root, report) -> str:
    process = forkserver.Process(target=function, args=(str(root), str(report)))
    process.start()
    process.join(timeout=300)
    assert process.exitcode == 0, f"worker ended with {process.exitcode}"
    return report.read_text()


def test_a_file_size_limit_is_a_clear_error(tmp_path, forkserver):
    outcome = run_worker(
        forkserver, crash_worker.save_over_file_size_limit, tmp_path / "run", tmp_path / "out"
    )
    assert outcome.startswith(f"CheckpointWriteError errno={errno.EFBIG}"), outcome
    assert "steps=[1]" in outcome
    assert leftovers(tmp_path / "run") == []


def test_restoring_200_items_under_a_64_descriptor_limit_works_in_place(tmp_path, forkserver):
    outcome = run_worker(
        forkserver,
        crash_worker.restore_many_items_with_few_descriptors,
        tmp_path / "run",
        tmp_path / "out",
    )
    assert outcome == "ok"
    assert len(os.listdir(tmp_path / "run" / step_dir_name(1))) == crash_worker.ITEMS + 1


@pytest.mark.parametrize("code", [errno.EACCES, errno.EIO, errno.EMFILE])
def test_a_refused_read_is_a_clear_error_and_touches_nothing(tmp_path, monkeypatch, code):
    mgr = ckpt.CheckpointManager(tmp_path, fallback_to_intact=True)
    mgr.save(1, data=state(1))
    mgr.save(2, data=state(2))

    def refusing(*args, **kwargs):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(ckpt.storage.SYSCALLS, "open", refusing)
    live = state(7)
    with pytest.raises(ckpt.CheckpointReadError) as info:
        mgr.restore(data=live)  # not corruption: no fallback to an older step either
    monkeypatch.undo()
    assert info.value.errno == code and info.value.path.startswith(str(tmp_path))
    assert isinstance(info.value, OSError) and os.strerror(code) in str(info.value)
    assert_same_state(live, state(7))
    mgr.close()
