"""Reading and writing one checkpoint directory through a :class:`~ckpt.storage.Storage`.

The edge between the pure format modules and the filesystem: writes tensor
files and the manifest into a directory, reads a manifest back, and loads
tensors, checking every file against the manifest on the way.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import BinaryIO

import torch

from ckpt.errors import CheckpointNotFoundError, CorruptCheckpointError
from ckpt.format import MANIFEST_NAME, Manifest, TensorRecord, decode_manifest, encode_manifest
from ckpt.locations import MapLocation, mapped_device, place
from ckpt.optim import Target
from ckpt.storage import Storage
from ckpt.tensorfile import MAX_HEADER_BYTES, TensorEntry, parse_header, read_tensor, write_tensors

__all__ = ["MAX_MANIFEST_BYTES", "load_tensors", "read_manifest", "write_checkpoint_files"]

_SAFETENSORS_METADATA = {"format": "pt"}

MAX_MANIFEST_BYTES = 256 * 1024 * 1024
"""Largest manifest read (a manifest of a million tensors is about 150 MB)."""


def write_checkpoint_files(
    storage: Storage,
    directory: str,
    files: Mapping[str, Mapping[str, torch.Tensor]],
    manifest: Manifest,
) -> Manifest:
    """Write each tensor file, then the manifest (with the files' sizes) last.

    Args:
        storage: Where to write.
        directory: An existing, empty directory below the storage root.
        files: ``{file name: {tensor name: tensor}}``.
        manifest: The manifest to complete with file sizes and write.

    Returns:
        The manifest as written.
    """
    sizes: dict[str, int] = {}
    for file_name, tensors in files.items():

        def write(f: BinaryIO, tensors: Mapping[str, torch.Tensor] = tensors) -> int:
            return write_tensors(f, tensors, _SAFETENSORS_METADATA)

        sizes[file_name] = storage.write_file((directory, file_name), write)
    manifest = dataclasses.replace(manifest, files=sizes)
    raw = encode_manifest(manifest)

    def write_manifest(f: BinaryIO) -> int:
        f.write(raw)
        return len(raw)

    storage.write_file((directory, MANIFEST_NAME), write_manifest)
    return manifest


def read_manifest(storage: Storage, directory: str) -> Manifest:
    """Read and validate the manifest of a checkpoint directory.

    Raises:
        CheckpointNotFoundError: There is no manifest (not a committed checkpoint).
        CorruptCheckpointError: The manifest is malformed.
    """
    path = storage.path(directory, MANIFEST_NAME)
    size = storage.size(directory, MANIFEST_NAME)
    if size > MAX_MANIFEST_BYTES:
        raise CorruptCheckpointError(
            f"manifest is {size} bytes, more than the {MAX_MANIFEST_BYTES} allowed", path=path
        )
    return decode_manifest(storage.read_bytes(directory, MANIFEST_NAME), path)


def _read_header(f: BinaryIO, path: str, size: int) -> tuple[dict[str, TensorEntry], int]:
    head = f.read(8)
    n = int.from_bytes(head, "little") if len(head) == 8 else 0
    prefix = head + f.read(max(0, min(n, size - 8, MAX_HEADER_BYTES)))
    entries, _, data_start = parse_header(prefix, size, path)
    return entries, data_start


def load_tensors(
    storage: Storage,
    directory: str,
    manifest: Manifest,
    names: list[str],
    targets: Mapping[str, Target],
    map_location: MapLocation,
) -> dict[str, torch.Tensor]:
    """Load the named tensors, each built at its target device and dtype.

    Args:
        storage: Where the checkpoint is.
        directory: The checkpoint directory below the storage root.
        manifest: Its validated manifest.
        names: The tensor names to load.
        targets: ``{name: (device, dtype)}``; a missing name or a ``None`` device
            means "where ``map_location`` maps the saved location".
        map_location: As for ``torch.load``.

    Raises:
        CheckpointNotFoundError: A tensor file is missing.
        CorruptCheckpointError: A file's size or header disagrees with the manifest.
    """
    by_file: dict[str, list[str]] = {}
    for name in names:
        record = manifest.tensors.get(name)
        if record is None:
            raise CorruptCheckpointError(
                "state refers to a tensor the manifest does not list",
                path=storage.path(directory, MANIFEST_NAME),
                key=name,
            )
        by_file.setdefault(record.file, []).append(name)
    out: dict[str, torch.Tensor] = {}
    cuda_devices: set[torch.device] = set()
    for file_name, file_names in by_file.items():
        path = storage.path(directory, file_name)
        expected = manifest.files[file_name]
        actual = storage.size(directory, file_name)
        if actual != expected:
            raise CorruptCheckpointError(
                f"file size is {actual} bytes, the manifest says {expected}", path=path
            )
        with storage.open_read(directory, file_name) as f:
            entries, data_start = _read_header(f, path, expected)
            for name in file_names:
                record = manifest.tensors[name]
                entry = _matching_entry(entries, name, record, path)
                device, dtype = targets.get(name, (None, None))
                if device is None and not callable(map_location):
                    device = mapped_device(map_location, record.device)
                if device is not None and device.type == "meta":
                    out[name] = torch.empty(
                        record.shape, dtype=dtype or record.dtype, device="meta"
                    )
                    continue
                to_cuda = device is not None and device.type == "cuda" and torch.cuda.is_available()
                cpu = read_tensor(f, entry, data_start, path, pin_memory=to_cuda)
                out[name] = place(
                    cpu,
                    device,
                    dtype,
                    map_location=map_location,
                    saved=record.device,
                    key=name,
                    non_blocking=to_cuda,
                )
                if to_cuda:
                    cuda_devices.add(out[name].device)
    for cuda in cuda_devices:  # pinned host copies are asynchronous: finish them
        torch.cuda.synchronize(cuda)
    return out


def _matching_entry(
    entries: Mapping[str, TensorEntry], name: str, record: TensorRecord, path: str
) -> TensorEntry:
    entry = entries.get(name)
    if entry is None:
        raise CheckpointNotFoundError("tensor is missing from its file", path=path, key=name)
    if entry.dtype != record.dtype or entry.shape != record.shape:
        raise CorruptCheckpointError(
            f"file holds {entry.dtype} {list(entry.shape)} but the manifest says "
            f"{record.dtype} {list(record.shape)}",
            path=path,
            key=name,
        )
    return entry
