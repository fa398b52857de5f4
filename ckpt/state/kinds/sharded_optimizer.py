"""The sharded ``torch.optim.Optimizer`` kind: per-parameter state keyed by parameter name.

Saved in the form ``get_optimizer_state_dict`` gives (so a checkpoint does not
depend on how parameters were wrapped or grouped) with the optimizer's class
and the module item holding its parameters; loaded through torch's own
``Optimizer.load_state_dict`` (:mod:`ckpt.distributed.states`). Saving or
checking never changes a live optimizer.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ckpt.distributed.destinations import live_optimizer_tensors, optimizer_destinations
from ckpt.distributed.reading import (
    ChunkSource,
    PlannedReads,
    SavedChunks,
    check_then_read,
    read_into,
)
from ckpt.distributed.states import load_optimizer_state, optimizer_state
from ckpt.format import ItemRecord, ShardedSection
from ckpt.state.kinds.base import RestoreOptions
from ckpt.state.kinds.sharded import ShardedCaptured, ShardedKind, ShardedPlan
from ckpt.state.optim import class_name
from ckpt.state.tree import Json, flatten, unflatten

__all__ = ["ShardedOptimizerKind", "index_packed"]


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
