"""The writer lock of a checkpoint root: taken by a manager's first save, held until ``close()``."""

from __future__ import annotations

import logging
import os
import secrets
import socket
import weakref
from datetime import datetime, timezone

from ckpt.saving.commit import writer_is_gone
from ckpt.storage import Storage, WriterLock

__all__ = ["LOCK_NAME", "hold_writer_lock", "release_quietly"]

logger = logging.getLogger(__name__)

LOCK_NAME = ".ckpt-writer.lock"
"""The writer lock file in the root directory."""


def hold_writer_lock(storage: Storage, held: WriterLock | None, holder: object) -> WriterLock:
    """Take the root's writer lock, or check and refresh ``held``, the one already taken.

    A lock taken here is released (quietly) when ``holder`` is garbage collected.

    Raises:
        CheckpointLockedError: Another writer holds the root, or ``held`` was
            deleted, replaced or taken over (or this is a forked child).
    """
    if held is None:
        owner = (
            f"host {socket.gethostname()} pid {os.getpid()} since "
            f"{datetime.now(timezone.utc).isoformat(timespec='seconds')} "
            f"id {secrets.token_hex(4)}"
        )
        lock = storage.lock(LOCK_NAME, owner, abandoned=writer_is_gone)
        weakref.finalize(holder, release_quietly, lock)
        return lock
    held.check()  # deleted, replaced or taken over, or a forked child: refuse
    try:
        held.refresh()
    except OSError as e:  # the save itself will tell whether storage works
        logger.warning("could not refresh the writer lock: %s", e)
    return held


def release_quietly(lock: WriterLock) -> None:
    """Release a lock left held by a manager never closed (at garbage collection or exit)."""
    try:
        lock.release()
    except Exception as e:  # the storage may be gone by now; never raise from a finalizer
        logger.warning(
            "could not release the writer lock of an unclosed manager (%s); the next writer "
            "takes it over once it is stale. Call close() or use the manager as a context "
            "manager to release it promptly",
            e,
        )
