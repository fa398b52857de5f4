"""Items: what can be saved, how its state is captured, checked and loaded back.

An item is a keyword argument of ``save``/``restore``: an ``nn.Module``, a
``torch.optim.Optimizer``, any :class:`Stateful` object (a scheduler, a
``GradScaler``, a sampler), or a plain ``dict``. This module decides each
item's kind, captures its state for saving, and on restore checks a saved
state against the live object and decides where each tensor is built before
anything is mutated. No I/O happens here.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from ckpt.errors import CorruptCheckpointError, IncompatibleCheckpointError
from ckpt.format import PACK_SUFFIX, ItemRecord, Manifest, TensorRecord, item_file_name
from ckpt.inplace import (
    Counterpart,
    module_loads_plainly,
    optimizer_loads_plainly,
)
from ckpt.optim import (
    Target,
    check_optimizer_state,
    module_param_names,
    optimizer_param_records,
    optimizer_targets,
)
from ckpt.rng import RandomStreams, check_rng_values
from ckpt.tensorfile import dtype_name, pack_tensors
from ckpt.tree import Json, flatten, tensors_by_path, unflatten

__all__ = [
    "PACK_MAX_BYTES",
    "PACK_MIN_TENSORS",
    "RESERVED_NAMES",
    "Captured",
    "RestorePlan",
    "Stateful",
    "assemble_manifest",
    "build_state",
    "capture",
    "check_state_shape",
    "check_item_name",
    "item_kind",
    "plan_restore",
    "plan_restores",
    "skeleton",
]

RESERVED_NAMES = frozenset({"step", "epoch", "metrics", "map_location", "strict", "rng"})
"""Names that cannot be items because ``save``/``restore`` take them as options."""

PACK_MAX_BYTES = 16 * 1024
"""Tensors of at most this many bytes may be packed together."""

PACK_MIN_TENSORS = 64
"""An item packs its small tensors only when it has at least this many."""

_RESTORE_ORDER = {"module": 0, "optimizer": 1, "stateful": 2, "dict": 3, "rng": 4}


@runtime_checkable
class Stateful(Protocol):
    """An object whose state ckpt can save and restore.

    The same protocol as ``torch.distributed.checkpoint.stateful.Stateful``:
    ``state_dict()`` returns nested dicts/lists/tuples of tensors and plain
    values; ``load_state_dict(state)`` restores from such a value.
    """

    def state_dict(self) -> dict[str, Any]:
        """Return the object's state."""
        ...

    def load_state_dict(self, state_dict: dict[str, Any]) -> Any:
        """Restore the object's state from what ``state_dict()`` returned."""
        ...


def check_item_name(name: str) -> None:
    """Refuse item names that are not identifiers or that clash with options.

    Raises:
        ValueError: Naming the item and why.
    """
    if not name.isidentifier() or not name.isascii():
        raise ValueError(f"item name {name!r} must be an ASCII Python identifier")
    if name in RESERVED_NAMES:
        raise ValueError(f"item name {name!r} is reserved; choose another name")


def item_kind(name: str, obj: object) -> str:
    """Return the kind of an item: ``module``, ``optimizer``, ``rng``, ``stateful`` or ``dict``.

    Raises:
        TypeError: The object is none of these; the message names the item.
    """
    if isinstance(obj, nn.Module):
        return "module"
    if isinstance(obj, torch.optim.Optimizer):
        return "optimizer"
    if isinstance(obj, RandomStreams):
        return "rng"
    if isinstance(obj, Stateful):
        return "stateful"
    if isinstance(obj, dict):
        return "dict"
    raise TypeError(
        f"item {name!r} is a {type(obj).__qualname__}; expected an nn.Module, an Optimizer, "
        "an object with state_dict()/load_state_dict(), or a dict"
    )


@dataclass(frozen=True)
class Captured:
    """An item's state ready to be written: its kind, typed-JSON tree, tensors and extras."""

    kind: str
    tree: Json
    tensors: dict[str, torch.Tensor]
    extra: dict[str, Json] = field(default_factory=dict)


def capture(name: str, obj: Any, param_names: Mapping[int, str]) -> Captured:
    """Capture one item's state for saving.

    Args:
        name: The item name (the first component of its tensor names).
        obj: The live object.
        param_names: ``id(parameter) -> name`` over the modules saved in the same call.

    Raises:
        TypeError: The item, or a value in its state, cannot be stored without pickle.
    """
    kind = item_kind(name, obj)
    extra: dict[str, Json] = {}
    if kind == "dict":
        state = obj
    else:
        state = obj.state_dict()
        if not isinstance(state, dict):
            raise TypeError(
                f"item {name!r}: state_dict() returned {type(state).__name__}, not a dict"
            )
    if kind == "module":
        metadata = getattr(state, "_metadata", None)
        if metadata is not None:
            extra["module_metadata"], _ = flatten(dict(metadata), name)
    elif kind == "optimizer":
        extra["params"] = optimizer_param_records(obj, param_names)
    tree, tensors = flatten(state, name)
    return Captured(kind, tree, tensors, extra)


