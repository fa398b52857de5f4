"""Read one item of a ckpt checkpoint for export: its layout, then its tensors one at a time.

The layout (keys, dtypes, shapes, ties) comes from the manifest; the tensors
stream through :meth:`ckpt.CheckpointReader.iter_tensors`, with bounded memory
(one tensor plus read buffers), each file's checksum checked as the bytes go by.
Format version 3 tensors come back whole, consolidated from their chunks.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from ckpt.errors import CheckpointNotFoundError, IncompatibleCheckpointError
from ckpt.reading.describe import key_of
from ckpt.reading.reader import CheckpointReader
from ckpt.state.tree import tensor_refs

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
        order: Every tensor key, aliases included, in the state's order.
    """

    step: int
    item: str
    kind: str
    entries: tuple[LayoutEntry, ...]
    aliases: dict[str, str]
    skipped: tuple[str, ...]
    order: tuple[str, ...] = ()


class ItemSource:
    """One item of one committed checkpoint, opened for streaming reads."""

    def __init__(self, reader: CheckpointReader, layout: ItemLayout, stream_keys: dict[str, str]):
        self.reader, self.layout, self._stream_keys = reader, layout, stream_keys

    def tensors(self, *, verify: bool = True) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield ``(key, CPU tensor)`` once per layout entry, one at a time, in file order.

        Reads through :meth:`ckpt.CheckpointReader.iter_tensors`. A checksum
        mismatch raises after the file's last tensor was yielded: a consumer must
        treat its output as valid only once the iterator is exhausted.
        """
        for stream_key, t in self.reader.iter_tensors(
            self.layout.step, item=self.layout.item, verify=verify
        ):
            key = self._stream_keys.get(stream_key)
            if key is not None:  # else a tied alias, written once under its first key
                yield key, t


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
    reader = CheckpointReader(directory, storage_options=storage_options)
    found = reader.manifest(step)
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
                path=f"{reader.directory.rstrip('/')}/{step_name}",
            )
        record = items[item]
        shapes = {n: (r.dtype, r.shape) for n, r in tensors.items()}
    where = f"{reader.directory.rstrip('/')}/{step_name}"
    if not isinstance(record.state, dict) or record.kind not in ("module", "dict", "stateful"):
        raise IncompatibleCheckpointError(
            f"item {item!r} is of kind {record.kind}; export writes a mapping of names to "
            "tensors (a module's weights): choose a module item (`ckpt info` lists each "
            "item's kind)",
            path=where,
            key=item,
        )
    entries: list[LayoutEntry] = []
    stream_keys: dict[str, str] = {}
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
        stream_keys[key_of(path)] = key
        dtype, shape = shapes[name]
        entries.append(LayoutEntry(key, name, dtype, tuple(shape)))
    tensor_keys = {e.key for e in entries} | aliases.keys()
    skipped = tuple(k for k in record.state if k not in tensor_keys)
    order = tuple(k for k in record.state if k in tensor_keys)
    layout = ItemLayout(manifest.step, item, record.kind, tuple(entries), aliases, skipped, order)
    return ItemSource(reader, layout, stream_keys)
