"""Read one item of a ckpt checkpoint for export: its layout, then its tensors one at a time.

This is the one place export reads checkpoints; it streams with bounded memory
(one tensor, or one pack of small tensors, plus a read buffer) and checks each
file's checksum as the bytes go by. Format version 3 tensors come back whole,
consolidated from their chunks.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from ckpt.distributed.restoring import _read_into
from ckpt.errors import CheckpointNotFoundError, IncompatibleCheckpointError
from ckpt.format import Manifest, TensorRecord
from ckpt.integrity import CHUNK_BYTES, Hasher
from ckpt.io.checks import check_digest, check_size, matching_entry, read_header
from ckpt.reader import StepReader
from ckpt.storage import Storage, open_storage
from ckpt.tensorfile import read_tensor, tensor_bytes
from ckpt.tree import tensor_refs

__all__ = ["ItemLayout", "LayoutEntry", "open_item"]


@dataclass(frozen=True)
class LayoutEntry:
    """One stored tensor of an item: its key in the item's state, dtype and shape."""

    key: str
    name: str
    """The stored tensor's name in the checkpoint."""
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        """Bytes of the tensor's data."""
        n = self.dtype.itemsize
        for d in self.shape:
            n *= d
        return n


@dataclass(frozen=True)
class ItemLayout:
    """An item's tensors in state order, each stored tensor once.

    Attributes:
        step: The checkpoint's step.
        item: The item name.
        kind: The item's kind (``module``, ``dict``, ...).
        entries: One per stored tensor, under the first key that refers to it.
        aliases: ``{alias key: first key}``: keys that refer to a tensor stored
            once under an earlier key (tied weights).
        skipped: Keys of the item's state that are not tensors (``_extra_state``).
    """

    step: int
    item: str
    kind: str
    entries: tuple[LayoutEntry, ...]
    aliases: dict[str, str]
    skipped: tuple[str, ...]


class ItemSource:
    """One item of one committed checkpoint, opened for streaming reads."""

    def __init__(self, storage: Storage, step_name: str, manifest: Manifest, layout: ItemLayout):
        self.storage, self.step_name, self.manifest, self.layout = (
            storage,
            step_name,
            manifest,
            layout,
        )

    def tensors(self, *, verify: bool = True) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield ``(key, CPU tensor)`` for every layout entry, one at a time, in file order.

        A checksum mismatch raises after the file's last tensor was yielded: a
        consumer must treat its output as valid only once the iterator is exhausted.
        """
        keys = {e.name: e.key for e in self.layout.entries}
        sharded = self.manifest.sharded
        if sharded is not None and self.layout.item in sharded.items:
            for name, key in keys.items():
                r = sharded.tensors[name]
                t = torch.empty(r.shape, dtype=r.dtype)
                _read_into(self.storage, self.step_name, {name: r}, {name: t}, verify)
                yield key, t
            return
        manifest = self.manifest
        if sharded is not None:  # an item each rank saved for itself: rank 0's
            rank0 = sharded.ranks[0]
            manifest = Manifest(
                manifest.step, manifest.epoch, {}, manifest.files, rank0.tensors, rank0.items
            )
        by_file: dict[str, list[str]] = {}
        for name in keys:
            by_file.setdefault(manifest.tensors[name].file, []).append(name)
        for file_name, names in by_file.items():
            for name, t in _stream_file(
                self.storage, self.step_name, manifest, file_name, names, verify
            ):
                yield keys[name], t


def _stream_file(
    storage: Storage,
    step_name: str,
    manifest: Manifest,
    file_name: str,
    names: list[str],
    verify: bool,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield the named tensors of one file in file order, hashing the whole file as it goes."""
    path = check_size(storage, step_name, file_name, manifest)
    record = manifest.files[file_name]
    hasher = Hasher() if verify and record.checksum else None
    records = manifest.tensors
    direct = {n for n in names if records[n].pack is None}
    packed: dict[str, list[str]] = {}
    for n in names:
        pack = records[n].pack
        if pack is not None:
            packed.setdefault(pack, []).append(n)
    scratch = bytearray(CHUNK_BYTES)
    with storage.open_read(step_name, file_name) as f:
        entries, data_start = read_header(f, path, record.size, hasher)
        for name in [*direct, *packed]:
            matching_entry(entries, name, records[name], path)
        for entry in sorted(entries.values(), key=lambda e: e.begin):
            if entry.name in direct or entry.name in packed:
                t = read_tensor(f, entry, data_start, path)
                if hasher is not None:
                    hasher.update(tensor_bytes(t))
                if entry.name in direct:
                    yield entry.name, t
                else:
                    for n in packed[entry.name]:
                        yield n, _cut(t, records[n])
                del t
            else:
                f.seek(data_start + entry.begin)
                if hasher is not None:
                    hasher.skip(f, entry.nbytes, scratch)
    if hasher is not None:
        check_digest(record, hasher, path, manifest.step)


