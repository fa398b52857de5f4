"""Committing a checkpoint and cleaning up after crashed or superseded ones.

The I/O side of a save, given a :class:`~ckpt.storage.Storage`: open an attempt
(:func:`open_attempt`, for one process or a coordinator of many ranks) and commit
a one-process save through it (:func:`commit_checkpoint`) the way the backend
says (:mod:`ckpt.saving.commit_protocol`, where the crash-safety argument is written
down: an atomic rename on local disk, a manifest created only if absent on
object stores), delete checkpoints retention dropped, and remove what crashed
writers left behind. Nothing here decides *what* to save or keep.
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
    parse_step_dir_name,
    parse_temp_dir_name,
    safe_host_name,
    step_dir_name,
)
from ckpt.format.header import ManifestHeader
from ckpt.io import read_manifest, write_checkpoint_files
from ckpt.saving.commit_protocol import (
    REPLACING,
    Attempt,
    CommitProtocol,
    RenameDir,
    protocol_for,
    remove_quietly,
    remove_unreferenced,
)
from ckpt.storage import Storage
from ckpt.storage.local import NEW_FILE_PREFIX

__all__ = [
    "STALE_TEMP_SECONDS",
    "REPLACING",
    "commit_checkpoint",
    "delete_checkpoint",
    "file_token",
    "open_attempt",
    "pid_alive",
    "remove_abandoned_temps",
    "remove_abandoned_uploads",
    "remove_leftovers",
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


def file_token(storage: Storage, token: str, *, overwrite: bool) -> str | None:
    """The token a save's file names carry on ``storage`` (``None``: plain names)."""
    return token if storage.unique_file_names(overwrite) else None


def open_attempt(
    storage: Storage,
    step: int,
    *,
    overwrite: bool,
    token: str,
    header: ManifestHeader,
    collective: bool = False,
    protocol: CommitProtocol | None = None,
) -> Attempt:
    """Open a save of ``step``: the one entry of the commit protocol for 1..N ranks.

    Removes the temporary directories crashed writers left (on backends that
    commit by rename), then opens the attempt the way the backend commits (see
    :mod:`ckpt.saving.commit_protocol`). Run by the only process, or by the coordinator.

    Raises:
        CheckpointWriteError: ``overwrite`` of a collective save where not supported.
        OSError: Storage failed; nothing of the attempt is left.
    """
    if protocol is None:
        protocol = protocol_for(storage, step, overwrite)
    if isinstance(protocol, RenameDir):
        remove_abandoned_temps(storage)
    return protocol.open(
        storage, step, overwrite=overwrite, token=token, header=header, collective=collective
    )


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
        guard: Called just before the manifest is written; raising refuses the
            commit (the writer lock's check).

    Returns:
        The manifest as written.

    Raises:
        CheckpointExistsError: Another writer committed ``step`` first.
        CheckpointWriteError: Writing failed; this attempt's files are removed.
    """
    protocol = protocol_for(storage, step, overwrite)
    if not isinstance(protocol, RenameDir) and any(token not in name for name in files):
        raise ValueError("files committed by their manifest need names unique to the attempt")
    attempt: Attempt | None = None
    try:
        header = ManifestHeader.of(manifest)
        attempt = open_attempt(
            storage, step, overwrite=overwrite, token=token, header=header, protocol=protocol
        )
        manifest = write_checkpoint_files(
            storage,
            attempt.directory,
            files,
            manifest,
            replace_manifest=attempt.replaces_manifest,
            before_manifest=guard,
        )
        if attempt.renames:
            attempt.protocol.finalize(storage, attempt, manifest)  # the commit point
    except BaseException as e:
        if attempt is not None:
            attempt.protocol.abandon(storage, attempt, files)
        where = step_dir_name(step) if attempt is None else attempt.directory
        raise _write_error(storage, step, e, where) from e
    if not attempt.renames:
        attempt.protocol.finalize(storage, attempt, manifest)  # cleanup after the commit
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
        remove_unreferenced(storage, name, manifest, grace=0.0)
        remove_quietly(storage, name, REPLACING)


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
            remove_quietly(storage, name, tree=True)


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
        remove_unreferenced(storage, name, manifest, grace=STALE_TEMP_SECONDS)
