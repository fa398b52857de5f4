"""A rank's own items in a restore: the items each rank saved for itself, not sharded.

Random streams, schedulers, samplers and the like are saved by every rank in
its own part of a v3 checkpoint and restored as a single-process restore
restores them (:mod:`ckpt.restoring.pipeline`), after the rank's modules and
optimizers. A rank that did not exist when the checkpoint was saved takes rank
0's own items, and its random streams are seeded from the step and its rank.
"""

from __future__ import annotations

import random
from functools import partial
from typing import Any

import torch
import torch.distributed as dist

from ckpt.format import Manifest, rank_manifest
from ckpt.restoring.pipeline import (
    ApplyStep,
    PreparedRestore,
    RestoreRequest,
    check_items,
    prepare_own,
)
from ckpt.state.rng import RNG_ITEM
from ckpt.storage import Storage

__all__ = [
    "check_own_items",
    "prepare_own_items",
    "reseed_step",
    "saved_rank",
    "seed_streams",
]


def prepare_own_items(
    storage: Storage,
    step_name: str,
    manifest: Manifest,
    items: dict[str, Any],
    request: RestoreRequest,
    *,
    rank: int,
) -> tuple[PreparedRestore, int | None]:
    """Check this rank's own items (as the rank saved them, or as rank 0 did); change nothing.

    They are prepared as a one-process restore prepares its items
    (:func:`~ckpt.restoring.pipeline.prepare_own`), from the rank's own part of
    the checkpoint (rank 0's for a rank that did not exist at save time).

    Returns:
        The prepared restore of the rank's own items, and the seed for its
        random streams when the checkpoint has none for this rank (else ``None``).

    Raises:
        CheckpointNotFoundError: An item is not in the checkpoint.
    """
    section = manifest.sharded
    assert section is not None
    own_index = rank if rank < section.world_size else 0
    view = rank_manifest(manifest, own_index)
    own_items = {n: o for n, o in items.items() if n not in section.items}
    reseed = None
    if request.rng and RNG_ITEM in view.items and own_index != rank:
        reseed = _seed_for(manifest.step, rank)
    own = prepare_own(
        storage, step_name, view, own_items, request, streams=reseed is None, warn=rank == 0
    )
    return own, reseed


def check_own_items(manifest: Manifest) -> None:
    """Check every rank's own items without live objects (what ``verify()`` runs)."""
    section = manifest.sharded
    assert section is not None
    for rank in range(section.world_size):
        check_items(rank_manifest(manifest, rank))


def _seed_for(step: int, rank: int) -> int:
    return (step * 1_000_003 + rank * 7_919 + 0x5EED) % (2**63)


def seed_streams(seed: int) -> None:
    """Seed Python's, torch's and (if installed) NumPy's random streams with ``seed``."""
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy  # noqa: PLC0415
    except ImportError:
        return
    numpy.random.seed(seed % 2**32)


def reseed_step(seed: int) -> ApplyStep:
    """The step that seeds this rank's random streams afresh, named as restored ones are.

    Last, where a rank restoring its saved streams loads them, so every rank of a
    group applies the same steps (see :class:`ckpt.distributed.outcomes.ApplyAgreement`).
    """
    return ApplyStep(RNG_ITEM, partial(_reseed, seed))


def _reseed(seed: int) -> tuple[list[str], list[str]]:
    seed_streams(seed)
    return [], []


def saved_rank(manifest: Manifest, group: Any) -> int:
    """Which rank's own state (items, random streams, buffers) this process restores.

    Its rank in ``group``, except for a group of some of the ranks restoring a
    checkpoint saved by every rank of a job of this size: then this process's
    global rank, so each rank takes what it saved itself, not what the rank at
    its position in the group did. Without a group (a manager private to this
    process, ``process_group=False``), its global rank in a job, else 0.
    """
    initialized = dist.is_available() and dist.is_initialized()
    if group is None:
        return int(dist.get_rank()) if initialized else 0
    saved = 1 if manifest.sharded is None else manifest.sharded.world_size
    if group.world_size < saved and initialized and saved == dist.get_world_size():
        return int(dist.get_rank())
    return int(group.rank)
