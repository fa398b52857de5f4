"""A restore's two halves as the manager runs them: prepare one step (read, check), then apply.

Single-process checkpoints (format versions 1 and 2) go through
:mod:`ckpt.restoring.pipeline`; checkpoints saved by several ranks, and any restore
inside a process group, through :mod:`ckpt.distributed`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, TypeAlias

from ckpt.distributed import PreparedCollective, apply_sharded_restore, prepare_collective
from ckpt.errors import CheckpointNotFoundError
from ckpt.format import MANIFEST_NAME, Manifest
from ckpt.reading.reader import located
from ckpt.restoring.pipeline import PreparedRestore, apply_restore, prepare_restore
from ckpt.state.kinds import RestoreOptions
from ckpt.state.rng import RNG_ITEM, RandomStreams
from ckpt.storage import Storage

__all__ = ["Prepared", "apply_prepared", "prepare_step"]

logger = logging.getLogger(__name__)

Prepared: TypeAlias = "PreparedRestore | PreparedCollective"


def prepare_step(
    storage: Storage,
    step_name: str,
    manifest: Manifest,
    items: dict[str, Any],
    options: RestoreOptions,
    *,
    rng: bool,
    verify: bool,
    group: Any,
    read: Callable[..., Any],
) -> Prepared:
    """Check a checkpoint against the live items and read its tensors; mutate nothing.

    ``read`` is :func:`ckpt.io.load_tensors` (or a stand-in with its signature).

    Raises:
        CheckpointNotFoundError: An item is not in the checkpoint.
        IncompatibleCheckpointError: An item does not fit its live object.
        CorruptCheckpointError: Anything in the checkpoint is malformed.
    """
    manifest_path = storage.path(step_name, MANIFEST_NAME)
    if manifest.sharded is not None or group is not None:
        with located(manifest_path):
            return prepare_collective(
                storage, step_name, manifest, items, options, rng, verify, group
            )
    if rng and RNG_ITEM in manifest.items:
        items[RNG_ITEM] = RandomStreams()
    elif rng:
        logger.warning(
            "checkpoint step %d holds no random state; the random streams are not restored",
            manifest.step,
        )
    for name in items:
        if name not in manifest.items:
            raise CheckpointNotFoundError(
                f"item {name!r} is not in checkpoint step {manifest.step} "
                f"(it holds {sorted(manifest.items)})",
                path=manifest_path,
                key=name,
            )
    with located(manifest_path):
        return prepare_restore(
            storage, step_name, manifest, items, options, verify=verify, read=read
        )


def apply_prepared(
    prepared: Prepared, items: dict[str, Any], strict: bool, where: str
) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """Load what :func:`prepare_step` read into the live items; warn about non-strict keys.

    Returns:
        Missing and unexpected keys of non-strict module loads, by item.

    Raises:
        PartialRestoreError: An item's own code raised while it was loaded.
    """
    if isinstance(prepared, PreparedRestore):
        missing, unexpected = apply_restore(prepared, where)
    else:
        missing, unexpected = apply_sharded_restore(prepared.restore, items, strict, where)
    for name in missing.keys() | unexpected.keys():
        logger.warning(
            "restored %r non-strictly: missing keys %s, unexpected keys %s",
            name,
            missing.get(name, []),
            unexpected.get(name, []),
        )
    return missing, unexpected
