"""Storage: the only module that touches a filesystem.

A :class:`Storage` is a checkpoint root directory on any fsspec filesystem,
resolved once from a URL and ``storage_options``. Local paths take a fast
path through plain OS calls, so that every file and directory can be fsynced
and a directory renamed atomically; other filesystems go through fsspec.
Paths inside the root are ``/``-separated strings relative to it.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import logging
import os
import random
import shutil
import stat
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import datetime, timezone
from typing import BinaryIO, TypeVar

import fsspec
from fsspec.implementations.local import LocalFileSystem

from ckpt.errors import (
    CheckpointError,
    CheckpointExistsError,
    CheckpointLockedError,
    CheckpointNotFoundError,
    CorruptCheckpointError,
)

__all__ = ["BackgroundSyncs", "Storage", "WriterLock"]

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


_SYMLINK = "is a symbolic link; ckpt never follows links inside a checkpoint directory"

_AT_FDCWD = -100
_RENAME_NOREPLACE = 1
_RENAME_EXCHANGE = 2


def _renameat2(old: str, new: str, flags: int) -> bool:
    """Call Linux ``renameat2``; return False where the C library or filesystem lacks it."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    if renameat2(_AT_FDCWD, os.fsencode(old), _AT_FDCWD, os.fsencode(new), flags) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
        return False
    raise OSError(code, os.strerror(code), old, None, new)


def _rename_noreplace(old: str, new: str) -> None:
    """Rename, failing with EEXIST if ``new`` exists, atomically where the kernel can."""
    if not _renameat2(old, new, _RENAME_NOREPLACE):
        if os.path.exists(new):
            raise OSError(errno.EEXIST, os.strerror(errno.EEXIST), new)
        os.rename(old, new)


def _exchange(a: str, b: str) -> None:
    """Swap two directories atomically; where the kernel cannot, move ``b`` aside first."""
    if _renameat2(a, b, _RENAME_EXCHANGE):
        return
    aside = f"{a}.old"
    os.rename(b, aside)
    os.rename(a, b)
    os.rename(aside, a)


_HELD_LOCK_FDS: set[int] = set()
"""File descriptors holding an ``flock`` writer lock in this process."""


def _close_inherited_locks() -> None:
    """In a forked child (a DataLoader worker, say), drop the parent's lock descriptors.

    An ``flock`` belongs to the open file description, which a fork shares: a
    child outliving a killed trainer would otherwise keep the directory locked.
    """
    for fd in _HELD_LOCK_FDS:
        with contextlib.suppress(OSError):
            os.close(fd)
    _HELD_LOCK_FDS.clear()


os.register_at_fork(after_in_child=_close_inherited_locks)


class WriterLock:
    """A held writer lock; ``release()`` gives it up (idempotent)."""

    def __init__(self, release: Callable[[], None], refresh: Callable[[], object] | None = None):
        self._release: Callable[[], None] | None = release
        self._refresh = refresh

    def refresh(self) -> None:
        """Show the lock is still in use (object stores; a no-op for ``flock``)."""
        if self._refresh is not None and self._release is not None:
            self._refresh()

    def release(self) -> None:
        """Give the lock up."""
        if self._release is not None:
            release, self._release = self._release, None
            release()


class BackgroundSyncs:
    """fsyncs of finished files, each on a helper thread while the next file is written.

    The disk flushes one file while the CPU copies the next into the page cache.
    Use as a context manager; :meth:`wait` before anything that must come after
    the files are durable (the manifest).
    """

    def __init__(self) -> None:
        self._helper: ThreadPoolExecutor | None = None
        self._pending: list[Future[None]] = []

    def __enter__(self) -> BackgroundSyncs:
        return self

    def __exit__(self, *exc_info: object) -> None:
        try:
            self.wait()
        except OSError:
            if exc_info[0] is None:
                raise  # else the error already propagating is the one to report

    def fsync(self, fd: int) -> None:
        """Start fsyncing ``fd`` (a duplicate is kept open until that is done)."""
        if self._helper is None:
            self._helper = ThreadPoolExecutor(2, thread_name_prefix="ckpt-fsync")
        duplicate = os.dup(fd)
        try:
            self._pending.append(self._helper.submit(_fsync_fd, duplicate))
        except RuntimeError:  # the interpreter is exiting (an async save finishing): inline
            _fsync_fd(duplicate)

    def wait(self) -> None:
        """Wait for every fsync started; raise the first one's error."""
        pending, self._pending = self._pending, []
        errors = [e for e in (f.exception() for f in pending) if e is not None]
        if self._helper is not None:
            self._helper.shutdown()
            self._helper = None
        if errors:
            raise errors[0]


def _fsync_fd(fd: int) -> None:
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: str) -> None:
    _fsync_fd(os.open(path, os.O_RDONLY))


