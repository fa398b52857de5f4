"""One storage suite over every backend (local disk, memory://, S3 with moto on loopback)."""

from __future__ import annotations

import uuid

import pytest

import ckpt
from ckpt.storage import Storage


@pytest.fixture(params=["local", "memory", pytest.param("s3", marks=pytest.mark.s3)])
def storage(request, tmp_path):
    if request.param == "s3":
        bucket, options = request.getfixturevalue("s3_bucket")
        s = Storage(f"s3://{bucket}/root", options)
    else:
        local = request.param == "local"
        s = Storage(str(tmp_path / "root") if local else f"memory://t-{uuid.uuid4().hex}")
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


def test_storage_returns_the_backend_for_the_url(tmp_path):
    from ckpt.storage import LocalStorage, RemoteStorage, open_storage

    assert type(Storage(str(tmp_path))) is LocalStorage
    assert type(Storage(f"file://{tmp_path}")) is LocalStorage
    assert type(open_storage("memory://x")) is RemoteStorage
    assert Storage(f"file://{tmp_path}").path("a") == str(tmp_path / "a")


def test_each_backend_names_its_commit_strategy(storage, monkeypatch):
    from ckpt.storage import SYSCALLS, CommitStrategy

    storage.makedirs("step")
    if not storage.is_local:
        assert storage.commit_strategy("step", overwrite=False) is CommitStrategy.MANIFEST_LAST
        assert storage.unique_file_names(overwrite=False)
        return
    assert storage.commit_strategy("step", overwrite=True) is CommitStrategy.RENAME_DIR
    assert not storage.unique_file_names(overwrite=True)
    monkeypatch.setattr(SYSCALLS, "renameat2", lambda *args: False)
    fresh = Storage(storage.root)  # probes again: no RENAME_EXCHANGE here now
    assert fresh.commit_strategy("step", overwrite=True) is CommitStrategy.MANIFEST_LAST
    assert fresh.commit_strategy("new", overwrite=True) is CommitStrategy.RENAME_DIR
    assert fresh.commit_strategy("step", overwrite=False) is CommitStrategy.RENAME_DIR
    assert fresh.unique_file_names(overwrite=True)
    assert [n for n in fresh.list_dir() if n.startswith(".ckpt-tmp")] == []  # probe removed


def test_replacing_a_file_is_atomic_and_leaves_no_temporary(storage):
    write(storage, ("f",), b"one")
    storage.write_file(("f",), lambda f: f.write(b"two"), replace=True)
    assert storage.read_bytes("f") == b"two" and storage.list_dir() == ["f"]


def test_a_failed_write_leaves_no_partial_file(storage):
    def broken(f):
        f.write(b"partial")
        raise PermissionError(13, "Permission denied")  # permanent: not retried

    with pytest.raises(OSError):
        storage.write_file(("f",), broken)
    assert not storage.exists("f")


def test_local_errors_name_the_full_path(tmp_path):
    s = Storage(str(tmp_path))
    s.makedirs("d")
    write(s, ("d", "f"), b"x")
    with pytest.raises(FileExistsError) as info:
        write(s, ("d", "f"), b"y")
    assert info.value.filename == str(tmp_path / "d" / "f")
    with pytest.raises(ValueError):
        s.read_bytes("..", "etc")


def test_errors_raised_by_the_writer_callback_pass_through_unchanged(tmp_path):
    s = Storage(str(tmp_path))

    def refuse(f):
        raise ckpt.CheckpointWriteError("mine", path="p", errno=28)

    with pytest.raises(ckpt.CheckpointWriteError, match="mine"):
        s.write_file(("f",), refuse)
    assert not s.exists("f")


@pytest.mark.s3
def test_object_store_metadata_is_never_served_from_a_stale_listing_cache(s3_bucket):
    """Another process's commit or deletion must be seen at once: the reader lists again
    to resolve races, which is useless if the listing comes from fsspec's cache."""
    bucket, options = s3_bucket
    reader = Storage(f"s3://{bucket}/root", options)
    writer = Storage(f"s3://{bucket}/root", options)  # skip_instance_cache: its own cache
    assert reader.fs is not writer.fs
    write(writer, ("a", "f"), b"1")
    assert reader.list_dir() == ["a"] and reader.exists("a", "f")  # now cached by the reader
    write(writer, ("b", "f"), b"22")
    assert reader.list_dir() == ["a", "b"]
    assert reader.exists("b", "f") and reader.size("b", "f") == 2
    writer.remove_tree("a")
    assert reader.list_dir() == ["b"] and not reader.exists("a", "f")
