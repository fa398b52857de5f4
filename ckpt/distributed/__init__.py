"""Checkpoints of training on several ranks: DDP, FSDP2 and DTensor state, saved together.

Inside an initialized process group, a :class:`~ckpt.CheckpointManager` is
collective: every rank constructs it and calls ``save``/``restore`` together.
See ``docs/distributed.md``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ckpt.format import Manifest
    from ckpt.restoring.pipeline import Prepared, RestoreRequest
    from ckpt.storage import Storage

__all__ = [
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


def prepare_collective(
    storage: Storage,
    step_name: str,
    manifest: Manifest,
    items: dict[str, Any],
    request: RestoreRequest,
) -> Prepared:
    """Read and check this rank's part of a restore; change nothing, run no collective.

    See :func:`ckpt.distributed.restoring.prepare_in_group` (imported here on
    first use: it imports DCP).
    """
    from ckpt.distributed.restoring import prepare_in_group  # noqa: PLC0415 - imports DCP

    return prepare_in_group(storage, step_name, manifest, items, request)


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
