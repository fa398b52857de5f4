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
from ckpt.format import (
    MANIFEST_NAME,
    FileRecord,
    Manifest,
    TensorRecord,
    decode_manifest,
    encode_manifest,
)
from ckpt.integrity import CHUNK_BYTES, Hasher, HashingWriter
from ckpt.locations import MapLocation, mapped_device, place
from ckpt.optim import Target
from ckpt.storage import Storage
from ckpt.tensorfile import (
    MAX_HEADER_BYTES,
    TensorEntry,
    parse_header,
    read_tensor,
    tensor_bytes,
    write_tensors,
)

__all__ = [
    "MAX_MANIFEST_BYTES",
    "load_tensors",
    "read_manifest",
    "verify_checkpoint_files",
    "write_checkpoint_files",
]

_SAFETENSORS_METADATA = {"format": "pt"}

MAX_MANIFEST_BYTES = 256 * 1024 * 1024
"""Largest manifest read (a manifest of a million tensors is about 150 MB)."""


def write_checkpoint_files(
    storage: Storage,
    directory: str,
    files: Mapping[str, Mapping[str, torch.Tensor]],
    manifest: Manifest,
    *,
    replace_manifest: bool = False,
) -> Manifest:
    """Write each tensor file, then the manifest (with the files' sizes and checksums) last.

    Each file's checksum is computed from the bytes as they are written.

    Args:
        storage: Where to write.
        directory: A directory below the storage root where the files do not exist yet.
        files: ``{file name: {tensor name: tensor}}``.
        manifest: The manifest to complete with file records and write.
        replace_manifest: Overwrite an existing manifest instead of failing.

    Returns:
        The manifest as written.

    Raises:
        FileExistsError: A file (the manifest, when another writer committed first) exists.
    """
    records: dict[str, FileRecord] = {}
    for file_name, tensors in files.items():
        hashers: list[Hasher] = []

        def write(
            f: BinaryIO,
            tensors: Mapping[str, torch.Tensor] = tensors,
            hashers: list[Hasher] = hashers,
        ) -> int:
            hashers.append(Hasher())  # a fresh digest for each attempt
            return write_tensors(HashingWriter(f, hashers[-1]), tensors, _SAFETENSORS_METADATA)

        size = storage.write_file((directory, file_name), write)
        records[file_name] = FileRecord(size, hashers[-1].digest())
    manifest = dataclasses.replace(manifest, files=records)
    raw = encode_manifest(manifest)

    def write_manifest(f: BinaryIO) -> int:
        f.write(raw)
        return len(raw)

    storage.write_file((directory, MANIFEST_NAME), write_manifest, replace=replace_manifest)
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


def _read_header(
    f: BinaryIO, path: str, size: int, hasher: Hasher | None
) -> tuple[dict[str, TensorEntry], int]:
    head = f.read(8)
    n = int.from_bytes(head, "little") if len(head) == 8 else 0
    prefix = head + f.read(max(0, min(n, size - 8, MAX_HEADER_BYTES)))
    entries, _, data_start = parse_header(prefix, size, path)
    if hasher is not None:
        hasher.update(prefix)
    return entries, data_start


def _check_digest(record: FileRecord, hasher: Hasher, path: str, step: int) -> None:
    actual = hasher.digest()
    if actual != record.checksum:
        raise CorruptCheckpointError(
            f"checksum mismatch in step {step}: expected {record.checksum}, actual {actual}",
            path=path,
        )


def _check_size(storage: Storage, directory: str, file_name: str, manifest: Manifest) -> str:
    path = storage.path(directory, file_name)
    expected = manifest.files[file_name].size
    try:
        actual = storage.size(directory, file_name)
    except CheckpointNotFoundError as e:
        raise CorruptCheckpointError(
            f"a file of step {manifest.step} listed in its manifest is missing", path=path
        ) from e
    if actual != expected:
        raise CorruptCheckpointError(
            f"file size in step {manifest.step} is {actual} bytes, the manifest says {expected}",
            path=path,
        )
    return path


