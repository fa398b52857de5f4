"""What a checkpoint holds, described from its manifest alone: pure, no I/O.

:func:`describe_manifest` turns a validated :class:`~ckpt.format.Manifest` (format
versions 1 to 5) into a :class:`Description`: the checkpoint's bookkeeping, its
files, and per item every tensor's key, dtype, shape and bytes, plus an
optimizer's class, hyperparameters and parameter names. No tensor data is read.

A tensor's **key** is where it sits in the item's state as ``read()`` returns it,
its key path joined by ``/`` (module: ``"0.weight"``; optimizer:
``"state/0/exp_avg"``): string keys with ``%`` and ``/`` escaped (``%25``,
``%2F``), integer keys and list positions as digits. A checkpoint saved by
several ranks (version 3) keys its optimizers by parameter name on disk; keys
here are index-packed, as ``read()`` returns them, so the same training state
has the same keys whatever wrote it. A tensor held at two places (tied weights)
is listed at both.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ckpt.errors import CorruptCheckpointError
from ckpt.format import GlobalTensorRecord, ItemRecord, Manifest, TensorRecord
from ckpt.format.blobs import file_parts, is_ref
from ckpt.format.dtypes import check_stored_dtype
from ckpt.state.tree import Json, KeyPath, placeholder, unflatten_at

if TYPE_CHECKING:
    import torch

__all__ = [
    "Description",
    "ItemInfo",
    "TensorInfo",
    "describe_manifest",
    "format_version_of",
    "item_tensor_keys",
    "key_of",
]


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of an item's state.

    Attributes:
        key: Its key path in the item's state (see the module docstring).
        dtype: torch's dtype name, ``"float32"``.
        shape: Its (global) shape.
        nbytes: The bytes of its data.
        file: The file holding it; ``None`` when its chunks span several files.
        shards: How many chunks it was saved in (format version 3), else 1.
    """

    key: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int
    file: str | None
    shards: int = 1


@dataclass(frozen=True)
class ItemInfo:
    """One saved item.

    Attributes:
        name: The item name.
        kind: ``module``, ``optimizer``, ``stateful``, ``dict`` or ``rng``.
        tensors: Its tensors, in state order.
        nbytes: The bytes of its distinct tensors (a tied tensor counts once).
        optimizer_class: An optimizer's class (``"torch.optim.adamw.AdamW"``) when recorded.
        param_groups: An optimizer's hyperparameters, one dict per group, its
            ``"params"`` replaced by how many parameters the group has.
        param_names: An optimizer's parameter name for each packed index
            (``None`` where no module saved with it owned the parameter).
    """

    name: str
    kind: str
    tensors: tuple[TensorInfo, ...]
    nbytes: int
    optimizer_class: str | None = None
    param_groups: tuple[dict[str, Json], ...] = ()
    param_names: tuple[str | None, ...] | None = None


@dataclass(frozen=True)
class Description:
    """A committed checkpoint, described from its manifest.

    Attributes:
        step: The step it was saved at.
        epoch: The epoch passed to ``save``, or ``None``.
        metrics: The metrics passed to ``save``.
        created_at: ISO 8601 UTC time of the save.
        versions: The ``ckpt``, ``torch`` and ``python`` versions that wrote it.
        format_version: The on-disk format version (1 to 5).
        world_size: How many ranks saved it (1 without a process group).
        files: Every tensor file's size in bytes, by name (a blob, format version 4,
            by its path below the root: ``.ckpt-blobs/<key>.safetensors``).
        nbytes: The bytes of all its tensor files.
        items: Its items, in save order (version 3: the sharded items, then
            rank 0's own items).
    """

    step: int
    epoch: int | None
    metrics: dict[str, float | int]
    created_at: str
    versions: dict[str, str]
    format_version: int
    world_size: int
    files: dict[str, int]
    nbytes: int
    items: tuple[ItemInfo, ...]

    def to_json(self) -> dict[str, Json]:
        """A JSON-compatible dict (strict JSON: non-finite metrics as ``"nan"``, ``"inf"``).

        Example:
            >>> json.dumps(reader.describe().to_json())  # doctest: +SKIP
        """
        return {
            "step": self.step,
            "epoch": self.epoch,
            "metrics": {k: _finite(v) for k, v in self.metrics.items()},
            "created_at": self.created_at,
            "versions": dict(self.versions),
            "format_version": self.format_version,
            "world_size": self.world_size,
            "files": dict(self.files),
            "nbytes": self.nbytes,
            "items": [
                {
                    "name": item.name,
                    "kind": item.kind,
                    "nbytes": item.nbytes,
                    "optimizer_class": item.optimizer_class,
                    "param_groups": [dict(g) for g in item.param_groups],
                    "param_names": None if item.param_names is None else list(item.param_names),
                    "tensors": [
                        {
                            "key": t.key,
                            "dtype": t.dtype,
                            "shape": list(t.shape),
                            "nbytes": t.nbytes,
                            "file": t.file,
                            "shards": t.shards,
                        }
                        for t in item.tensors
                    ],
                }
                for item in self.items
            ],
        }


