"""Writing one rank's files, and assembling the v3 manifest from every rank's report.

A rank's report is JSON (gathered by ckpt's pickle-free collective): its files'
sizes and checksums, each shard's place in the global tensor and in its file
with the shard's own checksum, and its own items as v2 manifest bytes.
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
from ckpt.format.checksums import Hasher, HashingWriter
from ckpt.format.tensorfile import dtype_from_name, dtype_name, write_tensors
from ckpt.state.tree import Json
from ckpt.storage import BackgroundSyncs, Storage

__all__ = ["assemble_v3", "write_rank_files"]

_METADATA = {"format": "pt"}


def _write_file(
    f: BinaryIO, tensors: Mapping[str, torch.Tensor], hasher: Hasher, digests: dict[str, Any]
) -> int:
    """Write a safetensors file; record each tensor's first byte and checksum in ``digests``."""
    return write_tensors(HashingWriter(f, hasher), tensors, _METADATA, digests=digests)


def write_rank_files(storage: Storage, directory: str, captured: RankCapture) -> Json:
    """Write this rank's files into ``directory``; return its report for the coordinator."""
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
    chunks = []
    for s in captured.shards:
        begin, checksum = digests[captured.shard_file][chunk_key(s.name, s.offsets)]
        chunks.append(
            [
                s.name,
                list(s.offsets),
                list(s.data.shape),
                list(s.global_shape),
                dtype_name(s.data.dtype),
                captured.shard_file,
                begin,
                checksum,
            ]
        )
    own = dataclasses.replace(
        captured.own, files={n: r for n, r in files.items() if n != captured.shard_file}
    )
    return {
        "files": {n: [r.size, r.checksum] for n, r in files.items()},
        "chunks": chunks,
        "own": base64.b64encode(encode_manifest(own)).decode("ascii"),
    }


def assemble_v3(
    template: Manifest, sharded_items: Mapping[str, ItemRecord], reports: Sequence[Any]
) -> Manifest:
    """The v3 manifest of a save, from the coordinator's template and every rank's report.

    ``template`` carries step, epoch, metrics, time and versions.
    """
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
