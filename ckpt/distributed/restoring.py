"""Restoring a checkpoint saved by several ranks (format v3), on any number of ranks.

Each rank (or the one process, with no process group) maps the saved chunks
onto its part of every live tensor with DCP's load planner, reads only those
chunks into fresh tensors and checks them, and validates its own items (random
streams, schedulers, samplers, ...) as a single-process restore does. Only when
every rank has succeeded do the ranks load anything: modules and optimizers
through DCP's ``set_*_state_dict``, then their own items. A rank that did not
exist when the checkpoint was saved takes rank 0's own items, and its random
streams are seeded from the step and its rank, with a warning.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from ckpt.distributed.capture import register_sharded, variant_name
from ckpt.distributed.group import RankGroup
from ckpt.distributed.planning import ChunkRead, local_shards, plan_reads
from ckpt.distributed.states import (
    apply_sharded,
    optimizer_param_names,
    pair_optimizers,
    sharded_state,
)
from ckpt.errors import CheckpointError, CheckpointNotFoundError, IncompatibleCheckpointError
from ckpt.format import GlobalTensorRecord, ItemRecord, Manifest, ShardedSection, rank_manifest
from ckpt.io import load_tensors, read_chunk
from ckpt.items import build_state
from ckpt.kinds import RestoreOptions
from ckpt.kinds.optimizer import check_optimizer_numbers
from ckpt.locations import MapLocation, mapped_device, place
from ckpt.optim import check_group_types, class_name
from ckpt.restoring import PreparedRestore, apply_restore, check_items, prepare_restore
from ckpt.rng import RNG_ITEM, RandomStreams
from ckpt.storage import Storage
from ckpt.tree import Json, tensor_refs, unflatten

__all__ = [
    "ShardedRestore",
    "apply_sharded_restore",
    "prepare_everywhere",
    "prepare_sharded_restore",
    "check_own_items",
    "read_full",
]

logger = logging.getLogger(__name__)


@dataclass
class ShardedRestore:
    """A v3 restore on one rank that has read and checked everything; nothing changed yet."""

    sharded: dict[str, Any]
    """``{item: (state, saved keys the live module lacks)}`` for modules and optimizers,
    the states holding fresh tensors."""
    pairs: dict[str, str]
    own: PreparedRestore | None
    reseed: int | None = None
    """Seed for this rank's random streams when the checkpoint has none for it."""
    nbytes: int = 0
    """Bytes of tensor data read."""


def _read_into(
    storage: Storage,
    directory: str,
    records: Mapping[str, GlobalTensorRecord],
    dest: Mapping[str, torch.Tensor],
    verify: bool,
) -> int:
    """Read the saved chunks overlapping this rank's part of each ``dest`` tensor into it.

    Returns:
        The bytes read.
    """
    reads = plan_reads(records, dest)
    by_chunk: dict[tuple[str, int], list[ChunkRead]] = {}
    for r in reads:
        by_chunk.setdefault((r.name, r.chunk), []).append(r)
    nbytes = 0
    for (name, index), boxes in by_chunk.items():
        record = records[name]
        saved = record.chunks[index]
        target = local_shards(dest[name])
        nbytes += record.chunk_nbytes(saved)
        direct = _whole_chunk_view(target, boxes, saved.sizes, record.dtype)
        if direct is not None:  # the usual case (same sharding): no second copy
            read_chunk(
                storage, directory, record, saved, verify=verify, out=direct, name=name, index=index
            )
            continue
        chunk = read_chunk(storage, directory, record, saved, verify=verify, name=name, index=index)
        for box in boxes:
            source = chunk
            local = target
            for dim, (src, dst, length) in enumerate(
                zip(box.source_offsets, box.dest_offsets, box.lengths, strict=True)
            ):
                source = source.narrow(dim, src, length)
                local = local.narrow(dim, dst, length)
            local.copy_(source)
    return nbytes


def _whole_chunk_view(
    target: torch.Tensor, boxes: list[ChunkRead], sizes: tuple[int, ...], dtype: torch.dtype
) -> torch.Tensor | None:
    """The part of ``target`` one whole chunk fills, when it can be read into directly."""
    if len(boxes) != 1 or target.device.type != "cpu" or target.dtype != dtype:
        return None
    box = boxes[0]
    if any(box.source_offsets) or box.lengths != tuple(sizes):
        return None
    view = target
    for dim, (start, length) in enumerate(zip(box.dest_offsets, box.lengths, strict=True)):
        view = view.narrow(dim, start, length)
    return view if view.is_contiguous() else None


def _check_names(item: str, saved: set[str], live: set[str], strict: bool) -> None:
    if saved == live or not strict:
        return
    missing, unexpected = sorted(live - saved), sorted(saved - live)
    raise IncompatibleCheckpointError(
        f"item {item!r} does not match the checkpoint: missing {missing[:10]}, "
        f"unexpected {unexpected[:10]}",
        key=item,
    )


