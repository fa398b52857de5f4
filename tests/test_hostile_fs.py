"""A hostile filesystem: links, FIFOs, directories and devices where ckpt expects its own files.

Every case runs under an alarm (a hang fails the test instead of blocking the
suite) and hashes everything outside the checkpoint root before and after:
nothing ckpt does may change it. A link or special file is never listed as a
step, never written or deleted through, and reading it is a
``CorruptCheckpointError`` (so ``fallback_to_intact`` applies).
"""

from __future__ import annotations

import os
import socket
import stat
import uuid

import pytest
import torch
from conftest import assert_same_state
from helpers import bounded, fingerprint

import ckpt
from ckpt.format import MANIFEST_NAME, step_dir_name, temp_dir_name
from ckpt.manager import LOCK_NAME


def state(step: int) -> dict:
    return {"w": torch.full((16, 8), float(step)), "n": torch.arange(5) * step}


@pytest.fixture
def world(tmp_path):
    """(root with steps 1 and 2 committed, outside: another run's files)."""
    outside = tmp_path / "outside"
    other = ckpt.CheckpointManager(outside / "other-run")
    other.save(7, data=state(7))
    other.close()
    (outside / "victim.txt").write_text("precious")
    root = tmp_path / "root"
    mgr = ckpt.CheckpointManager(root)
    mgr.save(1, data=state(1))
    mgr.save(2, data=state(2))
    mgr.close()
    before = fingerprint(outside)
    yield root, outside
    assert fingerprint(outside) == before, "something outside the root changed"


def data_file(step_dir) -> str:
    return next(n for n in os.listdir(step_dir) if n.endswith(".safetensors"))


def put_fifo(path) -> None:
    path.unlink()
    os.mkfifo(path)


def put_dir(path) -> None:
    path.unlink()
    path.mkdir()
    (path / "inner").write_text("x")


def put_device(path) -> None:
    path.unlink()
    os.mknod(path, stat.S_IFCHR | 0o600, os.makedev(1, 3))  # /dev/null's numbers


def put_link_outside(path) -> None:
    outside = path.parents[2] / "outside" / "victim.txt"
    path.unlink()
    path.symlink_to(outside)


REPLACEMENTS = {
    "fifo": put_fifo,
    "directory": put_dir,
    "device": put_device,
    "link out of the root": put_link_outside,
}


@pytest.mark.parametrize("target", ["manifest", "tensor file"])
@pytest.mark.parametrize("kind", list(REPLACEMENTS))
def test_a_special_file_in_the_latest_step_is_corrupt_and_fallback_applies(world, kind, target):
    root, _ = world
    step_dir = root / step_dir_name(2)
    name = MANIFEST_NAME if target == "manifest" else data_file(step_dir)
    if kind == "device" and os.geteuid() != 0:
        pytest.skip("making a device node needs root")
    REPLACEMENTS[kind](step_dir / name)
    with bounded():
        strict = ckpt.CheckpointManager(root)
        assert strict.all_steps() == [1, 2]
        for call in (lambda: strict.restore(data={}), strict.verify, strict.read):
            with pytest.raises(ckpt.CorruptCheckpointError) as info:
                call()
            assert name in str(info.value)
        live: dict = {}
        info2 = ckpt.CheckpointManager(root, fallback_to_intact=True).restore(data=live)
        assert info2 is not None and info2.step == 1
        assert_same_state(live, state(1))
        # A keep_best save ranks every step, reading each manifest: it must not hang.
        writer = ckpt.CheckpointManager(root, keep_best=1, best_metric="loss", keep_last=1)
        writer.save(3, data=state(3), metrics={"loss": 0.5})
        writer.close()
        assert 3 in writer.all_steps()


def test_a_step_directory_linked_out_of_the_root_is_never_listed_or_deleted_through(world):
    root, outside = world
    linked = root / step_dir_name(0)
    linked.symlink_to(outside / "other-run" / step_dir_name(7), target_is_directory=True)
    with bounded():
        mgr = ckpt.CheckpointManager(root, keep_last=1)
        assert mgr.all_steps() == [1, 2]
        with pytest.raises(ckpt.CorruptCheckpointError, match="symbolic link"):
            mgr.restore(0, data={})
        mgr.save(3, data=state(3))  # retention deletes 1 and 2, never the link's target
        assert mgr.all_steps() == [3]
        mgr.close()
    assert linked.is_symlink()


