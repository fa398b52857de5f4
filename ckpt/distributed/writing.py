"""Writing one rank's files, and assembling the v3 manifest from every rank's report.

A rank's report is JSON (gathered by ckpt's pickle-free collective): its files'
sizes and checksums, each shard's place in the global tensor and in its file
with the shard's own checksum, and its own items as v2 manifest bytes. In an
incremental save (format version 5) a large shard is a blob of the root's content
store instead: its chunk names the blob, and the report lists the blobs this
rank wrote (see :class:`BlobPlan`).
"""

from __future__ import annotations

import base64
import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, BinaryIO

import torch

from ckpt.distributed.capture import RankCapture, chunk_key
from ckpt.format import (
    ChunkRecord,
    FileRecord,
    GlobalTensorRecord,
    ItemRecord,
    Manifest,
    RankSection,
    ShardedSection,
    decode_manifest,
    encode_manifest,
)
from ckpt.format import bounds as format_bounds
from ckpt.format.blobs import blob_key, ref_key
from ckpt.format.checksums import Hasher, HashingWriter, hash_bytes
from ckpt.format.sharded import chunk_ref
from ckpt.format.tensorfile import (
    cpu_contiguous,
    dtype_from_name,
    dtype_name,
    tensor_bytes,
    write_tensors,
)
from ckpt.saving.blobs import blob_begin, write_blob
from ckpt.state.tree import Json
from ckpt.storage import BackgroundSyncs, Storage

__all__ = ["BlobPlan", "assemble_v3", "shard_keys", "write_rank_files"]

_METADATA = {"format": "pt"}


def _write_file(
    f: BinaryIO, tensors: Mapping[str, torch.Tensor], hasher: Hasher, digests: dict[str, Any]
) -> int:
    """Write a safetensors file; record each tensor's first byte and checksum in ``digests``."""
    return write_tensors(HashingWriter(f, hasher), tensors, _METADATA, digests=digests)


@dataclasses.dataclass
class BlobPlan:
    """Which of this rank's shards are blobs, and which blobs this rank writes."""

    keys: dict[str, tuple[str, str]]
    """``{chunk key: (blob key, chunk checksum)}`` of this rank's shards stored as blobs."""
    write: set[str]
    """The blob keys this rank writes (the store lacks them; no lower rank holds them)."""


def shard_keys(captured: RankCapture) -> dict[str, tuple[str, str]]:
    """``{chunk key: (blob key, checksum)}`` of this rank's shards large enough to be blobs.

    Hashed now, every save, from the bytes (one CPU copy at a time).
    """
    tensors = captured.files.get(captured.shard_file, {})
    keys: dict[str, tuple[str, str]] = {}
    for s in captured.shards:
        name = chunk_key(s.name, s.offsets)
        t = tensors[name]
        if t.nbytes >= format_bounds.MIN_BLOB_BYTES:
            cpu = cpu_contiguous(t.detach())
            data = tensor_bytes(cpu)
            keys[name] = (blob_key(cpu, data), hash_bytes(data))
    return keys


def _write_blobs(
    storage: Storage, captured: RankCapture, plan: BlobPlan
) -> tuple[dict[str, list[Any]], dict[str, tuple[str, int, str]]]:
    """Write this rank's blobs; their records, and each blob shard's key, begin and checksum."""
    tensors = captured.files.get(captured.shard_file, {})
    written: dict[str, list[Any]] = {}
    placed: dict[str, tuple[str, int, str]] = {}
    for name, (key, checksum) in plan.keys.items():
        t = tensors[name]
        if key in plan.write and key not in written:
            record = write_blob(storage, key, cpu_contiguous(t.detach()))
            written[key] = [record.size, record.checksum]
        placed[name] = (key, blob_begin(t), checksum)
    return written, placed


def _without(captured: RankCapture, placed: Mapping[str, Any]) -> RankCapture:
    """``captured`` without the shards stored as blobs (and without an empty shard file)."""
    if not placed:
        return captured
    shards = {n: t for n, t in captured.files[captured.shard_file].items() if n not in placed}
    files = {**captured.files, captured.shard_file: shards}
    if not shards:
        del files[captured.shard_file]
    return dataclasses.replace(captured, files=files)


