"""Checked files held open until the reads into live tensors, or reopened only if unchanged.

Both restores that read into live tensors after every check (one process:
:class:`~ckpt.io.pending.PendingReads`; a rank of a group:
:class:`~ckpt.io.held_chunks.HeldChunks`) keep their checked files here. Up to
a limit they stay open, so the reads get the bytes checked even if the
checkpoint is replaced or deleted meanwhile; beyond it, a file is closed and
becomes a :class:`Reopen`, reopened for the reads only if still the same file
(see ``Storage.file_identity``). Object-store bytes wait in one unnamed local
spill file.
"""

from __future__ import annotations

import dataclasses
import tempfile
import threading
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from typing import BinaryIO

from ckpt.io.spill import spill_room
from ckpt.storage import Storage

__all__ = ["HeldFiles", "Reopen", "Source", "opened", "recheck_reopened"]


@dataclasses.dataclass(frozen=True)
class Reopen:
    """A checked file closed to bound open descriptors: reopened only if still identical."""

    storage: Storage
    identity: object
    parts: tuple[str, ...]


Source = BinaryIO | Reopen


@contextmanager
def opened(source: Source) -> Iterator[BinaryIO]:
    """The held file itself, or a closed one reopened (and compared with what was checked).

    Raises:
        CorruptCheckpointError: A closed file no longer is the one checked.
    """
    if isinstance(source, Reopen):
        with source.storage.reopen(source.identity, *source.parts) as f:
            yield f
    else:
        yield source


def recheck_reopened(sources: Sequence[Source]) -> None:
    """Reopen each closed file once and compare it with what was checked; held ones pass.

    Raises:
        CorruptCheckpointError: A closed file no longer is the one checked.
    """
    for source in sources:
        if isinstance(source, Reopen):
            with opened(source):
                pass


class HeldFiles:
    """The checked files of one restore: up to ``limit`` held open, and the one spill file.

    Args:
        limit: How many checked files may stay open (see
            :func:`~ckpt.io.pending.held_files_limit`).

    Safe to use from several checking threads. Call :meth:`close` to close
    every held file and the spill.
    """

    def __init__(self, limit: int) -> None:
        self._stack = ExitStack()
        self._held = 0
        self._limit = limit
        self._spill: BinaryIO | None = None
        self._lock = threading.Lock()

    def keep(
        self,
        scope: ExitStack,
        f: BinaryIO,
        storage: Storage,
        identity: object,
        parts: tuple[str, ...],
    ) -> Source:
        """Hold ``f`` open until :meth:`close` if one more may stay open, else a :class:`Reopen`.

        Args:
            scope: What keeps ``f`` open; emptied into this registry if ``f`` is held.
            f: The checked local file.
            storage: Where it is.
            identity: ``storage.file_identity(f)``.
            parts: Its path parts below the storage root.

        Returns:
            ``f`` itself if held (``scope`` is then empty), else how to reopen it.
        """
        with self._lock:
            if self._held < self._limit:
                self._held += 1
                self._stack.push(scope.pop_all())
                return f
        return Reopen(storage, identity, parts)

    def spill(self, nbytes: int) -> BinaryIO | None:
        """The one unnamed local file where checked remote bytes wait, if ``nbytes`` more fit.

        It lives in ``tempfile.gettempdir()`` (``TMPDIR``) and disappears when
        closed or when the process dies.
        """
        if not spill_room(nbytes):
            return None
        with self._lock:
            if self._spill is None:
                spill = tempfile.TemporaryFile(dir=tempfile.gettempdir())  # noqa: SIM115 - held
                self._spill = self._stack.enter_context(spill)
            return self._spill

    def flush(self) -> None:
        """Flush the spill file, if any, so that reads through its descriptor see every byte."""
        if self._spill is not None:
            self._spill.flush()

    def close(self) -> None:
        """Close the held files and the spill; the registry can be used again."""
        self._spill = None
        self._held = 0
        self._stack.close()
