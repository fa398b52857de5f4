"""Chunks checked once, then read into live tensors from the very files checked.

A restore from a checkpoint saved by several ranks (format version 3) checks
every chunk a rank needs before any rank changes anything, and only then reads
the chunks into the live tensors. :class:`HeldChunks` is the first pass: it
opens each file once, hashes each chunk's bytes through one reused buffer (with
``verify``; without, it checks the file's size) and keeps the file open, so
the second pass reads the bytes checked even if the checkpoint is replaced or
deleted meanwhile. At most :func:`~ckpt.io.pending.held_files_limit` files stay
open; the others are closed, and reopened (for the checks and the reads) only
if still the same file. Object-store bytes are copied, as they are hashed, into
one unnamed local spill file (into memory when the spill has no room). The
files and the spill are kept in a :class:`~ckpt.io.held_files.HeldFiles`, as
for a restore in one process.
:meth:`HeldChunks.recheck` tells whether a held file was written to since (its
size and modification time), without touching a live tensor. :class:`ChunkReads`
is the second pass: it reads without hashing again.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from contextlib import ExitStack
from typing import BinaryIO

import torch

from ckpt.errors import CheckpointNotFoundError, CorruptCheckpointError
from ckpt.format import ChunkRecord, GlobalTensorRecord
from ckpt.format.blobs import file_parts
from ckpt.format.checksums import Hasher
from ckpt.format.tensorfile import TensorEntry, tensor_bytes
from ckpt.io.chunks import check_chunk_digest, read_range
from ckpt.io.held_files import HeldFiles, Reopen, Source, opened, recheck_reopened
from ckpt.io.live_reads import DeferredRead, run_reads
from ckpt.io.pending import held_files_limit
from ckpt.storage import Storage

__all__ = ["CHECK_READ_BYTES", "CheckedChunk", "ChunkReads", "HeldChunks"]

CHECK_READ_BYTES = 256 * 1024
"""Bytes read at a time to hash a chunk: few enough to stay in the CPU's cache from the read
to the hash (an 8 MiB buffer hashed about 1.5 times slower on a 2-core VM)."""


@dataclasses.dataclass(frozen=True)
class CheckedChunk:
    """A chunk whose bytes passed their checks, and where to read those bytes again."""

    source: Source | torch.Tensor
    """A held file (or the spill file), a closed file to reopen, or the bytes in memory."""
    entry: TensorEntry
    """The chunk's dtype, sizes and absolute byte range in ``source``."""
    path: str
    """The checkpoint file, for error messages."""


@dataclasses.dataclass
class _File:
    """One checkpoint file as the checks found it."""

    path: str
    source: Source | None
    """The held file or a :class:`Reopen`; ``None`` on an object store."""
    identity: object | None
    size: int | None = None
    stamp: tuple[int, int] | None = None
    """A held file's size and modification time when checked."""


