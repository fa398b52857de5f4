"""The storage interface every backend implements, and what backends share.

A :class:`Storage` is a checkpoint root directory, chosen once from a URL:
:class:`~ckpt.storage.local.LocalStorage` for local paths,
:class:`~ckpt.storage.remote.RemoteStorage` for any other fsspec filesystem.
Paths inside the root are ``/``-separated strings relative to it. Every byte
ckpt reads or writes goes through these methods, so a backend is the one
place that enforces what may be opened, followed and deleted.
"""

from __future__ import annotations

import abc
import contextlib
import enum
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, BinaryIO

import fsspec

if TYPE_CHECKING:
    from ckpt.storage.local import BackgroundSyncs

__all__ = ["CommitStrategy", "Storage", "WriterLock", "check_url", "open_storage"]


class CommitStrategy(enum.Enum):
    """How a backend makes a finished checkpoint visible, all at once.

    Each has its :class:`~ckpt.saving.commit_protocol.CommitProtocol` (open, abandon,
    finalize), the same for saves from one process and from several ranks.
    """

    RENAME_DIR = "rename"
    """Write into a temporary directory, then rename it to the step's name (local disk)."""
    MANIFEST_LAST = "manifest"
    """Write files with names unique to the attempt into the step directory; the
    manifest, created only if absent (or replaced in one atomic operation), commits."""


class WriterLock:
    """A held writer lock: ``check()`` before each commit, ``release()`` when done (idempotent).

    Args:
        release: Gives the lock up.
        refresh: Shows the lock is still in use (object stores).
        check: Raises :class:`~ckpt.CheckpointLockedError` when the lock is no
            longer this writer's (deleted, replaced, taken over, or used from a
            forked child).
    """

    def __init__(
        self,
        release: Callable[[], None],
        refresh: Callable[[], object] | None = None,
        check: Callable[[], None] | None = None,
    ):
        self._release: Callable[[], None] | None = release
        self._refresh = refresh
        self._check = check

    def check(self) -> None:
        """Raise :class:`~ckpt.CheckpointLockedError` unless this writer still holds the lock."""
        if self._check is not None and self._release is not None:
            self._check()

    def refresh(self) -> None:
        """Show the lock is still in use (object stores; a no-op for ``flock``)."""
        if self._refresh is not None and self._release is not None:
            self._refresh()

    def release(self) -> None:
        """Give the lock up."""
        if self._release is not None:
            release, self._release = self._release, None
            release()


def check_url(url: object) -> str:
    """Return ``url`` as a string, or raise for a value that cannot name a directory."""
    if not isinstance(url, (str, os.PathLike)):
        raise TypeError(f"directory must be a str or path, got {type(url).__name__}")
    text = os.fspath(url)
    if not isinstance(text, str) or not text:
        raise ValueError("directory must not be empty")
    return text


def _is_local_url(url: str) -> bool:
    protocol, _ = fsspec.core.split_protocol(url)
    return protocol in (None, "file", "local")


