"""Parallel multipart uploads to S3 (moto on loopback): part sizes, contents, bounds, aborts."""

from __future__ import annotations

import os
import threading

import pytest
import torch
from conftest import assert_same_state

import ckpt
from ckpt.storage import multipart
from ckpt.storage.multipart import MAX_PARTS, part_size, part_sizes_unknown
from ckpt.storage.remote import RemoteStorage

MIB = 2**20
PART = 5 * MIB  # S3's minimum: the smallest parts a test can make


# ---------------------------------------------------------------- the arithmetic


@pytest.mark.parametrize(
    "size",
    [0, 1, PART, 8 * MIB, 80 * 10**9, 10**12, 5 * 2**40, 10**13, 48 * 2**40],
)
def test_part_size_keeps_within_10000_parts_of_whole_mib(size):
    part = part_size(size)
    assert part % MIB == 0 and 8 * MIB <= part <= 5 * 2**30
    assert -(-size // part) <= MAX_PARTS
    if part > 8 * MIB:  # not larger than needed: one MiB less would take too many parts
        assert -(-size // (part - MIB)) > MAX_PARTS


def test_part_size_of_sizes_beyond_the_s3_limit_is_an_error():
    assert part_size(10_000 * 5 * 2**30) == 5 * 2**30
    with pytest.raises(ValueError, match="10000 parts"):
        part_size(10_000 * 5 * 2**30 + 1)
    assert part_size(0, minimum=PART) == PART
    assert part_size(0, minimum=MIB) == PART  # never below S3's minimum


def test_part_sizes_without_a_size_grow_to_reach_7_8_tib_in_10000_parts():
    sizes = [part_sizes_unknown(n) for n in range(1, MAX_PARTS + 1)]
    assert sizes[0] == 8 * MIB and sizes == sorted(sizes)
    assert sizes[999] == 8 * MIB and sizes[1000] == 16 * MIB
    assert sum(sizes) >= 7.8 * 2**40
    assert max(sizes) <= 5 * 2**30


# ---------------------------------------------------------------- uploads on moto


class Spy:
    """Wraps ``fs.call_s3``: counts calls and parts in flight; optionally fails a part."""

    def __init__(self, storage: RemoteStorage, fail_part: int | None = None) -> None:
        self.real = storage.fs.call_s3
        self.calls: list[str] = []
        self.part_bytes: list[int] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self.fail_part = fail_part
        self.nices: set[int] = set()
        self.lock = threading.Lock()
        storage.fs.call_s3 = self

    def __call__(self, method, *args, **kwargs):
        with self.lock:
            self.calls.append(method)
        if method != "upload_part":
            return self.real(method, *args, **kwargs)
        with self.lock:
            self.nices.add(os.getpriority(os.PRIO_PROCESS, threading.get_native_id()))
            self.in_flight += len(kwargs["Body"])
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            self.part_bytes.append(len(kwargs["Body"]))
        try:
            if kwargs["PartNumber"] == self.fail_part:
                raise PermissionError("injected: the store refused a part")
            return self.real(method, *args, **kwargs)
        finally:
            with self.lock:
                self.in_flight -= len(kwargs["Body"])


def _storage(s3_bucket) -> RemoteStorage:
    bucket, options = s3_bucket
    storage = RemoteStorage(f"s3://{bucket}/root", options)
    storage.min_part_bytes = PART
    storage.max_in_flight_bytes = 2 * PART
    storage.upload_threads = 3
    return storage


def _writer(data: bytes, fail_at: int | None = None):
    def write(f) -> int:
        for at in range(0, len(data), 3 * 10**5):  # chunks that straddle part boundaries
            if fail_at is not None and at >= fail_at:
                raise RuntimeError("injected: the writer failed")
            f.write(memoryview(data)[at : at + 3 * 10**5])
        return len(data)

    return write


def _no_uploads(storage: RemoteStorage) -> bool:
    bucket = storage.root.split("/")[0]
    return not storage.fs.call_s3("list_multipart_uploads", Bucket=bucket).get("Uploads")


@pytest.mark.s3
def test_a_large_file_goes_up_in_parallel_parts_bounded_in_flight(s3_bucket):
    storage = _storage(s3_bucket)
    spy = Spy(storage)
    data = os.urandom(4 * PART + 12345)
    assert storage.write_file(("dir", "big"), _writer(data)) == len(data)
    assert spy.part_bytes == [PART] * 4 + [12345]
    assert spy.calls.count("create_multipart_upload") == 1
    assert spy.calls[-1] == "complete_multipart_upload" and "put_object" not in spy.calls
    assert spy.max_in_flight <= 2 * PART
    assert storage.read_bytes("dir", "big") == data
    assert _no_uploads(storage)
    with pytest.raises(FileExistsError):  # created only if absent, as every write
        storage.write_file(("dir", "big"), _writer(data))
    assert storage.read_bytes("dir", "big") == data and _no_uploads(storage)
    other = os.urandom(2 * PART)
    storage.write_file(("dir", "big"), _writer(other), replace=True)
    assert storage.read_bytes("dir", "big") == other


@pytest.mark.s3
def test_a_file_smaller_than_a_part_takes_one_put(s3_bucket):
    storage = _storage(s3_bucket)
    spy = Spy(storage)
    data = os.urandom(PART - 1)
    storage.write_file(("small",), _writer(data))
    assert spy.calls == ["put_object"]
    assert storage.read_bytes("small") == data
    storage.write_file(("empty",), lambda f: 0)
    assert storage.read_bytes("empty") == b""


@pytest.mark.s3
@pytest.mark.parametrize("where", ["a part", "the writer"])
def test_a_failure_mid_upload_aborts_it_and_leaves_no_object(s3_bucket, where):
    storage = _storage(s3_bucket)
    spy = Spy(storage, fail_part=3 if where == "a part" else None)
    data = os.urandom(5 * PART)
    fail_at = None if where == "a part" else 3 * PART
    with pytest.raises((PermissionError, RuntimeError), match="injected"):
        storage.write_file(("big",), _writer(data, fail_at))
    assert "abort_multipart_upload" in spy.calls
    assert "complete_multipart_upload" not in spy.calls
    assert not storage.exists("big")
    assert _no_uploads(storage)


@pytest.mark.s3
def test_a_copy_to_s3_goes_up_in_parts_and_restores_bitwise(tmp_path, s3_bucket, monkeypatch):
    monkeypatch.setattr(multipart, "MIN_PART_BYTES", PART)
    bucket, options = s3_bucket
    data = {"w": torch.randn(3 * PART // 4 + 1000), "b": torch.arange(10)}  # ~15 MiB
    with ckpt.CheckpointManager(tmp_path / "src") as mgr:
        mgr.save(1, data=data)
    url = f"s3://{bucket}/run"
    parts: list[int] = []
    real = multipart.MultipartUpload._upload_part

    def spy(self, number, body, size):
        parts.append(size)
        return real(self, number, body, size)

    monkeypatch.setattr(multipart.MultipartUpload, "_upload_part", spy)
    copied: list[int] = []
    source = ckpt.CheckpointReader(tmp_path / "src").steps.storage
    with ckpt.CheckpointWriter(url, storage_options=options) as writer:
        manifest = writer.commit_copy(source, 1, progress=copied.append)
    assert sum(copied) == sum(r.size for r in manifest.files.values())
    assert len(parts) >= 3 and sum(parts) == max(r.size for r in manifest.files.values())
    reader = ckpt.CheckpointReader(url, storage_options=options)
    assert reader.verify(1).step == 1  # every checksum, over the bytes as stored
    assert_same_state(reader.read(1)["data"], data)
    assert _no_uploads(reader.steps.storage)  # type: ignore[arg-type]


@pytest.mark.s3
def test_parts_upload_at_the_niceness_of_the_writer(s3_bucket):
    from ckpt.saving.pipeline import set_thread_nice

    storage = _storage(s3_bucket)
    spy = Spy(storage)
    data = os.urandom(3 * PART)
    own = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    errors: list[BaseException] = []

    def niced() -> None:
        set_thread_nice(min(19, own + 5))  # what the copier thread does (background_nice)
        try:
            storage.write_file(("niced",), _writer(data))
        except BaseException as e:
            errors.append(e)

    thread = threading.Thread(target=niced)
    thread.start()
    thread.join()
    assert not errors
    assert spy.nices == {min(19, own + 5)}
    assert storage.read_bytes("niced") == data
