"""Item kinds, registered in one place: one handler type per kind of item.

The order of :data:`KINDS` is the order in which a live object is matched:
the first kind that accepts it handles it. Saved records are matched the same
way (:func:`kind_of_record`), so ``verify()`` checks each item with the
handler that wrote it.

A process group's modules and optimizers are sharded items, with kinds of
their own (:func:`sharded_kinds`, :mod:`ckpt.state.kinds.sharded`), imported
on first use: they import DCP.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

from ckpt.errors import CorruptCheckpointError
from ckpt.format import ItemRecord
from ckpt.state.kinds.base import Captured, ItemKind, ItemPlan, RestoreOptions, Stateful
from ckpt.state.kinds.module import ModuleKind
from ckpt.state.kinds.optimizer import OptimizerKind
from ckpt.state.kinds.plain import DictKind, RandomStreamsKind
from ckpt.state.kinds.stateful import SamplerKind, ScalerKind, SchedulerKind, StatefulKind

if TYPE_CHECKING:
    from ckpt.state.kinds.sharded import ShardedKind

__all__ = [
    "KINDS",
    "Captured",
    "ItemKind",
    "ItemPlan",
    "RestoreOptions",
    "Stateful",
    "kind_of",
    "kind_of_record",
    "sharded_kind_of",
    "sharded_kind_of_record",
    "sharded_kinds",
]

KINDS: tuple[ItemKind, ...] = (
    ModuleKind(),
    OptimizerKind(),
    RandomStreamsKind(),
    SchedulerKind(),
    ScalerKind(),
    SamplerKind(),
    StatefulKind(),
    DictKind(),
)
"""Every item kind, in matching order (most specific first)."""


def kind_of(name: str, obj: object) -> ItemKind:
    """Return the kind that handles a live object.

    Raises:
        TypeError: No kind accepts it; the message names the item.
    """
    for kind in KINDS:
        if kind.accepts(obj):
            return kind
    raise TypeError(
        f"item {name!r} is a {type(obj).__qualname__}; expected an nn.Module, an Optimizer, "
        "an object with state_dict()/load_state_dict(), or a dict"
    )


def kind_of_record(name: str, record: ItemRecord) -> ItemKind:
    """Return the kind that wrote a saved item.

    Raises:
        CorruptCheckpointError: No kind has written such a record.
    """
    for kind in KINDS:
        if kind.accepts_record(record):
            return kind
    raise CorruptCheckpointError(f"unknown item kind {record.kind!r}", key=name)


@functools.cache
def sharded_kinds() -> tuple[ShardedKind, ...]:
    """The kinds of a process group's sharded items, in matching order (imports DCP)."""
    from ckpt.state.kinds.sharded_module import ShardedModuleKind  # noqa: PLC0415 - DCP
    from ckpt.state.kinds.sharded_optimizer import ShardedOptimizerKind  # noqa: PLC0415 - DCP

    return (ShardedModuleKind(), ShardedOptimizerKind())


def sharded_kind_of(obj: object) -> ShardedKind | None:
    """The sharded kind that handles a live object, or ``None`` (the rank saves it itself)."""
    return next((kind for kind in sharded_kinds() if kind.accepts(obj)), None)


def sharded_kind_of_record(name: str, record: ItemRecord) -> ShardedKind:
    """The sharded kind that wrote a saved sharded item.

    Raises:
        CorruptCheckpointError: No sharded kind has written such a record.
    """
    for kind in sharded_kinds():
        if record.kind == kind.stored:
            return kind
    raise CorruptCheckpointError(f"unknown sharded item kind {record.kind!r}", key=name)