@dataclass
class RestorePlan:
    """A checked restore of one item: where each tensor goes, and how to load it.

    Built by :func:`plan_restore` before any file is read or object mutated.
    """

    name: str
    kind: str
    obj: Any
    record: ItemRecord
    targets: dict[str, Target]
    strict: bool
    tensor_names: list[str]
    """The stored tensors this item's state refers to, in first-reference order."""
    counterparts: dict[str, list[Counterpart]] = field(default_factory=dict)
    """Live tensors that loading would copy each stored tensor into unchanged (see
    :mod:`ckpt.inplace`); empty for items that do not load the standard way."""
    written: list[torch.Tensor] = field(default_factory=list)
    """Every live tensor that loading this item may write."""

    @property
    def order(self) -> int:
        """Restore position: modules, optimizers, other stateful objects, dicts, random streams."""
        return _RESTORE_ORDER[self.kind]

    def build(self, tensors: Mapping[str, torch.Tensor]) -> Any:
        """Assemble the item's state from the loaded tensors (random states are dry-run)."""
        state = build_state(self.record, tensors, self.name)
        if self.kind == "rng":
            check_rng_values(state)
        return state

    def apply(self, state: Any) -> tuple[list[str], list[str]]:
        """Load ``state`` into the live object; return (missing, unexpected) keys."""
        if self.kind == "module":
            result = self.obj.load_state_dict(state, strict=self.strict)
            return list(result.missing_keys), list(result.unexpected_keys)
        if self.kind == "dict":
            self.obj.clear()
            self.obj.update(state)
        else:
            self.obj.load_state_dict(state)
        return [], []


def build_state(record: ItemRecord, tensors: Mapping[str, torch.Tensor], name: str) -> Any:
    """Decode an item's saved tree with ``tensors`` (modules get an ``OrderedDict``)."""
    state = unflatten(record.state, tensors)
    if record.kind == "module":
        if not isinstance(state, dict):
            raise CorruptCheckpointError("module state is not a dict", key=name)
        state = OrderedDict(state)
        metadata = record.extra.get("module_metadata")
        if metadata is not None:
            state._metadata = unflatten(metadata, {})  # type: ignore[attr-defined]
    return state


def check_state_shape(name: str, kind: str, state: Any) -> None:
    """Check the outline every item of ``kind`` has, without live objects.

    Raises:
        CorruptCheckpointError: A module, optimizer or rng state that is not a dict,
            or an optimizer state without ``state`` and ``param_groups``.
    """
    if kind in ("module", "optimizer", "rng", "dict") and not isinstance(state, dict):
        raise CorruptCheckpointError(f"a {kind} state must be a dict", key=name)
    if kind == "optimizer" and not {"state", "param_groups"} <= set(state):
        raise CorruptCheckpointError(
            "an optimizer state needs 'state' and 'param_groups'", key=name
        )


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


def plan_restores(
    manifest: Manifest, items: Mapping[str, Any], *, strict: bool, override: bool
) -> list[RestorePlan]:
    """Check every live item against the checkpoint; reads no tensor data.

    Args:
        manifest: The checkpoint's manifest; every item name must be in it.
        items: The live objects by item name.
        strict: As for :func:`plan_restore`.
        override: As for :func:`plan_restore`.

    Returns:
        One plan per item, in the order given.
    """
    live_names = module_param_names({n: o for n, o in items.items() if isinstance(o, nn.Module)})
    plans = []
    for name, obj in items.items():
        record = manifest.items[name]
        state, placeholders = skeleton(record.state, manifest.tensors)
        plans.append(
            plan_restore(
                name,
                obj,
                record,
                state,
                placeholders,
                strict=strict,
                live_names=live_names,
                override=override,
            )
        )
    return plans


def skeleton(tree: Json, records: Mapping[str, TensorRecord]) -> tuple[Any, dict[int, str]]:
    """Decode a state tree with a meta tensor of the right dtype and shape for each stored tensor.

    Returns:
        The state, and ``id(placeholder) -> tensor name`` in first-reference order.

    Raises:
        CorruptCheckpointError: The tree is malformed or names an unlisted tensor.
    """
    cache: dict[str, torch.Tensor] = {}

    def placeholder(name: str) -> torch.Tensor:
        if name not in cache:
            record = records[name]  # KeyError: reported by unflatten with the key path
            cache[name] = torch.empty(record.shape, dtype=record.dtype, device="meta")
        return cache[name]

    state = unflatten(tree, placeholder)
    return state, {id(t): name for name, t in cache.items()}


