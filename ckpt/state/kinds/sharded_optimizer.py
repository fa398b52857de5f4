"""The sharded ``torch.optim.Optimizer`` kind: per-parameter state keyed by parameter name.

Saved in the form ``get_optimizer_state_dict`` gives (so a checkpoint does not
depend on how parameters were wrapped or grouped) with the optimizer's class
and the module item holding its parameters; loaded through torch's own
``Optimizer.load_state_dict`` (:mod:`ckpt.distributed.states`). Saving or
checking never changes a live optimizer.

On restore, the per-parameter state is matched by the names of the live
optimizer's parameters, everything but tensor data is checked (the class, the
param groups, every number), and each saved tensor gets a destination shaped
and placed like its parameter (:func:`optimizer_destinations`): the live state
tensor when it is laid out so, else a fresh one.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ckpt.distributed.planning import local_shards
from ckpt.distributed.reading import (
    ChunkSource,
    PlannedReads,
    SavedChunks,
    check_then_read,
    read_into,
)
from ckpt.distributed.states import (
    load_optimizer_state,
    optimizer_param_names,
    optimizer_state,
    sharded_state,
)
from ckpt.errors import IncompatibleCheckpointError
from ckpt.format import GlobalTensorRecord, ItemRecord, ShardedSection
from ckpt.state.kinds.base import RestoreOptions
from ckpt.state.kinds.optimizer import check_optimizer_numbers
from ckpt.state.kinds.sharded import ShardedCaptured, ShardedKind, ShardedPlan
from ckpt.state.optim import check_group_types, class_name
from ckpt.state.tree import Json, flatten, tensor_refs, unflatten

__all__ = [
    "ShardedOptimizerKind",
    "index_packed",
    "live_optimizer_tensors",
    "optimizer_destinations",
]


class ShardedOptimizerKind(ShardedKind):
    """An optimizer in a process group, saved and restored together with its module item."""

    stored = "optimizer"

    def accepts(self, obj: object) -> bool:
        """Whether ``obj`` is an optimizer."""
        return isinstance(obj, torch.optim.Optimizer)

    def capture(
        self, name: str, items: Mapping[str, Any], pairs: Mapping[str, str]
    ) -> ShardedCaptured:
        """The state by parameter name, with the class and the module item (``model``)."""
        obj = items[name]
        tree, tensors = flatten(optimizer_state(items[pairs[name]], obj), name)
        extra: dict[str, Json] = {"class": class_name(obj), "model": pairs[name]}
        return ShardedCaptured(ItemRecord(self.stored, tree, extra), tensors)

    def validate(
        self,
        name: str,
        record: ItemRecord,
        items: Mapping[str, Any],
        pairs: Mapping[str, str],
        options: RestoreOptions,
        section: ShardedSection,
        held: SavedChunks | None,
    ) -> ShardedPlan:
        """Class, groups and values checked; live state of the same layout read into in place."""
        candidates = None if held is None else live_optimizer_tensors(name, items, pairs, record)
        dest = optimizer_destinations(
            name, items[name], items[pairs[name]], record, section, options, candidates
        )
        in_place = {n for n, t in dest.items() if candidates and candidates.get(n) is t}
        return ShardedPlan(name, self, record.state, dest, in_place, held)

    def build(
        self, plan: ShardedPlan, source: ChunkSource, section: ShardedSection, rank: int
    ) -> tuple[Any, int, PlannedReads | None]:
        """Fresh tensors read now; the chunks of live ones checked now, read at apply."""
        live = {n: t for n, t in plan.dest.items() if n in plan.in_place}
        fresh = {n: t for n, t in plan.dest.items() if n not in live}
        nbytes = read_into(source, {n: section.tensors[n] for n in fresh}, fresh)
        reads = None
        if plan.held is not None and live:
            checked, reads = check_then_read(plan.held, {n: section.tensors[n] for n in live}, live)
            nbytes += checked
        return unflatten(plan.tree, {**plan.dest, **live}), nbytes, reads

    def apply(
        self,
        name: str,
        items: Mapping[str, Any],
        pairs: Mapping[str, str],
        state: dict[str, Any],
        strict: bool,
    ) -> tuple[list[str], list[str]]:
        """``load_state_dict`` with the parameters named as the live module names them."""
        load_optimizer_state(items[pairs[name]], items[name], state)
        return [], []

    def full_state(self, state: dict[str, Any]) -> dict[str, Any]:
        """The state in torch's index-packed form (see :func:`index_packed`)."""
        return index_packed(state)


def index_packed(state: dict[str, Any]) -> dict[str, Any]:
    """Turn an optimizer state keyed by parameter name into torch's index-packed form.

    Parameters are numbered as their groups list them.
    """
    index: dict[str, int] = {}
    groups = []
    for group in state["param_groups"]:
        ids = []
        for param_name in group["params"]:
            index.setdefault(param_name, len(index))
            ids.append(index[param_name])
        groups.append({**group, "params": ids})
    per_param = {index[n]: v for n, v in state["state"].items() if n in index}
    return {"state": per_param, "param_groups": groups}


