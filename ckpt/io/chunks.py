"""Chunks of global tensors (format version 3): checked reads, assembly and verification.

A chunk is one tensor of a safetensors file written by
:func:`ckpt.format.tensorfile.write_tensors`; the manifest records where its bytes
begin in the file and their checksum, so a reader fetches just those bytes (a
positioned read on local disk, a ranged read on an object store) and checks
them alone. :func:`verify_sharded_files` reads every file whole, once.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import BinaryIO

import torch

from ckpt.errors import CorruptCheckpointError
from ckpt.format import ChunkRecord, GlobalTensorRecord, Manifest, TensorRecord
from ckpt.format.blobs import file_parts
from ckpt.format.checksums import CHUNK_BYTES, Hasher, hash_bytes
from ckpt.format.tensorfile import TensorEntry, encode_header, layout, tensor_bytes
from ckpt.io.checks import check_digest, check_size, matching_entry, read_header
from ckpt.io.verify import verify_checkpoint_files
from ckpt.storage import Storage

__all__ = [
    "SAFETENSORS_METADATA",
    "assemble_tensor",
    "check_chunk_digest",
    "chunk_checksum",
    "data_offsets",
    "read_chunk",
    "read_chunk_slice",
    "read_range",
    "verify_sharded_files",
]

SAFETENSORS_METADATA = {"format": "pt"}
"""The ``__metadata__`` ckpt writes in every tensor file (as :mod:`ckpt.io.write` does)."""


def chunk_checksum(data: memoryview) -> str:
    """The checksum a :class:`~ckpt.format.ChunkRecord` records: ``"xxh3_64:<16 hex>"`` of ``data``.

    Example:
        >>> t = torch.arange(4)
        >>> chunk_checksum(tensor_bytes(t))  # doctest: +SKIP
    """
    return hash_bytes(data)


def data_offsets(
    tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = SAFETENSORS_METADATA
) -> dict[str, int]:
    """Where each tensor's bytes begin in a file written by ``write_tensors``.

    Pure: computed from the tensors' names, dtypes and shapes only.

    Args:
        tensors: What will be passed to ``write_tensors``.
        metadata: The ``metadata`` that will be passed with them.

    Returns:
        ``{tensor name: absolute byte offset in the file}`` (a chunk's ``begin``).
    """
    entries = layout(tensors)
    start = len(encode_header(entries, metadata))
    return {e.name: start + e.begin for e in entries}


def _where(chunk: ChunkRecord, index: int | None) -> str:
    label = "chunk" if index is None else f"chunk {index}"
    return f"{label} at offsets {list(chunk.offsets)}"


def _target(
    out: torch.Tensor | None, dtype: torch.dtype, shape: tuple[int, ...], what: str
) -> torch.Tensor:
    if out is None:
        return torch.empty(shape, dtype=dtype)
    if (
        out.device.type != "cpu"
        or not out.is_contiguous()
        or out.dtype != dtype
        or tuple(out.shape) != shape
    ):
        raise ValueError(
            f"out must be a contiguous CPU tensor of {dtype} {list(shape)} for the {what}, "
            f"got {out.dtype} {list(out.shape)} on {out.device}"
        )
    return out


def read_range(f: BinaryIO, at: int, view: memoryview, path: str, key: str | None) -> None:
    """Fill ``view`` with the file's bytes from ``at``; a short file is corrupt."""
    if not len(view):
        return
    f.seek(at)
    filled = 0
    while filled < len(view):
        n = f.readinto(view[filled:])  # type: ignore[attr-defined]
        if not n:
            raise CorruptCheckpointError(
                f"file ends {len(view) - filled} bytes before the chunk's last byte",
                path=path,
                key=key,
            )
        filled += n


def read_chunk(
    storage: Storage,
    directory: str,
    record: GlobalTensorRecord,
    chunk: ChunkRecord,
    *,
    verify: bool = True,
    out: torch.Tensor | None = None,
    name: str | None = None,
    index: int | None = None,
) -> torch.Tensor:
    """Read one chunk of a global tensor, checking its bytes against its checksum.

    Only the chunk's bytes are read. Safe to call from several threads at once
    (each call opens the file itself).

    Args:
        storage: Where the checkpoint is.
        directory: The checkpoint directory below the storage root.
        record: The global tensor the chunk belongs to.
        chunk: One of ``record.chunks``.
        verify: Compare the bytes with the chunk's checksum.
        out: A contiguous CPU tensor of the tensor's dtype and the chunk's sizes
            to read into, instead of a new one.
        name: The global tensor's name, for error messages.
        index: The chunk's position in ``record.chunks``, for error messages.

    Returns:
        A CPU tensor of ``chunk.sizes`` (``out`` when given).

    Raises:
        ValueError: ``out`` is not a contiguous CPU tensor of that dtype and shape.
        CheckpointNotFoundError: The file is missing.
        CorruptCheckpointError: The file is short, the checksum differs, or it is
            a link, FIFO or other special file; the error names the file and tensor.
    """
    target = _target(out, record.dtype, chunk.sizes, _where(chunk, index))
    view = tensor_bytes(target)
    parts = file_parts(directory, chunk.file)  # a blob (version 5) lies in the store
    path = storage.path(*parts)
    with storage.open_read(*parts) as f:
        read_range(f, chunk.begin, view, path, name)
    if verify:
        check_chunk_digest(chunk_checksum(view), chunk, index, path, name)
    return target


def check_chunk_digest(
    actual: str, chunk: ChunkRecord, index: int | None, path: str, name: str | None
) -> None:
    """Refuse a chunk whose bytes hash to ``actual`` rather than its recorded checksum.

    Raises:
        CorruptCheckpointError: The digests differ; names the chunk, the file and the tensor.
    """
    if actual != chunk.checksum:
        raise CorruptCheckpointError(
            f"checksum mismatch in {_where(chunk, index)}: expected {chunk.checksum}, "
            f"actual {actual}",
            path=path,
            key=name,
        )


def read_chunk_slice(
    storage: Storage,
    directory: str,
    record: GlobalTensorRecord,
    chunk: ChunkRecord,
    dim0_start: int,
    dim0_stop: int,
    *,
    out: torch.Tensor | None = None,
    name: str | None = None,
) -> torch.Tensor:
    """Read rows ``dim0_start:dim0_stop`` of a chunk (counted inside the chunk), unchecked.

    A chunk's checksum covers all of it, so a partial read cannot be verified:
    use it where the caller trusts the bytes (or has verified the checkpoint).

    Args:
        storage: Where the checkpoint is.
        directory: The checkpoint directory below the storage root.
        record: The global tensor the chunk belongs to.
        chunk: One of ``record.chunks``, of at least one dimension.
        dim0_start: The first row to read.
        dim0_stop: One past the last row to read.
        out: A contiguous CPU tensor of the rows' dtype and shape to read into.
        name: The global tensor's name, for error messages.

    Returns:
        A CPU tensor of ``(dim0_stop - dim0_start, *chunk.sizes[1:])``.

    Raises:
        ValueError: The rows are not within the chunk, or ``out`` does not fit.
        CorruptCheckpointError: The file is short, or not a regular file.
    """
    if not chunk.sizes or not 0 <= dim0_start <= dim0_stop <= chunk.sizes[0]:
        raise ValueError(
            f"rows {dim0_start}:{dim0_stop} are not within the chunk's sizes {list(chunk.sizes)}"
        )
    shape = (dim0_stop - dim0_start, *chunk.sizes[1:])
    target = _target(out, record.dtype, shape, f"rows {dim0_start}:{dim0_stop}")
    row_bytes = math.prod(chunk.sizes[1:]) * record.dtype.itemsize
    parts = file_parts(directory, chunk.file)  # a blob (version 5) lies in the store
    path = storage.path(*parts)
    with storage.open_read(*parts) as f:
        read_range(f, chunk.begin + dim0_start * row_bytes, tensor_bytes(target), path, name)
    return target


def assemble_tensor(
    storage: Storage,
    directory: str,
    name: str,
    record: GlobalTensorRecord,
    *,
    verify: bool = True,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """The full global tensor, read from its chunks.

    Memory: the result plus one chunk. A chunk that spans every dimension but
    the first is a contiguous block of a contiguous CPU result and is read
    straight into it, with no buffer at all.

    Args:
        storage: Where the checkpoint is.
        directory: The checkpoint directory below the storage root.
        name: The global tensor's name, for error messages.
        record: Its record.
        verify: Check every chunk's checksum.
        out: A tensor of the global shape to fill (any device and dtype; the
            bytes are cast as ``copy_`` casts), instead of a new CPU tensor.

    Returns:
        The tensor (``out`` when given).

    Raises:
        ValueError: ``out`` has another shape.
        CorruptCheckpointError: A chunk's file is short or fails its checksum.
    """
    if out is not None and tuple(out.shape) != record.shape:
        raise ValueError(
            f"out must have the shape {list(record.shape)} of {name!r}, got {list(out.shape)}"
        )
    result = torch.empty(record.shape, dtype=record.dtype) if out is None else out
    direct = result.device.type == "cpu" and result.dtype == record.dtype
    for i, chunk in enumerate(record.chunks):
        region = result[
            tuple(slice(o, o + s) for o, s in zip(chunk.offsets, chunk.sizes, strict=True))
        ]
        if direct and region.is_contiguous():
            read_chunk(
                storage, directory, record, chunk, verify=verify, out=region, name=name, index=i
            )
            continue
        buffer = read_chunk(storage, directory, record, chunk, verify=verify, name=name, index=i)
        region.copy_(buffer)
        del buffer
    return result


def verify_sharded_files(storage: Storage, directory: str, manifest: Manifest) -> int:
    """Read every file of a checkpoint whole, once, and check it against the manifest.

    Checks each file's size and checksum; its safetensors header (every rank's
    tensor the manifest places in it, with its dtype and shape; a tensor with
    the chunk's dtype and sizes where each chunk begins; nothing else); and
    every chunk's checksum. Memory is bounded (one read buffer), whatever the
    file sizes. A manifest of version 1 or 2 is verified as
    :func:`~ckpt.io.verify_checkpoint_files` does.

    Returns:
        The number of bytes checked.

    Raises:
        CheckpointNotFoundError: A file is missing.
        CorruptCheckpointError: A file disagrees with the manifest.
    """
    sharded = manifest.sharded
    if sharded is None:
        return verify_checkpoint_files(storage, directory, manifest)
    named: dict[str, dict[str, list[TensorRecord]]] = {name: {} for name in manifest.files}
    for rank in sharded.ranks:
        for name, tensor in rank.tensors.items():
            if tensor.pack is None:  # packed tensors live inside their pack
                named[tensor.file].setdefault(name, []).append(tensor)
    chunks: dict[str, list[_Chunk]] = {name: [] for name in manifest.files}
    for name, record in sharded.tensors.items():
        for i, chunk in enumerate(record.chunks):
            chunks[chunk.file].append(_Chunk(name, i, record, chunk))
    scratch = bytearray(CHUNK_BYTES)
    checked = 0
    for file_name in manifest.files:
        checked += _verify_file(
            storage, directory, manifest, file_name, named[file_name], chunks[file_name], scratch
        )
    return checked


class _Chunk:
    """A chunk with what names it, for :func:`verify_sharded_files`."""

    __slots__ = ("chunk", "index", "name", "nbytes", "record")

    def __init__(self, name: str, index: int, record: GlobalTensorRecord, chunk: ChunkRecord):
        self.name, self.index, self.record, self.chunk = name, index, record, chunk
        self.nbytes = record.chunk_nbytes(chunk)

    def error(self, why: str, path: str) -> CorruptCheckpointError:
        return CorruptCheckpointError(
            f"{_where(self.chunk, self.index)}: {why}", path=path, key=self.name
        )


def _verify_file(
    storage: Storage,
    directory: str,
    manifest: Manifest,
    file_name: str,
    named: Mapping[str, list[TensorRecord]],
    chunks: list[_Chunk],
    scratch: bytearray,
) -> int:
    path = check_size(storage, directory, file_name, manifest)
    record = manifest.files[file_name]
    hasher = Hasher()
    with storage.open_read(*file_parts(directory, file_name)) as f:
        entries, data_start = read_header(f, path, record.size, hasher)
        claimed: set[str] = set()
        for name, tensors in named.items():
            for tensor in tensors:
                matching_entry(entries, name, tensor, path)
            claimed.add(name)
        _claim_chunk_entries(entries, data_start, chunks, claimed, path)
        extra = sorted(set(entries) - claimed)
        if extra:
            raise CorruptCheckpointError(
                f"file holds tensors the manifest does not list: {extra[:5]}", path=path
            )
        at = data_start
        for c in sorted(chunks, key=lambda c: (c.chunk.begin, c.nbytes)):  # empty ones first
            if c.nbytes and c.chunk.begin < at:
                raise c.error("its bytes overlap another chunk's", path)
            hasher.skip(f, max(0, c.chunk.begin - at), scratch)
            _check_chunk_bytes(f, c, hasher, scratch, path)
            at = max(at, c.chunk.begin + c.nbytes)
        hasher.skip(f, record.size - at, scratch)
    check_digest(record, hasher, path, manifest.step)
    return record.size


def _claim_chunk_entries(
    entries: Mapping[str, TensorEntry],
    data_start: int,
    chunks: list[_Chunk],
    claimed: set[str],
    path: str,
) -> None:
    """Each chunk is a tensor of the file, of its dtype and sizes, starting at its begin."""
    at_begin: dict[int, list[TensorEntry]] = {}
    for entry in entries.values():
        at_begin.setdefault(data_start + entry.begin, []).append(entry)
    for c in chunks:
        found = next(
            (
                e
                for e in at_begin.get(c.chunk.begin, [])
                if e.name not in claimed and e.dtype == c.record.dtype and e.shape == c.chunk.sizes
            ),
            None,
        )
        if found is None:
            raise c.error(
                f"no tensor of {c.record.dtype} {list(c.chunk.sizes)} of the file begins at "
                f"byte {c.chunk.begin}",
                path,
            )
        claimed.add(found.name)


def _check_chunk_bytes(
    f: BinaryIO, c: _Chunk, file_hasher: Hasher, scratch: bytearray, path: str
) -> None:
    """Hash the chunk's bytes (at the file's position) into the file's digest and its own."""
    hasher = Hasher()
    view = memoryview(scratch)
    done = 0
    while done < c.nbytes:
        n = f.readinto(view[: min(len(scratch), c.nbytes - done)])  # type: ignore[attr-defined]
        if not n:
            raise c.error("the file ends before the chunk's last byte", path)
        file_hasher.update(view[:n])
        hasher.update(view[:n])
        done += n
    actual = hasher.digest()
    if actual != c.chunk.checksum:
        raise c.error(f"checksum mismatch: expected {c.chunk.checksum}, actual {actual}", path)