def _finite(v: float | int) -> Json:
    if isinstance(v, float) and not math.isfinite(v):
        return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf")
    return v


def key_of(path: KeyPath) -> str:
    """Join a key path into a tensor key: ``("state", 0, "exp_avg")`` -> ``"state/0/exp_avg"``."""
    return "/".join([_part(k) for k in path])


def _part(k: str | int) -> str:
    if isinstance(k, str):
        return k.replace("%", "%25").replace("/", "%2F") if "%" in k or "/" in k else k
    return str(k)


def format_version_of(manifest: Manifest, *, compressed: bool = False) -> int:
    """The format version a manifest was written in (``compressed``: its file was zlib)."""
    refs = any(is_ref(name) for name in manifest.files)
    if manifest.sharded is not None:
        return 5 if refs else 3
    if refs:
        return 4
    if compressed or any(r.pack is not None for r in manifest.tensors.values()):
        return 2
    return 1


def _decoded(record: ItemRecord, item: str) -> tuple[Any, list[tuple[KeyPath, str]]]:
    """An item's state with placeholder tensors, and ``(key path, stored name)`` per reference."""
    flat = _flat_refs(record.state)
    if flat is not None:
        return None, flat
    refs: list[tuple[KeyPath, str]] = []

    def lookup(name: str, path: KeyPath) -> torch.Tensor:
        refs.append((path, name))
        return placeholder()  # no torch needed for a tree of plain references

    try:
        state = unflatten_at(record.state, lookup)
    except CorruptCheckpointError as e:
        raise CorruptCheckpointError(
            f"item {item!r}: {e.reason}", key=f"{item}{e.key or ''}"
        ) from e
    return state, refs


def _flat_refs(tree: Json) -> list[tuple[KeyPath, str]] | None:
    """The references of a flat ``{key: {"$tensor": name}}`` tree (a module's, mostly), fast.

    ``None`` for any other tree, which is decoded in full. Such a tree decodes
    to a dict of plain tensors at those keys (no key starts with ``$``).
    """
    if not isinstance(tree, dict) or not tree:
        return None
    refs: list[tuple[KeyPath, str]] = []
    for key, value in tree.items():
        if key.startswith("$") or not isinstance(value, dict) or len(value) != 1:
            return None
        name = value.get("$tensor")
        if not isinstance(name, str):
            return None
        refs.append(((key,), name))
    return refs


def _is_sharded(manifest: Manifest, item: str) -> bool:
    return manifest.sharded is not None and item in manifest.sharded.items


def _param_index(state: Any) -> dict[str, int]:
    """Parameter name -> packed index, in ``param_groups`` order (a v3 optimizer state)."""
    index: dict[str, int] = {}
    groups = state.get("param_groups") if isinstance(state, dict) else None
    for group in groups if isinstance(groups, list) else []:
        params = group.get("params") if isinstance(group, dict) else None
        for name in params if isinstance(params, list) else []:
            if isinstance(name, str):
                index.setdefault(name, len(index))
    return index


def _keyed(
    manifest: Manifest, item: str, state: Any, refs: list[tuple[KeyPath, str]]
) -> list[tuple[str, str]]:
    if _is_sharded(manifest, item) and manifest.items[item].kind == "optimizer":
        index = _param_index(state)
        packed = []
        for path, name in refs:
            if len(path) >= 2 and path[0] == "state":
                if path[1] not in index:
                    continue  # read() drops state of parameters in no group
                packed.append((("state", index[str(path[1])], *path[2:]), name))
            else:
                packed.append((path, name))
        refs = packed
    part = _part  # most paths have one key (a module's): joined without a list
    return [(part(p[0]) if len(p) == 1 else key_of(p), name) for p, name in refs]