def optimizer_destinations(
    name: str,
    optimizer: torch.optim.Optimizer,
    model: torch.nn.Module,
    record: ItemRecord,
    section: ShardedSection,
    options: RestoreOptions,
    live: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """A fresh tensor for each saved optimizer tensor, sharded like its parameter if shaped so.

    A saved tensor whose candidate in ``live`` (by saved name, see
    :func:`live_optimizer_tensors`) is laid out as that fresh tensor would be
    gets the live tensor instead (none is allocated); the others a fresh one.
    """
    names = _check_saved_optimizer(name, optimizer, model, record, section, options)
    params = {
        n: p
        for n, p in zip(
            names, (p for g in optimizer.param_groups for p in g["params"]), strict=True
        )
    }
    dest: dict[str, torch.Tensor] = {}
    taken: set[int] = set()  # a live tensor shared by two states is taken once
    for path, tensor_name in tensor_refs(record.state):
        saved = section.tensors[tensor_name]
        param = params.get(str(path[1])) if len(path) >= 3 and path[0] == "state" else None
        if param is None:
            raise IncompatibleCheckpointError(
                f"item {name!r}: state for an unknown parameter at {list(path)}", key=name
            )
        like_param = tuple(saved.shape) == tuple(param.shape) and param.dim() > 0
        candidate = (live or {}).get(tensor_name)
        if candidate is not None and _laid_out_as_fresh(candidate, param, saved, like_param):
            where = local_shards(candidate).untyped_storage().data_ptr()
            if where not in taken:
                dest[tensor_name] = candidate
                taken.add(where)
                continue
            taken.add(where)
        if like_param:
            dest[tensor_name] = torch.empty_like(param, dtype=saved.dtype)
        else:
            dest[tensor_name] = torch.empty(saved.shape, dtype=saved.dtype)
    return dest


def _check_saved_optimizer(
    name: str,
    optimizer: torch.optim.Optimizer,
    model: torch.nn.Module,
    record: ItemRecord,
    section: ShardedSection,
    options: RestoreOptions,
) -> list[str]:
    """Check the saved class, param groups and numbers; return the live parameters' names."""
    saved_class = record.extra.get("class")
    if saved_class != class_name(optimizer) and not options.optimizer_class_change:
        raise IncompatibleCheckpointError(
            f"item {name!r} was saved from {saved_class} but the live optimizer is "
            f"{class_name(optimizer)} (pass optimizer_class_change=True to load it anyway)",
            key=f"{name}.class",
        )
    names = optimizer_param_names(model, optimizer)
    state = record.state
    groups = state.get("param_groups") if isinstance(state, dict) else None
    if not isinstance(groups, list) or len(groups) != len(optimizer.param_groups):
        raise IncompatibleCheckpointError(
            f"item {name!r} has {len(groups) if isinstance(groups, list) else 'no'} param groups "
            f"in the checkpoint but {len(optimizer.param_groups)} live: build the optimizer "
            "with the param groups it was saved with (`ckpt info` lists them)",
            key=f"{name}.param_groups",
        )
    at = 0
    for g, (saved_group, live_group) in enumerate(zip(groups, optimizer.param_groups, strict=True)):
        live_names = names[at : at + len(live_group["params"])]
        at += len(live_group["params"])
        if not isinstance(saved_group, dict) or saved_group.get("params") != live_names:
            raise IncompatibleCheckpointError(
                f"item {name!r}: param group {g} holds other parameters in the checkpoint "
                f"than live ({_short(saved_group)} vs {live_names[:10]})",
                key=f"{name}.param_groups[{g}]",
            )
    decoded = unflatten(
        state,
        lambda n: torch.empty(
            section.tensors[n].shape, dtype=section.tensors[n].dtype, device="meta"
        ),
    )
    for g, (saved_group, live_group) in enumerate(
        zip(decoded["param_groups"], optimizer.param_groups, strict=True)
    ):
        check_group_types(f"{name}.param_groups[{g}]", saved_group, live_group)
    check_optimizer_numbers(name, decoded)
    return names


def _laid_out_as_fresh(
    live: torch.Tensor, param: torch.Tensor, saved: GlobalTensorRecord, like_param: bool
) -> bool:
    """Whether ``live`` is placed, shaped and typed as the fresh destination would be."""
    if not like_param:
        fresh_type, placements, mesh = torch.Tensor, None, None
        local_shape, device = tuple(saved.shape), torch.device("cpu")
    else:
        # empty_like gives a plain tensor for a plain Parameter, the subclass for a DTensor
        fresh_type = torch.Tensor if type(param) is torch.nn.Parameter else type(param)
        placements = getattr(param, "placements", None)
        mesh = getattr(param, "device_mesh", None)
        local = local_shards(param)
        local_shape, device = tuple(local.shape), local.device
    if type(live) is not fresh_type or tuple(live.shape) != tuple(saved.shape):
        return False
    if live.dtype != saved.dtype or getattr(live, "placements", None) != placements:
        return False
    if getattr(live, "device_mesh", None) != mesh:
        return False
    here = local_shards(live)
    return tuple(here.shape) == local_shape and here.device == device and here.is_contiguous()


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def live_optimizer_tensors(
    name: str,
    items: Mapping[str, Any],
    pairs: Mapping[str, str],
    record: ItemRecord,
) -> dict[str, torch.Tensor]:
    """The live optimizer's state tensors by saved name: candidates to take the saved ones in place.

    :func:`optimizer_destinations` keeps those laid out as a fresh destination
    would be (the same local shard of the same mesh).
    """
    live_state = sharded_state(name, items, pairs)["state"]
    found: dict[str, torch.Tensor] = {}
    for path, tensor_name in tensor_refs(record.state):
        if len(path) != 3 or path[0] != "state":
            continue
        per = live_state.get(str(path[1]))
        live = per.get(path[2]) if isinstance(per, dict) else None
        if isinstance(live, torch.Tensor):
            found[tensor_name] = live
    return found