def _write_files(
    storage: Storage, directory: str, captured: RankCapture
) -> tuple[dict[str, FileRecord], dict[str, dict[str, Any]]]:
    """Write the rank's files; their records, and each file's tensors' first bytes and checksums."""
    files: dict[str, FileRecord] = {}
    digests: dict[str, dict[str, Any]] = {}
    with BackgroundSyncs() as syncs:
        for file_name, tensors in captured.files.items():
            hashers: list[Hasher] = []
            found: dict[str, Any] = {}

            def write(
                f: BinaryIO,
                tensors: Mapping[str, torch.Tensor] = tensors,
                hashers: list[Hasher] = hashers,
                found: dict[str, Any] = found,
            ) -> int:
                hashers.append(Hasher())
                found.clear()
                return _write_file(f, tensors, hashers[-1], found)

            size = storage.write_file((directory, file_name), write, syncs=syncs)
            files[file_name] = FileRecord(size, hashers[-1].digest())
            digests[file_name] = found
        syncs.wait()
    return files, digests


def write_rank_files(
    storage: Storage, directory: str, captured: RankCapture, plan: BlobPlan | None = None
) -> Json:
    """Write this rank's files into ``directory``; return its report for the coordinator.

    With ``plan`` (an incremental save), the shards it names are blobs: this rank
    writes those in ``plan.write`` to the content store, durably, first.
    """
    written, placed = _write_blobs(storage, captured, plan) if plan else ({}, {})
    captured = _without(captured, placed)
    files, digests = _write_files(storage, directory, captured)
    chunks = []
    for s in captured.shards:
        name = chunk_key(s.name, s.offsets)
        file = captured.shard_file
        if name in placed:
            key, begin, checksum = placed[name]
            file = chunk_ref(s.name, s.offsets, key)
        else:
            begin, checksum = digests[captured.shard_file][name]
        shape, dtype = list(s.data.shape), dtype_name(s.data.dtype)
        chunks.append(
            [s.name, list(s.offsets), shape, list(s.global_shape), dtype, file, begin, checksum]
        )
    own = dataclasses.replace(
        captured.own, files={n: r for n, r in files.items() if n != captured.shard_file}
    )
    return {
        "files": {n: [r.size, r.checksum] for n, r in files.items()},
        "chunks": chunks,
        "own": base64.b64encode(encode_manifest(own)).decode("ascii"),
        "blobs": written,
    }


def assemble_v3(
    template: Manifest,
    sharded_items: Mapping[str, ItemRecord],
    reports: Sequence[Any],
    known: dict[str, FileRecord] | None = None,
) -> Manifest:
    """The v3 (or v5) manifest of a save, from the coordinator's template and every rank's report.

    ``template`` carries step, epoch, metrics, time and versions. ``known`` (an
    incremental save): the content store's index, whose records the blobs the
    ranks did not write now come from; the blobs they wrote are added to it.
    """
    for report in reports:
        for key, (size, checksum) in report.get("blobs", {}).items():
            assert known is not None
            known[key] = FileRecord(size, checksum)
    files: dict[str, FileRecord] = {}
    chunks: dict[str, list[ChunkRecord]] = {}
    shapes: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {}
    ranks = []
    for rank, report in enumerate(reports):
        for name, (size, checksum) in report["files"].items():
            files[name] = FileRecord(size, checksum)
        for name, offsets, sizes, shape, dtype, file, begin, checksum in report["chunks"]:
            resolved = dtype_from_name(dtype)
            assert resolved is not None
            shapes[name] = (resolved, tuple(shape))
            key = ref_key(file)
            if key is not None:
                assert known is not None
                files[file] = known[key]
            chunks.setdefault(name, []).append(
                ChunkRecord(tuple(offsets), tuple(sizes), file, begin, checksum)
            )
        own = decode_manifest(base64.b64decode(report["own"]), f"rank {rank}'s report")
        ranks.append(RankSection(own.tensors, own.items))
    tensors = {
        name: GlobalTensorRecord(
            shapes[name][0], shapes[name][1], tuple(sorted(chunks[name], key=lambda c: c.offsets))
        )
        for name in sorted(chunks)
    }
    section = ShardedSection(len(reports), tensors, dict(sharded_items), tuple(ranks))
    items = {**sharded_items, **ranks[0].items}
    return dataclasses.replace(template, files=files, tensors={}, items=items, sharded=section)
