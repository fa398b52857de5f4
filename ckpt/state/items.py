"""Items: what can be saved, and how a save lays their states out as files.

An item is a keyword argument of ``save``/``restore``: an ``nn.Module``, a
``torch.optim.Optimizer``, any :class:`Stateful` object (a scheduler, a
``GradScaler``, a sampler), or a plain ``dict``. Each kind's capture, checks
and loading live in :mod:`ckpt.state.kinds`; this module names items, captures them
through their kind, and lays captured states out as tensor files and a
manifest. No I/O happens here.
"""

from __future__ import annotations

import inspect
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch

from ckpt.errors import CorruptCheckpointError
from ckpt.format import PACK_SUFFIX, ItemRecord, Manifest, TensorRecord, item_file_name
from ckpt.format.tensorfile import check_stored_dtype, dtype_name, pack_tensors
from ckpt.state.kinds import Captured, Stateful, kind_of
from ckpt.state.tree import Json, KeyPath, format_key_path, tensors_by_path, unflatten, unflatten_at
from ckpt.torch_compat import with_module_metadata

__all__ = [
    "PACK_MAX_BYTES",
    "PACK_MIN_TENSORS",
    "Captured",
    "Stateful",
    "assemble_manifest",
    "build_state",
    "capture",
    "check_flags",
    "check_item_name",
    "check_stored_dtype",
    "item_kind",
    "reserved_names",
    "skeleton",
]

PACK_MAX_BYTES = 16 * 1024
"""Tensors of at most this many bytes may be packed together."""

PACK_MIN_TENSORS = 64
"""An item packs its small tensors only when it has at least this many."""


def reserved_names(*functions: Callable[..., Any]) -> frozenset[str]:
    """The named parameters of ``functions`` (``save``, ``restore``): never item names."""
    return frozenset(
        p.name
        for f in functions
        for p in inspect.signature(f).parameters.values()
        if p.kind is not inspect.Parameter.VAR_KEYWORD and p.name != "self"
    )


def check_item_name(name: str, reserved: Iterable[str] = ()) -> None:
    """Refuse item names that are not identifiers or that clash with options.

    Args:
        name: The item name.
        reserved: The option names of ``save`` and ``restore``.

    Raises:
        ValueError: Naming the item and why.
    """
    if not name.isidentifier() or not name.isascii():
        raise ValueError(f"item name {name!r} must be an ASCII Python identifier")
    if name in reserved:
        raise ValueError(
            f"item name {name!r} is reserved (an option of save() or restore()); "
            "choose another name"
        )


def check_flags(**flags: object) -> None:
    """Refuse a bool option given anything but a bool (an item passed under its name, say).

    Raises:
        TypeError: Naming the option and the type it got.
    """
    for name, value in flags.items():
        if not isinstance(value, bool):
            raise TypeError(
                f"{name} must be True or False, got {type(value).__name__} "
                f"({name!r} is an option and cannot name an item)"
            )


def item_kind(name: str, obj: object) -> str:
    """Return the kind an item is saved as (``module``, ``optimizer``, ``stateful``, ...).

    Raises:
        TypeError: The object is none of these; the message names the item.
    """
    return kind_of(name, obj).stored


def capture(name: str, obj: Any, param_names: Mapping[int, str]) -> Captured:
    """Capture one item's state for saving (see :meth:`ckpt.state.kinds.ItemKind.capture`).

    Args:
        name: The item name (the first component of its tensor names).
        obj: The live object.
        param_names: ``id(parameter) -> name`` over the modules saved in the same call.

    Raises:
        TypeError: The item, or a value in its state, cannot be stored without pickle.
    """
    captured = kind_of(name, obj).capture(name, obj, param_names)
    for tensor_name, t in captured.tensors.items():
        if type(t).__name__ == "DTensor":  # torch.distributed.tensor.DTensor, not imported here
            raise TypeError(
                f"item {name!r} holds a DTensor ({tensor_name}): a sharded tensor is saved by "
                "every rank of its process group together, with a CheckpointManager made "
                "inside that group (not with process_group=False), and only in a module or "
                "optimizer item: pass the module or optimizer itself (model=model, not "
                "model=model.state_dict())"
            )
    return captured


