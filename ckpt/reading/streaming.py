"""Streaming one item's tensors out of a checkpoint, one at a time, with bounded memory.

Each tensor file is read once, front to back, tensor by tensor (packed tensors
straight out of their pack, member by member), and hashed as it streams when
verifying; a tensor of a checkpoint saved by several ranks is assembled from its
chunks, each chunk checked against its own checksum first. Memory: one tensor
(plus one chunk, for version 3). What is yielded is never referenced again here.

A file's checksum covers all of it, so a corrupt file is reported once its
last byte has been read: after the tensors before the damage were yielded.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import BinaryIO

import torch

from ckpt.errors import CorruptCheckpointError
from ckpt.format import Manifest, TensorRecord, rank_manifest
from ckpt.format.checksums import CHUNK_BYTES, Hasher
from ckpt.format.tensorfile import TensorEntry, read_tensor, tensor_bytes
from ckpt.io import assemble_tensor
from ckpt.io.checks import (
    alias_entries,
    check_digest,
    check_size,
    matching_entry,
    open_listed,
    read_header,
)
from ckpt.io.read import tensors_by_file
from ckpt.storage import Storage

__all__ = ["stream_item"]


def stream_item(
    storage: Storage,
    step_name: str,
    manifest: Manifest,
    keys: list[tuple[str, str]],
    *,
    sharded: bool,
    verify: bool,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(key, CPU tensor)`` for each of ``keys`` (``(key, stored name)`` pairs).

    Args:
        storage: The checkpoint root.
        step_name: The step directory.
        manifest: Its manifest.
        keys: From :func:`ckpt.reading.describe.item_tensor_keys`.
        sharded: The item is one of a version 3 manifest's sharded items.
        verify: Check every byte read against its checksum.

    Raises:
        CorruptCheckpointError: A file or chunk disagrees with the manifest.
    """
    by_name: dict[str, list[str]] = {}
    for key, name in keys:
        by_name.setdefault(name, []).append(key)
    if sharded:
        assert manifest.sharded is not None
        for name, at in by_name.items():
            tensor = assemble_tensor(
                storage, step_name, name, manifest.sharded.tensors[name], verify=verify
            )
            for key in at:
                yield key, tensor
            del tensor
        return
    view = rank_manifest(manifest, 0) if manifest.sharded is not None else manifest
    for file_name, names in tensors_by_file(storage, step_name, view, by_name).items():
        yield from _stream_file(storage, step_name, view, file_name, names, by_name, verify)


def _stream_file(
    storage: Storage,
    step_name: str,
    manifest: Manifest,
    file_name: str,
    names: list[str],
    keys: Mapping[str, list[str]],
    verify: bool,
) -> Iterator[tuple[str, torch.Tensor]]:
    """One pass over one file: yield the wanted tensors, hash (or skip) the rest."""
    path = check_size(storage, step_name, file_name, manifest)
    record = manifest.files[file_name]
    hasher = Hasher() if verify and record.checksum else None
    records = manifest.tensors
    members: dict[str, list[tuple[str, TensorRecord]]] = {}
    direct = set()
    for name in names:
        pack = records[name].pack
        if pack is None:
            direct.add(name)
    for name, r in records.items():  # every member, to hash the whole pack in order
        if r.pack is not None and r.file == file_name:
            members.setdefault(r.pack, []).append((name, r))
    wanted_packs = {p for p in (records[n].pack for n in names) if p is not None}
    scratch = bytearray(CHUNK_BYTES) if hasher is not None else bytearray()
    with open_listed(storage, step_name, file_name, manifest) as f:
        entries, data_start = read_header(f, path, record.size, hasher)
        entries = alias_entries(entries, file_name, path)
        for name in [*direct, *wanted_packs]:
            matching_entry(entries, name, records[name], path)
        for entry in sorted(entries.values(), key=lambda e: e.begin):
            if entry.name in direct:
                tensor = read_tensor(f, entry, data_start, path)
                if hasher is not None:
                    hasher.update(tensor_bytes(tensor))
                for key in keys[entry.name]:
                    yield key, tensor
                del tensor
            elif entry.name in wanted_packs:
                yield from _stream_pack(f, entry, data_start, path, members, keys, hasher)
            elif hasher is not None:
                f.seek(data_start + entry.begin)
                hasher.skip(f, entry.nbytes, scratch)
    if hasher is not None:
        check_digest(record, hasher, path, manifest.step, file_name)


def _stream_pack(
    f: BinaryIO,
    pack: TensorEntry,
    data_start: int,
    path: str,
    members: Mapping[str, list[tuple[str, TensorRecord]]],
    keys: Mapping[str, list[str]],
    hasher: Hasher | None,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield a pack's wanted members, reading the pack in spans of at most ``CHUNK_BYTES``.

    The members tile the pack exactly (the manifest was checked), so the spans
    cover it and are hashed whole; each member is copied out of its span.
    """
    ordered = sorted(members.get(pack.name, []), key=lambda m: m[1].offset)
    first = 0
    while first < len(ordered):
        begin = ordered[first][1].offset
        last = first + 1
        while last < len(ordered) and _end(ordered[last][1]) - begin <= CHUNK_BYTES:
            last += 1
        span = _read_span(f, data_start + pack.begin + begin, _end(ordered[last - 1][1]) - begin)
        if span is None:
            raise CorruptCheckpointError(
                "file ends inside a pack of small tensors", path=path, key=pack.name
            )
        if hasher is not None:
            hasher.update(span)
        for name, r in ordered[first:last]:
            if name in keys:
                tensor = torch.empty(r.shape, dtype=r.dtype)
                if r.nbytes:
                    at = r.offset - begin
                    tensor_bytes(tensor)[:] = span[at : at + r.nbytes]
                for key in keys[name]:
                    yield key, tensor
                del tensor
        first = last


def _end(r: TensorRecord) -> int:
    return r.offset + r.nbytes


def _read_span(f: BinaryIO, at: int, count: int) -> memoryview | None:
    """``count`` bytes of ``f`` from ``at``; ``None`` if the file ends first."""
    buffer = memoryview(bytearray(count))
    f.seek(at)
    filled = 0
    while filled < count:
        n = f.readinto(buffer[filled:])  # type: ignore[attr-defined]
        if not n:
            return None
        filled += n
    return buffer
