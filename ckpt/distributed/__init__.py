"""Checkpoints of training on several ranks: DDP, FSDP2 and DTensor state, saved together.

Inside an initialized process group, a :class:`~ckpt.CheckpointManager` is
collective: every rank constructs it and calls ``save``/``restore`` together.
See ``docs/distributed.md``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ckpt.format import Manifest

if TYPE_CHECKING:
    from ckpt.state.kinds import RestoreOptions
    from ckpt.storage import Storage

__all__ = [
    "PreparedCollective",
    "apply_sharded_restore",
    "collective_save",
    "open_rank_group",
    "prepare_collective",
    "read_consolidated",
    "verify_sharded",
]

# DCP is imported only when a checkpoint saved by several ranks, or a process group, is in use.


def open_rank_group(process_group: Any, timeout: float) -> Any:
    """The ranks a manager saves with, or ``None`` for a manager private to this process.

    Args:
        process_group: ``None`` for the default group when one is initialized;
            a ``ProcessGroup``; or ``False`` for a manager of this process alone.
        timeout: Seconds a collective of ckpt's may wait for the other ranks.
    """
    if process_group is False:
        return None
    import torch.distributed as dist  # noqa: PLC0415 - only when a group may be in use

    if process_group is None and not (dist.is_available() and dist.is_initialized()):
        return None
    from ckpt.distributed.group import RankGroup  # noqa: PLC0415

    return RankGroup(process_group, timeout=timeout)


def collective_save(
    storage: Any, group: Any, node_local: bool = False, blob_index: Any = None
) -> Any:
    """The :class:`~ckpt.distributed.saving.CollectiveSave` of a manager with a process group.

    Args:
        storage: The root.
        group: The manager's :class:`~ckpt.distributed.group.RankGroup`.
        node_local: Each rank's root is its own (see ``docs/tiers.md``).
        blob_index: For incremental saves (format version 5): the writer's
            ``blob_index``, the blobs the root holds.

    Raises:
        ValueError: ``incremental=True`` with node-local roots; ``group`` is closed.
    """
    if blob_index is not None and node_local:
        group.close()  # the manager is not built: its group goes with it
        raise ValueError(
            "incremental=True with a node-local directory ('{rank}' in the directory, with "
            "tiers) in a process group is not supported: a rank's own root cannot hold the "
            "blobs the other ranks write; use a directory every rank shares, or "
            "incremental=False"
        )
    from ckpt.distributed.saving import CollectiveSave  # noqa: PLC0415 - imports DCP

    collective = CollectiveSave(storage, group, node_local=node_local)
    collective.blob_index = blob_index
    return collective


@dataclass
class PreparedCollective:
    """A restore of a checkpoint saved by several ranks that every rank has read and checked."""

    step_name: str
    manifest: Manifest
    restore: Any
    """The :class:`~ckpt.distributed.restoring.ShardedRestore`."""

    @property
    def nbytes(self) -> int:
        """The bytes of tensor data read on this rank."""
        return int(self.restore.nbytes)


def prepare_collective(
    storage: Storage,
    step_name: str,
    manifest: Manifest,
    items: dict[str, Any],
    options: RestoreOptions,
    rng: bool,
    verify: bool,
    group: Any,
) -> PreparedCollective:
    """Read and check this rank's part of a restore; change nothing, run no collective.

    Any checkpoint restores this way: one saved by several ranks, or by one process
    (seen as a group of one). The caller agrees on the outcome with the other
    ranks before anything is applied (see :mod:`ckpt.distributed.outcomes`).

    Raises:
        CheckpointNotFoundError: An item is not in the checkpoint.
        IncompatibleCheckpointError: An item does not fit the live object.
        CorruptCheckpointError: A chunk or file fails its checks.
    """
    from ckpt.distributed.own_items import saved_rank  # noqa: PLC0415
    from ckpt.distributed.restoring import prepare_on_rank  # noqa: PLC0415
    from ckpt.state.kinds.sharded_live import check_live_items  # noqa: PLC0415

    check_live_items(manifest, items, assign=options.assign)
    rank, world_size = (0, 1) if group is None else (saved_rank(manifest, group), group.world_size)
    restore = prepare_on_rank(
        storage,
        step_name,
        manifest,
        items,
        options,
        rng=rng,
        verify=verify,
        rank=rank,
        world_size=world_size,
        group=group,
    )
    return PreparedCollective(step_name, manifest, restore)


def apply_sharded_restore(
    restore: Any, items: dict[str, Any], strict: bool, where: str
) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """Load what :func:`prepare_collective` read (see :mod:`ckpt.distributed.restoring`)."""
    from ckpt.distributed import restoring  # noqa: PLC0415

    return restoring.apply_sharded_restore(restore, items, strict, where)


def read_consolidated(
    storage: Storage, step_name: str, manifest: Manifest, map_location: Any, verify: bool
) -> dict[str, Any]:
    """Every item of a checkpoint saved by several ranks, with full tensors (see ``read``)."""
    from ckpt.distributed.consolidated import read_full  # noqa: PLC0415

    return read_full(storage, step_name, manifest, map_location, verify)


def verify_sharded(storage: Storage, step_name: str, manifest: Manifest) -> int:
    """Check every file and shard of a checkpoint saved by several ranks; return the bytes read."""
    from ckpt.distributed.own_items import check_own_items  # noqa: PLC0415
    from ckpt.io import verify_sharded_files  # noqa: PLC0415

    check_own_items(manifest)
    return verify_sharded_files(storage, step_name, manifest)