def prepare_sharded_restore(
    storage: Storage,
    step_name: str,
    manifest: Manifest,
    items: dict[str, Any],
    options: RestoreOptions,
    *,
    rng: bool,
    verify: bool,
    rank: int,
    world_size: int,
) -> ShardedRestore:
    """Read and check everything this rank restores from a v3 checkpoint; change nothing.

    Raises:
        CheckpointNotFoundError: An item is not in the checkpoint.
        IncompatibleCheckpointError: An item does not fit the live object.
        CorruptCheckpointError: A chunk fails its checksum or a file is malformed.
    """
    section = manifest.sharded
    assert section is not None
    sharded_live = {n: o for n, o in items.items() if n in section.items}
    register_sharded(sharded_live)
    pairs = pair_optimizers(sharded_live)
    restore = ShardedRestore({}, pairs, None)
    for name in sorted(sharded_live, key=lambda n: section.items[n].kind != "module"):
        restore.sharded[name], nbytes = _read_item(
            storage, step_name, section, name, items, pairs, options, verify, rank
        )
        restore.nbytes += nbytes
    own_index = rank if rank < section.world_size else 0
    view = rank_manifest(manifest, own_index)
    own_items = {n: o for n, o in items.items() if n not in section.items}
    for name in own_items:
        if name not in view.items:
            raise CheckpointNotFoundError(
                f"item {name!r} is not in checkpoint step {manifest.step}", key=name
            )
    if rng and RNG_ITEM in view.items:
        if own_index == rank:
            own_items[RNG_ITEM] = RandomStreams()
        else:
            restore.reseed = _seed_for(manifest.step, rank)
    if own_items:
        restore.own = prepare_restore(
            storage, step_name, view, own_items, options, verify=verify, read=load_tensors
        )
    if world_size != section.world_size:
        logger.warning(
            "restoring step %d saved by %d ranks on %d ranks%s",
            manifest.step,
            section.world_size,
            world_size,
            f"; rank {rank} did not exist then: its random streams are seeded from the step "
            "and its rank"
            if restore.reseed is not None
            else "",
        )
    return restore


def _read_item(
    storage: Storage,
    step_name: str,
    section: ShardedSection,
    name: str,
    items: Mapping[str, Any],
    pairs: Mapping[str, str],
    options: RestoreOptions,
    verify: bool,
    rank: int,
) -> tuple[Any, int]:
    """Read a module or optimizer item's saved state into fresh tensors placed like the live."""
    record = section.items[name]
    obj = items[name]
    live_kind = "module" if isinstance(obj, torch.nn.Module) else "optimizer"
    if record.kind != live_kind:
        raise IncompatibleCheckpointError(
            f"item {name!r} was saved as a {record.kind}, not a {live_kind}", key=name
        )
    if isinstance(obj, torch.nn.Module):
        tree, dest, unexpected = _module_destinations(name, record, items, pairs, options)
        own = {n: variant_name(n, rank) for n in dest if variant_name(n, rank) in section.tensors}
    else:
        dest = _optimizer_destinations(name, obj, items[pairs[name]], record, section, options)
        tree, own, unexpected = record.state, {}, []
    records = {n: section.tensors[own.get(n, n)] for n in dest}
    nbytes = _read_into(storage, step_name, records, dest, verify)
    return (unflatten(tree, dest), unexpected), nbytes


def _module_destinations(
    name: str,
    record: ItemRecord,
    items: Mapping[str, Any],
    pairs: Mapping[str, str],
    options: RestoreOptions,
) -> tuple[Json, dict[str, torch.Tensor], list[str]]:
    """Match a module's saved keys to its live ones; a fresh tensor for each saved tensor read.

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
                dest[stored] = torch.empty_like(target)
    return kept, dest, sorted(set(tree) - set(live))


def _optimizer_destinations(
    name: str,
    optimizer: torch.optim.Optimizer,
    model: torch.nn.Module,
    record: ItemRecord,
    section: ShardedSection,
    options: RestoreOptions,
) -> dict[str, torch.Tensor]:
    """A fresh tensor for each saved optimizer tensor, sharded like its parameter if shaped so."""
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
            f"in the checkpoint but {len(optimizer.param_groups)} live",
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
    for path, tensor_name in tensor_refs(state):
        saved = section.tensors[tensor_name]
        param = params.get(str(path[1])) if len(path) >= 3 and path[0] == "state" else None
        if param is None:
            raise IncompatibleCheckpointError(
                f"item {name!r}: state for an unknown parameter at {list(path)}", key=name
            )
        if tuple(saved.shape) == tuple(param.shape) and param.dim() > 0:
            dest[tensor_name] = torch.empty_like(param, dtype=saved.dtype)
        else:
            dest[tensor_name] = torch.empty(saved.shape, dtype=saved.dtype)
    return dest


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def apply_sharded_restore(
    restore: ShardedRestore, items: Mapping[str, Any], strict: bool, where: str
) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """Load everything read: modules, optimizers, then this rank's own items."""
    missing: dict[str, list[str]] = {}
    unexpected: dict[str, list[str]] = {}
    for name, (state, saved_only) in restore.sharded.items():
        m, u = apply_sharded(name, items, restore.pairs, state, strict)
        u = sorted({*u, *saved_only})
        if m:
            missing[name] = m
        if u:
            unexpected[name] = u
    if restore.own is not None:
        own_missing, own_unexpected = apply_restore(restore.own, where)
        missing.update(own_missing)
        unexpected.update(own_unexpected)
    if restore.reseed is not None:
        _seed_all(restore.reseed)
    return missing, unexpected


