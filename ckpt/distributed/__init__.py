"""Checkpoints of training on several ranks: DDP, FSDP2 and DTensor state, saved together.

Inside an initialized process group, a :class:`~ckpt.CheckpointManager` is
collective: every rank constructs it and calls ``save``/``restore`` together.
See ``docs/distributed.md``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ckpt.errors import CheckpointError, IncompatibleCheckpointError
from ckpt.format import Manifest
from ckpt.tree import Json

if TYPE_CHECKING:
    from ckpt.kinds import RestoreOptions
    from ckpt.storage import Storage

__all__ = [
    "PreparedCollective",
    "agree_on_step",
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


def collective_save(storage: Any, group: Any) -> Any:
    """The :class:`~ckpt.distributed.saving.CollectiveSave` of a manager with a process group."""
    from ckpt.distributed.saving import CollectiveSave  # noqa: PLC0415 - imports DCP

    return CollectiveSave(storage, group)


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
    """Read and check a restore on this rank; every rank agrees before anything changes.

    Raises:
        IncompatibleCheckpointError: A process group restores a single-process checkpoint.
        CheckpointError: This rank's failure, or another rank's (named).
    """
    from ckpt.distributed.restoring import prepare_everywhere  # noqa: PLC0415

    if manifest.sharded is None:
        raise IncompatibleCheckpointError(
            f"step {manifest.step} was saved by one process without a process group; restore "
            "it in one process (CheckpointManager(..., process_group=False)) and save it again "
            "from the process group"
        )
    restore = prepare_everywhere(
        storage, step_name, manifest, items, options, rng=rng, verify=verify, group=group
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
    from ckpt.distributed.restoring import read_full  # noqa: PLC0415

    return read_full(storage, step_name, manifest, map_location, verify)


def verify_sharded(storage: Storage, step_name: str, manifest: Manifest) -> int:
    """Check every file and shard of a checkpoint saved by several ranks; return the bytes read."""
    from ckpt.distributed.restoring import check_own_items  # noqa: PLC0415
    from ckpt.io import verify_sharded_files  # noqa: PLC0415

    check_own_items(manifest)
    return verify_sharded_files(storage, step_name, manifest)


def agree_on_step(group: Any, step: int | None, latest: Callable[[], int | None]) -> int | None:
    """The step every rank restores: ``step`` if every rank asks for the same one, else refused.

    With ``step`` ``None`` on every rank, rank 0's ``latest()`` (its newest committed step).

    Raises:
        ValueError: The ranks asked for different steps (on every rank).
    """
    asked = group.all_gather_json(step)
    if any(a != asked[0] for a in asked):
        raise ValueError(
            "every rank must restore the same step: they asked for "
            + ", ".join(f"rank {r}: {a}" for r, a in enumerate(asked))
        )
    if step is not None:
        return step
    found: Json = None
    if group.is_coordinator:
        try:
            found = {"step": latest()}
        except CheckpointError as e:  # every rank raises it, none waits for a step
            found = {"error": f"{type(e).__name__}: {e}"}
    decided = group.broadcast_json(found)
    assert isinstance(decided, dict)
    if "error" in decided:
        raise CheckpointError(f"rank 0 could not find the latest step: {decided['error']}")
    agreed = decided["step"]
    assert agreed is None or isinstance(agreed, int)
    return agreed
