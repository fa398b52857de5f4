"""Parallel multipart uploads to S3-like object stores (s3fs), with bounded memory.

A :class:`MultipartUpload` is the file a ``write`` callback of
:meth:`~ckpt.storage.remote.RemoteStorage.write_file` fills: bytes are cut into
parts of a fixed size, and each full part is uploaded on a small thread pool
while the caller goes on writing (and hashing, in order). At most
``max_in_flight`` bytes of parts wait or upload at once, plus the part being
filled. An object
smaller than one part is sent in one PUT. Completing the upload (or the PUT) is
the only step that makes the object visible, with ``If-None-Match: *`` unless it
replaces; any failure aborts the upload, so no part is kept or listed.

Part sizes: S3 allows at most 10,000 parts of 5 MiB to 5 GiB (the last may be
smaller). With the size known, the part is the larger of the minimum part and
``size / 10,000``, rounded up to whole MiB; unknown, the part size doubles every
1,000 parts, which reaches 10,000 parts only beyond 7.8 TiB from 8 MiB parts.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

__all__ = [
    "MAX_IN_FLIGHT_BYTES",
    "MAX_PARTS",
    "MIN_PART_BYTES",
    "THREADS",
    "MultipartUpload",
    "part_size",
    "part_sizes_unknown",
]

logger = logging.getLogger(__name__)

MIN_PART_BYTES = 8 * 2**20
"""The smallest part ckpt uploads (S3's own minimum is 5 MiB); smaller objects take one PUT."""
MAX_IN_FLIGHT_BYTES = 32 * 2**20
"""Bytes of parts waiting or uploading at once, per upload (at least one part; the part being
filled comes on top). 32 MiB: ``THREADS`` parts of 8 MiB, so no part waits for a thread."""
THREADS = 4
"""Parts uploading at once, per upload (fewer when ``MAX_IN_FLIGHT_BYTES`` allows fewer)."""
MAX_PARTS = 10_000
"""S3's limit on the parts of one upload."""
S3_MIN_PART = 5 * 2**20
S3_MAX_PART = 5 * 2**30
_MIB = 2**20
_GROWTH_PARTS = 1_000
"""Without a known size, the part size doubles after this many parts."""
_CHECKSUM_KEYS = (
    "ChecksumCRC32",
    "ChecksumCRC32C",
    "ChecksumCRC64NVME",
    "ChecksumSHA1",
    "ChecksumSHA256",
)


def part_size(size: int, minimum: int = MIN_PART_BYTES) -> int:
    """The part size for an object of ``size`` bytes: at most 10,000 parts, whole MiB.

    Raises:
        ValueError: ``size`` needs parts over S3's 5 GiB maximum (about 48.8 TiB).
    """
    need = -(-size // MAX_PARTS)
    part = max(minimum, S3_MIN_PART, need)
    part = -(-part // _MIB) * _MIB
    if part > S3_MAX_PART:
        raise ValueError(f"{size} bytes need more than {MAX_PARTS} parts of 5 GiB")
    return part


def part_sizes_unknown(number: int, minimum: int = MIN_PART_BYTES) -> int:
    """The size of part ``number`` (1-based) when the object's size is not known."""
    doublings: int = (number - 1) // _GROWTH_PARTS
    return min(S3_MAX_PART, max(minimum, S3_MIN_PART) << doublings)


def _nice_as(nice: int | None) -> None:
    """Give a pool thread the niceness of the thread that started the upload."""
    if nice is not None:
        with contextlib.suppress(AttributeError, OSError):
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), nice)


def _own_nice() -> int | None:
    try:
        return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    except (AttributeError, OSError):
        return None


class MultipartUpload:
    """A write-only file uploading one S3 object in parallel parts (see the module docstring).

    Call :meth:`close` to commit the object, or :meth:`abort` to drop it.

    Args:
        fs: An s3fs ``S3FileSystem``.
        path: The object's path as ``fs`` names it (``bucket/key``).
        replace: Overwrite an existing object; otherwise the commit fails with
            :class:`FileExistsError` when one exists.
        size_hint: The object's size when known (chooses the part size).
        min_part: The smallest part; objects smaller than a part take one PUT.
        max_in_flight: Bytes of parts waiting or uploading at once (at least one part),
            besides the part being filled.
        threads: Parts uploading at once, at most.
    """

    def __init__(
        self,
        fs: Any,
        path: str,
        *,
        replace: bool = False,
        size_hint: int | None = None,
        min_part: int = MIN_PART_BYTES,
        max_in_flight: int = MAX_IN_FLIGHT_BYTES,
        threads: int = THREADS,
    ) -> None:
        self._fs = fs
        self._bucket, self._key, _ = fs.split_path(path)
        self._match: dict[str, str] = {} if replace else {"IfNoneMatch": "*"}
        self._fixed = size_hint is not None or bool(getattr(fs, "fixed_upload_size", False))
        self._min_part = min_part
        self._part = part_size(size_hint, min_part) if size_hint is not None else min_part
        self._max_in_flight = max_in_flight
        self._threads = max(1, threads)
        self._buffer: bytearray | None = None
        self._filled = 0
        self._spare: list[bytearray] = []
        """Up to 2 part buffers already sent, for reuse (fixed sizes do not fragment memory)."""
        self._upload_id: str | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._futures: list[Future[None]] = []
        self._parts: dict[int, dict[str, Any]] = {}
        self._cond = threading.Condition()
        self._in_flight = 0
        self._error: BaseException | None = None
        self.written = 0
        self.parts_uploaded = 0
        """How many parts went up (0: one PUT)."""

    # ------------------------------------------------------------ the writer's side

    def write(self, data: bytes | bytearray | memoryview) -> int:
        """Buffer ``data``; each full part starts uploading (waits while too much is in flight)."""
        view = memoryview(data).cast("B")
        n = len(view)
        while view:
            if self._buffer is None:
                self._buffer, self._filled = self._fresh_buffer(), 0
            take = min(len(view), self._part - self._filled)
            self._buffer[self._filled : self._filled + take] = view[:take]
            self._filled += take
            view = view[take:]
            if self._filled == self._part:
                self._submit()
        self.written += n
        return n

    def _fresh_buffer(self) -> bytearray:
        with self._cond:
            spare = self._spare.pop() if self._spare else None
        return spare if spare is not None and len(spare) == self._part else bytearray(self._part)

    def close(self) -> None:
        """Upload what is left and commit the object (aborting the upload on failure)."""
        try:
            if self._upload_id is None:
                body = b"" if self._buffer is None else bytes(self._buffer[: self._filled])
                self._call("put_object", Body=body, **self._match)
                return
            if self._filled or not self._futures:
                self._submit()
            self._drain()
            parts = [self._parts[n] for n in sorted(self._parts)]
            self._call(
                "complete_multipart_upload",
                UploadId=self._upload_id,
                MultipartUpload={"Parts": parts},
                **self._match,
            )
            self._upload_id = None
        except BaseException:
            self.abort()
            raise
        finally:
            self._shutdown()
        self._fs.invalidate_cache(f"{self._bucket}/{self._key}")

    def abort(self) -> None:
        """Drop the upload: cancel queued parts, wait for those in flight, abort it on the store."""
        for future in self._futures:
            future.cancel()
        self._shutdown()
        self._buffer, self._filled, self._spare = None, 0, []
        upload_id, self._upload_id = self._upload_id, None
        if upload_id is not None:
            try:
                self._call("abort_multipart_upload", UploadId=upload_id)
            except Exception as e:  # the store's lifecycle rule or the next writer cleans up
                logger.warning(
                    "could not abort the upload of %s/%s: %s", self._bucket, self._key, e
                )

    # ------------------------------------------------------------ the parts

    def _call(self, method: str, **kwargs: Any) -> Any:
        return self._fs.call_s3(method, Bucket=self._bucket, Key=self._key, **kwargs)

    def _submit(self) -> None:
        """Start uploading the buffer as the next part."""
        if self._upload_id is None:
            self._upload_id = self._call("create_multipart_upload")["UploadId"]
            nice = _own_nice()
            self._pool = ThreadPoolExecutor(
                self._threads, "ckpt-upload", initializer=_nice_as, initargs=(nice,)
            )
        number = len(self._futures) + 1
        if number > MAX_PARTS:
            raise ValueError(f"{self._key}: more than {MAX_PARTS} parts")
        body = self._buffer if self._buffer is not None else bytearray()
        size, self._buffer, self._filled = self._filled, None, 0
        with self._cond:
            while self._in_flight and self._in_flight + size > self._max_in_flight:
                if self._error is not None:
                    break
                self._cond.wait()
            if self._error is not None:
                raise self._error
            self._in_flight += size
        assert self._pool is not None
        self._futures.append(self._pool.submit(self._upload_part, number, body, size))
        if not self._fixed:
            self._part = part_sizes_unknown(number + 1, self._min_part)

    def _upload_part(self, number: int, body: bytearray, size: int) -> None:
        try:
            data = bytes(memoryview(body)[:size])  # the HTTP client takes bytes only
            with self._cond:
                if len(self._spare) < 2:
                    self._spare.append(body)  # the writer fills it again
            del body
            out = self._call("upload_part", UploadId=self._upload_id, PartNumber=number, Body=data)
            del data
            part = {"PartNumber": number, "ETag": out["ETag"]}
            part.update({k: out[k] for k in _CHECKSUM_KEYS if k in out})
            with self._cond:
                self._parts[number] = part
                self.parts_uploaded += 1
        except BaseException as e:
            with self._cond:
                if self._error is None:
                    self._error = e
            raise
        finally:
            with self._cond:
                self._in_flight -= size
                self._cond.notify_all()

    def _drain(self) -> None:
        """Wait for every part; raise the first failure."""
        for future in self._futures:
            future.result()

    def _shutdown(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
