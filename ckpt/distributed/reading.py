"""Which saved bytes a rank reads for its part of each global tensor, and from where.

One place decides, whatever saved the checkpoint: DCP's load planner maps the
saved chunks of each global tensor onto this rank's part of the live tensor
(:func:`read_into`), and a :class:`ChunkSource` fetches the chunks it needs.

- :class:`SavedChunks`: a checkpoint saved by several ranks (format version 3);
  each chunk is read alone, its bytes checked against its own checksum. Chunks
  with a live destination are checked first (:func:`check_then_read`), their
  files held, and read into the live tensors from those files once every
  rank's checks passed, without being hashed again.
- :class:`WholeTensors`: a checkpoint saved by one process (versions 1 and 2),
  seen as a group of one (:mod:`ckpt.distributed.one_process`): each tensor is
  one chunk covering it. Its file's checksum covers the whole file, so the
  tensors of one item are loaded together, their file read whole and checked
  (:func:`ckpt.io.load_tensors`), and dropped once copied.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Protocol

import torch

from ckpt.distributed.planning import ChunkRead, local_shards, plan_reads
from ckpt.errors import CheckpointNotFoundError, CorruptCheckpointError
from ckpt.format import GlobalTensorRecord, Manifest
from ckpt.io import load_tensors, read_chunk
from ckpt.io.held_chunks import CheckedChunk, ChunkReads, HeldChunks
from ckpt.storage import Storage

__all__ = [
    "ChunkSource",
    "PlannedReads",
    "SavedChunks",
    "WholeTensors",
    "check_then_read",
    "read_into",
]


class ChunkSource(Protocol):
    """Fetches checked chunks of a checkpoint's global tensors."""

    def reading(self, names: list[str]) -> contextlib.AbstractContextManager[None]:
        """A scope in which the chunks of the global tensors ``names`` are read."""

    def read(
        self, name: str, record: GlobalTensorRecord, index: int, out: torch.Tensor | None
    ) -> torch.Tensor:
        """Chunk ``index`` of ``name``, checked (into ``out``, a contiguous CPU tensor, if any)."""


class SavedChunks:
    """The chunks of a version 3 checkpoint, each read alone and checked against its checksum."""

    def __init__(self, storage: Storage, directory: str, *, verify: bool) -> None:
        self.storage, self.directory, self.verify = storage, directory, verify
        self._held: HeldChunks | None = None

    def check(self, name: str, record: GlobalTensorRecord, index: int) -> CheckedChunk:
        """Check a chunk and keep where its checked bytes can be read again (see :meth:`close`).

        Its bytes are hashed (with ``verify``; else its file's size is checked)
        through one reused buffer; its file stays open, or is reopened for the
        reads only if unchanged (:class:`~ckpt.io.held_chunks.HeldChunks`).

        Raises:
            CorruptCheckpointError: The chunk fails its checksum, or its file is short or missing.
        """
        if self._held is None:
            self._held = HeldChunks(self.storage, self.directory, verify=self.verify)
        with _missing_is_corrupt(name):
            return self._held.check(name, record, index)

    def recheck(self) -> None:
        """Raise unless every file checked is still as checked (see ``HeldChunks.recheck``)."""
        if self._held is not None:
            self._held.recheck()

    def close(self) -> None:
        """Let go of the files held since the checks."""
        if self._held is not None:
            self._held.close()
            self._held = None

    @contextlib.contextmanager
    def reading(self, names: list[str]) -> Iterator[None]:
        """Nothing to do ahead: each chunk is read when asked for."""
        yield

    def read(
        self, name: str, record: GlobalTensorRecord, index: int, out: torch.Tensor | None
    ) -> torch.Tensor:
        """Read only the chunk's bytes and check them (a missing file is corruption)."""
        with _missing_is_corrupt(name):
            return read_chunk(
                self.storage,
                self.directory,
                record,
                record.chunks[index],
                verify=self.verify,
                out=out,
                name=name,
                index=index,
            )


@contextlib.contextmanager
def _missing_is_corrupt(name: str) -> Iterator[None]:
    """A file the manifest lists that is gone is corruption of its step, as in one process.

    So ``fallback_to_intact`` skips the step (and a step deleted meanwhile is read
    again), instead of the error of an item or step that does not exist.
    """
    try:
        yield
    except CheckpointNotFoundError as e:
        raise CorruptCheckpointError(
            "a file listed in the manifest is missing", path=e.path, key=name
        ) from e


class WholeTensors:
    """The tensors of a checkpoint saved by one process, each the one chunk of its global tensor.

    Args:
        storage: Where the checkpoint is.
        directory: The checkpoint directory below the storage root.
        manifest: The checkpoint's own (version 1 or 2) manifest.
        verify: Check each file read against its checksum.
    """

    def __init__(
        self, storage: Storage, directory: str, manifest: Manifest, *, verify: bool
    ) -> None:
        self.storage, self.directory, self.manifest = storage, directory, manifest
        self.verify = verify
        self._loaded: dict[str, torch.Tensor] = {}

    @contextlib.contextmanager
    def reading(self, names: list[str]) -> Iterator[None]:
        """Load ``names`` (their files read whole and checked) for the scope, then drop them."""
        loaded, pending = load_tensors(
            self.storage, self.directory, self.manifest, names, {}, "cpu", verify=self.verify
        )
        pending.close()  # nothing was deferred: no live tensors were given
        self._loaded = loaded
        try:
            yield
        finally:
            self._loaded = {}

    def read(
        self, name: str, record: GlobalTensorRecord, index: int, out: torch.Tensor | None
    ) -> torch.Tensor:
        """The loaded tensor (its only chunk), copied into ``out`` if given."""
        tensor = self._loaded[name]
        if out is None:
            return tensor
        out.copy_(tensor)
        return out