class Storage:
    """A checkpoint root directory on a local disk or any fsspec filesystem.

    Not thread-safe; one instance per manager.

    Args:
        url: A local path or an fsspec URL (``memory://runs/a``, ``s3://bucket/run``).
        storage_options: Passed to the fsspec filesystem (credentials, endpoint).

    Raises:
        ImportError: The URL's protocol needs a driver that is not installed;
            the message names the extra to install.
    """

    def __init__(self, url: str, storage_options: dict[str, object] | None = None):
        if not isinstance(url, (str, os.PathLike)):
            raise TypeError(f"directory must be a str or path, got {type(url).__name__}")
        url = os.fspath(url)
        if not url:
            raise ValueError("directory must not be empty")
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
        self.is_local = isinstance(fs, LocalFileSystem)
        self.root = os.path.abspath(root) if self.is_local else root.rstrip("/")

    def __repr__(self) -> str:
        return f"Storage({self.url!r})"

    def path(self, *parts: str) -> str:
        """Return the full path of ``parts`` below the root (for messages and fsspec)."""
        if self.is_local:
            return os.path.join(self.root, *parts)
        return "/".join((self.root, *parts))

    def url_of(self, *parts: str) -> str:
        """Return a user-facing location of ``parts``: a plain path locally, else a URL."""
        if self.is_local:
            return self.path(*parts)
        return "/".join((self.url.rstrip("/"), *parts))

    def makedirs(self, *parts: str) -> None:
        """Create a directory below the root (and its parents) if it does not exist.

        On local disk a directory that is created has its parent fsynced, so its
        name survives a power loss.
        """
        full = self.path(*parts)
        if self.is_local:
            if not os.path.isdir(full):
                os.makedirs(full, exist_ok=True)
                _fsync_dir(os.path.dirname(full.rstrip(os.sep)) or os.sep)
        else:
            self.fs.makedirs(full, exist_ok=True)

    def list_dir(self, *parts: str) -> list[str]:
        """Return the names of the entries of a directory below the root (empty if none)."""
        full = self.path(*parts)
        if self.is_local:
            try:
                return sorted(os.listdir(full))
            except FileNotFoundError:
                return []
        try:
            entries = self._retrying(f"listing {full}", lambda: self.fs.ls(full, detail=False))
        except FileNotFoundError:
            return []
        return sorted(str(e).rstrip("/").rsplit("/", 1)[-1] for e in entries)

    def exists(self, *parts: str) -> bool:
        """Tell whether a file or directory exists below the root."""
        if self.is_local:
            return os.path.exists(self.path(*parts))
        full = self.path(*parts)
        return bool(self._retrying(f"checking {full}", lambda: self.fs.exists(full)))

    def size(self, *parts: str) -> int:
        """Return a file's size in bytes.

        Raises:
            CheckpointNotFoundError: The file does not exist.
        """
        full = self.path(*parts)
        try:
            if self.is_local:
                info = os.lstat(full)
                if stat.S_ISLNK(info.st_mode):
                    raise CorruptCheckpointError(_SYMLINK, path=full)
                return info.st_size
            return int(self._retrying(f"sizing {full}", lambda: self.fs.size(full)))
        except FileNotFoundError as e:
            raise CheckpointNotFoundError("file is missing", path=full) from e

    def is_link(self, *parts: str) -> bool:
        """Tell whether an entry is a symbolic link (never on non-local filesystems)."""
        return self.is_local and os.path.islink(self.path(*parts))

    def age_seconds(self, *parts: str) -> float | None:
        """Return seconds since an entry was last modified, or ``None`` if unknown."""
        full = self.path(*parts)
        try:
            if self.is_local:
                return time.time() - os.stat(full).st_mtime
            modified = self.fs.modified(full)
        except (OSError, NotImplementedError, ValueError):
            return None
        return time.time() - float(modified.timestamp())

    def read_bytes(self, *parts: str) -> bytes:
        """Return a whole file's bytes.

        Raises:
            CheckpointNotFoundError: The file does not exist.
        """
        with self.open_read(*parts) as f:
            return f.read()

    @contextlib.contextmanager
    def open_read(self, *parts: str) -> Iterator[BinaryIO]:
        """Open a file for reading; seek and readinto are supported.

        Raises:
            CheckpointNotFoundError: The file does not exist.
        """
        full = self.path(*parts)
        try:
            if self.is_local:
                f = os.fdopen(os.open(full, os.O_RDONLY | os.O_NOFOLLOW), "rb")
            else:
                f = self._retrying(f"opening {full}", lambda: self.fs.open(full, "rb"))
        except FileNotFoundError as e:
            raise CheckpointNotFoundError("file is missing", path=full) from e
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise CorruptCheckpointError(_SYMLINK, path=full) from e
            raise
        with f:
            yield f

    def write_file(
        self,
        parts: tuple[str, ...],
        write: Callable[[BinaryIO], int],
        *,
        replace: bool = False,
        syncs: BackgroundSyncs | None = None,
    ) -> int:
        """Create a new file, fill it with ``write(f)``, then flush and fsync it.

        With ``syncs`` (local disk), the fsync runs on a helper thread while the
        caller goes on writing; :meth:`BackgroundSyncs.wait` waits for it.

        On object stores the file is streamed in parts (fsspec's block size) and
        created only if absent (S3 ``If-None-Match``), unless ``replace``; a
        transient failure restarts the write (``write`` must be repeatable).

        Args:
            parts: The file's path below the root.
            write: Writes the content and returns the number of bytes written.
            replace: Overwrite an existing file (object stores only; one PUT is atomic).
            syncs: Where to start the fsync instead of waiting for it (local disk).

        Returns:
            What ``write`` returned.

        Raises:
            FileExistsError: The file exists (and not ``replace``).
        """
        full = self.path(*parts)
        if self.is_local:
            with open(full, "xb") as f:
                n = write(f)
                f.flush()
                if syncs is None:
                    os.fsync(f.fileno())
                else:
                    syncs.fsync(f.fileno())
            return n

        def attempt() -> int:
            with self.fs.open(full, "wb" if replace else "xb") as f:
                return write(f)

        return self._retrying(f"writing {full}", attempt)

    @property
    def atomic_rename(self) -> bool:
        """Whether a directory can be renamed atomically here (local disk only)."""
        return self.is_local

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

    def commit_dir(self, temp: str, final: str, *, replace: bool = False) -> None:
        """Move a finished temporary directory to its final name.

        On local disk the temp directory is fsynced, renamed with
        ``renameat2(RENAME_NOREPLACE)`` (or, with ``replace``, swapped with the
        existing directory by ``RENAME_EXCHANGE`` and the old one removed), and
        the root fsynced, so the new name is durable and readers see the old
        checkpoint or the new one, never neither, when this returns. Only for
        local disk (:attr:`atomic_rename`); object stores commit by their
        manifest instead.

        Raises:
            CheckpointExistsError: ``final`` already exists and ``replace`` is false.
        """
        if self.is_local:
            _fsync_dir(self.path(temp))
            exists = CheckpointExistsError("checkpoint already exists", path=self.path(final))
            if replace and os.path.exists(self.path(final)):
                _exchange(self.path(temp), self.path(final))
                _fsync_dir(self.root)
                self.remove_tree(temp)  # now the old checkpoint
                return
            try:
                _rename_noreplace(self.path(temp), self.path(final))
            except OSError as e:
                if e.errno in (errno.EEXIST, errno.ENOTEMPTY):
                    raise exists from e
                raise
            _fsync_dir(self.root)
            return
        raise NotImplementedError("commit_dir needs atomic rename: local disk only")

    def abort_stale_uploads(self, grace: float) -> int:
        """Abort unfinished multipart uploads below the root older than ``grace`` seconds.

        A writer killed mid-upload leaves parts that S3 keeps (and bills) but never
        lists; only S3-like filesystems have them. Returns how many were aborted.
        """
        lister = getattr(self.fs, "list_multipart_uploads", None)
        if self.is_local or lister is None:
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
        """Take the exclusive writer lock ``name`` in the root, failing at once if it is held.

        Local disk uses ``flock``, which the OS releases when the process dies.
        Other filesystems create the lock file only if absent (a conditional
        create on S3). There, a lock is taken over when ``abandoned(holder)``
        says its writer is gone, or when it has not been refreshed (see
        :meth:`WriterLock.refresh`) for ``stale_after`` seconds.

        Args:
            name: The lock file's name.
            owner: Who takes it (written into the file, shown to the next writer).
            abandoned: Tells from the holder's text whether it is certainly gone.
            stale_after: Age after which an unrefreshed lock is taken over.

        Raises:
            CheckpointLockedError: Another writer holds it; the message says who.
        """
        full = self.path(name)
        if self.is_local:
            fd = os.open(full, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError as e:
                holder = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip()
                os.close(fd)
                raise CheckpointLockedError(
                    f"another writer holds this directory ({holder or 'unknown'}); "
                    "one process may write to a checkpoint directory at a time",
                    path=full,
                ) from e
            os.ftruncate(fd, 0)
            os.pwrite(fd, owner.encode(), 0)
            _HELD_LOCK_FDS.add(fd)

            def release() -> None:
                _HELD_LOCK_FDS.discard(fd)
                os.close(fd)

            return WriterLock(release)

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
        return WriterLock(
            lambda: self.remove_file(name), lambda: self.write_file((name,), write, replace=True)
        )

    def remove_file(self, *parts: str) -> None:
        """Remove one file; a missing file is not an error."""
        full = self.path(*parts)
        with contextlib.suppress(FileNotFoundError):
            if self.is_local:
                os.remove(full)
            else:
                self.fs.rm_file(full)

    def remove_tree(self, *parts: str) -> None:
        """Remove a directory and everything below it; a missing one is not an error."""
        full = self.path(*parts)
        if self.is_local:
            _rmtree(full)
            return
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm(full, recursive=True)


def _rmtree(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        shutil.rmtree(path)
