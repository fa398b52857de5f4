"""Committing a checkpoint and cleaning up after crashed or superseded ones.

The I/O side of a save, given a :class:`~ckpt.storage.Storage`: write the files
and commit them (by an atomic rename on local disk, by a manifest created only
if absent on object stores), delete checkpoints retention dropped, and remove
what crashed writers left behind. Nothing here decides *what* to save or keep.
"""

from __future__ import annotations

import logging
import os
import re
import socket

import torch

from ckpt.errors import CheckpointError, CheckpointExistsError, CheckpointWriteError
from ckpt.format import (
    MANIFEST_NAME,
    Manifest,
    is_tensor_file_name,
    parse_step_dir_name,
    parse_temp_dir_name,
    safe_host_name,
    step_dir_name,
    temp_dir_name,
)
from ckpt.io import read_manifest, write_checkpoint_files
from ckpt.storage import Storage

__all__ = [
    "STALE_TEMP_SECONDS",
    "commit_checkpoint",
    "delete_checkpoint",
    "pid_alive",
    "remove_abandoned_temps",
    "remove_abandoned_uploads",
    "writer_is_gone",
]

logger = logging.getLogger(__name__)

STALE_TEMP_SECONDS = 3600.0
"""Leftovers untouched for this long are abandoned and may be removed."""


def pid_alive(pid: int) -> bool:
    """Whether a process with this id exists on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def writer_is_gone(holder: str) -> bool:
    """Whether a lock's holder ("host H pid P since T") was a process on this host now dead."""
    match = re.match(r"host (\S+) pid (\d+) ", holder)
    return bool(
        match and match.group(1) == socket.gethostname() and not pid_alive(int(match.group(2)))
    )


def commit_checkpoint(
    storage: Storage,
    step: int,
    files: dict[str, dict[str, torch.Tensor]],
    manifest: Manifest,
    *,
    token: str,
    overwrite: bool,
) -> Manifest:
    """Write a checkpoint's files and commit them: by rename locally, else by the manifest.

    Args:
        storage: The checkpoint root.
        step: The step saved.
        files: ``{file name: {tensor name: tensor}}``; on object stores the names
            carry ``token``.
        manifest: The manifest to complete and write last.
        token: 8 hex digits unique to this attempt.
        overwrite: Replace an existing checkpoint of ``step``.

    Returns:
        The manifest as written.

    Raises:
        CheckpointExistsError: Another writer committed ``step`` first.
        CheckpointWriteError: Writing failed; this attempt's files are removed.
    """
    step_name = step_dir_name(step)
    renames = storage.atomic_rename
    replaced = False
    if renames:
        remove_abandoned_temps(storage)
        temp = temp_dir_name(step, socket.gethostname(), os.getpid(), token)
    else:
        temp = step_name
        replaced = overwrite and storage.exists(step_name, MANIFEST_NAME)
    try:
        if renames:
            storage.makedirs(temp)
            manifest = write_checkpoint_files(storage, temp, files, manifest)
            storage.commit_dir(temp, step_name, replace=overwrite)
        else:
            # No rename here: the files get names unique to this attempt, and the
            # manifest, created only if absent (or replaced in one PUT), commits them.
            manifest = write_checkpoint_files(
                storage, step_name, files, manifest, replace_manifest=overwrite
            )
    except BaseException as e:
        if renames:
            _remove_quietly(storage, temp, tree=True)
        else:
            for file_name in files:
                _remove_quietly(storage, step_name, file_name)
        if isinstance(e, FileExistsError) and not isinstance(e, CheckpointError):
            raise CheckpointExistsError(
                f"step {step} was committed by another writer meanwhile",
                path=storage.url_of(step_name),
            ) from e
        if isinstance(e, OSError) and not isinstance(e, CheckpointError):
            raise CheckpointWriteError(
                f"could not save step {step}: {e.strerror or e}; the partial checkpoint "
                "was removed and earlier checkpoints are intact",
                path=e.filename if isinstance(e.filename, str) else storage.url_of(temp),
                errno=e.errno,
            ) from e
        raise
    if replaced:
        _remove_unreferenced(storage, step_name, manifest, grace=0.0)
    return manifest


def delete_checkpoint(storage: Storage, step: int, reason: str) -> None:
    """Delete a committed checkpoint, manifest first; a failure is logged, never raised."""
    name = step_dir_name(step)
    try:
        storage.remove_file(name, MANIFEST_NAME)  # the step stops being listed at once
        storage.remove_tree(name)
    except Exception as e:
        logger.warning("could not delete old checkpoint %s: %s", storage.url_of(name), e)
    else:
        logger.info("deleted old checkpoint %s (%s)", storage.url_of(name), reason)


def remove_abandoned_temps(storage: Storage) -> None:
    """Remove temporary directories left by crashed saves (dead writer here, or stale)."""
    here = safe_host_name(socket.gethostname())
    for name in storage.list_dir():
        temp = parse_temp_dir_name(name)
        if temp is None:
            continue
        dead = temp.host == here and not pid_alive(temp.pid)
        age = storage.age_seconds(name)
        if dead or (age is not None and age > STALE_TEMP_SECONDS):
            logger.info("removing abandoned temporary checkpoint %s", storage.url_of(name))
            _remove_quietly(storage, name, tree=True)


def remove_abandoned_uploads(storage: Storage) -> None:
    """On object stores: remove what saves that never committed left behind.

    That is unfinished multipart uploads below the root, and ckpt-named files that
    no manifest lists, once older than :data:`STALE_TEMP_SECONDS`, so that a save
    in flight elsewhere is left alone. Other names are never touched.
    """
    try:
        storage.abort_stale_uploads(STALE_TEMP_SECONDS)
    except Exception as e:
        logger.warning("could not clean up unfinished uploads: %s", e)
    for name in storage.list_dir():
        if parse_step_dir_name(name) is None:
            continue
        try:
            manifest = read_manifest(storage, name)
        except CheckpointError:
            manifest = None
        _remove_unreferenced(storage, name, manifest, grace=STALE_TEMP_SECONDS)


def _remove_unreferenced(
    storage: Storage, step_name: str, manifest: Manifest | None, *, grace: float
) -> None:
    """Remove ckpt tensor files in ``step_name`` that ``manifest`` does not list."""
    keep = set() if manifest is None else set(manifest.files)
    for file_name in storage.list_dir(step_name):
        if file_name in keep or not is_tensor_file_name(file_name):
            continue
        age = storage.age_seconds(step_name, file_name)
        if age is not None and age >= grace:
            logger.info("removing abandoned upload %s", storage.url_of(step_name, file_name))
            _remove_quietly(storage, step_name, file_name)


def _remove_quietly(storage: Storage, *parts: str, tree: bool = False) -> None:
    try:
        if tree:
            storage.remove_tree(*parts)
        else:
            storage.remove_file(*parts)
    except Exception as e:
        logger.warning("could not remove %s: %s", storage.url_of(*parts), e)
