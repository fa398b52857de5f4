"""Assemble a torch.distributed.checkpoint (DCP) directory's state, checking every record.

The ``.metadata`` is unpickled by :func:`ckpt.convert.loading.load_dcp_metadata`
(DCP's own classes only); what it says is then checked before any of it is
used: dtypes are torch dtypes, sizes and offsets are ints in range, a tensor's
chunks lie inside it and cover it exactly (no gap, no overlap), each stored
slice lies inside its file (a plain name in the directory, a regular file),
and a tensor's size is at most the bytes its slices hold before anything is
allocated for it. A failure is a :class:`ckpt.CorruptCheckpointError` naming
the file and the key; nothing is dropped and imported without it.
"""

from __future__ import annotations

import bisect
import itertools
import os
from typing import Any, cast

import torch

from ckpt.convert.guard import MAX_DEPTH, MAX_NODES, check_shape, check_tree, open_source
from ckpt.convert.loading import load_bytes, load_dcp_metadata
from ckpt.errors import CorruptCheckpointError
from ckpt.format.limits import byte_count

__all__ = ["MAX_CHUNKS", "MAX_GRID_CELLS", "load_dcp"]

MAX_CHUNKS = 65536
"""The most chunks one tensor of a DCP checkpoint may be stored in."""

MAX_GRID_CELLS = 2**24
"""The most pieces the chunk boundaries of one tensor may cut it into (checked exactly)."""

_Box = tuple[tuple[int, ...], tuple[int, ...]]


class _DataFiles:
    """The data files of one DCP directory: plain names, regular files, slices in range."""

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self._sizes: dict[str, int] = {}

    def slice_of(self, info: Any, key: str) -> tuple[str, int, int]:
        """``(path, offset, length)`` of a storage record, checked against its file's size."""
        rel = getattr(info, "relative_path", None)
        offset, length = getattr(info, "offset", None), getattr(info, "length", None)
        where = os.path.join(self.directory, ".metadata")
        if getattr(info, "transform_descriptors", None):
            raise CorruptCheckpointError(
                f"stored with transforms {info.transform_descriptors!r:.80}: not supported",
                path=where,
                key=key,
            )
        if (
            not isinstance(rel, str)
            or os.path.basename(rel) != rel
            or rel in ("", ".", "..", ".metadata")
            or "\0" in rel
            or not _count(offset)
            or not _count(length)
        ):
            raise CorruptCheckpointError(f"bad storage record {info!r:.200}", path=where, key=key)
        offset, length = cast(int, offset), cast(int, length)  # checked above
        path = os.path.join(self.directory, rel)
        if path not in self._sizes:
            with open_source(path) as f:
                self._sizes[path] = os.fstat(f.fileno()).st_size
        if offset + length > self._sizes[path]:
            raise CorruptCheckpointError(
                f"its bytes {offset}..{offset + length} lie past the end of the file "
                f"({self._sizes[path]} bytes)",
                path=path,
                key=key,
            )
        return path, offset, length

    def read(self, place: tuple[str, int, int], key: str) -> bytes:
        """The bytes of a slice checked by :meth:`slice_of`."""
        path, offset, length = place
        with open_source(path) as f:
            f.seek(offset)
            data = f.read(length)
        if len(data) != length:
            raise CorruptCheckpointError("the file ends inside this value", path=path, key=key)
        return data


