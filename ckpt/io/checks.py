"""Checks of one tensor file against its manifest: size, header entries and checksum."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import os
from collections.abc import Iterator, Mapping
from typing import BinaryIO

import torch

from ckpt.errors import CheckpointNotFoundError, CorruptCheckpointError
from ckpt.format import FileRecord, Manifest, TensorRecord
from ckpt.format.blobs import BLOB_METADATA, BLOB_TENSOR, file_parts, ref_alias
from ckpt.format.checksums import Hasher
from ckpt.format.tensorfile import MAX_HEADER_BYTES, TensorEntry, encode_header, parse_header
from ckpt.storage import Storage

__all__ = [
    "alias_entries",
    "check_digest",
    "check_opened_size",
    "check_size",
    "file_entries",
    "matching_entry",
    "open_listed",
    "read_header",
]


def read_header(
    f: BinaryIO, path: str, size: int, hasher: Hasher | None
) -> tuple[dict[str, TensorEntry], int]:
    """Parse the header at the start of ``f``, hashing it; return its entries and data start."""
    head = f.read(8)
    n = int.from_bytes(head, "little") if len(head) == 8 else 0
    prefix = head + f.read(max(0, min(n, size - 8, MAX_HEADER_BYTES)))
    entries, _, data_start = parse_header(prefix, size, path)
    if hasher is not None:
        hasher.update(prefix)
    return entries, data_start


def file_entries(
    f: BinaryIO, path: str, file_name: str, manifest: Manifest, hasher: Hasher | None
) -> tuple[dict[str, TensorEntry], int]:
    """:func:`read_header` then :func:`alias_entries`: a file's entries by the manifest's names.

    A blob whose header is byte for byte the one ckpt writes for its tensor's
    dtype and shape (and whose size fits it exactly) is not parsed: those bytes
    can only parse to the one entry the manifest expects. Any other header is
    parsed and checked in full, with the same errors as before.
    """
    record = manifest.files[file_name]
    alias = ref_alias(file_name)
    tensor = manifest.tensors.get(alias) if alias is not None else None
    if alias is not None and tensor is not None and tensor.pack is None:
        expected = _blob_header(tensor.dtype, tensor.shape)
        if expected is not None and record.size == len(expected) + tensor.nbytes:
            head = f.read(len(expected))
            if head == expected:
                if hasher is not None:
                    hasher.update(head)
                entry = TensorEntry(alias, tensor.dtype, tensor.shape, 0, tensor.nbytes)
                return {alias: entry}, len(head)
            f.seek(0)
    entries, data_start = read_header(f, path, record.size, hasher)
    return alias_entries(entries, file_name, path), data_start


@functools.lru_cache(maxsize=1024)
def _blob_header(dtype: torch.dtype, shape: tuple[int, ...]) -> bytes | None:
    """The header ckpt writes for a blob of ``dtype`` and ``shape`` (``None``: none it writes)."""
    try:
        nbytes = math.prod(shape) * dtype.itemsize
        entry = TensorEntry(BLOB_TENSOR, dtype, tuple(shape), 0, nbytes)
        return encode_header([entry], BLOB_METADATA)
    except (TypeError, ValueError, OverflowError):
        return None


def alias_entries(
    entries: dict[str, TensorEntry], file_name: str, path: str
) -> dict[str, TensorEntry]:
    """A file's header entries by the names the manifest gives them.

    A blob (format version 4) holds exactly one tensor, :data:`BLOB_TENSOR`, which
    stands for the tensor the reference names; a step's own file is unchanged.

    Raises:
        CorruptCheckpointError: A blob's header holds anything else.
    """
    alias = ref_alias(file_name)
    if alias is None:
        return entries
    if set(entries) != {BLOB_TENSOR}:
        raise CorruptCheckpointError(
            f"a blob must hold exactly one tensor {BLOB_TENSOR!r}, it holds {sorted(entries)[:5]}",
            path=path,
            key=alias,
        )
    return {alias: dataclasses.replace(entries[BLOB_TENSOR], name=alias)}


def check_digest(
    record: FileRecord, hasher: Hasher, path: str, step: int, file_name: str = ""
) -> None:
    """Raise unless the bytes hashed match the manifest's checksum (naming a blob's tensor)."""
    actual = hasher.digest()
    if actual != record.checksum:
        raise CorruptCheckpointError(
            f"checksum mismatch in step {step}: expected {record.checksum}, actual {actual}",
            path=path,
            key=ref_alias(file_name),
        )


def check_size(storage: Storage, directory: str, file_name: str, manifest: Manifest) -> str:
    """Raise unless the file exists with the manifest's size; return its path."""
    parts = file_parts(directory, file_name)
    path = storage.path(*parts)
    expected = manifest.files[file_name].size
    try:
        actual = storage.size(*parts)
    except CheckpointNotFoundError as e:
        raise _missing(manifest, file_name, path) from e
    if actual != expected:
        raise _size_error(manifest, file_name, path, actual, expected)
    return path