def _seed_for(step: int, rank: int) -> int:
    return (step * 1_000_003 + rank * 7_919 + 0x5EED) % (2**63)


def _seed_all(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy  # noqa: PLC0415
    except ImportError:
        return
    numpy.random.seed(seed % 2**32)


def read_full(
    storage: Storage, step_name: str, manifest: Manifest, map_location: MapLocation, verify: bool
) -> dict[str, Any]:
    """Every item of a v3 checkpoint as plain state, sharded tensors consolidated in full.

    Modules come back keyed by parameter name; optimizers in torch's
    index-packed form, parameters numbered as their groups list them; the
    items each rank saved for itself as rank 0 saved them. Memory: the result
    plus one chunk.
    """
    section = manifest.sharded
    assert section is not None
    out: dict[str, Any] = {}
    for name, record in section.items.items():
        full = {}
        for tensor_name in dict.fromkeys(n for _, n in tensor_refs(record.state)):
            r = section.tensors[tensor_name]
            t = torch.empty(r.shape, dtype=r.dtype)
            _read_into(storage, step_name, {tensor_name: r}, {tensor_name: t}, verify)
            device = mapped_device(map_location, "cpu")
            full[tensor_name] = place(t, device, None, map_location=map_location, key=tensor_name)
        state = unflatten(record.state, full)
        out[name] = _index_packed(state) if record.kind == "optimizer" else state
    view = rank_manifest(manifest, 0)
    names = list(dict.fromkeys(n for r in view.items.values() for _, n in tensor_refs(r.state)))
    loaded, _ = load_tensors(storage, step_name, view, names, {}, map_location, verify=verify)
    for name, own in view.items.items():
        out[name] = build_state(own, loaded, name)
    return out


def check_own_items(manifest: Manifest) -> None:
    """Check every rank's own items without live objects (what ``verify()`` runs)."""
    section = manifest.sharded
    assert section is not None
    for rank in range(section.world_size):
        check_items(rank_manifest(manifest, rank))


def _index_packed(state: dict[str, Any]) -> dict[str, Any]:
    """Turn an optimizer state keyed by parameter name into torch's index-packed form."""
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


def agree_or_raise(group: RankGroup | None, error: BaseException | None, doing: str) -> None:
    """Raise on every rank when any rank failed (its own error where it failed)."""
    if group is None:
        if error is not None:
            raise error
        return
    failed = group.failures(error)
    if error is not None:
        raise error
    if failed:
        where = "; ".join(f"rank {r}: {m}" for r, m in failed)
        raise CheckpointError(f"{doing} failed on another rank ({where}); nothing was changed")


def prepare_everywhere(
    storage: Storage,
    step_name: str,
    manifest: Manifest,
    items: dict[str, Any],
    options: RestoreOptions,
    *,
    rng: bool,
    verify: bool,
    group: RankGroup | None,
) -> ShardedRestore:
    """Prepare a v3 restore on this rank; raise on every rank unless every rank succeeded."""
    rank, world_size = (0, 1) if group is None else (group.rank, group.world_size)
    if group is not None:
        asked = group.all_gather_json(sorted(items))
        if any(a != asked[0] for a in asked):
            raise ValueError(
                "every rank must restore the same items: "
                + "; ".join(f"rank {r} restores {a}" for r, a in enumerate(asked))
            )
    prepared: ShardedRestore | None = None
    error: BaseException | None = None
    try:
        prepared = prepare_sharded_restore(
            storage,
            step_name,
            manifest,
            items,
            options,
            rng=rng,
            verify=verify,
            rank=rank,
            world_size=world_size,
        )
    except Exception as e:
        error = e
    agree_or_raise(group, error, f"restoring step {manifest.step}")
    assert prepared is not None
    return prepared
