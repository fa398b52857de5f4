"""The local-disk backend: descriptors, no links followed, fsync, ``renameat2``.

Every path below the root is reached one component at a time with
``O_NOFOLLOW`` relative to its parent's descriptor, so a symbolic link
anywhere under the root is never followed, listed as a step, written or
deleted through. Files are opened only after ``lstat`` says they are regular
files (a FIFO or device is never opened) and checked again with ``fstat``
(``O_NONBLOCK`` keeps even a swapped-in FIFO from blocking the open). All OS
calls that write go through :data:`SYSCALLS`, the one place tests inject faults.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import shutil
import socket
import stat
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from concurrent.futures import Future, ThreadPoolExecutor
from typing import BinaryIO

from fsspec.implementations.local import LocalFileSystem

from ckpt.errors import (
    CheckpointError,
    CheckpointExistsError,
    CheckpointNotFoundError,
    CheckpointReadError,
    CorruptCheckpointError,
)
from ckpt.format import temp_dir_name
from ckpt.storage.base import CommitStrategy, Storage, WriterLock, check_url
from ckpt.storage.lock import take_flock
from ckpt.storage.syscalls import RENAME_EXCHANGE, RENAME_NOREPLACE, SYSCALLS, SysCalls

__all__ = [
    "NEW_FILE_PREFIX",
    "SYSCALLS",
    "BackgroundSyncs",
    "LocalStorage",
    "SysCalls",
    "file_kind",
]

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_CREATE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC

NEW_FILE_PREFIX = ".ckpt-new."
"""A file written to replace another has this prefix until it is renamed over it."""

NOT_OWN = "is a symbolic link or not a directory; ckpt never follows links below its root"


MAX_PENDING_SYNCS = 4
"""Files whose fsync may be in flight at once (each holds a duplicate descriptor)."""


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
        if len(self._pending) >= MAX_PENDING_SYNCS:  # bound the duplicates held open
            futures.wait(self._pending[: len(self._pending) - MAX_PENDING_SYNCS + 1])
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
        SYSCALLS.fsync(fd)
    finally:
        os.close(fd)


def _components(parts: tuple[str, ...]) -> list[str]:
    names = [n for part in parts for n in part.split("/")]
    for name in names:
        if name in ("", ".", "..") or "\0" in name:
            raise ValueError(f"not a plain name below the checkpoint root: {'/'.join(parts)!r}")
    return names


@contextlib.contextmanager
def _named(full: str) -> Iterator[None]:
    """Give ``OSError`` raised inside the full path (calls relative to a descriptor lack it)."""
    try:
        yield
    except OSError as e:
        if e.filename == full or e.errno is None or type(e).__module__ != "builtins":
            raise  # named already, or not the OS's (a CheckpointError, say)
        raise type(e)(e.errno, e.strerror, full) from e


def file_kind(mode: int, link: str = "ckpt never follows links below its root") -> str:
    """What a non-regular file is, for an error message (``link``: why a link is refused)."""
    if stat.S_ISLNK(mode):
        return f"a symbolic link; {link}"
    if stat.S_ISDIR(mode):
        return "a directory, not a file"
    if stat.S_ISFIFO(mode):
        return "a FIFO, not a regular file"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device, not a regular file"
    if stat.S_ISSOCK(mode):
        return "a socket, not a regular file"
    return "not a regular file"


def _check_regular(info: os.stat_result, full: str) -> None:
    if not stat.S_ISREG(info.st_mode):
        raise CorruptCheckpointError(f"is {file_kind(info.st_mode)}", path=full)


def _read_error(e: OSError, full: str) -> CheckpointError:
    if e.errno == errno.ENOENT:
        return CheckpointNotFoundError("file is missing", path=full)
    if e.errno in (errno.ELOOP, errno.ENOTDIR):
        return CorruptCheckpointError(f"it or a directory above it {NOT_OWN}", path=full)
    return CheckpointReadError(f"cannot read: {e.strerror or e}", path=full, errno=e.errno)


class LocalStorage(Storage):
    """A checkpoint root on a local disk (see the module docstring)."""

    is_local = True

    def __init__(self, url: str, storage_options: dict[str, object] | None = None):
        self.url = check_url(url)
        protocol_free = self.url.split("://", 1)[1] if "://" in self.url else self.url
        self.root = os.path.abspath(protocol_free)
        self.fs = LocalFileSystem()
        self._can_exchange: bool | None = None

    def path(self, *parts: str) -> str:
        """Return the full path of ``parts`` below the root."""
        return os.path.join(self.root, *parts)

    def url_of(self, *parts: str) -> str:
        """Return the full path of ``parts`` (local paths are shown as paths)."""
        return self.path(*parts)

    # ----------------------------------------------------------- descriptors

    def _open_dir(self, names: list[str]) -> int:
        """A descriptor of the directory ``names`` below the root, no link followed below it."""
        fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        for name in names:
            try:
                child = os.open(name, _DIR_FLAGS, dir_fd=fd)
            finally:
                os.close(fd)
            fd = child
        return fd

    @contextlib.contextmanager
    def _dir(self, names: list[str]) -> Iterator[int]:
        fd = self._open_dir(names)
        try:
            yield fd
        finally:
            os.close(fd)

    @contextlib.contextmanager
    def _parent(self, parts: tuple[str, ...]) -> Iterator[tuple[int, str]]:
        """The descriptor of an entry's directory and the entry's name in it."""
        names = _components(parts)
        if not names:
            raise ValueError("the root itself is not a file")
        with self._dir(names[:-1]) as fd:
            yield fd, names[-1]

    def _lstat(self, parts: tuple[str, ...]) -> os.stat_result:
        with self._parent(parts) as (fd, name):
            return os.stat(name, dir_fd=fd, follow_symlinks=False)

    def root_fd(self) -> contextlib.AbstractContextManager[int]:
        """The root directory, opened without following links: its descriptor, closed after."""
        return self._dir([])

    def lstat(self, *parts: str) -> os.stat_result:
        """The status of an entry below the root, never following a link.

        Raises:
            FileNotFoundError: It does not exist.
        """
        return self._lstat(parts)

    # ---------------------------------------------------------------- reading

    def list_dir(self, *parts: str) -> list[str]:
        """Return the names in a real directory below the root; [] if missing or a link."""
        try:
            with self._dir(_components(parts)) as fd:
                return sorted(os.listdir(fd))
        except OSError as e:
            if e.errno in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):
                return []
            raise _read_error(e, self.path(*parts)) from e

    def exists(self, *parts: str) -> bool:
        """Whether an entry exists, reached through real directories (never through a link).

        The entry itself may be anything: a link or special file where ckpt
        expects its own file exists, and reading it is a ``CorruptCheckpointError``.
        """
        try:
            self._lstat(parts)
        except OSError:
            return False
        return True

    def is_link(self, *parts: str) -> bool:
        """Whether the entry is a symbolic link."""
        try:
            return stat.S_ISLNK(self._lstat(parts).st_mode)
        except OSError:
            return False

    def size(self, *parts: str) -> int:
        """Return a regular file's size (see :meth:`Storage.size`)."""
        full = self.path(*parts)
        try:
            info = self._lstat(parts)
        except OSError as e:
            raise _read_error(e, full) from e
        _check_regular(info, full)
        return info.st_size

    def age_seconds(self, *parts: str) -> float | None:
        """Seconds since the entry (not a link's target) was modified, or ``None``."""
        try:
            return time.time() - self._lstat(parts).st_mtime
        except OSError:
            return None

    @contextlib.contextmanager
    def open_read(self, *parts: str) -> Iterator[BinaryIO]:
        """Open a regular file below the root for reading (see :meth:`Storage.open_read`)."""
        full = self.path(*parts)
        try:
            with self._parent(parts) as (dir_fd, name):
                _check_regular(os.stat(name, dir_fd=dir_fd, follow_symlinks=False), full)
                fd = SYSCALLS.open(name, _READ_FLAGS, dir_fd=dir_fd)
        except OSError as e:
            raise _read_error(e, full) from e
        try:
            _check_regular(os.fstat(fd), full)  # replaced between the lstat and the open
            f = os.fdopen(fd, "rb")
        except BaseException:
            os.close(fd)
            raise
        with f:
            yield f

    def file_identity(self, f: BinaryIO) -> object | None:
        """Device, inode, size and change times: any rewrite or replacement changes them."""
        info = os.fstat(f.fileno())
        return (info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns)

    @contextlib.contextmanager
    def reopen(self, identity: object, *parts: str) -> Iterator[BinaryIO]:
        """Open a file again; raise ``CorruptCheckpointError`` if it is not the file checked."""
        with self.open_read(*parts) as f:
            if self.file_identity(f) != identity:
                raise CorruptCheckpointError(
                    "file was replaced or changed after it was checked", path=self.path(*parts)
                )
            yield f

    # ---------------------------------------------------------------- writing

    def makedirs(self, *parts: str) -> None:
        """Create a directory (and parents) below the root; never through a link.

        Each directory created has its parent fsynced, so its name survives a
        power loss.
        """
        if not os.path.isdir(self.root):
            os.makedirs(self.root, exist_ok=True)
            _fsync_path(os.path.dirname(self.root.rstrip(os.sep)) or os.sep)
        names = _components(parts)
        full = self.path(*parts)
        with _named(full):
            fd = self._open_dir([])
            try:
                for name in names:
                    try:
                        child = os.open(name, _DIR_FLAGS, dir_fd=fd)
                    except FileNotFoundError:
                        SYSCALLS.mkdir(name, 0o755, dir_fd=fd)
                        SYSCALLS.fsync(fd)
                        child = os.open(name, _DIR_FLAGS, dir_fd=fd)
                    os.close(fd)
                    fd = child
            finally:
                os.close(fd)

    def sync_dir(self, *parts: str) -> None:
        """Make a directory below the root durable: fsync it (reached without following a link)."""
        with self._dir(_components(parts)) as fd:
            SYSCALLS.fsync(fd)

    def write_file(
        self,
        parts: tuple[str, ...],
        write: Callable[[BinaryIO], int],
        *,
        replace: bool = False,
        syncs: BackgroundSyncs | None = None,
        size_hint: int | None = None,
    ) -> int:
        """Create a file exclusively (never through a link), fill, flush and fsync it.

        With ``replace`` it is written under a temporary name and renamed over
        the old one, and the directory fsynced: readers see the old file or the
        new one. With ``syncs`` the fsync runs on a helper thread.
        """
        full = self.path(*parts)
        with _named(full), self._parent(parts) as (dir_fd, name):
            target = f"{NEW_FILE_PREFIX}{secrets.token_hex(4)}.{name}" if replace else name
            fd = SYSCALLS.open(target, _CREATE_FLAGS, 0o644, dir_fd=dir_fd)
            try:
                with os.fdopen(fd, "wb") as f:
                    n = write(f)
                    f.flush()
                    if syncs is None or replace:
                        SYSCALLS.fsync(f.fileno())
                    else:
                        syncs.fsync(f.fileno())
                if replace:
                    SYSCALLS.rename(target, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
                    target = ""
                    SYSCALLS.fsync(dir_fd)
            except BaseException:
                if target:  # this call created it: nothing half-written is left
                    with contextlib.suppress(OSError):
                        os.unlink(target, dir_fd=dir_fd)
                raise
        return n

    def remove_file(self, *parts: str) -> None:
        """Remove one entry (a link itself, never its target); missing is fine.

        Raises:
            OSError: A directory on the way is a link (nothing is removed).
        """
        full = self.path(*parts)
        with contextlib.suppress(FileNotFoundError), _named(full), self._parent(parts) as at:
            SYSCALLS.unlink(at[1], dir_fd=at[0])

    def remove_tree(self, *parts: str) -> None:
        """Remove a directory tree; a link or file there is unlinked itself; missing is fine."""
        full = self.path(*parts)
        with contextlib.suppress(FileNotFoundError), _named(full), self._parent(parts) as at:
            dir_fd, name = at
            if stat.S_ISDIR(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode):
                shutil.rmtree(name, dir_fd=dir_fd)  # descriptor-based: follows no link
            else:
                SYSCALLS.unlink(name, dir_fd=dir_fd)

    # ------------------------------------------------------------- committing

    @property
    def atomic_rename(self) -> bool:
        """Directories are renamed atomically on local disk."""
        return True

    def can_exchange(self) -> bool:
        """Whether this filesystem swaps two directories atomically (probed once, in the root)."""
        if self._can_exchange is None:
            token = secrets.token_hex(4)
            a, b = (temp_dir_name(0, socket.gethostname(), os.getpid(), token + s) for s in "ab")
            try:
                with self._dir([]) as root:
                    try:
                        for name in (a, b):
                            SYSCALLS.mkdir(name, 0o755, dir_fd=root)
                        self._can_exchange = SYSCALLS.renameat2(root, a, b, RENAME_EXCHANGE)
                    finally:
                        for name in (a, b):
                            with contextlib.suppress(OSError):
                                os.rmdir(name, dir_fd=root)
            except OSError:  # cannot write here now: the save will say why; ask again later
                return False
        return self._can_exchange

    def unique_file_names(self, overwrite: bool) -> bool:
        """Only an overwrite without ``RENAME_EXCHANGE`` writes next to the old files."""
        return overwrite and not self.can_exchange()

    def commit_strategy(self, step_name: str, overwrite: bool) -> CommitStrategy:
        """Rename a temporary directory; replace only the manifest where directories cannot swap."""
        if overwrite and self.exists(step_name) and not self.can_exchange():
            return CommitStrategy.MANIFEST_LAST
        return CommitStrategy.RENAME_DIR

    def commit_dir(self, temp: str, final: str, *, replace: bool = False) -> None:
        """Move a finished temporary directory to its final name, durably.

        The temp directory is fsynced, renamed with ``RENAME_NOREPLACE`` (with
        ``replace``, swapped with the existing directory by ``RENAME_EXCHANGE``
        and the old one removed), and the root fsynced: readers see the old
        checkpoint or the new one, never neither.

        Raises:
            CheckpointExistsError: ``final`` exists and ``replace`` is false.
        """
        with _named(self.path(temp)), self._dir([]) as root:
            temp_fd = os.open(temp, _DIR_FLAGS, dir_fd=root)
            try:
                SYSCALLS.fsync(temp_fd)
            finally:
                os.close(temp_fd)
            if replace and self.exists(final):
                if not SYSCALLS.renameat2(root, temp, final, RENAME_EXCHANGE):
                    raise OSError(errno.ENOTSUP, "RENAME_EXCHANGE is not supported", final)
                SYSCALLS.fsync(root)
                self.remove_tree(temp)  # now the old checkpoint
                return
            try:
                if not SYSCALLS.renameat2(root, temp, final, RENAME_NOREPLACE):
                    if os.path.lexists(self.path(final)):
                        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), final)
                    SYSCALLS.rename(temp, final, src_dir_fd=root, dst_dir_fd=root)
            except OSError as e:
                if e.errno in (errno.EEXIST, errno.ENOTEMPTY):
                    raise CheckpointExistsError(
                        "checkpoint already exists", path=self.path(final)
                    ) from e
                raise
            SYSCALLS.fsync(root)

    def lock(
        self,
        name: str,
        owner: str,
        *,
        abandoned: Callable[[str], bool] = lambda holder: False,
        stale_after: float = 3600.0,
    ) -> WriterLock:
        """Take the ``flock`` writer lock (released by the OS when the process dies)."""
        return take_flock(self, name, owner)


def _fsync_path(path: str) -> None:
    _fsync_fd(os.open(path, os.O_RDONLY | os.O_CLOEXEC))