class HeldChunks:
    """Checks chunks of one checkpoint directory and keeps what the reads into live tensors need.

    Args:
        storage: Where the checkpoint is.
        directory: The checkpoint directory below the storage root.
        verify: Compare each chunk's bytes with its checksum (else check only sizes).

    Use as a context manager, or call :meth:`close`; the chunks checked can be
    read (:class:`ChunkReads`) until then.
    """

    def __init__(self, storage: Storage, directory: str, *, verify: bool) -> None:
        self.storage, self.directory, self.verify = storage, directory, verify
        self._kept = HeldFiles(held_files_limit())
        self._files: dict[str, _File] = {}
        self._held: list[tuple[BinaryIO, _File]] = []
        self._scratch = bytearray()

    def __enter__(self) -> HeldChunks:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def check(self, name: str, record: GlobalTensorRecord, index: int) -> CheckedChunk:
        """Check chunk ``index`` of ``name`` and keep where its checked bytes can be read.

        Raises:
            CheckpointNotFoundError: Its file is missing (with ``verify``).
            CorruptCheckpointError: It fails its checksum, or its file is short or
                missing, or not a regular file.
        """
        chunk = record.chunks[index]
        nbytes = record.chunk_nbytes(chunk)
        entry = TensorEntry(name, record.dtype, chunk.sizes, chunk.begin, chunk.begin + nbytes)
        file = self._file(chunk.file, name)
        if file.source is None:  # an object store: its checked bytes wait locally
            return self._copy_remote(file, chunk, entry, index)
        if not self.verify:
            assert file.size is not None
            if file.size < entry.end:
                raise CorruptCheckpointError(
                    f"file ends before the last byte of chunk {index}", path=file.path, key=name
                )
            return CheckedChunk(file.source, entry, file.path)
        with opened(file.source) as f:
            hasher = Hasher()
            self._stream(f, entry, file.path, hasher, None)
        check_chunk_digest(hasher.digest(), chunk, index, file.path, name)
        return CheckedChunk(file.source, entry, file.path)

    def recheck(self) -> None:
        """Raise unless every file checked is still as checked; touches no live tensor.

        Held files must not have been written to (their size and modification
        time; one replaced or deleted is still read as checked); closed ones
        must reopen as the same file (see ``Storage.file_identity``).

        Raises:
            CorruptCheckpointError: A file was changed (or replaced, if closed) since.
        """
        for f, file in self._held:
            if _contents_stamp(f) != file.stamp:
                raise CorruptCheckpointError(
                    "file was changed after it was checked", path=file.path
                )
        recheck_reopened([f.source for f in self._files.values() if f.source is not None])

    def close(self) -> None:
        """Close the held files and the spill; chunks not read yet cannot be read any more."""
        self._files, self._held = {}, []
        self._kept.close()

    def _file(self, file_name: str, name: str) -> _File:
        """The file as checked: opened once, then held (or closed and its identity kept)."""
        found = self._files.get(file_name)
        if found is not None:
            return found
        parts = file_parts(self.directory, file_name)  # a blob (version 5) lies in the store
        path = self.storage.path(*parts)
        with ExitStack() as scope:
            try:
                f = scope.enter_context(self.storage.open_read(*parts))
            except CheckpointNotFoundError as e:
                if self.verify:
                    raise
                raise CorruptCheckpointError(
                    "a file listed in the manifest is missing", path=path, key=name
                ) from e
            identity = self.storage.file_identity(f)
            file = _File(path, None, identity)
            if identity is not None:
                file.size = os.fstat(f.fileno()).st_size
                file.source = self._kept.keep(scope, f, self.storage, identity, parts)
                if file.source is f:  # held: open until close()
                    file.stamp = _contents_stamp(f)
                    self._held.append((f, file))
        self._files[file_name] = file
        return file

    def _copy_remote(
        self, file: _File, chunk: ChunkRecord, entry: TensorEntry, index: int
    ) -> CheckedChunk:
        """Copy an object-store chunk, hashed, to the spill file (or memory if it has no room)."""
        hasher = Hasher() if self.verify else None
        spill = self._kept.spill(entry.nbytes)
        with self.storage.open_read(*file_parts(self.directory, chunk.file)) as f:
            if spill is None:
                held = torch.empty(entry.shape, dtype=entry.dtype)
                read_range(f, entry.begin, tensor_bytes(held), file.path, entry.name)
                if hasher is not None:
                    hasher.update(tensor_bytes(held))
                source: Source | torch.Tensor = held
                moved = entry
            else:
                at = spill.seek(0, 2)
                self._stream(f, entry, file.path, hasher, spill)
                spill.flush()  # the reads use the descriptor
                source, moved = spill, dataclasses.replace(entry, begin=at, end=at + entry.nbytes)
        if hasher is not None:
            check_chunk_digest(hasher.digest(), chunk, index, file.path, entry.name)
        return CheckedChunk(source, moved, file.path)

    def _stream(
        self, f: BinaryIO, entry: TensorEntry, path: str, hasher: Hasher | None, to: BinaryIO | None
    ) -> None:
        """Read the entry's bytes through the one scratch buffer, hashing (and copying) them."""
        if not self._scratch:
            self._scratch = bytearray(CHECK_READ_BYTES)
        view = memoryview(self._scratch)
        f.seek(entry.begin)
        left = entry.nbytes
        while left:
            n = f.readinto(view[: min(len(view), left)])  # type: ignore[attr-defined]
            if not n:
                raise CorruptCheckpointError(
                    f"file ends {left} bytes before the chunk's last byte",
                    path=path,
                    key=entry.name,
                )
            if hasher is not None:
                hasher.update(view[:n])
            if to is not None:
                to.write(view[:n])
            left -= n


def _contents_stamp(f: BinaryIO) -> tuple[int, int]:
    """Size and modification time: a write changes them, an unlink or rename does not."""
    info = os.fstat(f.fileno())
    return info.st_size, info.st_mtime_ns


Fill = Callable[[torch.Tensor], None]
"""Takes a whole chunk (a CPU tensor of its dtype and sizes) and copies its parts where they go."""


class ChunkReads:
    """Reads of checked chunks into live tensors, run once every check has passed.

    The bytes are not hashed again: they are read from the files checked (held
    open, or reopened only if unchanged), from the spill, or from memory.
    """

    def __init__(self) -> None:
        self._into: list[tuple[CheckedChunk, torch.Tensor]] = []
        self._fills: list[tuple[CheckedChunk, Fill]] = []

    def into(self, chunk: CheckedChunk, out: torch.Tensor) -> None:
        """Schedule reading ``chunk`` straight into ``out`` (contiguous; cast as ``copy_`` does)."""
        self._into.append((chunk, out))

    def fill(self, chunk: CheckedChunk, fill: Fill) -> None:
        """Schedule reading ``chunk`` into a buffer of its own and passing it to ``fill``."""
        self._fills.append((chunk, fill))

    def run(self, storage: Storage) -> None:
        """Do the reads: into live tensors first (large ones on several threads), then fills.

        Memory: one chunk at a time for the fills.

        Raises:
            CorruptCheckpointError: A closed file no longer is the one checked, or
                a read failed (the message says live tensors may be partly loaded).
        """
        into, self._into = self._into, []
        fills, self._fills = self._fills, []
        by_file: dict[int, tuple[Source, list[DeferredRead]]] = {}
        for chunk, out in into:
            if isinstance(chunk.source, torch.Tensor):
                out.copy_(chunk.source)
                continue
            reads = by_file.setdefault(id(chunk.source), (chunk.source, []))[1]
            reads.append((chunk.entry, 0, chunk.path, out))
        run_reads([(s, r) for s, r in by_file.values() if not isinstance(s, Reopen)])
        for source, reads in by_file.values():
            if isinstance(source, Reopen):
                with opened(source) as f:
                    run_reads([(f, reads)])
        for chunk, fill in fills:
            if isinstance(chunk.source, torch.Tensor):
                fill(chunk.source)
                continue
            buffer = torch.empty(chunk.entry.shape, dtype=chunk.entry.dtype)
            with opened(chunk.source) as f:
                run_reads([(f, [(chunk.entry, 0, chunk.path, buffer)])])
            fill(buffer)
            del buffer
