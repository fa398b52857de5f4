"""The in-place second pass: reads into live tensors, held back until every check has passed."""

from __future__ import annotations

import resource
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from typing import BinaryIO

import torch

from ckpt.format.tensorfile import TensorEntry
from ckpt.io.held_files import HeldFiles, Reopen, Source, opened, recheck_reopened
from ckpt.io.live_reads import DeferredRead, read_threads, run_reads
from ckpt.storage import Storage

__all__ = ["MAX_HELD_FILES", "PendingReads", "Reopen", "Source", "held_files_limit"]

MAX_HELD_FILES = 256
"""Checked files kept open from the checks to the reads into live tensors, at most (fewer
under a low ``RLIMIT_NOFILE``: an eighth of it, 128 under the usual 1024); beyond, files are
reopened and their identity compared. An incremental step reads one file per blob: 16 held
files made a 128-blob step reopen 112 of them, twice, in batches of 16 (issue 20)."""


def held_files_limit() -> int:
    """How many checked files a restore keeps open.

    :data:`MAX_HELD_FILES`, or an eighth of the soft descriptor limit if that is
    lower (at least 1).
    """
    try:
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    except (OSError, ValueError):
        return MAX_HELD_FILES
    if soft == resource.RLIM_INFINITY:
        return MAX_HELD_FILES
    return max(1, min(MAX_HELD_FILES, soft // 8))


class PendingReads:
    """Reads straight into live tensors, held back until every check of a restore has passed.

    The bytes read are those checked, even if the checkpoint is replaced or
    deleted meanwhile: up to :func:`held_files_limit` checked files stay open
    until the reads; beyond that, local files are closed and reopened one at a
    time, and must still be the same file (device, inode, size, modification
    and change times), else the restore fails; object-store bytes wait in one
    unnamed local spill file. Open descriptors stay bounded however many files
    a checkpoint has (the files and the spill are kept in a
    :class:`~ckpt.io.held_files.HeldFiles`). Use as a context manager, or call
    :meth:`close`.
    """

    def __init__(self) -> None:
        self._files = HeldFiles(held_files_limit())
        self._reads: dict[int, tuple[Source, list[DeferredRead]]] = {}
        self._copies: list[tuple[torch.Tensor, torch.Tensor]] = []

    def __enter__(self) -> PendingReads:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def keep(
        self,
        scope: ExitStack,
        f: BinaryIO,
        storage: Storage,
        identity: object,
        parts: tuple[str, ...],
    ) -> Source:
        """Hold checked file ``f`` open until :meth:`close`, or close it to reopen for the reads.

        See :meth:`HeldFiles.keep <ckpt.io.held_files.HeldFiles.keep>`.
        """
        return self._files.keep(scope, f, storage, identity, parts)

    def spill(self, nbytes: int) -> BinaryIO | None:
        """The one unnamed local file where checked remote bytes wait, if ``nbytes`` more fit.

        See :meth:`HeldFiles.spill <ckpt.io.held_files.HeldFiles.spill>`.
        """
        return self._files.spill(nbytes)

    def add(
        self, source: Source, entry: TensorEntry, data_start: int, path: str, out: torch.Tensor
    ) -> None:
        """Schedule reading ``entry`` of ``source`` into ``out`` (cast to its dtype)."""
        self._reads.setdefault(id(source), (source, []))[1].append((entry, data_start, path, out))

    def copy(self, source: torch.Tensor, out: torch.Tensor) -> None:
        """Schedule copying ``source`` (checked bytes already in memory) into ``out``."""
        self._copies.append((source, out))

    def run(self) -> None:
        """Do the reads; large ones in slices on several threads.

        Files that were closed are first reopened one at a time and compared
        with what was checked, before any live tensor is touched.

        Raises:
            CorruptCheckpointError: A file was replaced since it was checked
                (nothing is touched), or a read failed (the file changed or the
                disk failed since the checks; the message says that live
                tensors may be partly overwritten).
        """
        groups, self._reads = list(self._reads.values()), {}
        recheck_reopened([source for source, _ in groups])
        copies, self._copies = self._copies, []
        for tensor, out in copies:
            out.copy_(tensor)
        self._files.flush()
        run_reads([(s, reads) for s, reads in groups if not isinstance(s, Reopen)])
        closed = [(s, reads) for s, reads in groups if isinstance(s, Reopen)]
        if not closed:
            return
        batch = held_files_limit()
        workers = read_threads()
        with ThreadPoolExecutor(max(1, workers), thread_name_prefix="ckpt-read") as pool:
            for at in range(0, len(closed), batch):  # a few at a time, read in parallel
                with ExitStack() as files:
                    run_reads(
                        [
                            (files.enter_context(opened(s)), reads)
                            for s, reads in closed[at : at + batch]
                        ],
                        pool if workers >= 2 else None,
                    )

    def close(self) -> None:
        """Close the files; reads not run are dropped."""
        self._reads = {}
        self._copies = []
        self._files.close()