def item_tensor_keys(manifest: Manifest, item: str) -> list[tuple[str, str]]:
    """``(key, stored tensor name)`` for every tensor of ``item``'s state, in state order.

    For a version 3 manifest, rank 0's own items are described.

    Raises:
        KeyError: ``item`` is not in the manifest.
        CorruptCheckpointError: The item's state tree is malformed.
    """
    state, refs = _decoded(manifest.items[item], item)
    keys = _keyed(manifest, item, state, refs)
    packs = _pack_names(manifest, item)
    for _, name in keys:
        _stored(manifest, item, name, packs)
    return keys


def _stored(
    manifest: Manifest, item: str, name: str, packs: set[str]
) -> TensorRecord | GlobalTensorRecord:
    """The record of a tensor ``item``'s state refers to; raise unless it is one of its values."""
    section = manifest.sharded
    if section is not None and item in section.items:
        found: TensorRecord | GlobalTensorRecord | None = section.tensors.get(name)
    else:
        own = manifest.tensors if section is None else section.ranks[0].tensors
        found = own.get(name)
    if found is None or name in packs:
        why = "a pack of small tensors, no value" if found else "which the manifest does not list"
        raise CorruptCheckpointError(f"item {item!r} refers to tensor {name!r}, {why}", key=name)
    check_stored_dtype(name, found)
    return found


def _pack_names(manifest: Manifest, item: str) -> set[str]:
    """The packs among the tensors ``item``'s state may refer to (none for a sharded item)."""
    section = manifest.sharded
    if section is not None and item in section.items:
        return set()
    own = manifest.tensors if section is None else section.ranks[0].tensors
    return {r.pack for r in own.values() if r.pack is not None}


def _jsonable(value: Any) -> Json:
    """A hyperparameter as JSON: tuples as lists, tensors, dtypes and devices as text."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return _finite(value)
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if _is_tensor(value):
        return "<tensor>"
    if isinstance(value, bytes):
        return f"<{len(value)} bytes>"
    return str(value)


def _is_tensor(value: Any) -> bool:
    """A tensor, or the plain object :func:`placeholder` gives before torch is imported."""
    torch = sys.modules.get("torch")
    return type(value) is object or (torch is not None and isinstance(value, torch.Tensor))


def _param_groups(state: Any) -> tuple[dict[str, Json], ...]:
    groups = state.get("param_groups") if isinstance(state, dict) else None
    out = []
    for group in groups if isinstance(groups, list) else []:
        if not isinstance(group, dict):
            continue
        params = group.get("params")
        described = {str(k): _jsonable(v) for k, v in group.items() if k != "params"}
        described["params"] = len(params) if isinstance(params, (list, tuple)) else 0
        out.append(described)
    return tuple(out)


def _groups_of(item: str, state: Any) -> tuple[dict[str, Json], ...]:
    try:
        return _param_groups(state)
    except RecursionError as e:
        raise CorruptCheckpointError(
            f"item {item!r}: param_groups are nested too deeply", key=f"{item}/param_groups"
        ) from e


def _param_names(manifest: Manifest, item: str, state: Any) -> tuple[str | None, ...] | None:
    if _is_sharded(manifest, item):
        return tuple(_param_index(state))
    params = manifest.items[item].extra.get("params")
    if not isinstance(params, list):
        return None
    names: list[str | None] = []
    for p in params:
        name = p.get("name") if isinstance(p, dict) else None
        names.append(name if isinstance(name, str) else None)
    return tuple(names)


def _item_info(manifest: Manifest, item: str, record: ItemRecord) -> ItemInfo:
    state, refs = _decoded(record, item)
    packs = _pack_names(manifest, item)
    keyed = _keyed(manifest, item, state, refs)
    if _is_sharded(manifest, item):
        tensors, sizes = _sharded_infos(manifest, item, keyed)
    else:
        own = manifest.tensors if manifest.sharded is None else manifest.sharded.ranks[0].tensors
        tensors, sizes = _own_infos(manifest, item, keyed, own, packs)
    optimizer = record.kind == "optimizer"
    recorded_class = record.extra.get("class")
    return ItemInfo(
        name=item,
        kind=record.kind,
        tensors=tuple(tensors),
        nbytes=sum(sizes.values()),
        optimizer_class=recorded_class if optimizer and isinstance(recorded_class, str) else None,
        param_groups=_groups_of(item, state) if optimizer else (),
        param_names=_param_names(manifest, item, state) if optimizer else None,
    )


def _sharded_infos(
    manifest: Manifest, item: str, keyed: list[tuple[str, str]]
) -> tuple[list[TensorInfo], dict[str, int]]:
    """A sharded item's tensors (their global records) and the bytes of each stored name."""
    tensors, sizes = [], {}
    for key, name in keyed:
        r = _stored(manifest, item, name, set())
        if isinstance(r, GlobalTensorRecord):
            files = {c.file for c in r.chunks}
            only = next(iter(files)) if len(files) == 1 else None
            nbytes = math.prod(r.shape) * r.dtype.itemsize
            info = TensorInfo(key, _dtype(r.dtype), r.shape, nbytes, only, len(r.chunks))
        else:
            info = TensorInfo(key, _dtype(r.dtype), r.shape, r.nbytes, _shown(r.file))
        sizes[name] = info.nbytes
        tensors.append(info)
    return tensors, sizes


