"""Writing one checkpoint's files: each tensor file, hashed as it is written, then the manifest."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import BinaryIO

import torch

from ckpt.format import MANIFEST_NAME, FileRecord, Manifest, encode_manifest
from ckpt.format.blobs import is_ref
from ckpt.format.checksums import Hasher, HashingWriter
from ckpt.format.tensorfile import write_tensors
from ckpt.storage import BackgroundSyncs, Storage

__all__ = ["write_checkpoint_files"]

_SAFETENSORS_METADATA = {"format": "pt"}


def write_checkpoint_files(
    storage: Storage,
    directory: str,
    files: Mapping[str, Mapping[str, torch.Tensor]],
    manifest: Manifest,
    *,
    replace_manifest: bool = False,
    before_manifest: Callable[[], None] | None = None,
) -> Manifest:
    """Write each tensor file, then the manifest (with the files' sizes and checksums) last.

    Each file's checksum is computed from the bytes as they are written.

    Args:
        storage: Where to write.
        directory: A directory below the storage root where the files do not exist yet.
        files: ``{file name: {tensor name: tensor}}``.
        manifest: The manifest to complete with file records and write (the blob
            references it lists, format version 4, are kept).
        replace_manifest: Overwrite an existing manifest instead of failing.
        before_manifest: Called once the files are durable, before the manifest is
            written; raising stops the save there.

    Returns:
        The manifest as written.

    Raises:
        FileExistsError: A file (the manifest, when another writer committed first) exists.
    """
    records: dict[str, FileRecord] = {}
    with BackgroundSyncs() as syncs:  # each file flushes while the next is written
        for file_name, tensors in files.items():
            hashers: list[Hasher] = []

            def write(
                f: BinaryIO,
                tensors: Mapping[str, torch.Tensor] = tensors,
                hashers: list[Hasher] = hashers,
            ) -> int:
                hashers.append(Hasher())  # a fresh digest for each attempt
                return write_tensors(HashingWriter(f, hashers[-1]), tensors, _SAFETENSORS_METADATA)

            size = storage.write_file((directory, file_name), write, syncs=syncs)
            records[file_name] = FileRecord(size, hashers[-1].digest())
        syncs.wait()  # every tensor file is durable before the manifest exists
    if before_manifest is not None:
        before_manifest()
    refs = {n: r for n, r in manifest.files.items() if is_ref(n)}  # blobs (version 4)
    manifest = dataclasses.replace(manifest, files={**records, **refs})
    raw = encode_manifest(manifest)

    def write_manifest(f: BinaryIO) -> int:
        f.write(raw)
        return len(raw)

    storage.write_file((directory, MANIFEST_NAME), write_manifest, replace=replace_manifest)
    return manifest