def test_a_step_name_that_is_a_file_or_fifo_is_not_a_step(world):
    root, _ = world
    (root / step_dir_name(5)).write_text("not a directory")
    os.mkfifo(root / step_dir_name(6))
    with bounded():
        mgr = ckpt.CheckpointManager(root)
        assert mgr.all_steps() == [1, 2]
        assert mgr.restore(data={}).step == 2


@pytest.mark.parametrize("kind", ["link out of the root", "fifo", "directory", "device"])
def test_the_lock_file_is_never_followed_or_opened_unless_regular(world, kind):
    root, _ = world
    lock = root / LOCK_NAME
    lock.write_text("")
    if kind == "device" and os.geteuid() != 0:
        pytest.skip("making a device node needs root")
    REPLACEMENTS[kind](lock)
    with bounded():
        mgr = ckpt.CheckpointManager(root)
        with pytest.raises(ckpt.CheckpointWriteError, match="writer lock") as info:
            mgr.save(3, data=state(3))
        assert info.value.path == str(lock)
        assert mgr.all_steps() == [1, 2]
        assert mgr.restore(data={}).step == 2  # readers need no lock


def test_a_link_in_place_of_a_manifest_is_removed_itself_by_retention(world):
    root, outside = world
    manifest = root / step_dir_name(1) / MANIFEST_NAME
    manifest.unlink()
    manifest.symlink_to(outside / "other-run" / step_dir_name(7) / MANIFEST_NAME)
    with bounded():
        mgr = ckpt.CheckpointManager(root, keep_last=1)
        mgr.save(3, data=state(3))
        assert mgr.all_steps() == [3]
        mgr.close()


def test_leftovers_that_are_links_are_removed_themselves(world):
    root, outside = world
    dead = temp_dir_name(9, socket.gethostname(), 999999999, "abcd1234")
    (root / dead).symlink_to(outside / "other-run", target_is_directory=True)
    with bounded():
        mgr = ckpt.CheckpointManager(root)
        mgr.save(3, data=state(3))
        mgr.close()
    assert not os.path.lexists(root / dead)


def test_a_link_on_the_way_to_a_file_is_not_followed(world):
    root, _ = world
    storage = ckpt.storage.Storage(str(root))
    (root / "via").symlink_to(root / step_dir_name(1), target_is_directory=True)
    assert not storage.exists("via", MANIFEST_NAME)
    assert storage.list_dir("via") == []
    with pytest.raises(ckpt.CorruptCheckpointError):
        storage.read_bytes("via", MANIFEST_NAME)
    with pytest.raises(OSError):
        storage.remove_file("via", MANIFEST_NAME)
    storage.remove_tree("via")  # the link itself goes
    assert (root / step_dir_name(1) / MANIFEST_NAME).exists()


@pytest.mark.parametrize("where", ["memory", pytest.param("s3", marks=pytest.mark.s3)])
@pytest.mark.parametrize("target", ["manifest", "tensor file"])
def test_a_directory_in_place_of_a_file_on_an_object_store_is_corrupt(request, where, target):
    if where == "s3":
        bucket, options = request.getfixturevalue("s3_bucket")
        url = f"s3://{bucket}/run"
    else:
        url, options = f"memory://hostile-{uuid.uuid4().hex}", None
    mgr = ckpt.CheckpointManager(url, fallback_to_intact=True, storage_options=options)
    mgr.save(1, data=state(1))
    mgr.save(2, data=state(2))
    storage = mgr._storage
    step = step_dir_name(2)
    names = storage.list_dir(step)
    name = MANIFEST_NAME if target == "manifest" else next(n for n in names if "data" in n)
    storage.remove_file(step, name)
    storage.fs.pipe(storage.path(step, name, "inner"), b"x")  # now a "directory"
    with bounded():
        strict = ckpt.CheckpointManager(url, storage_options=options)
        with pytest.raises(ckpt.CorruptCheckpointError):
            strict.restore(data={})
        live: dict = {}
        info = mgr.restore(data=live)
        assert info is not None and info.step == 1
        assert_same_state(live, state(1))
    mgr.close()