def check_opened_size(
    storage: Storage,
    directory: str,
    file_name: str,
    manifest: Manifest,
    f: BinaryIO,
    identity: object = ...,
) -> str:
    """:func:`check_size` of a file already opened by :func:`open_listed`; return its path.

    A local file's size is its descriptor's (no second lookup of its name); an
    object store's is asked of the store. ``identity``, if given, is
    ``storage.file_identity(f)``, already asked by the caller.
    """
    if identity is ...:
        identity = storage.file_identity(f)
    if identity is None:
        return check_size(storage, directory, file_name, manifest)
    path = storage.path(*file_parts(directory, file_name))
    expected = manifest.files[file_name].size
    actual = os.fstat(f.fileno()).st_size
    if actual != expected:
        raise _size_error(manifest, file_name, path, actual, expected)
    return path


def _size_error(
    manifest: Manifest, file_name: str, path: str, actual: int, expected: int
) -> CorruptCheckpointError:
    return CorruptCheckpointError(
        f"file size in step {manifest.step} is {actual} bytes, the manifest says {expected}",
        path=path,
        key=ref_alias(file_name),
    )


def _missing(manifest: Manifest, file_name: str, path: str) -> CorruptCheckpointError:
    return CorruptCheckpointError(
        f"a file of step {manifest.step} listed in its manifest is missing",
        path=path,
        key=ref_alias(file_name),
    )


@contextlib.contextmanager
def open_listed(
    storage: Storage, directory: str, file_name: str, manifest: Manifest
) -> Iterator[BinaryIO]:
    """Open a file the manifest lists; one gone since :func:`check_size` is corruption.

    So a blob (or a step's file) deleted while it is read fails as its step's
    corruption, naming the file and tensor: the step then counts as changed (read
    again) or corrupt (skipped by ``fallback_to_intact``), never as an item missing.
    """
    parts = file_parts(directory, file_name)
    with contextlib.ExitStack() as stack:
        try:
            f = stack.enter_context(storage.open_read(*parts))
        except CheckpointNotFoundError as e:
            raise _missing(manifest, file_name, storage.path(*parts)) from e
        yield f


def matching_entry(
    entries: Mapping[str, TensorEntry], name: str, record: TensorRecord, path: str
) -> TensorEntry:
    """The header entry of ``name``; raise unless it has the manifest's dtype and shape."""
    entry = entries.get(name)
    if entry is None:
        raise CorruptCheckpointError("tensor is missing from its file", path=path, key=name)
    if entry.dtype != record.dtype or entry.shape != record.shape:
        raise CorruptCheckpointError(
            f"file holds {entry.dtype} {list(entry.shape)} but the manifest says "
            f"{record.dtype} {list(record.shape)}",
            path=path,
            key=name,
        )
    return entry