class Storage(abc.ABC):
    """A checkpoint root directory on local disk or any fsspec filesystem.

    ``Storage(url)`` returns the backend for the URL. Not thread-safe, except
    that reads may run on several threads; one instance per manager.

    Args:
        url: A local path or an fsspec URL (``memory://runs/a``, ``s3://bucket/run``).
        storage_options: Passed to the fsspec filesystem (credentials, endpoint).

    Raises:
        ImportError: The URL's protocol needs a driver that is not installed;
            the message names the extra to install.
    """

    url: str
    root: str
    fs: fsspec.AbstractFileSystem
    is_local: bool = False

    _backends: tuple[type[Storage], type[Storage]] | None = None
    """(local, remote): the backends ``Storage(url)`` chooses from (see :meth:`register`)."""

    def __new__(cls, url: str, storage_options: dict[str, object] | None = None) -> Storage:
        """Return the backend for ``url`` when called as ``Storage(url)``."""
        return super().__new__(Storage.backend_for(url) if cls is Storage else cls)

    @staticmethod
    def backend_for(url: str) -> type[Storage]:
        """The backend class for ``url``: local disk for a path or ``file://``, else fsspec."""
        if Storage._backends is None:
            raise RuntimeError("no storage backend is registered")
        local, remote = Storage._backends
        return local if _is_local_url(check_url(url)) else remote

    @staticmethod
    def register(local: type[Storage], remote: type[Storage]) -> None:
        """Set the backends ``Storage(url)`` returns for local paths and for other URLs."""
        Storage._backends = (local, remote)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url!r})"

    # ----------------------------------------------------------------- naming

    @abc.abstractmethod
    def path(self, *parts: str) -> str:
        """Return the full path of ``parts`` below the root (for messages and fsspec)."""

    def url_of(self, *parts: str) -> str:
        """Return a user-facing location of ``parts``: a plain path locally, else a URL."""
        return "/".join((self.url.rstrip("/"), *parts))

    # ---------------------------------------------------------------- reading

    @abc.abstractmethod
    def list_dir(self, *parts: str) -> list[str]:
        """Return the sorted names in a directory below the root (empty if there is none)."""

    @abc.abstractmethod
    def exists(self, *parts: str) -> bool:
        """Tell whether an entry exists below the root, reached without following a link."""

    @abc.abstractmethod
    def size(self, *parts: str) -> int:
        """Return a regular file's size in bytes.

        Raises:
            CheckpointNotFoundError: The file does not exist.
            CorruptCheckpointError: It is a link or not a regular file.
        """

    def is_link(self, *parts: str) -> bool:
        """Tell whether an entry is a symbolic link (never on object stores)."""
        return False

    @abc.abstractmethod
    def age_seconds(self, *parts: str) -> float | None:
        """Return seconds since an entry was last modified, or ``None`` if unknown."""

    @abc.abstractmethod
    def open_read(self, *parts: str) -> contextlib.AbstractContextManager[BinaryIO]:
        """Open a regular file for reading; seek and readinto are supported.

        Raises:
            CheckpointNotFoundError: The file does not exist.
            CorruptCheckpointError: It is a link, a directory, a FIFO or a device.
        """

    def read_bytes(self, *parts: str) -> bytes:
        """Return a whole file's bytes (see :meth:`open_read`)."""
        with self.open_read(*parts) as f:
            return f.read()

    def file_identity(self, f: BinaryIO) -> object | None:
        """Something that changes when the file open as ``f`` is replaced or rewritten.

        ``None`` where the backend cannot tell (then files are held open instead).
        """
        return None

    def reopen(self, identity: object, *parts: str) -> contextlib.AbstractContextManager[BinaryIO]:
        """Open a file again, failing unless it has ``identity`` (see :meth:`file_identity`)."""
        raise NotImplementedError

    # ---------------------------------------------------------------- writing

    @abc.abstractmethod
    def makedirs(self, *parts: str) -> None:
        """Create a directory below the root (and its parents) if it does not exist."""

    def sync_dir(self, *parts: str) -> None:  # noqa: B027 - nothing to do on an object store
        """Make the names lately created in a directory durable (local disk: fsync it)."""

    @abc.abstractmethod
    def write_file(
        self,
        parts: tuple[str, ...],
        write: Callable[[BinaryIO], int],
        *,
        replace: bool = False,
        syncs: BackgroundSyncs | None = None,
        size_hint: int | None = None,
    ) -> int:
        """Create a new file, fill it with ``write(f)``, and make it durable.

        Args:
            parts: The file's path below the root.
            write: Writes the content and returns the number of bytes written
                (it may be called again after a transient failure).
            replace: Replace an existing file in one atomic step.
            syncs: Where to start the fsync instead of waiting for it (local disk).
            size_hint: The file's size when known (object stores pick part sizes from it).

        Returns:
            What ``write`` returned.

        Raises:
            FileExistsError: The file exists (and not ``replace``).
        """

    @abc.abstractmethod
    def remove_file(self, *parts: str) -> None:
        """Remove one file (a link itself, never its target); a missing one is not an error."""

    @abc.abstractmethod
    def remove_tree(self, *parts: str) -> None:
        """Remove a directory and everything below it, never through a link; missing is fine."""

    # ------------------------------------------------------------- committing

    @abc.abstractmethod
    def commit_strategy(self, step_name: str, overwrite: bool) -> CommitStrategy:
        """How a save of ``step_name`` commits here."""

    def unique_file_names(self, overwrite: bool) -> bool:
        """Whether a save must give its files names unique to the attempt."""
        return True

    def commit_dir(self, temp: str, final: str, *, replace: bool = False) -> None:
        """Move a finished temporary directory to its final name (``RENAME_DIR`` only)."""
        raise NotImplementedError(f"{type(self).__name__} cannot rename directories")

    @property
    def atomic_rename(self) -> bool:
        """Whether a directory can be renamed atomically here (local disk only)."""
        return False

    def abort_stale_uploads(self, grace: float) -> int:
        """Abort unfinished uploads below the root older than ``grace`` seconds; how many."""
        return 0

    @abc.abstractmethod
    def lock(
        self,
        name: str,
        owner: str,
        *,
        abandoned: Callable[[str], bool] = lambda holder: False,
        stale_after: float = 3600.0,
    ) -> WriterLock:
        """Take the exclusive writer lock ``name`` in the root, failing at once if it is held.

        Args:
            name: The lock file's name.
            owner: Who takes it (written into the file, shown to the next writer).
            abandoned: Tells from the holder's text whether it is certainly gone.
            stale_after: Age after which an unrefreshed lock is taken over (object stores).

        Raises:
            CheckpointLockedError: Another writer holds it; the message says who.
            CheckpointWriteError: The lock file cannot be created here (read-only,
                full, permission denied, or a link or special file in its place).
        """


def open_storage(url: str, storage_options: dict[str, object] | None = None) -> Storage:
    """Resolve ``url`` once and return its backend (the same as ``Storage(url, options)``)."""
    backend = Storage.backend_for(url)
    return backend(url, storage_options)


def storage_of(
    directory: str | os.PathLike[str] | None,
    storage_options: dict[str, Any] | None,
    storage: Storage | None,
) -> Storage:
    """The root a reader or writer works on: ``directory`` opened, or an opened ``storage``.

    Raises:
        TypeError: ``storage_options`` is not a dict.
        ValueError: Neither or both of ``directory`` and ``storage`` are given.
    """
    if storage_options is not None and not isinstance(storage_options, dict):
        raise TypeError("storage_options must be a dict")
    if storage is None:
        if directory is None:
            raise ValueError("pass the directory (or an opened storage)")
        return open_storage(os.fspath(directory), storage_options)
    if directory is not None:
        raise ValueError("pass the directory or an opened storage, not both")
    return storage