def load_tensors(
    storage: Storage,
    directory: str,
    manifest: Manifest,
    names: list[str],
    targets: Mapping[str, Target],
    map_location: MapLocation,
    *,
    verify: bool = True,
) -> dict[str, torch.Tensor]:
    """Load the named tensors, each built at its target device and dtype.

    With ``verify``, every file that has a tensor to read is read whole and its
    checksum compared with the manifest's, as the bytes stream in; tensors not
    asked for are hashed and dropped. A file whose tensors all go to the
    ``meta`` device is not read at all.

    Args:
        storage: Where the checkpoint is.
        directory: The checkpoint directory below the storage root.
        manifest: Its validated manifest.
        names: The tensor names to load.
        targets: ``{name: (device, dtype)}``; a missing name or a ``None`` device
            means "where ``map_location`` maps the saved location".
        map_location: As for ``torch.load``.
        verify: Check each file read against its checksum.

    Raises:
        CheckpointNotFoundError: A tensor file is missing.
        CorruptCheckpointError: A file's size, header or checksum disagrees with the manifest.
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
    scratch = bytearray()
    for file_name, file_names in by_file.items():
        wanted: dict[str, tuple[torch.device | None, torch.dtype | None]] = {}
        for name in file_names:
            record = manifest.tensors[name]
            device, dtype = targets.get(name, (None, None))
            if device is None and not callable(map_location):
                device = mapped_device(map_location, record.device)
            if device is not None and device.type == "meta":
                out[name] = torch.empty(record.shape, dtype=dtype or record.dtype, device="meta")
            else:
                wanted[name] = (device, dtype)
        if not wanted:
            continue
        path = _check_size(storage, directory, file_name, manifest)
        file_record = manifest.files[file_name]
        hasher = Hasher() if verify and file_record.checksum else None
        with storage.open_read(directory, file_name) as f:
            entries, data_start = _read_header(f, path, file_record.size, hasher)
            for name in wanted:
                _matching_entry(entries, name, manifest.tensors[name], path)
            for entry in sorted(entries.values(), key=lambda e: e.begin):
                if entry.name not in wanted:
                    if hasher is not None:
                        if not scratch:
                            scratch = bytearray(CHUNK_BYTES)
                        f.seek(data_start + entry.begin)
                        hasher.skip(f, entry.nbytes, scratch)
                    continue
                device, dtype = wanted[entry.name]
                to_cuda = device is not None and device.type == "cuda" and torch.cuda.is_available()
                cpu = read_tensor(f, entry, data_start, path, pin_memory=to_cuda)
                if hasher is not None:
                    hasher.update(tensor_bytes(cpu))
                out[entry.name] = place(
                    cpu,
                    device,
                    dtype,
                    map_location=map_location,
                    saved=manifest.tensors[entry.name].device,
                    key=entry.name,
                    non_blocking=to_cuda,
                )
                if to_cuda:
                    cuda_devices.add(out[entry.name].device)
        if hasher is not None:
            _check_digest(file_record, hasher, path, manifest.step)
    for cuda in cuda_devices:  # pinned host copies are asynchronous: finish them
        torch.cuda.synchronize(cuda)
    return out


def verify_checkpoint_files(storage: Storage, directory: str, manifest: Manifest) -> int:
    """Read every file of a checkpoint whole and check it against the manifest.

    Checks each file's size, header (every tensor the manifest places in it, with
    its dtype and shape, and nothing else) and checksum.

    Returns:
        The number of bytes checked.

    Raises:
        CheckpointNotFoundError: A file is missing.
        CorruptCheckpointError: A file disagrees with the manifest.
    """
    in_file: dict[str, set[str]] = {name: set() for name in manifest.files}
    for name, tensor in manifest.tensors.items():
        in_file[tensor.file].add(name)
    scratch = bytearray(CHUNK_BYTES)
    checked = 0
    for file_name, names in in_file.items():
        path = _check_size(storage, directory, file_name, manifest)
        record = manifest.files[file_name]
        hasher = Hasher()
        with storage.open_read(directory, file_name) as f:
            entries, data_start = _read_header(f, path, record.size, hasher)
            for name in names:
                _matching_entry(entries, name, manifest.tensors[name], path)
            extra = sorted(set(entries) - names)
            if extra:
                raise CorruptCheckpointError(
                    f"file holds tensors the manifest does not list: {extra[:5]}", path=path
                )
            hasher.skip(f, record.size - data_start, scratch)
        if record.checksum is not None:
            _check_digest(record, hasher, path, manifest.step)
        checked += record.size
    return checked


def _matching_entry(
    entries: Mapping[str, TensorEntry], name: str, record: TensorRecord, path: str
) -> TensorEntry:
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