def _cut(pack: torch.Tensor, r: TensorRecord) -> torch.Tensor:
    return pack[r.offset : r.offset + r.nbytes].view(r.dtype).reshape(r.shape).clone()


def open_item(
    directory: str,
    step: int | None,
    item: str,
    storage_options: dict[str, Any] | None = None,
) -> ItemSource:
    """Open one item of a committed checkpoint and lay out its tensors (manifest only).

    Args:
        directory: The checkpoint root (path or fsspec URL).
        step: The step; the latest committed one when ``None``.
        item: The item to read (a module or a dict of tensors).
        storage_options: Passed to fsspec.

    Raises:
        CheckpointNotFoundError: No checkpoint, no such step, or no such item.
        IncompatibleCheckpointError: The item is not a flat mapping of names to tensors.
        CorruptCheckpointError: The manifest is malformed.
    """
    storage = open_storage(directory, storage_options)
    found = StepReader(storage).manifest(step)
    if found is None:
        raise CheckpointNotFoundError("no checkpoint here (or no such directory)", path=directory)
    step_name, manifest = found
    sharded = manifest.sharded
    if sharded is not None and item in sharded.items:
        record = sharded.items[item]
        shapes = {n: (r.dtype, r.shape) for n, r in sharded.tensors.items()}
    else:
        items = manifest.items if sharded is None else sharded.ranks[0].items
        tensors = manifest.tensors if sharded is None else sharded.ranks[0].tensors
        if item not in items:
            raise CheckpointNotFoundError(
                f"step {manifest.step} has no item {item!r} (items: {sorted(manifest.items)})",
                path=storage.url_of(step_name),
            )
        record = items[item]
        shapes = {n: (r.dtype, r.shape) for n, r in tensors.items()}
    where = storage.url_of(step_name)
    if not isinstance(record.state, dict) or record.kind not in ("module", "dict", "stateful"):
        raise IncompatibleCheckpointError(
            f"item {item!r} is a {record.kind}; export writes a mapping of names to tensors "
            "(a module's weights)",
            path=where,
            key=item,
        )
    entries: list[LayoutEntry] = []
    aliases: dict[str, str] = {}
    first: dict[str, str] = {}
    for path, name in tensor_refs(record.state):
        if len(path) != 1 or not isinstance(path[0], str):
            raise IncompatibleCheckpointError(
                "export needs a flat mapping of names to tensors; this tensor is nested",
                path=where,
                key=f"{item}{list(path)}",
            )
        key = path[0]
        if name in first:
            aliases[key] = first[name]
            continue
        if name not in shapes:
            raise IncompatibleCheckpointError(
                "state refers to a tensor the manifest does not list", path=where, key=name
            )
        first[name] = key
        dtype, shape = shapes[name]
        entries.append(LayoutEntry(key, name, dtype, tuple(shape)))
    tensor_keys = {e.key for e in entries} | aliases.keys()
    skipped = tuple(k for k in record.state if k not in tensor_keys)
    layout = ItemLayout(manifest.step, item, record.kind, tuple(entries), aliases, skipped)
    return ItemSource(storage, step_name, manifest, layout)
