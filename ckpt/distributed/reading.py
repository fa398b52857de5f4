"""Which saved bytes a rank reads for its part of each global tensor, and from where.

One place decides, whatever saved the checkpoint: DCP's load planner maps the
saved chunks of each global tensor onto this rank's part of the live tensor
(:func:`read_into`), and a :class:`ChunkSource` fetches the chunks it needs.

- :class:`SavedChunks`: a checkpoint saved by several ranks (format version 3);
  each chunk is read alone, its bytes checked against its own checksum.
- :class:`WholeTensors`: a checkpoint saved by one process (versions 1 and 2),
  seen as a group of one (:mod:`ckpt.distributed.one_process`): each tensor is
  one chunk covering it. Its file's checksum covers the whole file, so the
  tensors of one item are loaded together, their file read whole and checked
  (:func:`ckpt.io.load_tensors`), and dropped once copied.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Protocol

import torch

from ckpt.distributed.planning import ChunkRead, local_shards, plan_reads
from ckpt.errors import CheckpointNotFoundError, CorruptCheckpointError
from ckpt.format import GlobalTensorRecord, Manifest
from ckpt.format.blobs import file_parts
from ckpt.io import load_tensors, read_chunk
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
        self._sizes: dict[str, int] = {}

    def check(self, name: str, record: GlobalTensorRecord, index: int) -> None:
        """Check a chunk without keeping it: its bytes (with ``verify``), else its file's size.

        Raises:
            CorruptCheckpointError: The chunk fails its checksum, or its file is short or missing.
        """
        if self.verify:
            self.read(name, record, index, None)
            return
        chunk = record.chunks[index]
        parts = file_parts(self.directory, chunk.file)  # a blob (version 5) lies in the store
        if chunk.file not in self._sizes:
            try:
                self._sizes[chunk.file] = self.storage.size(*parts)
            except CheckpointNotFoundError as e:
                raise CorruptCheckpointError(
                    "a file listed in the manifest is missing",
                    path=self.storage.path(*parts),
                    key=name,
                ) from e
        if self._sizes[chunk.file] < chunk.begin + record.chunk_nbytes(chunk):
            raise CorruptCheckpointError(
                f"file ends before the last byte of chunk {index}",
                path=self.storage.path(*parts),
                key=name,
            )

    @contextlib.contextmanager
    def reading(self, names: list[str]) -> Iterator[None]:
        """Nothing to do ahead: each chunk is read when asked for."""
        yield

    def read(
        self, name: str, record: GlobalTensorRecord, index: int, out: torch.Tensor | None
    ) -> torch.Tensor:
        """Read only the chunk's bytes and check them."""
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

    source: ChunkSource
    records: Mapping[str, GlobalTensorRecord]
    dest: Mapping[str, torch.Tensor]
    by_chunk: dict[tuple[str, int], list[ChunkRead]]

    def run(self) -> None:
        """Read the chunks into the live tensors (each chunk checked again as it is read).

        Raises:
            CorruptCheckpointError: A chunk changed since it was checked.
        """
        with torch.no_grad():  # live parameters are written in place
            _read_planned(self.source, self.records, self.dest, self.by_chunk)


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
    """Read and check the chunks this rank needs for ``dest`` without writing into it.

    Each chunk is read into a buffer of its own size, checked and dropped
    (without ``verify``, only its file's size is checked); the returned reads
    put the chunks into ``dest`` later (:meth:`PlannedReads.run`).

    Returns:
        The bytes of the chunks checked, and the reads to run.

    Raises:
        IncompatibleCheckpointError: A destination's global shape differs from the saved one.
        CorruptCheckpointError: A chunk or file fails its checks.
    """
    by_chunk = _plan(records, dest)
    nbytes = 0
    for name, index in by_chunk:
        record = records[name]
        nbytes += record.chunk_nbytes(record.chunks[index])
        source.check(name, record, index)
    return nbytes, PlannedReads(source, records, dest, by_chunk)


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
            direct = _whole_chunk_view(target, boxes, saved.sizes, record.dtype)
            if direct is not None:  # the usual case (same sharding): no second copy
                source.read(name, record, index, direct)
                continue
            chunk = source.read(name, record, index, None)
            for box in boxes:
                _copy_box(chunk, target, box)
    return nbytes


def _copy_box(chunk: torch.Tensor, target: torch.Tensor, box: ChunkRead) -> None:
    source, local = chunk, target
    for dim, (src, dst, length) in enumerate(
        zip(box.source_offsets, box.dest_offsets, box.lengths, strict=True)
    ):
        source = source.narrow(dim, src, length)
        local = local.narrow(dim, dst, length)
    local.copy_(source)


def _whole_chunk_view(
    target: torch.Tensor, boxes: list[ChunkRead], sizes: tuple[int, ...], dtype: torch.dtype
) -> torch.Tensor | None:
    """The part of ``target`` one whole chunk fills, when it can be read into directly."""
    if len(boxes) != 1 or target.device.type != "cpu" or target.dtype != dtype:
        return None
    box = boxes[0]
    if any(box.source_offsets) or box.lengths != tuple(sizes):
        return None
    view = target
    for dim, (start, length) in enumerate(zip(box.dest_offsets, box.lengths, strict=True)):
        view = view.narrow(dim, start, length)
    return view if view.is_contiguous() else None
