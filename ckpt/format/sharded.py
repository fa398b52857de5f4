"""Checkpoints saved by several ranks (format version 3): the manifest's sharded section.

Pure functions over parsed JSON; no I/O. A version 3 manifest holds, besides the
top-level fields every version has, ``world_size``, the global tensors of the
sharded items (each with its chunks: where each sits in the global tensor and in
which file, at which byte), the sharded items, and one version 2 section
(``tensors`` and ``items``) per rank. Decoding validates all of it as strictly
as version 2 is validated: every chunk inside its tensor, the chunks disjoint
and covering it exactly, every byte range inside its listed file, every byte
count bounded, every reference resolved.
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections.abc import Mapping
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from ckpt.errors import CorruptCheckpointError
from ckpt.format.blobs import is_blob_key, ref_key, ref_name
from ckpt.format.checksums import ALGORITHM
from ckpt.format.dtypes import STORABLE, dtypes_by_name
from ckpt.format.limits import MAX_BYTES, byte_count
from ckpt.format.records import (
    ChunkRecord,
    FileRecord,
    GlobalTensorRecord,
    ItemRecord,
    Manifest,
    RankSection,
    ShardedSection,
)
from ckpt.format.sections import (
    DIGEST,
    decode_items,
    decode_tensors,
    encode_item,
    encode_tensor,
    shown_shape,
)
from ckpt.state.tree import Json, tensor_refs

if TYPE_CHECKING:
    import torch

__all__ = [
    "MAX_WORLD_SIZE",
    "SHARDED_KINDS",
    "decode_sharded",
    "encode_sharded",
    "chunk_ref",
    "rank_manifest",
]

MAX_WORLD_SIZE = 2**20
"""The most ranks a checkpoint may have been saved by."""
SHARDED_KINDS = ("module", "optimizer")
"""The kinds of item whose tensors may be saved in chunks."""
MAX_OVERLAP_CHECKS = 2**23
"""Most comparisons (pairs of chunks times dimensions) one manifest may need to
prove its chunks disjoint. Grids (any world size, sharding along one or several
dimensions) need few; a layout needing more is refused rather than checked for minutes."""

_CHUNK_FIELDS = ("offsets", "sizes", "file", "begin", "checksum")
_BLOB_CHUNK_FIELDS = ("offsets", "sizes", "blob", "begin", "checksum")


def encode_sharded(section: ShardedSection) -> dict[str, Json]:
    """The top-level JSON fields of a version 3 manifest that hold ``section``.

    Raises:
        ValueError: ``world_size`` is not the number of rank sections.
    """
    if section.world_size != len(section.ranks):
        raise ValueError(
            f"world_size is {section.world_size} but there are {len(section.ranks)} rank sections"
        )
    return {
        "world_size": section.world_size,
        "tensors": {name: _encode_global(r) for name, r in section.tensors.items()},
        "items": {name: encode_item(r) for name, r in section.items.items()},
        "ranks": [
            {
                "tensors": {name: encode_tensor(t) for name, t in rank.tensors.items()},
                "items": {name: encode_item(r) for name, r in rank.items.items()},
            }
            for rank in section.ranks
        ],
    }


def _encode_global(r: GlobalTensorRecord) -> dict[str, Json]:
    return {
        "dtype": str(r.dtype).removeprefix("torch."),
        "shape": list(r.shape),
        "chunks": [_encode_chunk(c) for c in r.chunks],
    }


def _encode_chunk(c: ChunkRecord) -> dict[str, Json]:
    """A chunk's JSON: ``blob`` (its key) in place of ``file`` for a blob reference (version 5)."""
    key = ref_key(c.file)
    return {
        "offsets": list(c.offsets),
        "sizes": list(c.sizes),
        **({"file": c.file} if key is None else {"blob": key}),
        "begin": c.begin,
        "checksum": c.checksum,
    }


def chunk_ref(name: str, offsets: tuple[int, ...] | list[int], key: str) -> str:
    """The file name a decoded manifest gives a chunk of ``name`` held by blob ``key``.

    One name per chunk (``<name>@<offsets>`` after the ``#``), so that no two chunks
    claim the same bytes of one file, even when several chunks hold equal bytes.
    """
    return ref_name(key, f"{name}@{','.join(str(o) for o in offsets)}")


