"""What one rank saves: its shards of the sharded items, and its own items as a v2 section.

Each sharded item is captured by its kind (:func:`ckpt.state.kinds.sharded_kinds`)
and laid out across the ranks here. Pure transformations of live state into
tensors to write and records to gather; the writing is
:mod:`ckpt.distributed.writing`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch.distributed.tensor import DTensor

from ckpt.distributed.planning import Shard, plan_writes
from ckpt.distributed.states import pair_optimizers
from ckpt.format import ItemRecord, Manifest, item_file_name
from ckpt.format.checksums import hash_bytes
from ckpt.format.tensorfile import tensor_bytes
from ckpt.state.items import assemble_manifest, capture
from ckpt.state.kinds import sharded_kind_of
from ckpt.state.kinds.sharded_module import register_sharded, variant_name
from ckpt.state.optim import module_param_names
from ckpt.state.tree import Json

__all__ = [
    "LocalCapture",
    "RankCapture",
    "capture_local",
    "capture_own",
    "chunk_key",
    "lay_out",
    "rank_file_name",
    "shard_file_name",
]


def shard_file_name(rank: int, token: str | None) -> str:
    """The file holding the shards rank ``rank`` writes."""
    return item_file_name(f"rank{rank}_shards", token)


def rank_file_name(file_name: str, rank: int) -> str:
    """The name rank ``rank`` gives its file of an item: ``<item>_r<rank>[.token].safetensors``."""
    stem, dot, rest = file_name.partition(".")
    return f"{stem}_r{rank}{dot}{rest}"


def chunk_key(name: str, offsets: tuple[int, ...]) -> str:
    """The tensor name of a shard inside its safetensors file: ``<global name>@<offsets>``."""
    return f"{name}@{','.join(str(o) for o in offsets)}"


@dataclass
class RankCapture:
    """One rank's part of a save, captured and laid out, not yet written."""

    files: dict[str, dict[str, torch.Tensor]]
    """``{file name: {tensor name: tensor}}``: this rank's shard file and its own item files."""
    shards: list[Shard]
    shard_file: str
    sharded_items: dict[str, ItemRecord]
    """The sharded items' records (trees referring to global tensor names)."""
    own: Manifest
    """This rank's own items, as a v2 manifest (file records still empty)."""


@dataclass
class LocalCapture:
    """One rank's state, captured without talking to other ranks."""

    sharded_items: dict[str, ItemRecord]
    flat: dict[str, torch.Tensor]
    """``{global name: tensor or DTensor}`` of the sharded items."""
    own_files: dict[str, dict[str, torch.Tensor]]
    own: Manifest
    buffers: set[str]
    """Names of module tensors that are no parameters: ranks may hold different values."""


def capture_local(
    items: Mapping[str, Any],
    rank: int,
    own_manifest: Callable[[dict[str, Any]], tuple[dict[str, dict[str, torch.Tensor]], Manifest]],
) -> LocalCapture:
    """Capture this rank's state: sharded items through DCP's state-dict API, the rest itself.

    Args:
        items: Every item, as given to ``save`` (plus the random streams).
        rank: This rank.
        own_manifest: Captures the items each rank saves for itself and lays them
            out as a v2 manifest (what a single-process save does).

    Raises:
        TypeError: A value cannot be stored without pickle.
        ValueError: An optimizer is saved without the module holding its parameters.
    """
    register_sharded(items)
    pairs = pair_optimizers(items)
    records: dict[str, ItemRecord] = {}
    flat: dict[str, torch.Tensor] = {}
    buffers: set[str] = set()
    for name, obj in items.items():
        kind = sharded_kind_of(obj)
        if kind is None:
            continue
        captured = kind.capture(name, items, pairs)
        records[name] = captured.record
        buffers.update(captured.buffers)
        flat.update(captured.tensors)
    own_files, own = own_manifest({n: o for n, o in items.items() if n not in records})
    renamed = {f: rank_file_name(f, rank) for f in own_files}
    own = dataclasses.replace(
        own,
        tensors={n: dataclasses.replace(r, file=renamed[r.file]) for n, r in own.tensors.items()},
    )
    own_files = {renamed[f]: tensors for f, tensors in own_files.items()}
    return LocalCapture(records, flat, own_files, own, buffers)


def _digest(t: torch.Tensor) -> str:
    t = t.detach()
    if isinstance(t, DTensor):
        t = t.to_local()
    t = t.to("cpu").contiguous()
    return f"{t.dtype}{tuple(t.shape)}{hash_bytes(tensor_bytes(t))}"


def lay_out(
    local: LocalCapture, rank: int, token: str | None, all_gather: Callable[[Json], list[Json]]
) -> RankCapture:
    """Decide this rank's shards with DCP's planner and lay out its files (collective)."""
    digests = {n: _digest(local.flat[n]) for n in sorted(local.buffers)}
    gathered = all_gather(digests)
    divergent = [n for n in digests if len({d[n] for d in gathered}) > 1]
    flat = {n: t for n, t in local.flat.items() if rank == 0 or n not in divergent}
    flat.update({variant_name(n, rank): local.flat[n] for n in divergent if rank > 0})
    shards = plan_writes(flat, rank, all_gather)
    shard_file = shard_file_name(rank, token)
    files: dict[str, dict[str, torch.Tensor]] = {}
    if shards:
        files[shard_file] = {chunk_key(s.name, s.offsets): s.data for s in shards}
    files.update(local.own_files)
    return RankCapture(files, shards, shard_file, local.sharded_items, local.own)


def capture_own(
    step: int,
    epoch: int | None,
    metrics: dict[str, float | int],
    created_at: str,
    versions: dict[str, str],
    token: str | None,
) -> Callable[[dict[str, Any]], tuple[dict[str, dict[str, torch.Tensor]], Manifest]]:
    """What :func:`capture_rank` calls for the items a rank saves for itself."""

    def own(items: dict[str, Any]) -> tuple[dict[str, dict[str, torch.Tensor]], Manifest]:
        param_names = module_param_names({})
        captured = {name: capture(name, obj, param_names) for name, obj in items.items()}
        return assemble_manifest(
            step,
            epoch,
            metrics,
            captured,
            created_at=created_at,
            versions=versions,
            file_token=token,
        )

    return own
