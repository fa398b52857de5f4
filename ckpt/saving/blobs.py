"""The content store of an incremental root (format version 4): blobs written once, swept.

Every mutation of ``.ckpt-blobs`` happens under the root's writer lock, by the
:class:`~ckpt.saving.writer.CheckpointWriter` holding it, on one thread at a time.
Crash safety rests on two orders:

- A save writes (and makes durable) every blob it references before its
  manifest commits, so a committed step never references a blob not yet there.
  On local disk a new blob is written under its final name, fsynced on a helper
  thread while the next one is hashed and written, and the store directory is
  fsynced once for all of them (as a step's own files are written), instead of a
  temporary name, an fsync, a rename and a directory fsync per blob.
- A sweep deletes only blobs that no committed manifest references, and it runs
  after retention deleted manifests, so a blob goes only once no listed step needs it.

What a crash leaves (a blob written for a save that never committed, even
half, a blob whose last step was deleted before the sweep, a half-written
temporary file) is referenced by nothing and reclaimed by the next writer's
first sweep; a save that finds such a name still there writes over it atomically.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import re
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import BinaryIO

import torch

from ckpt.errors import CheckpointError, CheckpointWriteError
from ckpt.format import FileRecord, Manifest, TensorRecord, step_dir_name
from ckpt.format import bounds as format_bounds
from ckpt.format.blobs import (
    BLOB_DIR,
    BLOB_METADATA,
    BLOB_TENSOR,
    blob_file_name,
    blob_key,
    parse_blob_file_name,
    ref_key,
    ref_name,
)
from ckpt.format.checksums import CHUNK_BYTES, Hasher, HashingWriter
from ckpt.format.packs import PACK_SUFFIX
from ckpt.format.tensorfile import (
    cpu_contiguous,
    encode_header,
    layout,
    tensor_bytes,
    write_tensors,
)
from ckpt.io import read_manifest
from ckpt.storage import BackgroundSyncs, Storage
from ckpt.storage.local import NEW_FILE_PREFIX

__all__ = ["BlobStore", "SaveStats", "blob_begin", "write_blob"]

logger = logging.getLogger(__name__)

Files = dict[str, dict[str, torch.Tensor]]

_METADATA = BLOB_METADATA

_LEFTOVER = re.compile(re.escape(NEW_FILE_PREFIX) + r"[0-9a-f]{8}\.([0-9a-f]{32})\.safetensors")
"""A temporary file of a blob write that a crash interrupted (``Storage.write_file``)."""


def _ours(name: str) -> bool:
    """Whether ckpt wrote a file of this name in the store: a blob or a blob's temporary file.

    Nothing else found there (a user's file, a directory) is ever deleted.
    """
    return parse_blob_file_name(name) is not None or _LEFTOVER.fullmatch(name) is not None


@dataclasses.dataclass
class SaveStats:
    """What the last incremental save did with its large tensors."""

    referenced: int = 0
    """Bytes of tensors referenced in the store (written now or before)."""
    written: int = 0
    """Bytes of blob files written by this save."""
    hash_seconds: float = 0.0
    """Time spent establishing identity (hashing the bytes)."""


class BlobStore:
    """The blobs of one root, as known to the writer holding its lock.

    ``known`` maps each blob present and referenced by a committed step (or written
    by this writer since) to its file record; it is taken by :meth:`sweep`, which
    the writer runs before its first incremental save, and kept up to date by
    :meth:`store` and :meth:`sweep`. The writer lock guarantees nothing else
    changes the store meanwhile; :meth:`forget_all` drops it when the lock is lost.
    """

    def __init__(self, storage: Storage) -> None:
        self._storage = storage
        self._known: dict[str, FileRecord] | None = None
        self._checked: set[str] = set()
        self.last = SaveStats()

    def forget_all(self) -> None:
        """Forget what is known (a new lock: another writer may have changed the store)."""
        self._known = None
        self._checked = set()

    # ------------------------------------------------------------------ saving

    def store(
        self, files: Files, manifest: Manifest, committed: Callable[[], list[int]]
    ) -> tuple[Files, Manifest]:
        """Move the large tensors of a save into the store; return what the step still writes.

        Each tensor of at least :data:`~ckpt.format.bounds.MIN_BLOB_BYTES` that is
        not packed is hashed (its bytes, dtype and shape, every time: never a
        version counter) and referenced; its blob is written only when the store
        lacks it. Every blob is durable when this returns.
        """
        if self._known is None:
            self.sweep(committed())
        known = self._known
        assert known is not None
        stats = SaveStats()
        records = dict(manifest.tensors)
        refs: dict[str, FileRecord] = {}
        kept: Files = {}
        new = _NewBlobs(self._storage)
        try:
            self._reference(files, records, refs, kept, new, known, stats)
            new.finish()
        except BaseException:
            new.abandon()
            for key in new.keys:  # perhaps not durable: written anew by the next save needing it
                known.pop(key, None)
                self._checked.discard(key)
            raise
        self.last = stats
        return kept, dataclasses.replace(manifest, files=refs, tensors=records)

    def _reference(
        self,
        files: Files,
        records: dict[str, TensorRecord],
        refs: dict[str, FileRecord],
        kept: Files,
        new: _NewBlobs,
        known: dict[str, FileRecord],
        stats: SaveStats,
    ) -> None:
        """Reference each large tensor of ``files`` (updating ``records`` and ``refs``).

        What stays in the step's own files goes in ``kept``. Tensors already
        contiguous on the CPU are hashed ahead on helper threads (``xxhash``
        releases the GIL) while this thread writes the blobs the store lacks.
        """
        large: list[tuple[str, torch.Tensor, TensorRecord]] = []
        for file_name, tensors in files.items():
            own: dict[str, torch.Tensor] = {}
            for name, t in tensors.items():
                record = records.get(name)
                if (
                    name.endswith(PACK_SUFFIX)
                    or record is None
                    or record.pack is not None
                    or t.nbytes < format_bounds.MIN_BLOB_BYTES
                ):
                    own[name] = t
                    continue
                large.append((name, t, record))
            if own:
                kept[file_name] = own
        with _KeysAhead([t for _, t, _ in large]) as ahead:
            for i, (name, t, record) in enumerate(large):
                key, blob = self._blob_of(t, known, stats, new, ahead.key(i, stats))
                ref = ref_name(key, name)
                refs[ref] = blob
                records[name] = dataclasses.replace(record, file=ref)
                stats.referenced += t.nbytes

    def _blob_of(
        self,
        t: torch.Tensor,
        known: dict[str, FileRecord],
        stats: SaveStats,
        new: _NewBlobs,
        key: str | None,
    ) -> tuple[str, FileRecord]:
        """The key and file record of ``t``'s blob, writing the blob if the store lacks it.

        ``key``: hashed ahead from the same bytes, or ``None`` (hashed now).
        """
        cpu = cpu_contiguous(t.detach())
        if key is None:
            start = time.perf_counter()
            key = blob_key(cpu, tensor_bytes(cpu))
            stats.hash_seconds += time.perf_counter() - start
        blob = known.get(key)
        if blob is not None and key not in self._checked and not self._intact(key, blob):
            blob = None
        if blob is None:
            blob = new.write(key, cpu)
            known[key] = blob
            stats.written += blob.size
        self._checked.add(key)
        return key, blob

    def _intact(self, key: str, blob: FileRecord) -> bool:
        """Whether a blob written before this lock still holds the bytes its checksum says.

        Read once per lock, at the first save referencing it, on local disk only
        (objects of an object store are whole): a blob damaged since (bit rot, a
        truncation) is written anew, never referenced by a new step, and the same
        bytes renamed over it make the earlier steps referencing it whole again.
        """
        if not self._storage.atomic_rename:
            return True
        name = blob_file_name(key)
        hasher = Hasher()
        try:
            with self._storage.open_read(BLOB_DIR, name) as f:
                done = hasher.skip(f, blob.size + 1, bytearray(CHUNK_BYTES))
        except (CheckpointError, OSError) as e:
            logger.warning("blob %s is unreadable, so it is written anew: %s", name, e)
            return False
        if done != blob.size or (blob.checksum is not None and hasher.digest() != blob.checksum):
            logger.warning("blob %s no longer matches its checksum: written anew", name)
            return False
        return True

    # ------------------------------------------------------ several ranks

    def index(self, committed: Callable[[], list[int]]) -> dict[str, FileRecord]:
        """The blobs present and referenced (swept first if not known yet): for the coordinator.

        The dict is the store's own: the coordinator records in it the blobs its
        ranks wrote (durably) for a save.
        """
        if self._known is None:
            self.sweep(committed())
        assert self._known is not None
        return self._known

    # --------------------------------------------------------------- sweeping

    def sweep(self, steps: list[int]) -> int:
        """Delete every blob (and blob temporary file) of the store no committed step references.

        Called under the writer lock with the committed ``steps``, after retention
        deleted manifests, and before this writer's first incremental save. When a
        manifest cannot be read, nothing is deleted (the step may still need its blobs).

        Returns:
            The number of files deleted.
        """
        referenced: dict[str, FileRecord] = {}
        readable = True
        for step in steps:
            try:
                manifest = read_manifest(self._storage, step_dir_name(step))
            except (CheckpointError, OSError) as e:  # OSError: a backend's raw error
                logger.warning("cannot read step %d, so no blob is deleted now: %s", step, e)
                readable = False
                continue
            for name, record in manifest.files.items():
                key = ref_key(name)
                if key is not None:
                    referenced[key] = record
        present = self._storage.list_dir(BLOB_DIR)
        deleted = 0
        on_disk: set[str] = set()
        for name in present:
            key = parse_blob_file_name(name)
            if key is not None and key in referenced:
                if self._usable(name, referenced[key]):
                    on_disk.add(key)
            elif readable and _ours(name):
                deleted += self._remove(name)
            elif not _ours(name):
                logger.warning(
                    "%s was not written by ckpt: left alone", self._storage.url_of(BLOB_DIR, name)
                )
        self._known = {k: r for k, r in referenced.items() if k in on_disk}
        if deleted:
            logger.info("deleted %d unreferenced blob(s) in %s", deleted, self._storage.url)
        return deleted

    def _usable(self, name: str, record: FileRecord) -> bool:
        """Whether blob file ``name`` may be referenced again without writing it anew.

        A blob this writer knows with the same record is (it wrote or checked it under
        its lock), as is any object of an object store; any other must be a regular
        file of the recorded size (one ``lstat`` each, once per lock). One that is
        not (a link, a FIFO, a truncated file) is written again by the next save that
        needs it, which also makes whole the earlier steps referencing it.
        """
        key = parse_blob_file_name(name)
        if self._known is not None and self._known.get(key or "") == record:
            return True
        if not self._storage.atomic_rename:
            return True  # an object store: objects are whole (one PUT), and a stat costs a request
        try:
            size = self._storage.size(BLOB_DIR, name)
        except (CheckpointError, OSError) as e:
            logger.warning("blob %s is unusable, so it is written anew: %s", name, e)
            return False
        if size != record.size:
            logger.warning("blob %s has %d bytes, not %d: written anew", name, size, record.size)
            return False
        return True

    def _remove(self, name: str) -> int:
        """Delete one file of the store; how many were deleted (0 or 1)."""
        try:
            self._storage.remove_file(BLOB_DIR, name)
        except OSError as e:
            logger.warning("could not delete blob %s: %s", self._storage.url_of(BLOB_DIR, name), e)
            return 0
        return 1


HASH_THREADS = 4
"""Helper threads hashing tensors ahead of the blob writes, at most (and no more than CPUs)."""


class _KeysAhead:
    """Blob keys of the tensors already contiguous on the CPU, hashed on helper threads.

    Only those: their bytes are hashed where they lie, as :meth:`BlobStore._blob_of`
    would hash them (a tensor needing a CPU copy is hashed there, one copy at a
    time). Use as a context manager: hashes not needed after an error are dropped.
    """

    def __init__(self, tensors: list[torch.Tensor]) -> None:
        ready = [i for i, t in enumerate(tensors) if _in_place(t)]
        workers = min(HASH_THREADS, os.cpu_count() or 1, len(ready))
        self._pool = (
            ThreadPoolExecutor(workers, thread_name_prefix="ckpt-hash") if workers >= 2 else None
        )
        self._keys: dict[int, Future[str]] = {}
        if self._pool is not None:  # RuntimeError: the interpreter is exiting, hashed inline
            with contextlib.suppress(RuntimeError):
                for i in ready:
                    self._keys[i] = self._pool.submit(_key_of, tensors[i])

    def __enter__(self) -> _KeysAhead:
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)

    def key(self, index: int, stats: SaveStats) -> str | None:
        """Tensor ``index``'s key (the wait for it counted as hashing), or ``None``: not ahead."""
        future = self._keys.pop(index, None)
        if future is None:
            return None
        start = time.perf_counter()
        key = future.result()
        stats.hash_seconds += time.perf_counter() - start
        return key


def _in_place(t: torch.Tensor) -> bool:
    """Whether ``t``'s bytes are written where they lie (no copy to make first)."""
    return t.device.type == "cpu" and t.is_contiguous() and not (t.is_conj() or t.is_neg())


def _key_of(t: torch.Tensor) -> str:
    cpu = cpu_contiguous(t.detach())
    return blob_key(cpu, tensor_bytes(cpu))


class _NewBlobs:
    """The blobs one save writes, made durable together before its manifest commits.

    On local disk each is fsynced on a helper thread while the next is hashed
    and written (see :class:`~ckpt.storage.BackgroundSyncs`), then the store
    directory is fsynced once; an object store's PUTs are durable as they return.
    """

    def __init__(self, storage: Storage) -> None:
        self._storage = storage
        self._syncs = BackgroundSyncs() if storage.atomic_rename else None
        self.keys: list[str] = []
        """The blobs written (or begun): forgotten if the save fails."""

    def write(self, key: str, t: torch.Tensor) -> FileRecord:
        self.keys.append(key)
        return write_blob(self._storage, key, t, syncs=self._syncs)

    def finish(self) -> None:
        """Wait for every fsync, then fsync the store directory: every blob is durable."""
        if self._syncs is None or not self.keys:
            return
        try:
            self._syncs.wait()
            self._storage.sync_dir(BLOB_DIR)
        except OSError as e:
            if isinstance(e, CheckpointError):
                raise
            raise CheckpointWriteError(
                f"could not make the new blobs durable: {e.strerror or e}; earlier "
                "checkpoints are intact",
                path=self._storage.url_of(BLOB_DIR),
                errno=e.errno,
            ) from e

    def abandon(self) -> None:
        """Wait for the fsyncs begun (their errors are moot: the save failed already)."""
        if self._syncs is not None:
            with contextlib.suppress(OSError):
                self._syncs.wait()


def blob_begin(t: torch.Tensor) -> int:
    """The byte at which the data of ``t``'s blob starts (its safetensors header's length)."""
    return len(encode_header(layout({BLOB_TENSOR: t}), _METADATA))


def write_blob(
    storage: Storage, key: str, t: torch.Tensor, *, syncs: BackgroundSyncs | None = None
) -> FileRecord:
    """Write one blob under its final name, durably (with ``syncs``: once they are waited for).

    Local disk: a temporary name, fsynced, renamed into place, the directory
    fsynced, so it is never visible half-written. With ``syncs`` (local disk):
    created under its final name, its fsync started on ``syncs``; the caller
    waits for them and fsyncs the store directory before any manifest references
    it; a name already there (a crashed save's blob) is replaced as without.
    Object stores: one PUT. Content-named, so an identical blob already there is
    replaced by the same bytes. Under the root's writer lock, held by this
    process or by the coordinator of its group.
    """
    hashers: list[Hasher] = []

    def write(f: BinaryIO) -> int:
        hashers.append(Hasher())
        return write_tensors(HashingWriter(f, hashers[-1]), {BLOB_TENSOR: t}, _METADATA)

    name = blob_file_name(key)
    try:
        storage.makedirs(BLOB_DIR)
        size = None
        if syncs is not None:
            with contextlib.suppress(FileExistsError):  # then replaced, atomically
                size = storage.write_file((BLOB_DIR, name), write, syncs=syncs)
        if size is None:
            size = storage.write_file((BLOB_DIR, name), write, replace=True)
    except OSError as e:
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointWriteError(
            f"could not write a blob: {e.strerror or e}; earlier checkpoints are intact",
            path=storage.url_of(BLOB_DIR, name),
            errno=e.errno,
        ) from e
    return FileRecord(size, hashers[-1].digest())
