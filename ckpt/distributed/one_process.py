"""A checkpoint saved by one process, seen as one saved by a group of one rank.

A version 1 or 2 checkpoint restores into a process group through the same
path as a version 3 one: :func:`group_of_one` gives a version 3 view of its
manifest in which

- every tensor of a module or optimizer item is a global tensor of one chunk
  covering it (read through :class:`~ckpt.distributed.reading.WholeTensors`);
- module states are keyed by parameter name without wrapper prefixes
  (``module.``, ``_orig_mod.``), as ``get_model_state_dict`` keys them;
- optimizer states are keyed by parameter name, as a process group saves them,
  from the parameter names recorded at save time;
- every other item is what rank 0 saved for itself: rank 0 restores it, and
  other ranks restore it as ranks that did not exist at save time do.

Pure functions over manifests; no I/O.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import replace
from typing import Any

from ckpt.errors import IncompatibleCheckpointError
from ckpt.format import (
    SHARDED_KINDS,
    ChunkRecord,
    GlobalTensorRecord,
    ItemRecord,
    Manifest,
    RankSection,
    ShardedSection,
)
from ckpt.state.kinds.module import bare_key
from ckpt.state.tree import Json, tensor_refs

__all__ = ["group_of_one"]


def group_of_one(manifest: Manifest, wanted: Collection[str]) -> Manifest:
    """A version 3 view of a single-process manifest: world size 1 (see the module docstring).

    Args:
        manifest: A version 1 or 2 manifest.
        wanted: The items being restored: their module and optimizer items are
            converted (others of those kinds are left out of the view).

    Raises:
        IncompatibleCheckpointError: A wanted optimizer's parameters were not
            named when it was saved (it was saved without its module).
    """
    if manifest.sharded is not None:
        raise ValueError("the manifest was saved by several ranks already")
    sharded: dict[str, ItemRecord] = {}
    globals_: dict[str, GlobalTensorRecord] = {}
    for name, record in manifest.items.items():
        if record.kind not in SHARDED_KINDS or name not in wanted:
            continue
        if record.kind == "module":
            sharded[name] = ItemRecord("module", _module_tree(record.state), record.extra)
        else:
            sharded[name] = _optimizer_record(name, record)
        for _, tensor_name in tensor_refs(record.state):
            saved = manifest.tensors[tensor_name]
            whole = ChunkRecord((0,) * len(saved.shape), saved.shape, saved.file, 0, "")
            globals_[tensor_name] = GlobalTensorRecord(saved.dtype, saved.shape, (whole,))
    own_items = {n: r for n, r in manifest.items.items() if r.kind not in SHARDED_KINDS}
    own_tensors = {n: r for n, r in manifest.tensors.items() if n not in globals_}
    section = ShardedSection(1, globals_, sharded, (RankSection(own_tensors, own_items),))
    return replace(manifest, tensors={}, items={**sharded, **own_items}, sharded=section)


def _module_tree(tree: Json) -> Json:
    """The module state keyed without wrapper prefixes (unless stripping them merges keys)."""
    if not isinstance(tree, dict) or any(k.startswith("$") for k in tree):
        return tree  # refused with a clear error where module states are matched
    renamed = {bare_key(k): v for k, v in tree.items()}
    return renamed if len(renamed) == len(tree) else tree


def _optimizer_record(name: str, record: ItemRecord) -> ItemRecord:
    """An index-packed optimizer state rewritten keyed by parameter name."""
    params = record.extra.get("params")
    state = record.state
    if not isinstance(params, list) or not isinstance(state, dict):
        return record  # malformed: refused where optimizer states are checked
    names: list[str | None] = []
    for entry in params:
        full = entry.get("name") if isinstance(entry, dict) else None
        names.append(bare_key(full.split(".", 1)[1]) if isinstance(full, str) else None)
    by_index = _packed_state(state.get("state"))
    groups = state.get("param_groups")
    if by_index is None or not isinstance(groups, list):
        return record

    def named(index: Any) -> str:
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < len(names):
            raise IncompatibleCheckpointError(
                f"item {name!r}: parameter index {index!r} is not among the {len(names)} "
                "parameters recorded at save",
                key=f"{name}.param_groups",
            )
        found = names[index]
        if found is None:
            raise IncompatibleCheckpointError(
                f"item {name!r} was saved by one process without the module holding its "
                f"parameters (parameter {index} has no name), so a process group cannot tell "
                "which of its parameters each state belongs to; save the optimizer together "
                "with its model",
                key=f"{name}.params[{index}]",
            )
        return found

    new_groups = [
        {**g, "params": [named(i) for i in g.get("params", [])]} if isinstance(g, dict) else g
        for g in groups
    ]
    new_state = {named(i): per for i, per in by_index.items()}
    extra = {k: v for k, v in record.extra.items() if k != "params"}
    return ItemRecord("optimizer", {"state": new_state, "param_groups": new_groups}, extra)


def _packed_state(node: Json) -> Mapping[Any, Json] | None:
    """The per-parameter states of an index-packed optimizer tree, by index."""
    if isinstance(node, dict) and set(node) == {"$dict"} and isinstance(node["$dict"], list):
        pairs = node["$dict"]
        if all(isinstance(p, list) and len(p) == 2 for p in pairs):
            return {p[0]: p[1] for p in pairs}
        return None
    if isinstance(node, dict) and not node:
        return {}
    return None
