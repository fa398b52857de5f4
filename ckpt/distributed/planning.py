"""Who writes what, and who reads what: DCP's planners, with plans exchanged as JSON.

Saving: every rank builds its local plan with DCP's ``DefaultSavePlanner`` (one
write item per local shard of a DTensor, one per whole plain tensor); the plans
are exchanged as JSON (never pickle) and every rank runs the same deterministic
global step, which deduplicates replicated tensors over the ranks so they share
the writing. Loading: DCP's local load planner maps the saved chunks onto the
live (possibly differently sharded) tensors; here its read items are grouped
by saved chunk. Pure functions over plans and records; no I/O.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch.distributed.checkpoint.default_planner import (
    DefaultSavePlanner,
    create_default_local_load_plan,
)
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import (
    ReadItem,
    SavePlan,
    TensorWriteData,
    WriteItem,
    WriteItemType,
)
from torch.distributed.tensor import DTensor

from ckpt.errors import IncompatibleCheckpointError, RankMismatchError
from ckpt.format import GlobalTensorRecord
from ckpt.format.tensorfile import dtype_from_name, dtype_name
from ckpt.state.tree import Json

__all__ = ["ChunkRead", "Shard", "local_shards", "plan_reads", "plan_writes"]


@dataclass(frozen=True)
class Shard:
    """One piece of a global tensor this rank writes."""

    name: str
    offsets: tuple[int, ...]
    global_shape: tuple[int, ...]
    data: torch.Tensor
    """The shard's values (a local tensor, possibly on a GPU)."""


def _item_to_json(item: WriteItem) -> Json:
    data = item.tensor_data
    assert data is not None
    return [
        item.index.fqn,
        list(data.chunk.offsets),
        list(data.chunk.sizes),
        list(data.size),
        dtype_name(data.properties.dtype),
        item.type.value,
    ]


def _item_from_json(doc: Any) -> WriteItem:
    fqn, offsets, sizes, size, dtype, kind = doc
    resolved = dtype_from_name(dtype)
    assert resolved is not None
    return WriteItem(
        index=MetadataIndex(fqn, torch.Size(offsets)),
        type=WriteItemType(kind),
        tensor_data=TensorWriteData(
            chunk=ChunkStorageMetadata(torch.Size(offsets), torch.Size(sizes)),
            properties=TensorProperties(dtype=resolved),
            size=torch.Size(size),
        ),
    )


def plan_writes(
    tensors: Mapping[str, torch.Tensor],
    rank: int,
    all_gather: Callable[[Json], list[Json]],
) -> list[Shard]:
    """Decide which shards this rank writes (collective: every rank calls it).

    Args:
        tensors: ``{global name: tensor or DTensor}`` of this rank's sharded items.
        rank: This rank.
        all_gather: Gathers one JSON value from every rank (ckpt's pickle-free collective).

    Returns:
        This rank's shards: those of its DTensor shards it owns after DCP's
        deduplication, and its share of the replicated tensors.
    """
    planner = DefaultSavePlanner(flatten_state_dict=False)
    planner.set_up_planner(dict(tensors), is_coordinator=rank == 0)
    local = planner.create_local_plan()
    gathered = all_gather([_item_to_json(item) for item in local.items])
    _check_alike(gathered)
    _check_covered(gathered)
    plans = [SavePlan([_item_from_json(d) for d in doc]) for doc in gathered]
    global_plans, _ = planner.create_global_plan(plans)
    final = planner.finish_plan(global_plans[rank])
    shards = []
    for item in final.items:
        data = planner.resolve_data(item)
        assert isinstance(data, torch.Tensor) and item.tensor_data is not None
        if data.numel() == 0 and math.prod(item.tensor_data.size) > 0:
            continue  # an empty local shard (uneven sharding): nothing to store
        shards.append(
            Shard(
                item.index.fqn,
                tuple(item.tensor_data.chunk.offsets),
                tuple(item.tensor_data.size),
                data.detach(),
            )
        )
    return shards


