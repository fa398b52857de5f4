"""What the kinds of a process group's modules and optimizers share: captures, plans, the base.

In a process group (and whenever a checkpoint saved by several ranks is
restored), modules and optimizers are sharded items: their state is keyed by
parameter name, as DCP's state-dict API gives it, sharded tensors are
DTensors, and each rank writes and reads only its chunks. A sharded kind has
the steps of every item kind (:mod:`ckpt.state.kinds.base`):

* **capture** (save): the state through DCP's state-dict bridge, flattened;
* **validate** (restore, changes nothing): the saved record against the live
  object, every non-tensor value, and a destination for every saved tensor;
* **build**: read and check the chunks this rank needs: into fresh tensors
  now, or (checked now) into the live tensors when the restore is applied;
* **apply**: load the state into the live object.

The group, its collectives, DCP's planners and the chunk reads stay in
:mod:`ckpt.distributed`; a kind calls them through narrow functions. The
kinds are registered in :func:`ckpt.state.kinds.sharded_kinds` and imported
on first use (they import DCP).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from ckpt.format import ItemRecord, ShardedSection
from ckpt.state.kinds.base import RestoreOptions
from ckpt.state.tree import Json

if TYPE_CHECKING:
    from ckpt.distributed.reading import ChunkSource, PlannedReads, SavedChunks

__all__ = ["ShardedCaptured", "ShardedKind", "ShardedPlan"]


@dataclass(frozen=True)
class ShardedCaptured:
    """A sharded item's state on this rank, ready to be laid out across the ranks."""

    record: ItemRecord
    """The item's record: its tree refers to global tensor names."""
    tensors: dict[str, torch.Tensor]
    """``{global name: tensor or DTensor}``."""
    buffers: set[str] = field(default_factory=set)
    """Names of module tensors that are no parameters: ranks may hold different values."""


@dataclass
class ShardedPlan:
    """A validated restore of one sharded item on this rank: where each saved tensor goes."""

    name: str
    kind: ShardedKind
    tree: Json
    """The saved tree, restricted to what the live object takes."""
    dest: dict[str, torch.Tensor]
    """``{global name: the tensor to read it into}``: fresh, or live (see ``in_place``)."""
    in_place: set[str] = field(default_factory=set)
    """Global names whose destination is the live tensor: checked now, read at apply."""
    held: SavedChunks | None = None
    """The held chunks to check now and read later (``None``: everything is read now)."""
    unexpected: list[str] = field(default_factory=list)
    """Saved keys the live object lacks."""


class ShardedKind:
    """One kind of sharded item (registered in :func:`ckpt.state.kinds.sharded_kinds`)."""

    stored: ClassVar[str] = ""
    """The kind written in the manifest."""

    def accepts(self, obj: object) -> bool:
        """Whether ``obj`` is an item of this kind."""
        raise NotImplementedError

    def capture(
        self, name: str, items: Mapping[str, Any], pairs: Mapping[str, str]
    ) -> ShardedCaptured:
        """Capture the item's state on this rank, keyed by parameter name.

        Args:
            name: The item.
            items: Every item saved.
            pairs: Each optimizer item's module item.
        """
        raise NotImplementedError

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
        """Check the saved record against the live object and place every saved tensor.

        Args:
            name: The item.
            record: Its saved record.
            items: Every live item restored.
            pairs: Each optimizer item's module item.
            options: The restore's options.
            section: The checkpoint's sharded section (the global tensors).
            held: The chunks to check now and read into live tensors at apply, or
                ``None`` to read everything into fresh tensors.

        Raises:
            IncompatibleCheckpointError: The state does not fit the live object.
        """
        raise NotImplementedError

    def build(
        self, plan: ShardedPlan, source: ChunkSource, section: ShardedSection, rank: int
    ) -> tuple[Any, int, PlannedReads | None]:
        """Read and check this rank's chunks; return the state, the bytes, the reads left.

        The reads left (into live tensors) run when the restore is applied.

        Raises:
            CorruptCheckpointError: A chunk or file fails its checks.
        """
        raise NotImplementedError

    def apply(
        self,
        name: str,
        items: Mapping[str, Any],
        pairs: Mapping[str, str],
        state: dict[str, Any],
        strict: bool,
    ) -> tuple[list[str], list[str]]:
        """Load ``state`` into the live item; return missing and unexpected keys."""
        raise NotImplementedError

    def full_state(self, state: dict[str, Any]) -> dict[str, Any]:
        """The state of a consolidated read (``read()``), from the state keyed by parameter name."""
        return state
