"""Restoring any checkpoint on any number of ranks (or in one process without a group).

A checkpoint saved by several ranks (format v3) is read as saved; one saved by
one process (v1, v2) as one saved by a group of one
(:mod:`ckpt.distributed.one_process`). Each module and optimizer is validated
and built by its item kind (:mod:`ckpt.state.kinds.sharded`): each rank maps
the saved chunks onto its part of every live tensor with DCP's load planner
(:mod:`ckpt.distributed.reading`), checks the chunks it needs, holding their
files (reading into fresh tensors those without a live counterpart), and
validates its own items (random streams, schedulers, samplers, ...) as a
single-process restore does (:mod:`ckpt.distributed.own_items`). Only when
every rank has succeeded (the caller agrees, see
:mod:`ckpt.distributed.outcomes`) does a rank change anything: the ranks agree
that no file they checked changed since, then each reads the checked chunks
into its live tensors (not hashed again), loads modules through DCP's
``set_model_state_dict`` and optimizers through torch's ``load_state_dict``,
then its own items. A rank that did not exist when the checkpoint was saved
takes rank 0's own items, and its random streams are seeded from the step and
its rank, with a warning. (``read()`` of such a checkpoint, without a group:
:mod:`ckpt.distributed.consolidated`.)
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from ckpt.distributed.group import RankGroup
from ckpt.distributed.one_process import group_of_one
from ckpt.distributed.outcomes import raise_agreed
from ckpt.distributed.own_items import prepare_own_items, saved_rank, seed_streams
from ckpt.distributed.reading import ChunkSource, PlannedReads, SavedChunks, WholeTensors
from ckpt.distributed.states import pair_optimizers
from ckpt.errors import IncompatibleCheckpointError
from ckpt.format import Manifest, ShardedSection
from ckpt.restoring.pipeline import ApplyStep, Keys, PreparedRestore, RestoreRequest, apply_steps
from ckpt.state.kinds import RestoreOptions, sharded_kind_of
from ckpt.state.kinds.sharded import ShardedKind
from ckpt.state.kinds.sharded_live import check_live_items
from ckpt.state.kinds.sharded_module import register_sharded
from ckpt.storage import Storage

__all__ = [
    "ShardedRestore",
    "apply_sharded_restore",
    "prepare_in_group",
    "prepare_on_rank",
]

logger = logging.getLogger(__name__)


@dataclass
class ShardedRestore:
    """A restore on one rank that has read and checked everything; nothing changed yet.

    A :class:`~ckpt.restoring.pipeline.Prepared`: :meth:`apply` is a collective
    when :attr:`group` is set (every rank of the group applies together).
    """

    step_name: str
    manifest: Manifest
    """The checkpoint's manifest as saved (a version 1 or 2 one too)."""
    items: Mapping[str, Any]
    """The live items restored."""
    strict: bool
    sharded: dict[str, Any] = field(default_factory=dict)
    """``{item: (state, saved keys the live module lacks)}`` for modules and optimizers,
    the states holding fresh tensors."""
    pairs: dict[str, str] = field(default_factory=dict)
    own: PreparedRestore | None = None
    reseed: int | None = None
    """Seed for this rank's random streams when the checkpoint has none for it."""
    nbytes: int = 0
    """Bytes of tensor data read."""
    reads: dict[str, PlannedReads] = field(default_factory=dict)
    """Checked chunks still to read into live tensors, by item (run when it is applied)."""
    chunks: SavedChunks | None = None
    """The chunks' files, held from the checks to the reads into live tensors."""
    group: RankGroup | None = None
    """The ranks that agree, before any applies, that their files are still as checked."""
    kinds: dict[str, ShardedKind] = field(default_factory=dict)
    """The kind of each sharded item, which applies it."""

    def recheck(self) -> None:
        """Raise unless every file held or closed since the checks is still as checked.

        Raises:
            CorruptCheckpointError: A file was changed since its checks.
        """
        if self.chunks is not None:
            self.chunks.recheck()

    def apply(self, where: str) -> tuple[Keys, Keys]:
        """Load everything read (see :func:`apply_sharded_restore`)."""
        return apply_sharded_restore(self, where)

    def close(self) -> None:
        """Let go of the files held for the reads into live tensors."""
        if self.chunks is not None:
            self.chunks.close()
        if self.own is not None:
            self.own.close()


