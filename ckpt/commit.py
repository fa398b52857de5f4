"""Committing a checkpoint and cleaning up after crashed or superseded ones.

The I/O side of a save, given a :class:`~ckpt.storage.Storage`: write the files
and commit them the way the backend says (:class:`~ckpt.storage.CommitStrategy`:
an atomic rename on local disk, a manifest created only if absent on object
stores), delete checkpoints retention dropped, and remove what crashed writers
left behind. Nothing here decides *what* to save or keep.
"""

from __future__ import annotations

import logging
import os
import re
import socket
from collections.abc import Callable

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
from ckpt.storage import CommitStrategy, Storage
from ckpt.storage.local import NEW_FILE_PREFIX

__all__ = [
    "STALE_TEMP_SECONDS",
    "REPLACING",
    "commit_checkpoint",
    "delete_checkpoint",
    "file_token",
    "pid_alive",
    "remove_abandoned_temps",
    "remove_abandoned_uploads",
    "remove_leftovers",
    "writer_is_gone",
]

logger = logging.getLogger(__name__)

STALE_TEMP_SECONDS = 3600.0
"""Leftovers untouched for this long are abandoned and may be removed."""

REPLACING = ".ckpt-replacing"
"""Marker in a step directory whose files an overwrite is replacing (local disk without
``RENAME_EXCHANGE``); the next writer removes the files its manifest does not list."""


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


def file_token(storage: Storage, token: str, *, overwrite: bool) -> str | None:
    """The token a save's file names carry on ``storage`` (``None``: plain names)."""
    return token if storage.unique_file_names(overwrite) else None


def commit_checkpoint(
    storage: Storage,
    step: int,
    files: dict[str, dict[str, torch.Tensor]],
    manifest: Manifest,
    *,
    token: str,
    overwrite: bool,
    guard: Callable[[], None] | None = None,
) -> Manifest:
    """Write a checkpoint's files and commit them the way the backend commits.

    Args:
        storage: The checkpoint root.
        step: The step saved.
        files: ``{file name: {tensor name: tensor}}``; names carry ``token`` where
            :func:`file_token` says so.
        manifest: The manifest to complete and write last.
        token: 8 hex digits unique to this attempt.
        overwrite: Replace an existing checkpoint of ``step``.
        guard: Called just before the commit point; raising refuses the commit
            (the writer lock's check).

    Returns:
        The manifest as written.

    Raises:
        CheckpointExistsError: Another writer committed ``step`` first.
        CheckpointWriteError: Writing failed; this attempt's files are removed.
    """
    step_name = step_dir_name(step)
    strategy = storage.commit_strategy(step_name, overwrite)
    if strategy is CommitStrategy.RENAME_DIR:
        return _commit_by_rename(storage, step, files, manifest, token, overwrite, guard)
    if strategy is CommitStrategy.MANIFEST_LAST:
        return _commit_by_manifest(storage, step, files, manifest, token, overwrite, guard)
    raise NotImplementedError(f"no commit for {strategy}")


def _commit_by_rename(
    storage: Storage,
    step: int,
    files: dict[str, dict[str, torch.Tensor]],
    manifest: Manifest,
    token: str,
    overwrite: bool,
    guard: Callable[[], None] | None,
) -> Manifest:
    """Write into a temporary directory, then rename (or swap) it to the step's name."""
    remove_abandoned_temps(storage)
    temp = temp_dir_name(step, socket.gethostname(), os.getpid(), token)
    try:
        storage.makedirs(temp)
        manifest = write_checkpoint_files(storage, temp, files, manifest)
        if guard is not None:
            guard()
        storage.commit_dir(temp, step_dir_name(step), replace=overwrite)
    except BaseException as e:
        _remove_quietly(storage, temp, tree=True)
        raise _write_error(storage, step, e, temp) from e
    return manifest


def _commit_by_manifest(
    storage: Storage,
    step: int,
    files: dict[str, dict[str, torch.Tensor]],
    manifest: Manifest,
    token: str,
    overwrite: bool,
    guard: Callable[[], None] | None,
) -> Manifest:
    """Write attempt-unique files into the step directory; the manifest commits them.

    On object stores the manifest is created only if absent (or replaced in one
    PUT); on local disk (an overwrite where directories cannot be swapped) it is
    renamed over the old one, after a marker that lets the next writer finish
    the cleanup if this one dies: the step is never unlisted and no old file is
    stranded.
    """
    step_name = step_dir_name(step)
    if any(token not in name for name in files):
        raise ValueError("files committed by their manifest need names unique to the attempt")
    replaced = overwrite and storage.exists(step_name, MANIFEST_NAME)
    marked = replaced and storage.atomic_rename
    try:
        storage.makedirs(step_name)
        if marked:
            # Replaced into place, so the marker is durable before any new file exists.
            storage.write_file(
                (step_name, REPLACING), lambda f: f.write(token.encode()), replace=True
            )
        manifest = write_checkpoint_files(
            storage, step_name, files, manifest, replace_manifest=overwrite, before_manifest=guard
        )
    except BaseException as e:
        for file_name in files:
            _remove_quietly(storage, step_name, file_name)
        if marked:
            _remove_quietly(storage, step_name, REPLACING)
        raise _write_error(storage, step, e, step_name) from e
    if replaced:
        _remove_unreferenced(storage, step_name, manifest, grace=0.0)
    if marked:
        _remove_quietly(storage, step_name, REPLACING)
    return manifest


def _write_error(storage: Storage, step: int, e: BaseException, where: str) -> BaseException:
    """The error a failed commit raises: a clear one naming the path, for the OS's errors."""
    if isinstance(e, FileExistsError) and not isinstance(e, CheckpointError):
        return CheckpointExistsError(
            f"step {step} was committed by another writer meanwhile",
            path=storage.url_of(step_dir_name(step)),
        )
    if isinstance(e, OSError) and not isinstance(e, CheckpointError):
        return CheckpointWriteError(
            f"could not save step {step}: {e.strerror or e}; the partial checkpoint "
            "was removed and earlier checkpoints are intact",
            path=e.filename if isinstance(e.filename, str) else storage.url_of(where),
            errno=e.errno,
        )
    return e


def remove_leftovers(storage: Storage) -> None:
    """Remove what crashed saves left behind, once per writer, the way the backend commits.

    Local disk: finish overwrites that were interrupted (see :data:`REPLACING`);
    temporary directories are removed by every save. Object stores: see
    :func:`remove_abandoned_uploads`.
    """
    if not storage.atomic_rename:
        remove_abandoned_uploads(storage)
        return
    for name in storage.list_dir():
        if parse_step_dir_name(name) is None or not any(
            n == REPLACING or n.startswith(NEW_FILE_PREFIX) for n in storage.list_dir(name)
        ):
            continue
        try:
            manifest = read_manifest(storage, name)
        except CheckpointError as e:
            logger.warning("cannot finish an interrupted overwrite of %s: %s", name, e)
            continue
        logger.info("finishing an interrupted overwrite of %s", storage.url_of(name))
        _remove_unreferenced(storage, name, manifest, grace=0.0)
        _remove_quietly(storage, name, REPLACING)


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
        ours = is_tensor_file_name(file_name) or file_name.startswith(NEW_FILE_PREFIX)
        if file_name in keep or not ours:
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
