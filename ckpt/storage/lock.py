"""The local writer lock: ``flock`` on a file opened without following links.

The lock is held through one descriptor. Before each commit the holder checks
that the lock file at the path is still the one it holds (same device and
inode): a lock file deleted or replaced while held would let a second writer
in, so the commit is refused instead. A forked child (a DataLoader worker, say)
gets the parent's descriptor closed at fork, and its copy of the manager
refuses to save and never closes a descriptor it does not own.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat
from typing import TYPE_CHECKING

from ckpt.errors import CheckpointLockedError, CheckpointWriteError
from ckpt.storage.base import WriterLock
from ckpt.storage.syscalls import SYSCALLS

if TYPE_CHECKING:
    from ckpt.storage.local import LocalStorage

__all__ = ["take_flock"]

_LOCK_FLAGS = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC

_HELD_LOCK_FDS: set[int] = set()
"""File descriptors holding an ``flock`` writer lock in this process."""


def _close_inherited_locks() -> None:
    """In a forked child, drop the parent's lock descriptors.

    An ``flock`` belongs to the open file description, which a fork shares: a
    child outliving a killed trainer would otherwise keep the directory locked.
    """
    for fd in _HELD_LOCK_FDS:
        with contextlib.suppress(OSError):
            os.close(fd)
    _HELD_LOCK_FDS.clear()


os.register_at_fork(after_in_child=_close_inherited_locks)


def _refuse(full: str, e: OSError) -> CheckpointWriteError:
    if e.errno == errno.ELOOP:
        why = "it is a symbolic link; ckpt never follows links in its root (remove it)"
    elif e.errno == errno.EISDIR:
        why = "a directory is in its place (remove it)"
    else:
        why = e.strerror or str(e)
    return CheckpointWriteError(
        f"cannot take the writer lock: {why}; nothing was written", path=full, errno=e.errno
    )


def _not_regular(full: str) -> CheckpointWriteError:
    return CheckpointWriteError(
        "cannot take the writer lock: a link, directory, FIFO or device is in its place "
        "(ckpt never follows or opens those in its root; remove it)",
        path=full,
    )


def _shared(full: str, links: int) -> CheckpointWriteError:
    return CheckpointWriteError(
        f"cannot take the writer lock: the lock file has {links} hard links, so writing the "
        "holder into it would change a file elsewhere (possibly outside the root); ckpt "
        "refuses to write through a shared file (remove it); nothing was written",
        path=full,
    )


def _what_to_do(identity: tuple[int, int]) -> str:
    """What a writer refused the lock should do: this process may be the holder."""
    for held in list(_HELD_LOCK_FDS):
        with contextlib.suppress(OSError):
            if (os.fstat(held).st_dev, os.fstat(held).st_ino) == identity:
                return (
                    "it is this process, through another CheckpointManager or "
                    "CheckpointWriter: write through that one, or close() it first"
                )
    return (
        "one process may write to a checkpoint directory at a time: stop the other "
        "writer, or write to another directory (a killed writer's lock is released); "
        "the ranks of a job share one collective CheckpointManager, created on every "
        "rank after init_process_group, and managers on groups of some of the ranks "
        "(one per HSDP replica) each write to a directory of their own"
    )


def take_flock(storage: LocalStorage, name: str, owner: str) -> WriterLock:
    """Take the exclusive writer lock ``name`` in ``storage``'s root, failing at once if held.

    Raises:
        CheckpointLockedError: Another writer holds it; the message says who.
        CheckpointWriteError: It cannot be created (read-only, full, no permission),
            or a link or something other than a regular file is in its place.
    """
    full = storage.path(name)
    try:
        with storage.root_fd() as root:
            with contextlib.suppress(FileNotFoundError):  # never open a device or FIFO there
                if not stat.S_ISREG(os.stat(name, dir_fd=root, follow_symlinks=False).st_mode):
                    raise _not_regular(full)
            fd = SYSCALLS.open(name, _LOCK_FLAGS, 0o644, dir_fd=root)
    except CheckpointWriteError:
        raise
    except OSError as e:
        raise _refuse(full, e) from e
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise _not_regular(full)
        if info.st_nlink > 1:  # opened without O_TRUNC: nothing is written before this
            raise _shared(full, info.st_nlink)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as e:
            holder = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip()
            raise CheckpointLockedError(
                f"another writer holds this directory ({holder or 'unknown'}); "
                + _what_to_do((info.st_dev, info.st_ino)),
                path=full,
            ) from e
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, owner.encode(), 0)
        except OSError as e:
            raise _refuse(full, e) from e
    except BaseException:
        os.close(fd)
        raise
    held = _FlockHeld(storage, name, fd, (info.st_dev, info.st_ino))
    return WriterLock(held.release, check=held.check)


class _FlockHeld:
    """The state of one held ``flock``: its descriptor, the file's identity, the owning pid."""

    def __init__(self, storage: LocalStorage, name: str, fd: int, identity: tuple[int, int]):
        self.storage, self.name, self.fd, self.identity = storage, name, fd, identity
        self.pid = os.getpid()
        _HELD_LOCK_FDS.add(fd)

    def check(self) -> None:
        full = self.storage.path(self.name)
        if os.getpid() != self.pid:
            raise CheckpointLockedError(
                f"this manager took the writer lock in process {self.pid}; a forked child "
                f"(pid {os.getpid()}) cannot save with it: create a new CheckpointManager there",
                path=full,
            )
        try:
            info = self.storage.lstat(self.name)
        except FileNotFoundError:
            now = None
        else:
            now = (info.st_dev, info.st_ino)
        if now != self.identity:
            what = "deleted" if now is None else "replaced"
            raise CheckpointLockedError(
                f"the writer lock file was {what} while held, so another writer may be "
                "writing here; refusing to commit. Close this manager and open a new one",
                path=full,
            )

    def release(self) -> None:
        if os.getpid() != self.pid:
            return  # a forked child: the descriptor was closed at fork and is not ours
        _HELD_LOCK_FDS.discard(self.fd)
        os.close(self.fd)
