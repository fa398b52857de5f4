"""The OS calls through which the local backend changes the disk: one place to inject faults."""

from __future__ import annotations

import ctypes
import errno
import os

__all__ = ["RENAME_EXCHANGE", "RENAME_NOREPLACE", "SYSCALLS", "SysCalls"]

RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2


def _renameat2(dir_fd: int, old: str, new: str, flags: int) -> bool:
    """Call Linux ``renameat2`` in one directory; False where libc or the filesystem lacks it."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    if renameat2(dir_fd, os.fsencode(old), dir_fd, os.fsencode(new), flags) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
        return False
    raise OSError(code, os.strerror(code), old, None, new)


class SysCalls:
    """The OS calls through which the local backend changes the disk.

    Tests replace one attribute of :data:`SYSCALLS` to make it fail or to kill
    the process at that point; ``renameat2`` returning False stands for a
    filesystem without ``RENAME_NOREPLACE``/``RENAME_EXCHANGE``.
    """

    open = staticmethod(os.open)
    fsync = staticmethod(os.fsync)
    mkdir = staticmethod(os.mkdir)
    rename = staticmethod(os.rename)
    unlink = staticmethod(os.unlink)
    renameat2 = staticmethod(_renameat2)


SYSCALLS = SysCalls()
"""The calls every :class:`LocalStorage` makes; patch its attributes to inject faults."""
