"""Copying one committed step from one root to another: verified, committed like a save.

A copy streams every file the source manifest lists, checking each file's size
and checksum as its bytes pass, into an attempt opened by the target's own
commit protocol (:mod:`ckpt.saving.commit_protocol`: a renamed temporary
directory on local disk, manifest last on object stores). The manifest's bytes
are copied unchanged and written last, so the copy is bitwise the checkpoint it
came from and is listed only once complete. A copy that fails, or a process
killed while copying, leaves nothing listed; the target's next writer removes
what it left. Run under the target's writer lock (:meth:`CheckpointWriter.commit_copy`).
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Callable
from typing import BinaryIO

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

__all__ = ["copy_step", "read_source_manifest"]

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


def copy_step(
    source: Storage, target: Storage, step: int, guard: Callable[[], None] | None = None
) -> Manifest:
    """Copy the committed ``step`` of ``source`` into ``target``, verified, committed atomically.

    Args:
        source: The root holding the step.
        target: The root to copy into (its writer lock held by the caller).
        step: The step; it must not be committed in ``target``.
        guard: Called just before the manifest is written (the writer lock's check).

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
    header = ManifestHeader(manifest.created_at, manifest.versions)
    attempt: Attempt | None = None
    try:
        token = secrets.token_hex(4)
        attempt = open_attempt(
            target, step, overwrite=False, token=token, header=header, protocol=protocol
        )
        _copy_files(source, target, step_name, attempt.directory, manifest)
        if guard is not None:
            guard()
        write_manifest(target, attempt, raw)
        if attempt.renames:
            attempt.protocol.finalize(target, attempt, manifest)  # the commit point
    except BaseException as e:
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


def _copy_files(
    source: Storage, target: Storage, step_name: str, directory: str, manifest: Manifest
) -> None:
    """Copy every file the manifest lists; a blob (version 4) only if the target lacks it."""
    copied: set[tuple[str, ...]] = set()
    for file_name, record in manifest.files.items():
        if not is_ref(file_name):
            _copy_file(source, target, step_name, directory, file_name, record)
            continue
        parts = file_parts(step_name, file_name)
        if parts not in copied and not target.exists(*parts):
            target.makedirs(BLOB_DIR)
            _copy_file(source, target, step_name, directory, file_name, record)
        copied.add(parts)


def _copy_file(
    source: Storage,
    target: Storage,
    step_name: str,
    directory: str,
    file_name: str,
    record: FileRecord,
) -> None:
    """Stream one file into the attempt, checking its size and checksum as it passes.

    A blob (format version 4) goes into the target's content store instead,
    written whole under a temporary name and renamed into place: its checked
    bytes are content-named, so one already there is the same.
    """
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
        target.write_file(tuple(parts), write, replace=True)
    else:
        target.write_file((directory, *parts), write)