def decode_sharded(
    doc: Mapping[str, Json],
    files: dict[str, FileRecord],
    bad: Any,
    blobs: Mapping[str, FileRecord] | None = None,
) -> ShardedSection:
    """Validate the sharded section of a parsed version 3 (or 5) manifest ``doc``.

    Args:
        doc: The whole parsed manifest.
        files: Its validated ``files`` section; with ``blobs``, each chunk's blob
            reference (:func:`chunk_ref`) is added to it.
        bad: Makes the error for a key and a reason.
        blobs: The ``blobs`` section of a version 5 manifest: chunks may name a
            blob in place of a file.

    Raises:
        CorruptCheckpointError: Anything malformed, out of bounds or inconsistent.
    """
    world_size = doc.get("world_size")
    if (
        isinstance(world_size, bool)
        or not isinstance(world_size, int)
        or not 1 <= world_size <= MAX_WORLD_SIZE
    ):
        raise bad("world_size", f"must be an int from 1 to {MAX_WORLD_SIZE}")
    for name, file in files.items():
        if file.checksum is None:
            raise bad(f"files.{name}.checksum", f"required from version 3: '{ALGORITHM}:<16 hex>'")
    ranks_doc = doc.get("ranks")
    if not isinstance(ranks_doc, list) or len(ranks_doc) != world_size:
        raise bad("ranks", f"must be a list of {world_size} rank sections (world_size)")
    plain = dict(files)  # rank sections name the step's own files only
    tensors = _decode_globals(doc.get("tensors"), files, bad, blobs)
    items = decode_items(doc.get("items"), bad)
    for name, item in items.items():
        _check_sharded_item(name, item, tensors, bad)
    ranks = tuple(_decode_rank(i, rank, plain, bad) for i, rank in enumerate(ranks_doc))
    _check_same_items(ranks, items, bad)
    return ShardedSection(world_size, tensors, items, ranks)


def _is_dims(value: Json) -> bool:
    return isinstance(value, list) and all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in value
    )


def _decode_globals(
    doc: Json, files: dict[str, FileRecord], bad: Any, blobs: Mapping[str, FileRecord] | None
) -> dict[str, GlobalTensorRecord]:
    if not isinstance(doc, dict):
        raise bad("tensors", "must be an object")
    budget = [MAX_OVERLAP_CHECKS]
    tensors: dict[str, GlobalTensorRecord] = {}
    for name, info in doc.items():
        where = f"tensors.{name}"
        if not isinstance(info, dict):
            raise bad(where, "must be an object")
        unknown = sorted(set(info) - {"dtype", "shape", "chunks"})
        if unknown:
            raise bad(where, f"unknown fields {unknown}")
        dtype_doc, shape, chunks_doc = info.get("dtype"), info.get("shape"), info.get("chunks")
        storable = dtype_doc if isinstance(dtype_doc, str) and dtype_doc in STORABLE else None
        dtype = None if storable is None else dtypes_by_name().get(storable)
        if dtype is None:
            raise bad(where, f"dtype {dtype_doc!r} is not one ckpt writes ({sorted(STORABLE)})")
        if not _is_dims(shape):
            raise bad(where, "shape must be a list of non-negative ints")
        assert isinstance(shape, list)
        if byte_count(shape, dtype.itemsize) is None:
            raise bad(where, f"shape {shown_shape(shape)} overflows: more than {MAX_BYTES} bytes")
        if not isinstance(chunks_doc, list) or not chunks_doc:
            raise bad(f"{where}.chunks", "must be a non-empty list")
        chunks = tuple(
            _decode_chunk(
                f"{where}.chunks[{i}]",
                chunk,
                shape,
                dtype,
                files,
                bad,
                _blob_of(f"{where}.chunks[{i}]", name, chunk, blobs, bad),
            )
            for i, chunk in enumerate(chunks_doc)
        )
        record = GlobalTensorRecord(dtype, tuple(shape), chunks)
        _check_cover(where, record, bad, budget)
        tensors[name] = record
    _check_file_spans(tensors, bad)
    return tensors


def _blob_of(
    where: str, name: str, doc: Json, blobs: Mapping[str, FileRecord] | None, bad: Any
) -> tuple[str, FileRecord] | None:
    """A blob chunk's reference and blob record (version 5), or ``None`` for a file's chunk."""
    if blobs is None or not isinstance(doc, dict) or "blob" not in doc:
        return None
    key, offsets = doc["blob"], doc.get("offsets")
    if not isinstance(key, str) or not is_blob_key(key):
        raise bad(where, f"blob key {key!r} is not 32 lower-case hex digits")
    if key not in blobs:
        raise bad(where, f"names blob {key!r}, which is not in 'blobs'")
    if not _is_dims(offsets):
        raise bad(where, "offsets and sizes must be lists of non-negative ints")
    assert isinstance(offsets, list)
    return chunk_ref(name, [o for o in offsets if isinstance(o, int)], key), blobs[key]


