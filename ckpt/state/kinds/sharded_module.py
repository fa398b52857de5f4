"""The sharded ``nn.Module`` kind: plain, DDP-wrapped, FSDP2 or holding DTensors, in a group.

Saved as DCP's ``get_model_state_dict`` gives the state (keyed by fully
qualified name, without wrapper prefixes, shards as DTensors) and loaded with
``set_model_state_dict`` (:mod:`ckpt.distributed.states`). Buffers the ranks
hold different values of are saved once per rank (:func:`variant_name`).

On restore, saved keys are matched to the live module's by parameter name
(:func:`module_destinations`), and each saved tensor gets a destination shaped
and placed like its live counterpart: a fresh tensor, or the live tensor
itself when the bytes are read into it once every rank's checks passed.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ckpt.distributed.reading import (
    ChunkSource,
    PlannedReads,
    SavedChunks,
    check_then_read,
    read_into,
)
from ckpt.distributed.states import module_state, parameter_names, set_module_state, sharded_state
from ckpt.errors import IncompatibleCheckpointError
from ckpt.format import ItemRecord, ShardedSection
from ckpt.state.kinds.base import RestoreOptions
from ckpt.state.kinds.sharded import ShardedCaptured, ShardedKind, ShardedPlan
from ckpt.state.tree import Json, flatten, tensor_refs, unflatten

__all__ = ["ShardedModuleKind", "module_destinations", "register_sharded", "variant_name"]


def variant_name(name: str, rank: int) -> str:
    """The global tensor holding rank ``rank``'s own value of a module buffer the ranks disagree on.

    Rank 0's value is the tensor ``name`` itself. ``#`` never occurs in a tensor
    name made from a string key (it is escaped), so no state key can produce this.
    """
    return f"{name}#rank{rank}"


def register_sharded(items: Mapping[str, Any]) -> None:
    """Register every FSDP2 module's sharded parameters again, as its ``state_dict()`` does.

    After a forward with ``reshard_after_forward=False`` (an eval pass), FSDP2 leaves
    the unsharded parameters registered: then neither the module's parameters nor
    their names match its optimizer's. ``FSDPModule.reshard()`` frees them (the next
    forward gathers them again) and changes no value.
    """
    from torch.distributed.fsdp import FSDPModule  # noqa: PLC0415 - FSDP2 only when used

    for obj in items.values():
        if isinstance(obj, torch.nn.Module):
            for module in obj.modules():
                if isinstance(module, FSDPModule):
                    module.reshard()


class ShardedModuleKind(ShardedKind):
    """A module in a process group: its shards read into its live tensors where it has data."""

    stored = "module"

    def accepts(self, obj: object) -> bool:
        """Whether ``obj`` is an ``nn.Module``."""
        return isinstance(obj, nn.Module)

    def capture(
        self, name: str, items: Mapping[str, Any], pairs: Mapping[str, str]
    ) -> ShardedCaptured:
        """The state by parameter name; every tensor that is no parameter is a buffer."""
        obj = items[name]
        tree, tensors = flatten(module_state(obj), name)
        params = parameter_names(obj)
        buffers = {n for path, n in tensor_refs(tree) if path[0] not in params}
        return ShardedCaptured(ItemRecord(self.stored, tree), tensors, buffers)

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
        """Match saved keys to live ones; read into the live tensors unless they are on ``meta``."""
        tree, dest, unexpected = module_destinations(
            name, record, items, pairs, options, held is not None
        )
        if held is not None and any(t.device.type == "meta" for t in dest.values()):
            held = None  # the live module holds no data yet: read into fresh tensors
            tree, dest, unexpected = module_destinations(name, record, items, pairs, options, False)
        in_place = set(dest) if held is not None else set()
        return ShardedPlan(name, self, tree, dest, in_place, held, unexpected)

    def build(
        self, plan: ShardedPlan, source: ChunkSource, section: ShardedSection, rank: int
    ) -> tuple[Any, int, PlannedReads | None]:
        """This rank's chunks (its own variant of a divergent buffer): read now, or checked now."""
        dest = plan.dest
        own = {n: variant_name(n, rank) for n in dest if variant_name(n, rank) in section.tensors}
        records = {n: section.tensors[own.get(n, n)] for n in dest}
        if plan.held is not None:
            nbytes, reads = check_then_read(plan.held, records, dest)
            return unflatten(plan.tree, dest), nbytes, reads
        return unflatten(plan.tree, dest), read_into(source, records, dest), None

    def apply(
        self,
        name: str,
        items: Mapping[str, Any],
        pairs: Mapping[str, str],
        state: dict[str, Any],
        strict: bool,
    ) -> tuple[list[str], list[str]]:
        """``set_model_state_dict``; the missing and unexpected keys it reports."""
        return set_module_state(items[name], state, strict)


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