def plan_restore(
    name: str,
    obj: Any,
    record: ItemRecord,
    saved: Any,
    placeholder_names: Mapping[int, str],
    *,
    strict: bool,
    live_names: Mapping[int, str],
    override: bool,
) -> RestorePlan:
    """Check a saved item against its live object and decide where its tensors go.

    Args:
        name: The item name.
        obj: The live object.
        record: The item's manifest record.
        saved: The saved state with meta placeholders for tensors (see :func:`skeleton`).
        placeholder_names: ``id(placeholder) -> tensor name``.
        strict: Module keys must match exactly; optimizer parameter names must match.
        live_names: ``id(parameter) -> name`` over the modules restored in the same call.
        override: ``map_location`` was given: build every tensor there, not at its live target.

    Raises:
        IncompatibleCheckpointError: The saved state does not fit the live object.
        CorruptCheckpointError: The saved state is malformed.
    """
    kind = item_kind(name, obj)
    if kind != record.kind:
        raise IncompatibleCheckpointError(
            f"item {name!r} was saved as a {record.kind} but a {kind} was given", key=name
        )
    by_id: dict[int, Target] = {}
    counterparts: dict[str, list[Counterpart]] = {}
    written: list[torch.Tensor] = []
    if kind == "optimizer":
        id_map = check_optimizer_state(
            name, saved, obj, record.extra.get("params"), live_names, strict=strict
        )
        natural = optimizer_targets(saved, id_map)
        if not override:
            by_id = natural
        written = list(tensors_by_path(list(obj.state.values())).values())
        if optimizer_loads_plainly(obj):
            for index, value in saved["state"].items():
                live_state = obj.state.get(id_map[index]) if index in id_map else None
                if not isinstance(value, dict) or not isinstance(live_state, dict):
                    continue
                for key, t in value.items():
                    live_t = live_state.get(key)
                    if id(t) in placeholder_names and isinstance(live_t, torch.Tensor):
                        counterparts.setdefault(placeholder_names[id(t)], []).append(
                            (live_t, natural[id(t)])
                        )
    elif kind == "rng":
        obj.check_state_dict(saved)
        # Generators take their states from host memory, whatever map_location says.
        by_id = {id(t): (_CPU, None) for t in tensors_by_path(saved).values()}
    else:
        live = obj if kind == "dict" else obj.state_dict()
        if kind == "module":
            _check_module_state(name, saved, live, strict=strict)
            live_by_path = tensors_by_path(live)
            written = list(live_by_path.values())
            if module_loads_plainly(obj):
                for path, t in tensors_by_path(saved).items():
                    if id(t) in placeholder_names and path in live_by_path:
                        counterparts.setdefault(placeholder_names[id(t)], []).append(
                            (live_by_path[path], None)  # load_state_dict copies into it
                        )
        if not override:
            live_devices = {p: t.device for p, t in tensors_by_path(live).items()}
            by_id = {
                id(t): (_staging_device(kind, live_devices.get(path)), None)
                for path, t in tensors_by_path(saved).items()
            }
    targets = {
        placeholder_names[i]: target for i, target in by_id.items() if i in placeholder_names
    }
    return RestorePlan(
        name,
        kind,
        obj,
        record,
        targets,
        strict,
        list(placeholder_names.values()),
        counterparts,
        written,
    )


_CPU = torch.device("cpu")


def _staging_device(kind: str, live: torch.device | None) -> torch.device | None:
    """Where to build a tensor whose live counterpart is on ``live`` (``None``: none).

    A module's tensors are staged in host memory and copied into its parameters
    by ``load_state_dict``, so a restore never needs twice the model's size in
    accelerator memory; meta modules need no data. Other items may keep the
    tensors they are given, so those are built where the live tensor is.
    """
    if kind == "module":
        return live if live is not None and live.type == "meta" else _CPU
    return live


def _check_module_state(name: str, saved: Any, live: Mapping[str, Any], *, strict: bool) -> None:
    """Raise what ``nn.Module.load_state_dict`` would, in its wording, before loading anything."""
    if not isinstance(saved, dict):
        raise CorruptCheckpointError("module state is not a dict", key=name)
    errors = []
    if strict:
        missing = [k for k in live if k not in saved]
        unexpected = [k for k in saved if k not in live]
        if unexpected:
            errors.append(
                "Unexpected key(s) in state_dict: " + ", ".join(f'"{k}"' for k in unexpected) + "."
            )
        if missing:
            errors.append(
                "Missing key(s) in state_dict: " + ", ".join(f'"{k}"' for k in missing) + "."
            )
    for key, value in saved.items():
        target = live.get(key)
        if not (isinstance(value, torch.Tensor) and isinstance(target, torch.Tensor)):
            continue
        if isinstance(target, nn.parameter.UninitializedParameter):
            continue
        if target.dim() == 0 and value.dim() == 1:
            continue  # torch accepts a 1-d tensor for a 0-d parameter (old checkpoints)
        if value.shape != target.shape:
            errors.append(
                f"size mismatch for {key}: copying a param with shape {value.shape} from "
                f"checkpoint, the shape in current model is {target.shape}."
            )
    if errors:
        raise IncompatibleCheckpointError(
            f"Error(s) in loading state_dict for item {name!r}:\n\t" + "\n\t".join(errors), key=name
        )