def prepare_in_group(
    storage: Storage,
    step_name: str,
    manifest: Manifest,
    items: dict[str, Any],
    request: RestoreRequest,
) -> ShardedRestore:
    """Read and check this rank's part of a restore; change nothing, run no collective.

    Any checkpoint restores this way: one saved by several ranks, or by one
    process (seen as a group of one), on the ranks of ``request.group`` (or
    in one process without a group). The caller agrees on the outcome with the
    other ranks before anything is applied (see :mod:`ckpt.distributed.outcomes`).

    Raises:
        CheckpointNotFoundError: An item is not in the checkpoint.
        IncompatibleCheckpointError: An item does not fit the live object.
        CorruptCheckpointError: A chunk or file fails its checks.
    """
    group = request.group
    world_size = 1 if group is None else group.world_size
    rank = saved_rank(manifest, group)
    return prepare_on_rank(
        storage, step_name, manifest, items, request, rank=rank, world_size=world_size
    )


def prepare_on_rank(
    storage: Storage,
    step_name: str,
    manifest: Manifest,
    items: dict[str, Any],
    request: RestoreRequest,
    *,
    rank: int,
    world_size: int,
) -> ShardedRestore:
    """Prepare a restore on this rank, from a checkpoint saved by any number of processes.

    Live objects a module or optimizer item cannot be restored into are refused
    first, before anything is read
    (:func:`~ckpt.state.kinds.sharded_live.check_live_items`). A
    single-process checkpoint (format 1 or 2) is read as one saved by a group
    of one (:mod:`ckpt.distributed.one_process`), its tensors whole
    (:class:`~ckpt.distributed.reading.WholeTensors`); a checkpoint saved by
    several ranks by chunks, whose files stay held until the restore is
    applied (or :meth:`ShardedRestore.close`). Runs no collective: the caller
    agrees on the outcome with the other ranks (and applying it on
    ``request.group`` runs one, see :func:`apply_sharded_restore`).

    Raises:
        CheckpointNotFoundError: An item is not in the checkpoint.
        IncompatibleCheckpointError: An item does not fit the live object.
        CorruptCheckpointError: A chunk fails its checksum or a file is malformed.
    """
    check_live_items(manifest, items, assign=request.options.assign)
    view = manifest if manifest.sharded is not None else group_of_one(manifest, items)
    section = view.sharded
    assert section is not None
    chunks: ChunkSource
    if manifest.sharded is None:
        chunks = WholeTensors(storage, step_name, manifest, verify=request.verify)
    else:
        chunks = SavedChunks(storage, step_name, verify=request.verify)
    held = chunks if isinstance(chunks, SavedChunks) else None
    restore = ShardedRestore(
        step_name, manifest, items, request.options.strict, chunks=held, group=request.group
    )
    try:
        _read_sharded(restore, chunks, section, items, request.options, rank)
        restore.own, restore.reseed = prepare_own_items(
            storage, step_name, view, items, request, rank=rank
        )
    except BaseException:
        restore.close()
        raise
    if world_size != section.world_size and (rank == 0 or restore.reseed is not None):
        logger.warning(  # once per job, and on each rank whose streams are seeded afresh
            "restoring step %d saved by %s on %s%s",
            manifest.step,
            _ranks(section.world_size),
            _ranks(world_size),
            f"; rank {rank} did not exist then: its random streams are seeded from the step "
            "and its rank"
            if restore.reseed is not None
            else "",
        )
    return restore


def _ranks(count: int) -> str:
    return "one process" if count == 1 else f"{count} ranks"


