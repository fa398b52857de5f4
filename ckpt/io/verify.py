"""Verifying a checkpoint without loading it: every file read whole and checked."""

from __future__ import annotations

from ckpt.errors import CorruptCheckpointError
from ckpt.format import Manifest
from ckpt.format.blobs import file_parts
from ckpt.format.checksums import CHUNK_BYTES, Hasher
from ckpt.io.checks import (
    alias_entries,
    check_digest,
    check_size,
    matching_entry,
    open_listed,
    read_header,
)
from ckpt.storage import Storage

__all__ = ["verify_checkpoint_files"]


def verify_checkpoint_files(storage: Storage, directory: str, manifest: Manifest) -> int:
    """Read every file of a checkpoint whole and check it against the manifest.

    Checks each file's size, header (every tensor the manifest places in it, with
    its dtype and shape, and nothing else) and checksum. A blob (format version 4)
    that several tensors reference is read once; its header is checked for each.

    Returns:
        The number of bytes checked.

    Raises:
        CheckpointNotFoundError: A file is missing.
        CorruptCheckpointError: A file disagrees with the manifest.
    """
    in_file: dict[str, set[str]] = {name: set() for name in manifest.files}
    for name, tensor in manifest.tensors.items():
        if tensor.pack is None:  # packed tensors live inside their pack
            in_file[tensor.file].add(name)
    scratch = bytearray(CHUNK_BYTES)
    checked = 0
    hashed: set[tuple[str, ...]] = set()
    for file_name, names in in_file.items():
        path = check_size(storage, directory, file_name, manifest)
        record = manifest.files[file_name]
        parts = file_parts(directory, file_name)
        hasher = Hasher()
        with open_listed(storage, directory, file_name, manifest) as f:
            entries, data_start = read_header(f, path, record.size, hasher)
            entries = alias_entries(entries, file_name, path)
            for name in names:
                matching_entry(entries, name, manifest.tensors[name], path)
            extra = sorted(set(entries) - names)
            if extra:
                raise CorruptCheckpointError(
                    f"file holds tensors the manifest does not list: {extra[:5]}", path=path
                )
            if parts in hashed:
                continue
            hasher.skip(f, record.size - data_start, scratch)
        if record.checksum is not None:
            check_digest(record, hasher, path, manifest.step, file_name)
        hashed.add(parts)
        checked += record.size
    return checked