@dataclass
class PlannedReads:
    """Reads of checked chunks into live tensors, held back until every rank's checks passed."""

    source: SavedChunks
    dest: Mapping[str, torch.Tensor]
    reads: ChunkReads

    def run(self) -> None:
        """Read the checked chunks into the live tensors, from the files checked (not hashed again).

        Raises:
            CorruptCheckpointError: A file closed after its checks was replaced, or a read failed.
        """
        with torch.no_grad():  # live parameters are written in place
            self.reads.run(self.source.storage)


def _plan(
    records: Mapping[str, GlobalTensorRecord], dest: Mapping[str, torch.Tensor]
) -> dict[tuple[str, int], list[ChunkRead]]:
    by_chunk: dict[tuple[str, int], list[ChunkRead]] = {}
    for r in plan_reads(records, dest):
        by_chunk.setdefault((r.name, r.chunk), []).append(r)
    return by_chunk


def read_into(
    source: ChunkSource,
    records: Mapping[str, GlobalTensorRecord],
    dest: Mapping[str, torch.Tensor],
) -> int:
    """Read the saved chunks overlapping this rank's part of each ``dest`` tensor into it.

    Args:
        source: Where the chunks come from.
        records: The global tensors ``dest`` names.
        dest: ``{global name: tensor or DTensor}`` shaped like the global tensor.

    Returns:
        The bytes of the chunks read.

    Raises:
        IncompatibleCheckpointError: A destination's global shape differs from the saved one.
        CorruptCheckpointError: A chunk or file fails its checks.
    """
    by_chunk = _plan(records, dest)
    return _read_planned(source, records, dest, by_chunk)


def check_then_read(
    source: SavedChunks,
    records: Mapping[str, GlobalTensorRecord],
    dest: Mapping[str, torch.Tensor],
) -> tuple[int, PlannedReads]:
    """Check the chunks this rank needs for ``dest`` without writing into it.

    Each chunk's bytes are hashed through one reused buffer (without
    ``verify``, only its file's size is checked) and its file kept (see
    :meth:`SavedChunks.check`); the returned reads put the checked bytes into
    ``dest`` later (:meth:`PlannedReads.run`): a chunk filling a contiguous part
    of its destination straight into it, any other through a buffer of its own
    size, one at a time.

    Returns:
        The bytes of the chunks checked, and the reads to run.

    Raises:
        IncompatibleCheckpointError: A destination's global shape differs from the saved one.
        CorruptCheckpointError: A chunk or file fails its checks.
    """
    by_chunk = _plan(records, dest)
    nbytes = 0
    reads = ChunkReads()
    for (name, index), boxes in by_chunk.items():
        record = records[name]
        saved = record.chunks[index]
        nbytes += record.chunk_nbytes(saved)
        checked = source.check(name, record, index)
        target = local_shards(dest[name])
        direct = _whole_chunk_view(target, boxes, saved.sizes)
        if direct is not None:  # the usual case (same sharding): no buffer at all
            reads.into(checked, direct)
        else:
            reads.fill(checked, functools.partial(_copy_boxes, target=target, boxes=boxes))
    return nbytes, PlannedReads(source, dest, reads)


def _read_planned(
    source: ChunkSource,
    records: Mapping[str, GlobalTensorRecord],
    dest: Mapping[str, torch.Tensor],
    by_chunk: dict[tuple[str, int], list[ChunkRead]],
) -> int:
    nbytes = 0
    with source.reading(list(dict.fromkeys(name for name, _ in by_chunk))):
        for (name, index), boxes in by_chunk.items():
            record = records[name]
            saved = record.chunks[index]
            target = local_shards(dest[name])
            nbytes += record.chunk_nbytes(saved)
            direct = _whole_chunk_view(target, boxes, saved.sizes)
            if direct is not None and direct.device.type == "cpu" and direct.dtype == record.dtype:
                source.read(name, record, index, direct)  # no second copy
                continue
            _copy_boxes(source.read(name, record, index, None), target, boxes)
    return nbytes


def _copy_boxes(chunk: torch.Tensor, target: torch.Tensor, boxes: list[ChunkRead]) -> None:
    for box in boxes:
        _copy_box(chunk, target, box)


def _copy_box(chunk: torch.Tensor, target: torch.Tensor, box: ChunkRead) -> None:
    source, local = chunk, target
    for dim, (src, dst, length) in enumerate(
        zip(box.source_offsets, box.dest_offsets, box.lengths, strict=True)
    ):
        source = source.narrow(dim, src, length)
        local = local.narrow(dim, dst, length)
    local.copy_(source)


def _whole_chunk_view(
    target: torch.Tensor, boxes: list[ChunkRead], sizes: tuple[int, ...]
) -> torch.Tensor | None:
    """The part of ``target`` one whole chunk fills, when it is contiguous (any device, dtype)."""
    if len(boxes) != 1:
        return None
    box = boxes[0]
    if any(box.source_offsets) or box.lengths != tuple(sizes):
        return None
    view = target
    for dim, (start, length) in enumerate(zip(box.dest_offsets, box.lengths, strict=True)):
        view = view.narrow(dim, start, length)
    return view if view.is_contiguous() else None