def _read_sharded(
    restore: ShardedRestore,
    chunks: ChunkSource,
    section: ShardedSection,
    items: dict[str, Any],
    options: RestoreOptions,
    rank: int,
) -> None:
    """Read and check the modules and optimizers (modules first) into ``restore``."""
    sharded_live = {n: o for n, o in items.items() if n in section.items}
    register_sharded(sharded_live)
    restore.pairs = pairs = pair_optimizers(sharded_live)
    for name in sorted(sharded_live, key=lambda n: section.items[n].kind != "module"):
        kind, state, nbytes, reads = _read_item(chunks, section, name, items, pairs, options, rank)
        restore.kinds[name] = kind
        restore.sharded[name] = state
        restore.nbytes += nbytes
        if reads is not None:
            restore.reads[name] = reads


def _read_item(
    source: ChunkSource,
    section: ShardedSection,
    name: str,
    items: Mapping[str, Any],
    pairs: Mapping[str, str],
    options: RestoreOptions,
    rank: int,
) -> tuple[ShardedKind, Any, int, PlannedReads | None]:
    """Validate a module or optimizer item and read its saved state, checked; change nothing.

    Its kind validates it and places every saved tensor. Chunks saved by
    several ranks that have a live counterpart (a module's tensors; an
    optimizer's state, when it has some of the same layout) are only checked
    now, and read into the live tensors when the restore is applied (the
    returned reads); everything else is read into fresh tensors placed like
    the live ones.
    """
    record = section.items[name]
    kind = sharded_kind_of(items[name])
    if kind is None or record.kind != kind.stored:
        live_kind = type(items[name]).__qualname__ if kind is None else kind.stored
        raise IncompatibleCheckpointError(
            f"item {name!r} was saved as a {record.kind}, not a {live_kind}", key=name
        )
    held = source if isinstance(source, SavedChunks) else None  # checked now, read at apply
    plan = kind.validate(name, record, items, pairs, options, section, held)
    state, nbytes, reads = kind.build(plan, source, section, rank)
    return kind, (state, plan.unexpected), nbytes, reads


def apply_sharded_restore(restore: ShardedRestore, where: str) -> tuple[Keys, Keys]:
    """Load everything read: modules, optimizers, then this rank's own items.

    First, before anything changes, every file the checks held or closed must
    still be as checked, on every rank of ``restore.group`` (a collective: every
    rank of the group calls this). Then the items are loaded in order, through
    the one loop of every restore (:func:`~ckpt.restoring.pipeline.apply_steps`).

    Raises:
        CorruptCheckpointError: A file changed since its checks, on this rank or
            (naming it) on another; nothing was changed on any rank.
        PartialRestoreError: An item's own code raised while it was loaded.
    """
    try:
        _recheck_everywhere(restore)
        steps = [ApplyStep(name, partial(_load_sharded, restore, name)) for name in restore.sharded]
        missing, unexpected = apply_steps(
            steps + ([] if restore.own is None else restore.own.steps()), where
        )
    finally:
        restore.close()
    if restore.own is not None:
        restore.own.finish()
    if restore.reseed is not None:
        seed_streams(restore.reseed)
    return missing, unexpected


def _recheck_everywhere(restore: ShardedRestore) -> None:
    """Raise on every rank of the group unless every rank's files are still as checked."""
    error: Exception | None = None
    try:
        restore.recheck()
    except Exception as e:
        error = e
    if restore.group is None:
        if error is not None:
            raise error
        return
    raise_agreed(restore.group, error, "checking the checked files again")


def _load_sharded(restore: ShardedRestore, name: str) -> tuple[list[str], list[str]]:
    """Read a module's or optimizer's checked chunks into its live tensors, then load it."""
    state, saved_only = restore.sharded[name]
    if name in restore.reads:
        restore.reads[name].run()
    missing, unexpected = restore.kinds[name].apply(
        name, restore.items, restore.pairs, state, restore.strict
    )
    return missing, sorted({*unexpected, *saved_only})
