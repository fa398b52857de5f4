"""The one way to write a checkpoint root: its writer lock, commits, deletes and retention.

:class:`~ckpt.CheckpointManager`, ``ckpt prune`` and :func:`ckpt.import_checkpoint`
all write through a :class:`CheckpointWriter`; nothing else writes into a root.
"""

from __future__ import annotations

import logging
import os
import secrets
import time
from collections.abc import Callable, Collection, Mapping
from typing import Any

from ckpt.errors import CheckpointWriteError
from ckpt.format import MANIFEST_NAME, FileRecord, Manifest, step_dir_name
from ckpt.format.blobs import BLOB_DIR
from ckpt.format.header import ManifestHeader
from ckpt.policies.retention import RetentionPolicy
from ckpt.reading.steps import StepReader
from ckpt.saving.blobs import BlobStore, SaveStats
from ckpt.saving.commit import delete_checkpoint, file_token, remove_leftovers
from ckpt.saving.copying import CopyShare, copy_step
from ckpt.saving.pipeline import Files, commit_and_log
from ckpt.saving.retaining import Retainer
from ckpt.saving.writer_lock import hold_writer_lock
from ckpt.state.items import assemble_manifest
from ckpt.state.kinds import Captured
from ckpt.storage import Storage, WriterLock, storage_of

__all__ = ["CheckpointWriter"]

logger = logging.getLogger(__name__)


