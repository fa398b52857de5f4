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
from ckpt.distributed.outcomes import ApplyAgreement, raise_agreed_sharing, run_agreed_apply
from ckpt.distributed.own_items import prepare_own_items, reseed_step, saved_rank
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
    still be as checked, on every rank of ``restore.group``. Then the items are
    loaded in order, through the one loop of every restore
    (:func:`~ckpt.restoring.pipeline.apply_steps`). In a group this is
    collective (every rank of the group calls it): the ranks agree on the
    recheck and their items, on each item as it is loaded, and on the end
    (:class:`~ckpt.distributed.outcomes.ApplyAgreement` counts the collectives
    of each path), so an item failing on one rank stops every rank after it.

    Raises:
        CorruptCheckpointError: A file changed since its checks, on this rank or
            (naming it) on another; nothing was changed on any rank (without a group).
        PartialRestoreError: An item's own code raised while it was loaded (in a
            group: on any rank, and every rank raises it alike); in a group, too,
            when a file changed since its checks (nothing applied on any rank).
    """
    if restore.group is None:
        return _apply_here(restore, where, None)
    agreement = ApplyAgreement(restore.group, where)
    return run_agreed_apply(agreement, partial(_apply_here, restore, where, agreement))


def _apply_here(
    restore: ShardedRestore, where: str, agreement: ApplyAgreement | None
) -> tuple[Keys, Keys]:
    """Recheck everywhere, then load this rank's steps (each agreed, when every rank's match)."""
    try:
        steps = _steps(restore)
        names = [step.name for step in steps]
        if agreement is not None:
            agreement.names = names
        agreed = _recheck_everywhere(restore, names)
        agree = None
        if agreement is not None and agreed:
            agreement.agreed = True
            agree = agreement.step
        missing, unexpected = apply_steps(steps, where, agree)
    finally:
        restore.close()
    if agreement is not None:
        agreement.applied = names
    if restore.own is not None:
        restore.own.finish()
    return missing, unexpected


def _steps(restore: ShardedRestore) -> list[ApplyStep]:
    """The items to load, in order: modules, optimizers, own items, then reseeded streams."""
    steps = [ApplyStep(name, partial(_load_sharded, restore, name)) for name in restore.sharded]
    if restore.own is not None:
        steps += restore.own.steps()
    if restore.reseed is not None:
        steps.append(reseed_step(restore.reseed))
    return steps


def _recheck_everywhere(restore: ShardedRestore, names: list[str]) -> bool:
    """Raise on every rank unless every rank's files are still as checked.

    In a group, one collective: each rank's recheck outcome travels with its step
    ``names``.

    Returns:
        Whether every rank of the group applies the same steps (``False`` without one).
    """
    error: Exception | None = None
    try:
        restore.recheck()
    except Exception as e:
        error = e
    if restore.group is None:
        if error is not None:
            raise error
        return False
    sent = raise_agreed_sharing(restore.group, error, "checking the checked files again", names)
    if all(theirs == names for theirs in sent):
        return True
    logger.warning(
        "the ranks load different items (%s): an item failing on one rank does not stop the others",
        "; ".join(f"rank {r}: {theirs}" for r, theirs in enumerate(sent)),
    )
    return False


def _load_sharded(restore: ShardedRestore, name: str) -> tuple[list[str], list[str]]:
    """Read a module's or optimizer's checked chunks into its live tensors, then load it."""
    state, saved_only = restore.sharded[name]
    if name in restore.reads:
        restore.reads[name].run()
    missing, unexpected = restore.kinds[name].apply(
        name, restore.items, restore.pairs, state, restore.strict
    )
    return missing, sorted({*unexpected, *saved_only})