def build_state(record: ItemRecord, tensors: Mapping[str, torch.Tensor], name: str) -> Any:
    """Decode an item's saved tree with ``tensors`` (modules: ``OrderedDict`` with metadata).

    ``tensors`` holds the state tensors, never packs: a reference to a name it lacks
    that is a pack's is reported as such, naming the item and key path.
    """

    def lookup(tensor_name: str, path: KeyPath) -> torch.Tensor:
        if tensor_name not in tensors and tensor_name.endswith(PACK_SUFFIX):
            raise _pack_reference(tensor_name, name, path)
        return tensors[tensor_name]  # KeyError: reported with the key path

    state = unflatten_at(record.state, lookup)
    if record.kind == "module":
        if not isinstance(state, dict):
            raise CorruptCheckpointError("module state is not a dict", key=name)
        state = OrderedDict(state)
        metadata = record.extra.get("module_metadata")
        if metadata is not None:
            with_module_metadata(state, unflatten(metadata, {}))
    return state


def _pack_reference(name: str, item: str, path: KeyPath) -> CorruptCheckpointError:
    """A state tree refers to a pack: an internal container of small tensors, never a value."""
    where = f"item {item!r} " if item else ""
    return CorruptCheckpointError(
        f"malformed state tree: {where}refers to the pack {name!r}, which holds other "
        "tensors and is no value of any state",
        key=format_key_path(item, path),
    )


def skeleton(
    tree: Json, records: Mapping[str, TensorRecord], item: str = ""
) -> tuple[Any, dict[int, str]]:
    """Decode a state tree with a meta tensor of the right dtype and shape for each stored tensor.

    Returns:
        The state, and ``id(leaf) -> tensor name`` for every tensor leaf in it, in
        first-reference order.

    Raises:
        CorruptCheckpointError: The tree is malformed, names an unlisted tensor, a
            pack (format v2's container of small tensors) or a tensor of a dtype ckpt
            never writes; the key names the path (after ``item``, when given).
    """
    cache: dict[str, torch.Tensor] = {}
    names_at: dict[KeyPath, str] = {}
    packs = {r.pack for r in records.values() if r.pack is not None}

    def placeholder(name: str, path: KeyPath) -> torch.Tensor:
        names_at[path] = name
        if name in packs or (name.endswith(PACK_SUFFIX) and name not in records):
            raise _pack_reference(name, item, path)
        if name not in cache:
            record = records[name]  # KeyError: reported by unflatten with the key path
            check_stored_dtype(name, record)
            cache[name] = torch.empty(record.shape, dtype=record.dtype, device="meta")
        return cache[name]

    state = unflatten_at(tree, placeholder)
    # Keyed by the decoded leaves, not the placeholders: a Parameter or requires_grad
    # tag decodes to a new leaf over its placeholder.
    names: dict[int, str] = {}
    for path, leaf in tensors_by_path(state).items():
        if path in names_at:
            names.setdefault(id(leaf), names_at[path])
    return state, names


def assemble_manifest(
    step: int,
    epoch: int | None,
    metrics: dict[str, float | int],
    captured: Mapping[str, Captured],
    *,
    created_at: str,
    versions: dict[str, str],
    file_token: str | None = None,
) -> tuple[dict[str, dict[str, torch.Tensor]], Manifest]:
    """Lay captured items out as tensor files and a manifest (file sizes still unknown).

    An item with at least :data:`PACK_MIN_TENSORS` tensors of at most
    :data:`PACK_MAX_BYTES` each stores those as one pack (format version 2):
    per-tensor headers would otherwise outweigh their data.

    Returns:
        ``{file name: {tensor name: tensor}}`` and the manifest.

    Raises:
        TypeError: A tensor's dtype cannot be stored in safetensors.
    """
    files: dict[str, dict[str, torch.Tensor]] = {}
    tensors: dict[str, TensorRecord] = {}
    for name, cap in captured.items():
        if not cap.tensors:
            continue
        file_name = item_file_name(name, file_token)
        small = {n: t for n, t in cap.tensors.items() if t.nbytes <= PACK_MAX_BYTES}
        offsets: dict[str, int] = {}
        pack_name = None
        files[file_name] = dict(cap.tensors)
        if len(small) >= PACK_MIN_TENSORS:
            pack_name = name + PACK_SUFFIX
            pack, offsets = pack_tensors(small)
            for tensor_name in small:
                del files[file_name][tensor_name]
            files[file_name][pack_name] = pack
            tensors[pack_name] = TensorRecord(file_name, torch.uint8, tuple(pack.shape), "cpu")
        for tensor_name, t in cap.tensors.items():
            dtype_name(t.dtype)
            offset = offsets.get(tensor_name)
            tensors[tensor_name] = TensorRecord(
                file_name,
                t.dtype,
                tuple(t.shape),
                str(t.device),
                None if offset is None else pack_name,
                offset or 0,
            )
    items = {n: ItemRecord(c.kind, c.tree, c.extra) for n, c in captured.items()}
    manifest = Manifest(step, epoch, metrics, {}, tensors, items, created_at, versions)
    return files, manifest
