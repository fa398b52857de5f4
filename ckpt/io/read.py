"""The checked read of tensors: each file hashed whole; tensors placed, or their reads deferred.

Independent local files are checked on several threads when every tensor goes
to the CPU (a step of an incremental root is one file per blob).
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from typing import BinaryIO

import torch

from ckpt.errors import CorruptCheckpointError
from ckpt.format import MANIFEST_NAME, Manifest, TensorRecord
from ckpt.format.blobs import file_parts
from ckpt.format.checksums import CHUNK_BYTES, Hasher
from ckpt.format.tensorfile import TensorEntry, check_stored_dtype, read_tensor, tensor_bytes
from ckpt.io.checks import (
    check_digest,
    check_opened_size,
    file_entries,
    matching_entry,
    open_listed,
)
from ckpt.io.live_reads import read_threads
from ckpt.io.pending import PendingReads, Source
from ckpt.io.spill import copy_bytes
from ckpt.restoring.locations import MapLocation, mapped_device, place
from ckpt.state.optim import Target
from ckpt.storage import Storage

__all__ = ["load_tensors", "tensors_by_file"]


def tensors_by_file(
    storage: Storage, directory: str, manifest: Manifest, names: Iterable[str]
) -> dict[str, list[str]]:
    """The named stored tensors grouped by the file holding them, in first-use order.

    Raises:
        CorruptCheckpointError: A name is not in the manifest, or its dtype is one ckpt
            never writes; names the manifest and the tensor.
    """
    by_file: dict[str, list[str]] = {}
    for name in names:
        record = manifest.tensors.get(name)
        if record is None:
            raise CorruptCheckpointError(
                "state refers to a tensor the manifest does not list",
                path=storage.path(directory, MANIFEST_NAME),
                key=name,
            )
        try:
            check_stored_dtype(name, record)
        except CorruptCheckpointError as e:
            raise e.located(storage.path(directory, MANIFEST_NAME)) from e
        by_file.setdefault(record.file, []).append(name)
    return by_file


def load_tensors(
    storage: Storage,
    directory: str,
    manifest: Manifest,
    names: list[str],
    targets: Mapping[str, Target],
    map_location: MapLocation,
    *,
    verify: bool = True,
    into: Mapping[str, torch.Tensor] | None = None,
) -> tuple[dict[str, torch.Tensor], PendingReads]:
    """Load the named tensors, each built at its target device and dtype.

    With ``verify``, every file that has a tensor to read is read whole and its
    checksum compared with the manifest's, as the bytes stream in; tensors not
    asked for are hashed and dropped. A file whose tensors all go to the
    ``meta`` device is not read at all.

    Tensors named in ``into`` are not read now: they are hashed (with
    ``verify``) and their reads into the given live tensors are returned as
    :class:`PendingReads`, to run once the caller has checked everything else.

    Args:
        storage: Where the checkpoint is.
        directory: The checkpoint directory below the storage root.
        manifest: Its validated manifest.
        names: The tensor names to load.
        targets: ``{name: (device, dtype)}``; a missing name or a ``None`` device
            means "where ``map_location`` maps the saved location".
        map_location: As for ``torch.load``.
        verify: Check each file read against its checksum.
        into: ``{name: contiguous CPU or CUDA tensor of the stored shape}``; the
            bytes are cast to its dtype on the way, as ``copy_`` casts.

    Returns:
        ``{name: tensor}`` (for names in ``into``, the live tensor, not yet
        read into) and the pending reads, which the caller must run or close.

    Raises:
        CheckpointNotFoundError: A tensor file is missing.
        CorruptCheckpointError: A file's size, header or checksum disagrees with the manifest.
    """
    into = into or {}
    by_file = tensors_by_file(storage, directory, manifest, names)
    out: dict[str, torch.Tensor] = {}
    jobs: list[tuple[str, dict[str, Target]]] = []
    for file_name, file_names in by_file.items():
        wanted: dict[str, Target] = {}
        for name in file_names:
            record = manifest.tensors[name]
            device, dtype = targets.get(name, (None, None))
            if device is None and not callable(map_location):
                device = mapped_device(map_location, record.device)
            if device is not None and device.type == "meta":
                out[name] = torch.empty(record.shape, dtype=dtype or record.dtype, device="meta")
            else:
                wanted[name] = (device, dtype)
        if wanted:
            jobs.append((file_name, wanted))
    reader = _FileReader(storage, directory, manifest, map_location, verify, into)
    with ExitStack() as on_error:
        on_error.push(reader.pending)
        for loaded in _load_files(reader, jobs, storage):
            out.update(loaded)
        for cuda in reader.cuda_devices:  # pinned host copies are asynchronous: finish them
            torch.cuda.synchronize(cuda)
        on_error.pop_all()
    return out, reader.pending


def _load_files(
    reader: _FileReader, jobs: list[tuple[str, dict[str, Target]]], storage: Storage
) -> Iterator[dict[str, torch.Tensor]]:
    """Each file's tensors, in ``jobs`` order; independent local files checked on several threads.

    Every file is still read and hashed whole before its tensors count; the
    first file (in order) that fails raises, after every other file's check has
    stopped. Files are checked one at a time on an object store (the spill is
    one sequential file) or when a tensor may go to a GPU.
    """
    workers = min(read_threads(), len(jobs))
    if workers < 2 or not storage.atomic_rename or not _all_cpu(jobs, reader.into):
        for file_name, wanted in jobs:
            yield reader.load(file_name, wanted)
        return
    size = max(1, len(jobs) // (workers * _BATCHES_PER_THREAD))
    batches = [jobs[at : at + size] for at in range(0, len(jobs), size)]
    pool = ThreadPoolExecutor(workers, thread_name_prefix="ckpt-check")
    try:
        futures = [pool.submit(_load_batch, reader, batch) for batch in batches]
        for future in futures:
            yield from future.result()
    finally:  # on an error: stop the checks not begun, wait for those running
        pool.shutdown(wait=True, cancel_futures=True)


_BATCHES_PER_THREAD = 4
"""Files checked on threads go in about this many batches per thread: one task per
file cost more in submission and waiting than checking a small blob file (issue 20)."""


def _load_batch(
    reader: _FileReader, batch: list[tuple[str, dict[str, Target]]]
) -> list[dict[str, torch.Tensor]]:
    """Each file's tensors of one batch, in order; the first file that fails raises."""
    return [reader.load(file_name, wanted) for file_name, wanted in batch]


