"""The sharded ``nn.Module`` kind: plain, DDP-wrapped, FSDP2 or holding DTensors, in a group.

Saved as DCP's ``get_model_state_dict`` gives the state (keyed by fully
qualified name, without wrapper prefixes, shards as DTensors) and loaded with
``set_model_state_dict`` (:mod:`ckpt.distributed.states`). Buffers the ranks
hold different values of are saved once per rank (:func:`variant_name`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ckpt.distributed.destinations import module_destinations
from ckpt.distributed.reading import (
    ChunkSource,
    PlannedReads,
    SavedChunks,
    check_then_read,
    read_into,
)
from ckpt.distributed.states import module_state, parameter_names, set_module_state
from ckpt.format import ItemRecord, ShardedSection
from ckpt.state.kinds.base import RestoreOptions
from ckpt.state.kinds.sharded import ShardedCaptured, ShardedKind, ShardedPlan
from ckpt.state.tree import flatten, tensor_refs, unflatten

__all__ = ["ShardedModuleKind", "register_sharded", "variant_name"]


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