def _decode_chunk(
    where: str,
    doc: Json,
    shape: list[int],
    dtype: torch.dtype,
    files: dict[str, FileRecord],
    bad: Any,
    blob: tuple[str, FileRecord] | None = None,
) -> ChunkRecord:
    fields = _CHUNK_FIELDS if blob is None else _BLOB_CHUNK_FIELDS
    if not isinstance(doc, dict) or set(doc) != set(fields):
        raise bad(where, f"must be an object with exactly the fields {list(fields)}")
    offsets, sizes, file, begin, checksum = (doc[k] for k in fields)
    if blob is not None:
        file = blob[0]
        files[file] = blob[1]
    if not (_is_dims(offsets) and _is_dims(sizes)):
        raise bad(where, "offsets and sizes must be lists of non-negative ints")
    assert isinstance(offsets, list) and isinstance(sizes, list)
    if len(offsets) != len(shape) or len(sizes) != len(shape):
        raise bad(where, f"offsets and sizes must have {len(shape)} dimensions, as the shape")
    for d, (at, size, dim) in enumerate(zip(offsets, sizes, shape, strict=True)):
        if at + size > dim:
            raise bad(where, f"reaches past the shape {shown_shape(shape)} in dimension {d}")
    if not isinstance(file, str) or file not in files:
        raise bad(where, f"names file {file!r}, which is not in 'files'")
    nbytes = byte_count(sizes, dtype.itemsize)  # within the shape's count, checked already
    if isinstance(begin, bool) or not isinstance(begin, int) or begin < 0 or nbytes is None:
        raise bad(where, "begin must be a non-negative int")
    if begin % dtype.itemsize:
        raise bad(where, f"begin {begin} is not aligned to {dtype}")
    if begin + nbytes > files[file].size:
        raise bad(
            where,
            f"bytes {begin} to {begin + nbytes} run past the end of {file!r} "
            f"({files[file].size} bytes)",
        )
    if not isinstance(checksum, str) or not DIGEST.fullmatch(checksum):
        raise bad(f"{where}.checksum", f"must be '{ALGORITHM}:' and 16 hex digits")
    return ChunkRecord(tuple(offsets), tuple(sizes), file, begin, checksum)


def _check_cover(where: str, record: GlobalTensorRecord, bad: Any, budget: list[int]) -> None:
    """The chunks are disjoint and cover the shape exactly (each lies inside it already)."""
    shape, chunks = record.shape, record.chunks
    numel = math.prod(shape)
    if numel == 0:
        only = chunks[0]
        if len(chunks) != 1 or only.sizes != shape or any(only.offsets):
            raise bad(f"{where}.chunks", "a tensor with no elements has one chunk, of its shape")
        return
    for i, chunk in enumerate(chunks):
        if chunk.numel == 0:
            raise bad(f"{where}.chunks[{i}]", "holds no elements")
    _check_disjoint(where, chunks, bad, budget)
    total = sum(chunk.numel for chunk in chunks)
    if total != numel:  # disjoint, inside the shape, fewer elements: a gap
        raise bad(
            f"{where}.chunks", f"chunks hold {total} of the {numel} elements: they leave a gap"
        )


def _check_disjoint(
    where: str, chunks: tuple[ChunkRecord, ...], bad: Any, budget: list[int]
) -> None:
    """No two chunks share an element: a sweep along the dimension with most distinct offsets.

    Only chunks whose extents along that dimension overlap are compared, so a
    grid costs about one comparison per chunk and neighbour; ``budget`` bounds
    the comparisons a hostile layout can demand.
    """
    if len(chunks) < 2:
        return
    ndim = len(chunks[0].offsets)
    if ndim == 0:  # two chunks of a scalar
        raise bad(f"{where}.chunks[1]", "overlaps chunk 0")
    axis = max(range(ndim), key=lambda d: len({c.offsets[d] for c in chunks}))
    order = sorted(range(len(chunks)), key=lambda i: chunks[i].offsets[axis])
    active: list[tuple[int, int]] = []  # (end along the axis, chunk index), a heap
    for i in order:
        chunk = chunks[i]
        start = chunk.offsets[axis]
        while active and active[0][0] <= start:
            heapq.heappop(active)
        budget[0] -= len(active) * ndim
        if budget[0] < 0:
            raise bad(
                f"{where}.chunks",
                f"proving the chunks disjoint takes more than {MAX_OVERLAP_CHECKS} "
                "comparisons: too irregular a layout to check",
            )
        for _, j in active:
            if _overlap(chunk, chunks[j]):
                raise bad(f"{where}.chunks[{i}]", f"overlaps chunk {j}")
        heapq.heappush(active, (start + chunk.sizes[axis], i))


