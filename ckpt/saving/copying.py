"""Copying one committed step from one root to another: verified, committed like a save.

A copy streams every file the source manifest lists, checking each file's size
and checksum as its bytes pass, into an attempt opened by the target's own
commit protocol (:mod:`ckpt.saving.commit_protocol`: a renamed temporary
directory on local disk, manifest last on object stores). The manifest's bytes
are copied unchanged and written last, so the copy is bitwise the checkpoint it
came from and is listed only once complete. A copy that fails, or a process
killed while copying, leaves nothing listed; the target's next writer removes
what it left. Run under the target's writer lock (:meth:`CheckpointWriter.commit_copy`).

With several ranks (:mod:`ckpt.tiers.ranks`) the copy is shared: the process
holding the lock (rank 0) opens the attempt, tells the other ranks where it is
(:class:`CopyShare`), copies its own files, waits until every rank has copied its
files (:func:`copy_files`), and commits once.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Callable
from typing import BinaryIO, Protocol

from ckpt.errors import CheckpointError, CheckpointWriteError, CorruptCheckpointError
from ckpt.format import (
    MANIFEST_NAME,
    MAX_MANIFEST_BYTES,
    FileRecord,
    Manifest,
    decode_manifest,
    step_dir_name,
)
from ckpt.format.blobs import BLOB_DIR, file_parts, is_ref
from ckpt.format.checksums import CHUNK_BYTES, Hasher
from ckpt.format.header import ManifestHeader
from ckpt.saving.commit import open_attempt
from ckpt.saving.commit_protocol import (
    Attempt,
    protocol_for,
    remove_unreferenced,
    write_manifest,
)
from ckpt.storage import CommitStrategy, Storage

__all__ = ["CopyShare", "copy_files", "copy_step", "read_source_manifest"]

logger = logging.getLogger(__name__)


def read_source_manifest(source: Storage, step: int) -> tuple[bytes, Manifest]:
    """The raw bytes of ``step``'s manifest in ``source`` and what they say.

    Raises:
        CheckpointNotFoundError: ``step`` is not committed in ``source``.
        CorruptCheckpointError: The manifest is malformed or names another step.
    """
    step_name = step_dir_name(step)
    path = source.path(step_name, MANIFEST_NAME)
    if source.is_link(step_name):
        raise CorruptCheckpointError("checkpoint directory is a symbolic link", path=path)
    size = source.size(step_name, MANIFEST_NAME)
    if size > MAX_MANIFEST_BYTES:
        raise CorruptCheckpointError(f"manifest is {size} bytes, too large", path=path)
    raw = source.read_bytes(step_name, MANIFEST_NAME)
    manifest = decode_manifest(raw, path)
    if manifest.step != step:
        raise CorruptCheckpointError(
            f"manifest says step {manifest.step} but lives in the directory of step {step}",
            path=path,
            key="step",
        )
    return raw, manifest


class CopyShare(Protocol):
    """A copy shared with other processes (ranks), each copying the files it wrote."""

    def own(self, manifest: Manifest) -> list[str]:
        """The files of ``manifest`` this process copies."""

    def opened(self, target: Storage, attempt: Attempt, manifest: Manifest) -> None:
        """The attempt is open: tell the other processes where to copy their files."""

    def others(self, target: Storage, attempt: Attempt, manifest: Manifest) -> None:
        """Wait until the other processes have copied theirs; raise if one failed."""

    def closed(self, target: Storage, step: int) -> None:
        """The copy committed or failed: withdraw what :meth:`opened` published."""


def copy_step(
    source: Storage,
    target: Storage,
    step: int,
    guard: Callable[[], None] | None = None,
    share: CopyShare | None = None,
    progress: Callable[[int], None] | None = None,
) -> Manifest:
    """Copy the committed ``step`` of ``source`` into ``target``, verified, committed atomically.

    Args:
        source: The root holding the step.
        target: The root to copy into (its writer lock held by the caller).
        step: The step; it must not be committed in ``target``.
        guard: Called just before the manifest is written (the writer lock's check).
        share: With several ranks: the other ranks copy their own files (see
            :class:`CopyShare`); this process copies its part and commits.
        progress: Called with the number of bytes of each chunk this process copies
            (a retried file counts again).

    Returns:
        The manifest copied.

    Raises:
        CheckpointNotFoundError: ``step`` or one of its files is missing in ``source``.
        CorruptCheckpointError: A source file disagrees with the manifest (size or checksum).
        CheckpointExistsError: ``step`` got committed in ``target`` meanwhile.
        CheckpointWriteError: Writing ``target`` failed; nothing of the copy is listed.
    """
    start = time.perf_counter()
    raw, manifest = read_source_manifest(source, step)
    step_name = step_dir_name(step)
    protocol = protocol_for(target, step, False)
    # Under the writer lock no other save is in flight: unlisted files are leftovers.
    if (
        protocol.strategy is CommitStrategy.MANIFEST_LAST
        and target.exists(step_name)
        and not target.exists(step_name, MANIFEST_NAME)
    ):
        remove_unreferenced(target, step_name, None, grace=0.0)
    header = ManifestHeader.of(manifest)
    attempt: Attempt | None = None
    try:
        token = secrets.token_hex(4)
        attempt = open_attempt(
            target, step, overwrite=False, token=token, header=header, protocol=protocol
        )
        names = list(manifest.files) if share is None else share.own(manifest)
        if share is not None:
            share.opened(target, attempt, manifest)
        copy_files(source, target, step_name, attempt.directory, manifest, names, progress)
        if share is not None:
            share.others(target, attempt, manifest)
        if guard is not None:
            guard()
        write_manifest(target, attempt, raw)
        if attempt.renames:
            attempt.protocol.finalize(target, attempt, manifest)  # the commit point
    except BaseException as e:
        if share is not None:
            share.closed(target, step)
        if attempt is not None:
            attempt.protocol.abandon(target, attempt, [n for n in manifest.files if not is_ref(n)])
        if isinstance(e, OSError) and not isinstance(e, CheckpointError):
            raise CheckpointWriteError(
                f"could not copy step {step}: {e.strerror or e}; nothing of the copy is listed",
                path=target.url_of(step_name),
                errno=e.errno,
            ) from e
        raise
    if not attempt.renames:
        attempt.protocol.finalize(target, attempt, manifest)
    if share is not None:
        share.closed(target, step)
    nbytes = sum(r.size for r in manifest.files.values())
    logger.info(
        "copied step %d from %s to %s (%d bytes in %.3f s)",
        step,
        source.url,
        target.url_of(step_name),
        nbytes,
        time.perf_counter() - start,
    )
    return manifest


def copy_files(
    source: Storage,
    target: Storage,
    step_name: str,
    directory: str,
    manifest: Manifest,
    names: list[str],
    progress: Callable[[int], None] | None = None,
) -> None:
    """Copy the files ``names`` of ``manifest`` into ``directory`` of ``target``, verified.

    A blob (format version 4) is copied only if the target lacks it.

    Raises:
        CheckpointNotFoundError: A file is missing in ``source``.
        CorruptCheckpointError: A file disagrees with the manifest (size or checksum).
        OSError: Reading or writing failed.
    """
    copied: set[tuple[str, ...]] = set()
    for file_name in names:
        record = manifest.files[file_name]
        where = (directory, file_name)
        if not is_ref(file_name):
            _copy_file(source, target, step_name, where, record, progress)
            continue
        parts = file_parts(step_name, file_name)
        if parts not in copied and not _has_blob(target, parts, record):
            target.makedirs(BLOB_DIR)
            _copy_file(source, target, step_name, where, record, progress)
        copied.add(parts)


def _has_blob(target: Storage, parts: tuple[str, ...], record: FileRecord) -> bool:
    """Whether ``target`` holds a blob as a regular file of the recorded size.

    One that is not (a link, a FIFO, truncated) is copied again, replacing it.
    """
    try:
        return target.size(*parts) == record.size
    except (CheckpointError, OSError):
        return False


def _copy_file(
    source: Storage,
    target: Storage,
    step_name: str,
    where: tuple[str, str],
    record: FileRecord,
    progress: Callable[[int], None] | None,
) -> None:
    """Stream one file (``where``: attempt directory, file name) into the attempt, checked.

    A blob (format version 4) goes into the target's content store instead,
    written whole under a temporary name and renamed into place: its checked
    bytes are content-named, so one already there is the same.
    """
    directory, file_name = where
    blob = is_ref(file_name)
    parts = list(file_parts(step_name, file_name)) if blob else file_name.split("/")
    if len(parts) > 1 and not blob:
        target.makedirs(directory, *parts[:-1])
    path = source.url_of(*parts) if blob else source.url_of(step_name, file_name)
    source_parts = parts if blob else [step_name, *parts]

    def write(out: BinaryIO) -> int:  # may be called again after a transient failure
        hasher = Hasher()
        done = 0
        with source.open_read(*source_parts) as f:
            while True:
                chunk = f.read(min(CHUNK_BYTES, record.size + 1 - done))
                if not chunk:
                    break
                done += len(chunk)
                if done > record.size:
                    break
                hasher.update(chunk)
                out.write(chunk)
                if progress is not None:
                    progress(len(chunk))
        if done != record.size:
            raise CorruptCheckpointError(
                f"file is {'longer' if done > record.size else f'{done} bytes'}; "
                f"the manifest says {record.size} bytes",
                path=path,
                key=file_name,
            )
        if record.checksum is not None and hasher.digest() != record.checksum:
            raise CorruptCheckpointError(
                f"checksum mismatch: read {hasher.digest()}, the manifest says {record.checksum}",
                path=path,
                key=file_name,
            )
        return done

    if blob:
        target.write_file(tuple(parts), write, replace=True, size_hint=record.size)
    else:
        target.write_file((directory, *parts), write, size_hint=record.size)