def _count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def load_dcp(directory: str) -> dict[str, Any]:
    """Every value of a DCP checkpoint, as the nested state that was saved.

    Returns:
        The nested state (keys as DCP's planner recorded them; DCP writes the int
        keys of optimizer states as strings).

    Raises:
        CheckpointNotFoundError: No ``.metadata``.
        CorruptCheckpointError: Any record is malformed, out of range, or
            disagrees with the bytes present; the message names file and key.
    """
    metadata = load_dcp_metadata(directory)
    where = os.path.join(directory, ".metadata")
    entries = getattr(metadata, "state_dict_metadata", None)
    storage = getattr(metadata, "storage_data", None)
    planner = getattr(metadata, "planner_data", None) or {}
    if not isinstance(entries, dict) or not isinstance(storage, dict):
        raise CorruptCheckpointError("not DCP metadata (no state or storage records)", path=where)
    if not isinstance(planner, dict) or max(len(entries), len(storage)) > MAX_NODES:
        raise CorruptCheckpointError(f"more than {MAX_NODES} records, or bad ones", path=where)
    by_fqn: dict[str, list[tuple[Any, Any]]] = {}
    for index, info in storage.items():
        fqn = getattr(index, "fqn", None)
        if not isinstance(fqn, str):
            raise CorruptCheckpointError(f"bad storage index {index!r:.200}", path=where)
        by_fqn.setdefault(fqn, []).append((index, info))
    files = _DataFiles(directory)
    state: dict[str, Any] = {}
    for fqn, meta in entries.items():
        if not isinstance(fqn, str):
            raise CorruptCheckpointError(f"bad key {fqn!r:.80}", path=where)
        stored = by_fqn.get(fqn, [])
        if hasattr(meta, "chunks"):
            value: Any = _assemble(files, fqn, meta, stored)
        else:
            if len(stored) != 1:
                raise CorruptCheckpointError(
                    f"{len(stored)} storage records for one value", path=where, key=fqn
                )
            place = files.slice_of(stored[0][1], fqn)
            value = load_bytes(files.read(place, fqn), place[0], fqn)
            check_tree(value, place[0], fqn)
        _put(state, _path(planner.get(fqn, (fqn,)), len(entries), where, fqn), value, where, fqn)
    return state


def _boxes(meta: Any, size: tuple[int, ...], where: str, fqn: str) -> list[_Box]:
    chunks = getattr(meta, "chunks", None)
    if not isinstance(chunks, (list, tuple)) or len(chunks) > MAX_CHUNKS:
        raise CorruptCheckpointError(
            f"chunks are not a list of at most {MAX_CHUNKS}", path=where, key=fqn
        )
    boxes = []
    for chunk in chunks:
        offsets = check_shape(getattr(chunk, "offsets", None), "a chunk's offsets", where, fqn)
        sizes = check_shape(getattr(chunk, "sizes", None), "a chunk's sizes", where, fqn)
        if len(offsets) != len(size) or len(sizes) != len(size):
            raise CorruptCheckpointError(
                f"a chunk has {len(offsets)} dimensions, the tensor {len(size)}",
                path=where,
                key=fqn,
            )
        if any(o + s > d for o, s, d in zip(offsets, sizes, size, strict=True)):
            raise CorruptCheckpointError(
                f"a chunk at {list(offsets)} of size {list(sizes)} lies outside the tensor's "
                f"size {list(size)}",
                path=where,
                key=fqn,
            )
        boxes.append((offsets, sizes))
    _check_cover(boxes, size, where, fqn)
    return boxes


def _volume(sizes: tuple[int, ...]) -> int:
    n = 1
    for s in sizes:
        n *= s
    return n


def _check_cover(boxes: list[_Box], size: tuple[int, ...], where: str, fqn: str) -> None:
    """The chunks cover the tensor exactly: no gap, no overlap.

    On the grid cut by every chunk boundary (at most :data:`MAX_GRID_CELLS`
    cells), the chunks' cell counts must add up to the grid's and every cell
    must be marked: then each cell is covered exactly once. The work is one
    mark per cell, whatever the chunks claim.
    """
    total = sum(_volume(s) for _, s in boxes)
    if total != _volume(size):
        raise CorruptCheckpointError(
            f"the chunks hold {total} elements, the tensor {_volume(size)}: they leave a gap "
            "or overlap",
            path=where,
            key=fqn,
        )
    solid = [b for b in boxes if _volume(b[1])]
    if not size or not solid:
        return  # a 0-d tensor (one chunk of volume 1, the sum says so), or no elements
    cuts = [
        sorted({0, d} | {o[i] for o, _ in solid} | {o[i] + s[i] for o, s in solid})
        for i, d in enumerate(size)
    ]
    cells = _volume(tuple(len(c) - 1 for c in cuts))
    if cells > MAX_GRID_CELLS:
        raise CorruptCheckpointError(
            f"the chunks cut the tensor into more than {MAX_GRID_CELLS} pieces", path=where, key=fqn
        )
    spans = [
        [
            (bisect.bisect_left(cut, o[i]), bisect.bisect_left(cut, o[i] + s[i]))
            for i, cut in enumerate(cuts)
        ]
        for o, s in solid
    ]
    if sum(_volume(tuple(b - a for a, b in span)) for span in spans) != cells:
        raise CorruptCheckpointError("the chunks overlap or leave a gap", path=where, key=fqn)
    grid = torch.zeros(tuple(len(c) - 1 for c in cuts), dtype=torch.bool)
    for span in spans:
        grid[tuple(slice(a, b) for a, b in span)] = True
    if not bool(grid.all()):
        raise CorruptCheckpointError("the chunks overlap and leave a gap", path=where, key=fqn)


