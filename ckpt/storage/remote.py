"""The object-store backend: any fsspec filesystem other than local disk.

Files are created only if absent (S3 ``If-None-Match``); on S3 they stream as
parallel multipart uploads (:mod:`ckpt.storage.multipart`), elsewhere in parts
of fsspec's block size. Operations that fail transiently are retried with
backoff. There is no rename here: checkpoints commit by their manifest
(:attr:`~ckpt.storage.base.CommitStrategy.MANIFEST_LAST`).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import random
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from typing import TYPE_CHECKING, BinaryIO, TypeVar

import fsspec
from fsspec.spec import AbstractBufferedFile

from ckpt.errors import (
    CheckpointError,
    CheckpointLockedError,
    CheckpointNotFoundError,
    CheckpointReadError,
    CorruptCheckpointError,
)
from ckpt.storage import multipart
from ckpt.storage.base import CommitStrategy, Storage, WriterLock, check_url

if TYPE_CHECKING:
    from ckpt.storage.local import BackgroundSyncs

__all__ = ["RETRIES", "RETRY_BASE_SECONDS", "RemoteStorage"]

logger = logging.getLogger(__name__)

_EXTRAS = {"s3": "s3", "s3a": "s3"}

_T = TypeVar("_T")

RETRIES = 4
"""Object-store operations failing transiently are tried this many more times."""
RETRY_BASE_SECONDS = 0.1
"""The first retry waits 0.1-0.2 s; each later one twice as long."""

_PERMANENT = (
    FileNotFoundError,
    FileExistsError,
    PermissionError,
    IsADirectoryError,
    NotADirectoryError,
    CheckpointError,
)


def _is_transient(e: BaseException) -> bool:
    """Throttling (503), timeouts and dropped connections; not missing or refused objects."""
    return isinstance(e, (OSError, ConnectionError, TimeoutError)) and not isinstance(e, _PERMANENT)


def _read_error(e: OSError, full: str) -> CheckpointError:
    """A read the store refused or failed (after retries), as a checkpoint error."""
    if isinstance(e, CheckpointError):
        return e
    return CheckpointReadError(f"cannot read: {e.strerror or e}", path=full, errno=e.errno)


class RemoteStorage(Storage):
    """A checkpoint root on an fsspec filesystem (see the module docstring)."""

    def __init__(self, url: str, storage_options: dict[str, object] | None = None):
        url = check_url(url)
        try:
            fs, root = fsspec.core.url_to_fs(url, **(storage_options or {}))
        except ImportError as e:
            protocol = url.split("://", 1)[0]
            extra = _EXTRAS.get(protocol)
            hint = (
                f"pip install 'ckpt[{extra}]'"
                if extra
                else f"install the fsspec driver for {protocol}://"
            )
            raise ImportError(f"cannot open {url!r}: {e}; {hint}") from e
        self.url = url
        self.fs = fs
        self.root = root.rstrip("/")
        self.parallel_uploads = getattr(fs, "call_s3", None) is not None
        """Whether files are written as parallel multipart uploads (S3 through s3fs)."""
        block = getattr(fs, "default_block_size", None) or multipart.MIN_PART_BYTES
        self.min_part_bytes = max(multipart.S3_MIN_PART, min(multipart.MIN_PART_BYTES, block))
        """The smallest multipart part (a smaller ``default_block_size`` lowers it to
        S3's 5 MiB); smaller files take one PUT."""
        self.max_in_flight_bytes = multipart.MAX_IN_FLIGHT_BYTES
        """Bytes of parts waiting or uploading at once, per file (plus the part being filled)."""
        self.upload_threads = multipart.THREADS
        """Parts uploading at once, per file."""

    def path(self, *parts: str) -> str:
        """Return the full path of ``parts`` below the root, as fsspec names it."""
        return "/".join((self.root, *parts))

    def _retrying(self, what: str, operation: Callable[[], _T]) -> _T:
        """Run an object-store operation, retrying transient failures with backoff."""
        for attempt in range(RETRIES + 1):
            try:
                return operation()
            except Exception as e:
                if not _is_transient(e):
                    raise
                if attempt == RETRIES:
                    raise OSError(
                        getattr(e, "errno", None) or errno.EIO,
                        f"{what} failed after {RETRIES + 1} attempts: {e}",
                        what.rsplit(" ", 1)[-1],
                    ) from e
                delay = RETRY_BASE_SECONDS * 2**attempt * (1 + random.random())
                logger.warning("%s failed (%s); retrying in %.2f s", what, e, delay)
                time.sleep(delay)
        raise AssertionError("unreachable")

    # ---------------------------------------------------------------- reading

    def _fresh(self, full: str) -> str:
        """Forget what the filesystem cached about ``full`` (and its parents); return it.

        s3fs and others cache listings; another process's commit or retention would
        then go unseen, and a reader that lists again to resolve a race would see the
        same stale listing.
        """
        self.fs.invalidate_cache(full)
        return full

    def list_dir(self, *parts: str) -> list[str]:
        """Return the names below a prefix (empty if none)."""
        full = self.path(*parts)
        try:
            entries = self._retrying(
                f"listing {full}", lambda: self.fs.ls(self._fresh(full), detail=False)
            )
        except (FileNotFoundError, NotADirectoryError):
            return []
        except OSError as e:
            raise _read_error(e, full) from e
        return sorted(str(e).rstrip("/").rsplit("/", 1)[-1] for e in entries)

    def exists(self, *parts: str) -> bool:
        """Tell whether an object (or prefix) exists."""
        full = self.path(*parts)
        return bool(self._retrying(f"checking {full}", lambda: self.fs.exists(self._fresh(full))))

    def size(self, *parts: str) -> int:
        """Return an object's size in bytes."""
        full = self.path(*parts)
        try:
            size = self._retrying(f"sizing {full}", lambda: self.fs.size(self._fresh(full)))
        except (FileNotFoundError, IsADirectoryError) as e:
            raise self._missing(full) from e
        except OSError as e:
            raise _read_error(e, full) from e
        if size is None:  # a prefix ("directory") has no size
            raise CorruptCheckpointError("is a directory, not a file", path=full)
        return int(size)

    def _missing(self, full: str) -> CheckpointError:
        """The error for an object that cannot be opened: missing, or a prefix in its place."""
        try:
            prefix = bool(self.fs.isdir(self._fresh(full)))
        except Exception:
            prefix = False
        if prefix:
            return CorruptCheckpointError("is a directory, not a file", path=full)
        return CheckpointNotFoundError("file is missing", path=full)

    def age_seconds(self, *parts: str) -> float | None:
        """Seconds since the object was last modified, or ``None`` if unknown."""
        try:
            modified = self.fs.modified(self._fresh(self.path(*parts)))
        except (OSError, NotImplementedError, ValueError):
            return None
        return time.time() - float(modified.timestamp())

    @contextlib.contextmanager
    def open_read(self, *parts: str) -> Iterator[BinaryIO]:
        """Open an object for reading (see :meth:`Storage.open_read`)."""
        full = self.path(*parts)
        try:
            f = self._retrying(f"opening {full}", lambda: self.fs.open(full, "rb"))
        except (FileNotFoundError, IsADirectoryError) as e:
            raise self._missing(full) from e
        except OSError as e:
            raise _read_error(e, full) from e
        with f:
            yield f

    # ---------------------------------------------------------------- writing

    def makedirs(self, *parts: str) -> None:
        """Create a prefix (a no-op on most object stores)."""
        self.fs.makedirs(self.path(*parts), exist_ok=True)

    def write_file(
        self,
        parts: tuple[str, ...],
        write: Callable[[BinaryIO], int],
        *,
        replace: bool = False,
        syncs: BackgroundSyncs | None = None,
        size_hint: int | None = None,
    ) -> int:
        """Create an object only if absent (unless ``replace``: one PUT is atomic).

        On S3 the object streams as a parallel multipart upload (``size_hint``
        picks the part size). A transient failure restarts the write (``write``
        must be repeatable).
        """
        full = self.path(*parts)

        def attempt() -> int:
            if self.parallel_uploads:
                return self._upload(full, write, replace=replace, size_hint=size_hint)
            f = self.fs.open(full, "wb" if replace else "xb")
            try:
                n = write(f)
            except BaseException:
                self._abandon(f, full, created=not replace)
                raise
            f.close()
            return n

        return self._retrying(f"writing {full}", attempt)

    def _upload(
        self,
        full: str,
        write: Callable[[BinaryIO], int],
        *,
        replace: bool,
        size_hint: int | None,
    ) -> int:
        """One attempt at writing ``full`` as a parallel multipart upload."""
        upload = multipart.MultipartUpload(
            self.fs,
            full,
            replace=replace,
            size_hint=size_hint,
            min_part=self.min_part_bytes,
            max_in_flight=self.max_in_flight_bytes,
            threads=self.upload_threads,
        )
        try:
            n = write(upload)  # type: ignore[arg-type]  # only write() is called
        except BaseException:
            upload.abort()
            raise
        upload.close()
        return n

    def _abandon(self, f: BinaryIO, full: str, *, created: bool) -> None:
        """Drop a write that failed, so that no partial object is ever committed.

        Buffered uploads (S3) are discarded (a multipart upload is aborted) and
        never closed, since closing commits; a filesystem that made the file at
        open (``memory://``) has the file, which this call created, removed.
        """
        if isinstance(f, AbstractBufferedFile):
            with contextlib.suppress(Exception):
                f.discard()
            f.closed = True  # closing, even at garbage collection, would commit it
            return
        with contextlib.suppress(Exception):
            f.close()
        if created:
            with contextlib.suppress(Exception):
                self.fs.rm_file(full)

    def remove_file(self, *parts: str) -> None:
        """Remove one object; a missing one is not an error."""
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm_file(self.path(*parts))

    def remove_tree(self, *parts: str) -> None:
        """Remove every object below a prefix; a missing one is not an error."""
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm(self.path(*parts), recursive=True)

    # ------------------------------------------------------------- committing

    def commit_strategy(self, step_name: str, overwrite: bool) -> CommitStrategy:
        """Object stores commit by the manifest."""
        return CommitStrategy.MANIFEST_LAST

    def abort_stale_uploads(self, grace: float) -> int:
        """Abort unfinished multipart uploads below the root older than ``grace`` seconds.

        A writer killed mid-upload leaves parts that S3 keeps (and bills) but never
        lists; only S3-like filesystems have them. Returns how many were aborted.
        """
        lister = getattr(self.fs, "list_multipart_uploads", None)
        if lister is None:
            return 0
        bucket, _, prefix = self.root.partition("/")
        now = datetime.now(timezone.utc)
        aborted = 0
        for upload in self._retrying(f"listing uploads in {bucket}", lambda: lister(bucket)):
            key, initiated = upload.get("Key", ""), upload.get("Initiated")
            if not key.startswith(prefix + "/") or initiated is None:
                continue
            if (now - initiated).total_seconds() < grace:
                continue
            self.fs.call_s3(
                "abort_multipart_upload", Bucket=bucket, Key=key, UploadId=upload["UploadId"]
            )
            logger.info("aborted an unfinished upload of %s/%s", bucket, key)
            aborted += 1
        return aborted

    def lock(
        self,
        name: str,
        owner: str,
        *,
        abandoned: Callable[[str], bool] = lambda holder: False,
        stale_after: float = 3600.0,
    ) -> WriterLock:
        """Create the lock object only if absent; take it over when abandoned or stale.

        Before each commit the holder reads it back: a lock deleted or taken
        over meanwhile refuses the commit.
        """
        full = self.path(name)
        pid = os.getpid()

        def write(f: BinaryIO) -> int:
            return f.write(owner.encode())

        try:
            self.write_file((name,), write)
        except FileExistsError as e:
            holder = self.read_bytes(name).decode("utf-8", "replace").strip()
            age = self.age_seconds(name)
            if not abandoned(holder) and (age is None or age < stale_after):
                raise CheckpointLockedError(
                    f"another writer holds this directory ({holder}); it is taken over once "
                    f"unrefreshed for {stale_after:.0f} s, or delete the lock file if that "
                    "writer is gone",
                    path=full,
                ) from e
            logger.warning(
                "taking over the writer lock of %s (%s)",
                holder,
                "its writer is gone" if age is None else f"last refreshed {age:.0f} s ago",
            )
            self.write_file((name,), write, replace=True)

        def check() -> None:
            if os.getpid() != pid:
                raise CheckpointLockedError(
                    f"this manager took the writer lock in process {pid}; a forked child "
                    f"(pid {os.getpid()}) cannot save with it: create a new CheckpointManager",
                    path=full,
                )
            try:
                now = self.read_bytes(name).decode("utf-8", "replace")
            except CheckpointNotFoundError:
                now = None
            except OSError as e:  # unreachable now: the save itself will tell
                logger.warning("could not check the writer lock %s: %s", full, e)
                return
            if now != owner:
                raise CheckpointLockedError(
                    "the writer lock was deleted or taken over while held ("
                    f"{'deleted' if now is None else now.strip()}); refusing to commit. "
                    "Close this manager and open a new one",
                    path=full,
                )

        def release() -> None:
            if os.getpid() == pid:
                self.remove_file(name)

        return WriterLock(
            release, lambda: self.write_file((name,), write, replace=True), check=check
        )