def _overlap(a: ChunkRecord, b: ChunkRecord) -> bool:
    return all(
        a0 < b0 + bn and b0 < a0 + an
        for a0, an, b0, bn in zip(a.offsets, a.sizes, b.offsets, b.sizes, strict=True)
    )


def _check_file_spans(tensors: Mapping[str, GlobalTensorRecord], bad: Any) -> None:
    """No two chunks claim the same bytes of a file."""
    spans: dict[str, list[tuple[int, int, str]]] = {}
    for name, record in tensors.items():
        for i, chunk in enumerate(record.chunks):
            end = chunk.begin + record.chunk_nbytes(chunk)
            if end > chunk.begin:
                spans.setdefault(chunk.file, []).append((chunk.begin, end, f"{name}.chunks[{i}]"))
    for file, found in spans.items():
        found.sort()
        for (_, end, first), (begin, _, second) in itertools.pairwise(found):
            if begin < end:
                raise bad(f"tensors.{second}", f"its bytes in {file!r} overlap tensors.{first}'s")


def _check_sharded_item(
    name: str, item: ItemRecord, tensors: Mapping[str, GlobalTensorRecord], bad: Any
) -> None:
    where = f"items.{name}"
    if item.kind not in SHARDED_KINDS:
        raise bad(where, f"a sharded item's kind must be one of {SHARDED_KINDS}")
    try:
        refs = tensor_refs(item.state)
    except CorruptCheckpointError as e:
        raise bad(f"{where}{e.key}" if e.key else where, e.reason) from e
    for _, ref in refs:
        if ref not in tensors:
            raise bad(where, f"state refers to tensor {ref!r}, which is not in 'tensors'")


def _decode_rank(rank: int, doc: Json, files: Mapping[str, FileRecord], bad: Any) -> RankSection:
    prefix = f"ranks[{rank}]"

    def rank_bad(key: str, why: str) -> CorruptCheckpointError:
        error: CorruptCheckpointError = bad(f"{prefix}.{key}", why)
        return error

    if not isinstance(doc, dict) or set(doc) != {"tensors", "items"}:
        raise bad(prefix, "must be an object with exactly the fields ['tensors', 'items']")
    tensors = decode_tensors(doc["tensors"], files, rank_bad)
    items = decode_items(doc["items"], rank_bad)
    return RankSection(tensors, items)


def _check_same_items(
    ranks: tuple[RankSection, ...], sharded: Mapping[str, ItemRecord], bad: Any
) -> None:
    """Every rank has rank 0's item names and kinds, none of them a sharded item's name."""
    first = {name: r.kind for name, r in ranks[0].items.items()}
    clash = sorted(set(first) & set(sharded))
    if clash:
        raise bad(f"ranks[0].items.{clash[0]}", "has the name of a sharded item")
    for i, rank in enumerate(ranks[1:], start=1):
        kinds = {name: r.kind for name, r in rank.items.items()}
        if kinds != first:
            differ = sorted(set(kinds) ^ set(first)) or sorted(
                n for n in kinds if kinds[n] != first[n]
            )
            raise bad(
                f"ranks[{i}].items",
                f"item names or kinds differ from rank 0's (first: {differ[0]!r})",
            )


def rank_manifest(manifest: Manifest, rank: int) -> Manifest:
    """A version 2 view of what ``rank`` saved for itself in a version 3 manifest.

    Its ``tensors`` and ``items`` are the rank's own; ``files`` lists every file
    of the checkpoint. The version 2 readers (:func:`ckpt.io.load_tensors`,
    the restore of each item) take it as they take any manifest.

    Raises:
        ValueError: ``manifest`` is not sharded, or has no such rank.
    """
    if manifest.sharded is None:
        raise ValueError("the manifest was not saved by several ranks")
    if not 0 <= rank < manifest.sharded.world_size:
        raise ValueError(f"rank must be from 0 to {manifest.sharded.world_size - 1}, got {rank}")
    section = manifest.sharded.ranks[rank]
    return replace(manifest, tensors=section.tensors, items=section.items, sharded=None)