def _assemble(files: _DataFiles, fqn: str, meta: Any, stored: list[tuple[Any, Any]]) -> Any:
    where = os.path.join(files.directory, ".metadata")
    dtype = getattr(getattr(meta, "properties", None), "dtype", None)
    if not isinstance(dtype, torch.dtype):
        raise CorruptCheckpointError(f"bad dtype {dtype!r:.80}", path=where, key=fqn)
    size = check_shape(getattr(meta, "size", None), "the tensor's size", where, fqn)
    nbytes = byte_count(size, dtype.itemsize)
    if nbytes is None:
        raise CorruptCheckpointError(f"size {list(size)} is too large", path=where, key=fqn)
    boxes = _boxes(meta, size, where, fqn)
    by_offset = {}
    for index, info in stored:
        offset = getattr(index, "offset", None)
        by_offset[tuple(offset) if isinstance(offset, (list, tuple)) else None] = info
    places = []
    for offsets, sizes in boxes:
        info = by_offset.get(offsets)
        if info is None and len(stored) == 1 and len(boxes) == 1:
            info = stored[0][1]
        if info is None:
            raise CorruptCheckpointError(
                f"the chunk at {list(offsets)} has no storage record", path=where, key=fqn
            )
        places.append(((offsets, sizes), files.slice_of(info, fqn)))
    present = sum(length for _, (_, _, length) in places)
    if nbytes > present:
        raise CorruptCheckpointError(
            f"declares {nbytes} bytes of data but its stored slices hold {present}",
            path=where,
            key=fqn,
        )
    full = torch.empty(size, dtype=dtype)
    for (offsets, sizes), place in places:
        part = load_bytes(files.read(place, fqn), place[0], fqn)
        if not isinstance(part, torch.Tensor) or part.dtype != dtype or part.shape != sizes:
            got = f"{part.dtype} {list(part.shape)}" if isinstance(part, torch.Tensor) else "?"
            raise CorruptCheckpointError(
                f"the chunk at {list(offsets)} is not a {dtype} tensor of size {list(sizes)} "
                f"(got {got})",
                path=place[0],
                key=fqn,
            )
        target = full
        for dim, (o, s) in enumerate(zip(offsets, sizes, strict=True)):
            target = target.narrow(dim, o, s)
        target.copy_(part)
    return full


def _path(path: Any, count: int, where: str, fqn: str) -> tuple[str | int, ...]:
    """A planner path: 1..MAX_DEPTH keys, str or int (list indices below ``count``)."""
    ok = isinstance(path, (list, tuple)) and 0 < len(path) <= MAX_DEPTH
    ok = ok and all(isinstance(k, str) or (_count(k) and k < max(count, 1)) for k in path)
    if not ok:
        raise CorruptCheckpointError(f"bad planner path {path!r:.200}", path=where, key=fqn)
    return tuple(path)


def _slot(node: Any, key: str | int, where: str, fqn: str) -> Any:
    """The value at ``node[key]`` (``None`` if absent), growing a list to hold ``key``."""
    if isinstance(node, list):
        if not isinstance(key, int):
            raise CorruptCheckpointError("a path gives a list a str key", path=where, key=fqn)
        node.extend([None] * (key + 1 - len(node)))
        return node[key]
    if isinstance(node, dict):
        return node.get(key)
    raise CorruptCheckpointError("a path runs through a stored value", path=where, key=fqn)


def _put(
    state: dict[str, Any], path: tuple[str | int, ...], value: Any, where: str, fqn: str
) -> None:
    node: Any = state
    for key, nxt in itertools.pairwise(path):
        child = _slot(node, key, where, fqn)
        if child is None:
            child = [] if isinstance(nxt, int) else {}
            node[key] = child
        node = child
    if _slot(node, path[-1], where, fqn) is not None:
        raise CorruptCheckpointError("two values at one place", path=where, key=fqn)
    node[path[-1]] = value