def _all_cpu(jobs: list[tuple[str, dict[str, Target]]], into: Mapping[str, torch.Tensor]) -> bool:
    """Whether every tensor of ``jobs`` is built on (or read into a tensor on) the CPU."""
    for _, wanted in jobs:
        for name, (device, _) in wanted.items():
            live = into.get(name)
            if live is not None and live.device.type != "cpu":
                return False
            if live is None and (device is None or device.type != "cpu"):
                return False
    return True


class _FileReader:
    """Loads the wanted tensors of one file per call for :func:`load_tensors`; calls may overlap."""

    def __init__(
        self,
        storage: Storage,
        directory: str,
        manifest: Manifest,
        map_location: MapLocation,
        verify: bool,
        into: Mapping[str, torch.Tensor],
    ) -> None:
        self.storage, self.directory, self.manifest = storage, directory, manifest
        self.map_location, self.verify, self.into = map_location, verify, into
        self.pending = PendingReads()
        self.cuda_devices: set[torch.device] = set()
        self._local = threading.local()  # each checking thread's own scratch buffer
        self._lock = threading.Lock()  # around ``pending``, shared by the checking threads

    def load(self, file_name: str, wanted: Mapping[str, Target]) -> dict[str, torch.Tensor]:
        """Read ``wanted`` from one file (hashing it whole), deferring reads into live tensors.

        Packed tensors are cut from their pack, which is read whole.
        """
        manifest = self.manifest
        record = manifest.files[file_name]
        hasher = Hasher() if self.verify and record.checksum else None
        packed = {n: manifest.tensors[n] for n in wanted if manifest.tensors[n].pack is not None}
        direct = {n: t for n, t in wanted.items() if n not in packed}
        packs = {r.pack for r in packed.values() if r.pack is not None}
        in_place = {n for n in direct if n in self.into}
        spill = None
        out: dict[str, torch.Tensor] = {}
        buffers: dict[str, torch.Tensor] = {}
        scratch = self._scratch()
        with ExitStack() as file_scope:
            parts = file_parts(self.directory, file_name)
            f = file_scope.enter_context(
                open_listed(self.storage, self.directory, file_name, manifest)
            )
            identity = self.storage.file_identity(f)
            path = check_opened_size(self.storage, self.directory, file_name, manifest, f, identity)
            source: Source = f
            if in_place and identity is None:  # an object store: checked bytes wait locally
                spill = self.pending.spill(sum(manifest.tensors[n].nbytes for n in in_place))
                if spill is None:
                    in_place = set()  # no room: read them into fresh memory instead
            elif in_place:  # held until the pending reads ran, or closed and reopened then
                source = self.pending.keep(file_scope, f, self.storage, identity, parts)
            entries, data_start = file_entries(f, path, file_name, manifest, hasher)
            for name in [*direct, *packs]:
                matching_entry(entries, name, manifest.tensors[name], path)
            for entry in sorted(entries.values(), key=lambda e: e.begin):
                if entry.name in packs:
                    buffers[entry.name] = read_tensor(f, entry, data_start, path)
                    if hasher is not None:
                        hasher.update(tensor_bytes(buffers[entry.name]))
                    continue
                if entry.name in direct and entry.name not in in_place:
                    out[entry.name] = self._read(f, entry, data_start, path, direct, hasher)
                    continue
                f.seek(data_start + entry.begin)
                if entry.name in in_place:
                    out[entry.name] = self._defer(f, source, entry, data_start, path, hasher, spill)
                elif hasher is not None:
                    hasher.skip(f, entry.nbytes, scratch)
        if hasher is not None:
            check_digest(record, hasher, path, manifest.step, file_name)
        out.update(self._cut(packed, buffers, wanted))
        return out

    def _scratch(self) -> bytearray:
        """This thread's buffer for bytes hashed and dropped."""
        scratch: bytearray | None = getattr(self._local, "scratch", None)
        if scratch is None:
            scratch = self._local.scratch = bytearray(CHUNK_BYTES)
        return scratch

    def _defer(
        self,
        f: BinaryIO,
        source: Source,
        entry: TensorEntry,
        data_start: int,
        path: str,
        hasher: Hasher | None,
        spill: BinaryIO | None,
    ) -> torch.Tensor:
        """Hash a tensor's bytes now and schedule reading them into its live tensor."""
        live = self.into[entry.name]
        if spill is None:
            with self._lock:
                self.pending.add(source, entry, data_start, path, live)
            if hasher is not None:
                hasher.skip(f, entry.nbytes, self._scratch())
            return live
        at = spill.tell()  # object stores: one file checked at a time
        copy_bytes(f, spill, entry, path, hasher, self._scratch())
        moved = dataclasses.replace(entry, begin=at, end=at + entry.nbytes)
        self.pending.add(spill, moved, 0, path, live)
        return live

    def _cut(
        self,
        packed: Mapping[str, TensorRecord],
        buffers: Mapping[str, torch.Tensor],
        wanted: Mapping[str, Target],
    ) -> dict[str, torch.Tensor]:
        """Cut packed tensors from their checked packs (copies into live tensors wait)."""
        out: dict[str, torch.Tensor] = {}
        for name, r in packed.items():
            assert r.pack is not None
            cut = buffers[r.pack][r.offset : r.offset + r.nbytes].view(r.dtype).reshape(r.shape)
            if name in self.into:
                out[name] = self.into[name]
                with self._lock:
                    self.pending.copy(cut, self.into[name])
                continue
            device, dtype = wanted[name]
            out[name] = place(
                cut.clone(),
                device,
                dtype,
                map_location=self.map_location,
                saved=r.device,
                key=name,
            )
        return out

    def _read(
        self,
        f: BinaryIO,
        entry: TensorEntry,
        data_start: int,
        path: str,
        wanted: Mapping[str, Target],
        hasher: Hasher | None,
    ) -> torch.Tensor:
        device, dtype = wanted[entry.name]
        to_cuda = device is not None and device.type == "cuda" and torch.cuda.is_available()
        cpu = read_tensor(f, entry, data_start, path, pin_memory=to_cuda)
        if hasher is not None:
            hasher.update(tensor_bytes(cpu))
        placed = place(
            cpu,
            device,
            dtype,
            map_location=self.map_location,
            saved=self.manifest.tensors[entry.name].device,
            key=entry.name,
            non_blocking=to_cuda,
        )
        if to_cuda:
            self.cuda_devices.add(placed.device)
        return placed