_new = object.__new__


def _own_infos(
    manifest: Manifest,
    item: str,
    keyed: list[tuple[str, str]],
    own: Mapping[str, TensorRecord],
    packs: set[str],
) -> tuple[list[TensorInfo], dict[str, int]]:
    """An item's tensors stored by one process, and the bytes of each stored name.

    Hot for items of many thousand tensors: every reference is checked as
    :func:`_stored` does (each dtype once), each file's shown name and each
    shape's bytes are computed once, and each ``TensorInfo`` is filled at once.
    """
    tensors: list[TensorInfo] = []
    sizes: dict[str, int] = {}
    dtypes: dict[torch.dtype, str] = {}
    shown: dict[str, str | None] = {}
    shape_bytes: dict[tuple[torch.dtype, tuple[int, ...]], int] = {}
    for key, name in keyed:
        r = own.get(name)
        if r is None or name in packs:
            _stored(manifest, item, name, packs)  # raises, naming the tensor
            continue  # pragma: no cover
        dtype, shape = r.dtype, r.shape
        dtype_name = dtypes.get(dtype)
        if dtype_name is None:
            check_stored_dtype(name, r)
            dtype_name = dtypes[dtype] = _dtype(dtype)
        nbytes = shape_bytes.get((dtype, shape))
        if nbytes is None:
            nbytes = shape_bytes[(dtype, shape)] = r.nbytes
        file = r.file
        file_shown = shown.get(file)
        if file_shown is None:
            file_shown = shown[file] = _shown(file)
        info: TensorInfo = _new(TensorInfo)
        info.__dict__.update(
            key=key, dtype=dtype_name, shape=shape, nbytes=nbytes, file=file_shown, shards=1
        )
        sizes[name] = nbytes
        tensors.append(info)
    return tensors, sizes


_DTYPE_NAMES: dict[torch.dtype, str] = {}


def _shown(file_name: str) -> str:
    """A file's name as described: a blob (version 4) by its path below the root."""
    return "/".join(file_parts("", file_name)) if is_ref(file_name) else file_name


def _dtype(dtype: torch.dtype) -> str:
    name = _DTYPE_NAMES.get(dtype)
    if name is None:  # str(dtype) costs microseconds: once per dtype, not per tensor
        name = _DTYPE_NAMES[dtype] = str(dtype).removeprefix("torch.")
    return name


def describe_manifest(manifest: Manifest, *, format_version: int | None = None) -> Description:
    """Describe a checkpoint from its validated manifest; reads nothing.

    Args:
        manifest: The manifest (any format version).
        format_version: The version its file declared; inferred when ``None``
            (a compressed version 2 manifest without packs then reads as 1).

    Raises:
        CorruptCheckpointError: An item's state tree is malformed or names an unlisted tensor.
    """
    files: Mapping[str, int] = {_shown(name): r.size for name, r in manifest.files.items()}
    return Description(
        step=manifest.step,
        epoch=manifest.epoch,
        metrics=dict(manifest.metrics),
        created_at=manifest.created_at,
        versions=dict(manifest.versions),
        format_version=format_version or format_version_of(manifest),
        world_size=1 if manifest.sharded is None else manifest.sharded.world_size,
        files=dict(files),
        nbytes=sum(files.values()),
        items=tuple(_item_info(manifest, n, r) for n, r in manifest.items.items()),
    )
