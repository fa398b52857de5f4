"""Errors about missing, bad or incompatible checkpoints.

Every error ckpt raises about a checkpoint derives from :class:`CheckpointError`;
each subclass also derives from the builtin it resembles, so existing
``except FileNotFoundError`` code keeps working::

    CheckpointError (Exception)
    ├── CheckpointNotFoundError (FileNotFoundError)   no such step / item
    ├── CheckpointExistsError (FileExistsError)        the step is already committed
    ├── CorruptCheckpointError (ValueError)            bytes or manifest are malformed,
    │                                                  a file is missing or fails its checksum
    ├── IncompatibleCheckpointError (ValueError)       well formed, but does not fit the
    │                                                  live objects (shapes, groups, keys)
    ├── CheckpointWriteError (OSError)                 a save could not write (disk full,
    │                                                  I/O error); earlier ones are intact
    ├── CheckpointReadError (OSError)                  the OS refused to read a file
    │                                                  (permission, I/O error); not corrupt
    ├── CheckpointLockedError (BlockingIOError)        another process is writing here
    ├── CollectiveError (RuntimeError)                 a collective among the ranks failed
    │                                                  (a rank died, or the timeout passed)
    ├── RankMismatchError (ValueError)                 the ranks of a group asked for different
    │                                                  things (steps, items, options, calls)
    ├── PartialRestoreError (RuntimeError)             an item's own code raised while being
    │                                                  loaded, after every check had passed
    └── InexactResumeError (AssertionError)            ``verify_resume`` found that a resumed
                                                       run departs from an uninterrupted one

Errors carry ``path`` (the file or directory at fault) and ``key`` (the item or
key path inside it) when they are known, and the message names both.
"""

from __future__ import annotations

__all__ = [
    "CheckpointError",
    "CheckpointExistsError",
    "CheckpointLockedError",
    "CheckpointNotFoundError",
    "CheckpointReadError",
    "CheckpointWriteError",
    "CollectiveError",
    "CorruptCheckpointError",
    "IncompatibleCheckpointError",
    "InexactResumeError",
    "PartialRestoreError",
    "RankMismatchError",
]


class CheckpointError(Exception):
    """Base class of every error about a missing, bad or incompatible checkpoint.

    Attributes:
        reason: The message without the location.
        path: The file or directory at fault, when known.
        key: The item or key path at fault, when known.
    """

    def __init__(self, message: str, *, path: str | None = None, key: str | None = None):
        self.reason = message
        self.path = path
        self.key = key
        where = []
        if path is not None:
            where.append(f"file {path!r}")
        if key is not None:
            where.append(f"key {key!r}")
        full = f"{message} ({', '.join(where)})" if where else message
        super().__init__(full)

    def located(self, path: str) -> CheckpointError:
        """Return this error with ``path`` filled in when it names no file yet."""
        if self.path is not None:
            return self
        return type(self)(self.reason, path=path, key=self.key)


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """A step, item or file that the caller asked for is not in the checkpoint."""


class CheckpointExistsError(CheckpointError, FileExistsError):
    """A checkpoint for this step is already committed."""


class CorruptCheckpointError(CheckpointError, ValueError):
    """A checkpoint file is truncated, malformed or disagrees with its manifest."""


class IncompatibleCheckpointError(CheckpointError, ValueError):
    """A well-formed checkpoint does not fit the live objects it is restored into."""


class _OSCheckpointError(CheckpointError, OSError):
    """A checkpoint error that the operating system caused; ``errno`` is its errno."""

    def __init__(
        self,
        message: str,
        *,
        path: str | None = None,
        key: str | None = None,
        errno: int | None = None,
    ):
        super().__init__(message, path=path, key=key)
        self.errno = errno

    def located(self, path: str) -> CheckpointError:
        """Return this error with ``path`` filled in when it names no file yet (errno kept)."""
        if self.path is not None:
            return self
        return type(self)(self.reason, path=path, key=self.key, errno=self.errno)


class CheckpointWriteError(_OSCheckpointError):
    """A save failed while writing; its temporary files are gone and earlier checkpoints intact.

    ``errno`` is that of the underlying ``OSError`` (``ENOSPC``, ``EIO``, ...).
    """


class CheckpointReadError(_OSCheckpointError):
    """The operating system refused or failed to read a checkpoint file (not corruption).

    ``errno`` is that of the underlying ``OSError`` (``EACCES``, ``EIO``, ...).
    """


class CheckpointLockedError(CheckpointError, BlockingIOError):
    """Another process (or manager) holds the directory's writer lock."""


class PartialRestoreError(CheckpointError, RuntimeError):
    """An item's own code (a hook, a ``load_state_dict`` override) raised while restoring.

    Every check had passed. The items in ``applied`` hold the checkpoint's state,
    those in ``not_applied`` are untouched, and ``item`` may be partly loaded.
    """

    def __init__(
        self,
        message: str,
        *,
        path: str | None = None,
        key: str | None = None,
        item: str | None = None,
        applied: list[str] | tuple[str, ...] = (),
        not_applied: list[str] | tuple[str, ...] = (),
    ):
        super().__init__(message, path=path, key=key)
        self.item = item
        self.applied = tuple(applied)
        self.not_applied = tuple(not_applied)

    def located(self, path: str) -> CheckpointError:
        """Return this error with ``path`` filled in when it names no file yet."""
        if self.path is not None:
            return self
        return PartialRestoreError(
            self.reason,
            path=path,
            key=self.key,
            item=self.item,
            applied=self.applied,
            not_applied=self.not_applied,
        )


class CollectiveError(CheckpointError, RuntimeError):
    """A collective among the ranks failed: a rank died or left, or the timeout passed.

    The message names the operation, this rank, the timeout and the cause. Attributes:
    ``operation`` (``"all_gather_json"``, ``"barrier"``, ...), ``rank`` (this rank in
    the group) and ``timeout`` (seconds), each ``None`` when unknown.
    """

    def __init__(
        self,
        message: str,
        *,
        path: str | None = None,
        key: str | None = None,
        operation: str | None = None,
        rank: int | None = None,
        timeout: float | None = None,
    ):
        super().__init__(message, path=path, key=key)
        self.operation = operation
        self.rank = rank
        self.timeout = timeout

    def located(self, path: str) -> CheckpointError:
        """Return this error with ``path`` filled in when it names no file yet."""
        if self.path is not None:
            return self
        return CollectiveError(
            self.reason,
            path=path,
            key=self.key,
            operation=self.operation,
            rank=self.rank,
            timeout=self.timeout,
        )


class RankMismatchError(CheckpointError, ValueError):
    """The ranks of a process group asked for different things: steps, items, options, calls.

    Raised on every rank alike, before anything is written or changed; the message
    names what each rank asked for, ``path`` the root or step directory and ``key``
    the item, when one item differs.
    """


class InexactResumeError(CheckpointError, AssertionError):
    """A resumed run departs from an uninterrupted one (``ResumeReport.raise_if_inexact``).

    ``report`` is the :class:`~ckpt.ResumeReport`; ``key`` names the first difference.
    """

    def __init__(
        self,
        message: str,
        *,
        path: str | None = None,
        key: str | None = None,
        report: object = None,
    ):
        super().__init__(message, path=path, key=key)
        self.report = report

    def located(self, path: str) -> CheckpointError:
        """Return this error with ``path`` filled in when it names no file yet."""
        if self.path is not None:
            return self
        return InexactResumeError(self.reason, path=path, key=self.key, report=self.report)