class CheckpointWriter:
    """Writes the checkpoints of one root: holds its writer lock, commits, deletes, retains.

    The writer lock is taken by :meth:`lock` (and by the methods that take it
    themselves: :meth:`commit_captured`, :meth:`delete`, :meth:`prune`) and held
    until :meth:`close`, or until the writer is garbage collected. While it is
    held, a writer of the same root in any other process or instance fails at
    once with :class:`~ckpt.CheckpointLockedError`; readers are never blocked.
    An instance is not thread-safe: one thread uses it at a time (a background
    save counts as that thread while it runs).

    Args:
        directory: A local path or fsspec URL; ``None`` when ``storage`` is given.
        storage_options: Passed to the fsspec filesystem (credentials, endpoint, ...).
        storage: An opened root to share (e.g. with a
            :class:`~ckpt.CheckpointReader` built over the same ``storage``).
        incremental: Commit saves as format version 4: large tensors whose bytes
            the root's content store holds are referenced, not written again
            (see ``docs/usage.md``, "Incremental checkpoints").

    Raises:
        CheckpointWriteError: The root directory cannot be created.

    Example:
        >>> from ckpt.policies.retention import RetentionPolicy
        >>> with ckpt.CheckpointWriter("runs/exp1") as writer:
        ...     writer.prune(RetentionPolicy(keep_last=3))
    """

    def __init__(
        self,
        directory: str | os.PathLike[str] | None = None,
        *,
        storage_options: dict[str, Any] | None = None,
        storage: Storage | None = None,
        incremental: bool = False,
    ) -> None:
        if not isinstance(incremental, bool):
            raise TypeError(f"incremental must be a bool, got {incremental!r}")
        storage = storage_of(directory, storage_options, storage)
        self._storage = storage
        try:
            storage.makedirs()
        except OSError as e:
            raise CheckpointWriteError(
                f"cannot create the checkpoint directory: {e.strerror or e}",
                path=storage.url,
                errno=e.errno,
            ) from e
        self._steps = StepReader(storage)
        self._lock: WriterLock | None = None
        self._retainer = Retainer()
        self._leftovers_checked = False
        self.incremental = incremental
        self._blobs = BlobStore(storage)

    def __repr__(self) -> str:
        return f"CheckpointWriter({self.directory!r})"

    def __enter__(self) -> CheckpointWriter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def storage(self) -> Storage:
        """The root this writer writes."""
        return self._storage

    @property
    def directory(self) -> str:
        """The root directory, as given."""
        return self._storage.url

    # -------------------------------------------------------------------- lock

    def lock(self) -> None:
        """Take the root's writer lock, or check and refresh it if this writer holds it.

        Raises:
            CheckpointLockedError: Another writer holds the root, or the lock held
                here was deleted, replaced or taken over (or this is a forked child).
        """
        held = self._lock
        self._lock = hold_writer_lock(self._storage, self._lock, self)
        if self._lock is not held:  # a new lock: what this writer knew of the store may be stale
            self._blobs.forget_all()

    def check_lock(self) -> None:
        """Raise if the lock this writer took is no longer its own; nothing when none was taken.

        Raises:
            CheckpointLockedError: The lock was deleted, replaced or taken over.
        """
        if self._lock is not None:
            self._lock.check()

    def close(self) -> None:
        """Release the writer lock, if held; idempotent."""
        lock, self._lock = self._lock, None
        self._blobs.forget_all()
        if lock is not None:
            lock.release()

    # ------------------------------------------------------------------ commit

    def is_committed(self, step: int) -> bool:
        """Whether ``step`` has a committed checkpoint now."""
        return self._storage.exists(step_dir_name(step), MANIFEST_NAME)

    def commit(
        self,
        step: int,
        files: Files,
        manifest: Manifest,
        *,
        token: str,
        overwrite: bool = False,
        start: float | None = None,
    ) -> Manifest:
        """Write ``files`` and commit them with ``manifest`` as the checkpoint of ``step``.

        Call :meth:`lock` first: the commit checks, just before its commit point,
        that the lock taken is still this writer's. The first commit of a writer
        also removes what crashed writers left behind.

        Args:
            step: The step.
            files: ``{file name: {tensor name: tensor}}``, named as
                :meth:`file_token` says.
            manifest: The manifest to complete with the files' records.
            token: 8 hex digits unique to this attempt.
            overwrite: Replace a committed ``step``.
            start: ``time.perf_counter()`` when the save began, for the log line.

        Returns:
            The manifest as committed.

        Raises:
            CheckpointExistsError: Another writer committed ``step`` first.
            CheckpointLockedError: The lock was lost.
            CheckpointWriteError: Writing failed; earlier checkpoints are intact.
        """
        if not self._leftovers_checked:
            self._leftovers_checked = True  # once per writer: crashed writers' leftovers
            remove_leftovers(self._storage)
            self._sweep()
        lock = self._lock
        if self.incremental:
            files, manifest = self._blobs.store(files, manifest, self._steps.all_steps)
        try:
            committed = commit_and_log(
                self._storage,
                step,
                files,
                manifest,
                token,
                overwrite,
                None if lock is None else lock.check,
                time.perf_counter() if start is None else start,
            )
        finally:
            self._retainer.forget(step)
        if overwrite:
            self._sweep()  # the replaced step's blobs may be referenced no more
        return committed

    @property
    def last_save(self) -> SaveStats:
        """What the last incremental save of this writer stored and wrote in the content store."""
        return self._blobs.last

    def blob_index(self) -> dict[str, FileRecord]:
        """The blobs of the content store known under the lock (for a group's coordinator)."""
        return self._blobs.index(self._steps.all_steps)

    def sweep(self) -> int:
        """Delete the blobs no committed step references (takes the lock); how many.

        Runs by itself after retention; a crashed writer's leftovers go at the next one.
        """
        self.lock()
        return self._sweep()

    def _sweep(self) -> int:
        if not self._storage.exists(BLOB_DIR):
            return 0
        try:
            return self._blobs.sweep(self._steps.all_steps())
        except Exception as e:  # the save stands; the next sweep retries
            logger.warning("could not sweep the blobs of %s: %s", self._storage.url, e)
            return 0

    def commit_copy(
        self,
        source: Storage,
        step: int,
        share: CopyShare | None = None,
        progress: Callable[[int], None] | None = None,
    ) -> Manifest:
        """Copy the committed ``step`` of ``source`` here, verified, committed atomically.

        Takes the lock; see :func:`ckpt.saving.copying.copy_step` (``share``: a copy the
        other ranks take part in; ``progress``: called with the bytes copied).

        Returns:
            The manifest copied.

        Raises:
            CheckpointNotFoundError: ``step`` or a file of it is missing in ``source``.
            CorruptCheckpointError: A source file fails its size or checksum.
            CheckpointExistsError: ``step`` is committed here.
            CheckpointLockedError: Another writer holds the root.
            CheckpointWriteError: Writing failed; nothing of the copy is listed.
        """
        self.lock()
        if not self._leftovers_checked:
            self._leftovers_checked = True
            remove_leftovers(self._storage)
        try:
            return copy_step(source, self._storage, step, self.check_lock, share, progress)
        finally:
            self._retainer.forget(step)

    def file_token(self, token: str, *, overwrite: bool) -> str | None:
        """The token a save's file names carry here (``None``: plain names)."""
        return file_token(self._storage, token, overwrite=overwrite)

    def commit_captured(
        self,
        step: int,
        captured: Mapping[str, Captured],
        *,
        epoch: int | None = None,
        metrics: dict[str, float | int] | None = None,
        overwrite: bool = False,
    ) -> Manifest:
        """Lay captured items out and commit them as the checkpoint of ``step`` (takes the lock).

        Returns:
            The manifest as committed.

        Raises:
            CheckpointExistsError: ``step`` is committed (and not ``overwrite``).
            CheckpointLockedError: Another writer holds the root.
            CheckpointWriteError: Writing failed; earlier checkpoints are intact.
        """
        start = time.perf_counter()
        self.lock()
        token = secrets.token_hex(4)
        header = ManifestHeader.now()
        files, manifest = assemble_manifest(
            step,
            epoch,
            {} if metrics is None else metrics,
            captured,
            created_at=header.created_at,
            versions=header.versions,
            file_token=self.file_token(token, overwrite=overwrite),
        )
        return self.commit(step, files, manifest, token=token, overwrite=overwrite, start=start)

    # --------------------------------------------------------------- retention

    def delete(self, step: int, reason: str) -> None:
        """Delete the checkpoint of ``step``, manifest first (takes the lock).

        A failed delete is logged as a warning, never raised.

        Raises:
            CheckpointLockedError: Another writer holds the root.
        """
        self.lock()
        self._delete(step, reason)
        self._sweep()

    def _delete(self, step: int, reason: str) -> None:
        self._retainer.forget(step)
        delete_checkpoint(self._storage, step, reason)

    def retain(
        self, policy: RetentionPolicy, just_saved: int, *, keep: Collection[int] = ()
    ) -> None:
        """After ``just_saved`` committed: delete what ``policy`` drops; never raises.

        Runs under the lock the save took (it takes none itself). Steps in ``keep``
        (e.g. waiting to be copied to another tier) are never deleted.
        """
        deleted = self._retainer.apply(
            self._storage, policy, self._steps.all_steps, just_saved, keep
        )
        if deleted:
            self._sweep()

    def prune(self, policy: RetentionPolicy) -> tuple[list[int], list[int]]:
        """Delete the committed steps ``policy`` drops, judged from the newest (takes the lock).

        Returns:
            The steps committed before, and those deleted.

        Raises:
            CheckpointLockedError: Another writer holds the root.
        """
        self.lock()
        steps = self._steps.all_steps()
        doomed = self._retainer.dropped(self._storage, policy, steps, steps[-1]) if steps else []
        for step in doomed:
            self._delete(step, f"ckpt prune {policy}")
        self._sweep()
        return steps, doomed
