"""One storage suite over every backend (local disk, memory://)."""

from __future__ import annotations

import uuid

import pytest

import ckpt
from ckpt.storage import Storage


@pytest.fixture(params=["local", "memory"])
def storage(request, tmp_path):
    url = str(tmp_path / "root") if request.param == "local" else f"memory://t-{uuid.uuid4().hex}"
    s = Storage(url)
    s.makedirs()
    return s


def write(storage: Storage, parts: tuple[str, ...], data: bytes) -> int:
    return storage.write_file(parts, lambda f: f.write(data) or len(data))


def test_write_read_size_and_list(storage):
    storage.makedirs("d")
    assert write(storage, ("d", "a.bin"), b"hello") == 5
    assert storage.read_bytes("d", "a.bin") == b"hello"
    assert storage.size("d", "a.bin") == 5
    assert storage.exists("d", "a.bin") and not storage.exists("d", "b.bin")
    assert storage.list_dir("d") == ["a.bin"]
    assert storage.list_dir() == ["d"]
    assert storage.list_dir("missing") == []
    with storage.open_read("d", "a.bin") as f:
        f.seek(1)
        buf = bytearray(3)
        assert f.readinto(buf) == 3 and bytes(buf) == b"ell"


def test_missing_files_are_not_found_errors(storage):
    for call in (storage.read_bytes, storage.size):
        with pytest.raises(ckpt.CheckpointNotFoundError) as info:
            call("nope.bin")
        assert info.value.path.endswith("nope.bin")


def test_commit_moves_a_directory_and_refuses_to_replace(storage):
    if not storage.atomic_rename:
        with pytest.raises(NotImplementedError):
            storage.commit_dir("tmp1", "final")
        return
    for name in ("tmp1", "tmp2"):
        storage.makedirs(name)
        write(storage, (name, "f"), name.encode())
    storage.commit_dir("tmp1", "final")
    assert storage.read_bytes("final", "f") == b"tmp1" and not storage.exists("tmp1")
    with pytest.raises(ckpt.CheckpointExistsError):
        storage.commit_dir("tmp2", "final")
    assert storage.read_bytes("final", "f") == b"tmp1"


def test_remove_is_idempotent(storage):
    storage.makedirs("d")
    write(storage, ("d", "f"), b"x")
    storage.remove_file("d", "f")
    storage.remove_file("d", "f")
    storage.remove_tree("d")
    storage.remove_tree("d")
    assert not storage.exists("d")


def test_age_is_known_for_local_files(tmp_path):
    s = Storage(str(tmp_path))
    write(s, ("f",), b"x")
    age = s.age_seconds("f")
    assert age is not None and 0 <= age < 60
    assert s.age_seconds("missing") is None


def test_bad_directory_arguments():
    with pytest.raises(TypeError):
        Storage(3)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        Storage("")


def test_url_of_keeps_the_users_spelling(tmp_path):
    assert Storage("memory://a/b").url_of("x", "y") == "memory://a/b/x/y"
    assert Storage(str(tmp_path)).url_of("x") == str(tmp_path / "x")


def test_object_store_files_are_created_only_if_absent_unless_replaced(storage):
    write(storage, ("f",), b"one")
    with pytest.raises(FileExistsError):
        write(storage, ("f",), b"two")
    if not storage.is_local:  # local disk never replaces a file: it renames directories
        storage.write_file(("f",), lambda f: f.write(b"three"), replace=True)
        assert storage.read_bytes("f") == b"three"


def test_object_store_locks_are_taken_over_only_when_abandoned_or_stale(tmp_path):
    s = Storage(f"memory://t-{uuid.uuid4().hex}")
    held = s.lock("lock", "host a pid 1 since t")
    with pytest.raises(ckpt.CheckpointLockedError, match="host a pid 1"):
        s.lock("lock", "host b pid 2 since t")
    s.lock("lock", "host b pid 2 since t", abandoned=lambda holder: "host a" in holder)
    assert s.read_bytes("lock") == b"host b pid 2 since t"
    s.lock("lock", "host c pid 3 since t", stale_after=0.0)
    assert s.read_bytes("lock") == b"host c pid 3 since t"
    held.release()
    assert not s.exists("lock")
