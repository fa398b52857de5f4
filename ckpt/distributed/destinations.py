"""Where each saved tensor of a module or optimizer item is read to on this rank.

Saved keys are matched to the live object's (a module's by parameter name, an
optimizer's per-parameter state by the names of its parameters), everything
but tensor data is checked, and each saved tensor gets a destination shaped
and placed like its live counterpart: a fresh tensor, or the live tensor
itself when the bytes are read into it once every rank's checks passed.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ckpt.distributed.planning import local_shards
from ckpt.distributed.states import optimizer_param_names, sharded_state
from ckpt.errors import IncompatibleCheckpointError
from ckpt.format import GlobalTensorRecord, ItemRecord, ShardedSection
from ckpt.state.kinds import RestoreOptions
from ckpt.state.kinds.optimizer import check_optimizer_numbers
from ckpt.state.optim import check_group_types, class_name
from ckpt.state.tree import Json, tensor_refs, unflatten

__all__ = ["live_optimizer_tensors", "module_destinations", "optimizer_destinations"]


def _check_names(item: str, saved: set[str], live: set[str], strict: bool) -> None:
    if saved == live or not strict:
        return
    missing, unexpected = sorted(live - saved), sorted(saved - live)
    raise IncompatibleCheckpointError(
        f"item {item!r} does not match the checkpoint: missing {missing[:10]}, "
        f"unexpected {unexpected[:10]}: restore into the model that was saved (the same "
        "modules and names), or pass strict=False to restore only the keys both have",
        key=item,
    )


def module_destinations(
    name: str,
    record: ItemRecord,
    items: Mapping[str, Any],
    pairs: Mapping[str, str],
    options: RestoreOptions,
    in_place: bool,
) -> tuple[Json, dict[str, torch.Tensor], list[str]]:
    """Match a module's saved keys to its live ones; a tensor to read each saved tensor into.

    With ``in_place`` that tensor is the live one (as ``get_model_state_dict``
    gives it), else a fresh one like it.

    Keys are matched, not stored tensor names: weights tied when saved (one stored
    tensor) load into untied live ones and the other way round.

    Returns:
        The saved tree restricted to the live keys, the destinations by stored
        name, and the saved keys the live module lacks.
    """
    live = sharded_state(name, items, pairs)
    tree = record.state
    if not isinstance(tree, dict) or any(k.startswith("$") for k in tree):
        raise IncompatibleCheckpointError(
            f"item {name!r}: the saved module state is not keyed by parameter name", key=name
        )
    _check_names(name, set(tree), set(live), options.strict)
    kept = {k: v for k, v in tree.items() if k in live}
    dest: dict[str, torch.Tensor] = {}
    for key, value in kept.items():
        for _, stored in tensor_refs(value):
            target = live[key]
            if stored not in dest and isinstance(target, torch.Tensor):
                dest[stored] = target if in_place else torch.empty_like(target)
    return kept, dest, sorted(set(tree) - set(live))


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
    saved_class = record.extra.get("class")
    if saved_class != class_name(optimizer) and not options.optimizer_class_change:
        raise IncompatibleCheckpointError(
            f"item {name!r} was saved from {saved_class} but the live optimizer is "
            f"{class_name(optimizer)} (pass optimizer_class_change=True to load it anyway)",
            key=f"{name}.class",
        )
    names = optimizer_param_names(model, optimizer)
    params = {
        n: p
        for n, p in zip(
            names, (p for g in optimizer.param_groups for p in g["params"]), strict=True
        )
    }
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
    dest: dict[str, torch.Tensor] = {}
    taken: set[int] = set()  # a live tensor shared by two states is taken once
    for path, tensor_name in tensor_refs(state):
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