def _check_alike(gathered: list[Json]) -> None:
    """Refuse a tensor whose global shape or dtype differs between ranks (the same on every rank).

    DCP's planner would keep one rank's shape for the tensor and write each rank's
    share of a replicated one, so the checkpoint would mix the ranks' models.

    Raises:
        RankMismatchError: Names the first such tensor (its key) and what two ranks hold
            of it.
    """
    first: dict[str, tuple[int, tuple[int, ...], str]] = {}
    for rank, doc in enumerate(gathered):
        assert isinstance(doc, list)
        for fqn, _, _, size, name, *_ in doc:
            dtype = str(dtype_from_name(name)).removeprefix("torch.")
            seen = first.setdefault(fqn, (rank, tuple(size), dtype))
            if seen[1:] != (tuple(size), dtype):
                raise RankMismatchError(
                    f"tensor {fqn!r} is {seen[2]} of shape {seen[1]} on rank {seen[0]} but "
                    f"{dtype} of shape {tuple(size)} on rank {rank}: every rank must hold the "
                    "same model and optimizer (build them the same way on every rank, then "
                    "wrap them in DistributedDataParallel or shard them with fully_shard)",
                    key=fqn,
                )


def _check_covered(gathered: list[Json]) -> None:
    """Refuse tensors the ranks do not hold in full together (the same on every rank).

    Raises:
        ValueError: Names the first such tensor and what the ranks hold of it.
    """
    boxes: dict[str, set[tuple[tuple[int, ...], tuple[int, ...]]]] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    for doc in gathered:
        assert isinstance(doc, list)
        for fqn, offsets, sizes, size, *_ in doc:
            boxes.setdefault(fqn, set()).add((tuple(offsets), tuple(sizes)))
            shapes[fqn] = tuple(size)
    for fqn, found in boxes.items():
        held, total = sum(math.prod(s) for _, s in found), math.prod(shapes[fqn])
        if held < total:
            raise ValueError(
                f"tensor {fqn!r} of shape {shapes[fqn]}: the {len(gathered)} ranks of this "
                f"manager's group hold only {held} of its {total} elements together; its "
                "DTensor's device mesh spans ranks outside the group (as when a manager is "
                "built on the replicate dimension of HSDP's 2-D mesh, whose ranks hold the "
                "same shard, or on either dimension of FSDP2 x tensor parallel, where no "
                "dimension's ranks hold a whole copy). Build the manager on a group whose "
                "ranks hold a whole copy: every rank, or with HSDP one replica's ranks (the "
                "shard dimension); with FSDP2 x tensor parallel, every rank"
            )


def local_shards(t: torch.Tensor) -> torch.Tensor:
    """The part of ``t`` this rank holds (a DTensor's local tensor, else ``t``)."""
    return t.to_local() if isinstance(t, DTensor) else t


@dataclass(frozen=True)
class ChunkRead:
    """Copy the saved chunk's box ``source`` (offsets, lengths) into ``dest`` of a live tensor."""

    name: str
    chunk: int
    """Index of the saved chunk in its record."""
    source_offsets: tuple[int, ...]
    dest_offsets: tuple[int, ...]
    lengths: tuple[int, ...]


def _metadata(records: Mapping[str, GlobalTensorRecord]) -> Metadata:
    return Metadata(
        state_dict_metadata={
            name: TensorStorageMetadata(
                TensorProperties(dtype=r.dtype),
                torch.Size(r.shape),
                [
                    ChunkStorageMetadata(torch.Size(c.offsets), torch.Size(c.sizes))
                    for c in r.chunks
                ],
            )
            for name, r in records.items()
        }
    )


def plan_reads(
    records: Mapping[str, GlobalTensorRecord], live: Mapping[str, torch.Tensor]
) -> list[ChunkRead]:
    """Map the saved chunks onto this rank's part of each live tensor (DCP's load planning).

    Args:
        records: The saved global tensors that ``live`` names.
        live: ``{global name: tensor or DTensor}``, each of the saved global shape.

    Raises:
        IncompatibleCheckpointError: A live tensor's global shape differs from the saved one.
    """
    for name, t in live.items():
        if tuple(t.shape) != records[name].shape:
            raise IncompatibleCheckpointError(
                f"tensor {name!r} has shape {tuple(records[name].shape)} in the checkpoint "
                f"but {tuple(t.shape)} in the live object",
                key=name,
            )
    plan = create_default_local_load_plan(dict(live), _metadata(records), strict=True)
    index = {
        name: {tuple(c.offsets): i for i, c in enumerate(r.chunks)} for name, r in records.items()
    }
    reads = []
    for item in plan.items:
        assert isinstance(item, ReadItem)
        name = item.storage_index.fqn
        reads.append(
            ChunkRead(
                name,
                index[name][tuple(item.storage_index.offset or ())],
                tuple(item.storage_offsets),
                tuple(item.dest_offsets),
                tuple(item.lengths),
            )
        )
    return reads
