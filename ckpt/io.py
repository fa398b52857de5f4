"""Reading and writing one checkpoint directory through a :class:`~ckpt.storage.Storage`.

The edge between the pure format modules and the filesystem: writes tensor
files and the manifest into a directory, reads a manifest back, and loads
tensors, checking every file against the manifest on the way.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import resource
import shutil
import tempfile
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from typing import BinaryIO

import torch

from ckpt.errors import CheckpointNotFoundError, CorruptCheckpointError
from ckpt.format import (
    MANIFEST_NAME,
    MAX_MANIFEST_BYTES,
    FileRecord,
    Manifest,
    TensorRecord,
    decode_manifest,
    encode_manifest,
)
from ckpt.integrity import CHUNK_BYTES, Hasher, HashingWriter, hash_bytes
from ckpt.locations import MapLocation, mapped_device, place
from ckpt.optim import Target
from ckpt.storage import BackgroundSyncs, Storage
from ckpt.tensorfile import (
    MAX_HEADER_BYTES,
    TensorEntry,
    parse_header,
    read_tensor,
    tensor_bytes,
    write_tensors,
)

__all__ = [
    "MAX_MANIFEST_BYTES",
    "PendingReads",
    "load_tensors",
    "manifest_digest",
    "read_manifest",
    "verify_checkpoint_files",
    "write_checkpoint_files",
]

logger = logging.getLogger(__name__)

_SAFETENSORS_METADATA = {"format": "pt"}


def write_checkpoint_files(
    storage: Storage,
    directory: str,
    files: Mapping[str, Mapping[str, torch.Tensor]],
    manifest: Manifest,
    *,
    replace_manifest: bool = False,
    before_manifest: Callable[[], None] | None = None,
) -> Manifest:
    """Write each tensor file, then the manifest (with the files' sizes and checksums) last.

    Each file's checksum is computed from the bytes as they are written.

    Args:
        storage: Where to write.
        directory: A directory below the storage root where the files do not exist yet.
        files: ``{file name: {tensor name: tensor}}``.
        manifest: The manifest to complete with file records and write.
        replace_manifest: Overwrite an existing manifest instead of failing.
        before_manifest: Called once the files are durable, before the manifest is
            written; raising stops the save there.

    Returns:
        The manifest as written.

    Raises:
        FileExistsError: A file (the manifest, when another writer committed first) exists.
    """
    records: dict[str, FileRecord] = {}
    with BackgroundSyncs() as syncs:  # each file flushes while the next is written
        for file_name, tensors in files.items():
            hashers: list[Hasher] = []

            def write(
                f: BinaryIO,
                tensors: Mapping[str, torch.Tensor] = tensors,
                hashers: list[Hasher] = hashers,
            ) -> int:
                hashers.append(Hasher())  # a fresh digest for each attempt
                return write_tensors(HashingWriter(f, hashers[-1]), tensors, _SAFETENSORS_METADATA)

            size = storage.write_file((directory, file_name), write, syncs=syncs)
            records[file_name] = FileRecord(size, hashers[-1].digest())
        syncs.wait()  # every tensor file is durable before the manifest exists
    if before_manifest is not None:
        before_manifest()
    manifest = dataclasses.replace(manifest, files=records)
    raw = encode_manifest(manifest)

    def write_manifest(f: BinaryIO) -> int:
        f.write(raw)
        return len(raw)

    storage.write_file((directory, MANIFEST_NAME), write_manifest, replace=replace_manifest)
    return manifest


def read_manifest(storage: Storage, directory: str) -> Manifest:
    """Read and validate the manifest of a checkpoint directory.

    Raises:
        CheckpointNotFoundError: There is no manifest (not a committed checkpoint).
        CorruptCheckpointError: The manifest is malformed.
    """
    path = storage.path(directory, MANIFEST_NAME)
    return decode_manifest(_manifest_bytes(storage, directory), path)


def manifest_digest(storage: Storage, directory: str) -> str:
    """A digest of the manifest's bytes, unparsed: tells a replaced checkpoint apart cheaply.

    Raises:
        CheckpointNotFoundError: There is no manifest.
        CorruptCheckpointError: It is larger than any manifest may be.
    """
    return hash_bytes(_manifest_bytes(storage, directory))


def _manifest_bytes(storage: Storage, directory: str) -> bytes:
    size = storage.size(directory, MANIFEST_NAME)
    if size > MAX_MANIFEST_BYTES:
        raise CorruptCheckpointError(
            f"manifest is {size} bytes, more than the {MAX_MANIFEST_BYTES} allowed",
            path=storage.path(directory, MANIFEST_NAME),
        )
    return storage.read_bytes(directory, MANIFEST_NAME)


def _read_header(
    f: BinaryIO, path: str, size: int, hasher: Hasher | None
) -> tuple[dict[str, TensorEntry], int]:
    head = f.read(8)
    n = int.from_bytes(head, "little") if len(head) == 8 else 0
    prefix = head + f.read(max(0, min(n, size - 8, MAX_HEADER_BYTES)))
    entries, _, data_start = parse_header(prefix, size, path)
    if hasher is not None:
        hasher.update(prefix)
    return entries, data_start


def _check_digest(record: FileRecord, hasher: Hasher, path: str, step: int) -> None:
    actual = hasher.digest()
    if actual != record.checksum:
        raise CorruptCheckpointError(
            f"checksum mismatch in step {step}: expected {record.checksum}, actual {actual}",
            path=path,
        )


def _check_size(storage: Storage, directory: str, file_name: str, manifest: Manifest) -> str:
    path = storage.path(directory, file_name)
    expected = manifest.files[file_name].size
    try:
        actual = storage.size(directory, file_name)
    except CheckpointNotFoundError as e:
        raise CorruptCheckpointError(
            f"a file of step {manifest.step} listed in its manifest is missing", path=path
        ) from e
    if actual != expected:
        raise CorruptCheckpointError(
            f"file size in step {manifest.step} is {actual} bytes, the manifest says {expected}",
            path=path,
        )
    return path


READ_SLICE_BYTES = 32 * 1024 * 1024
"""Reads into live tensors go in slices of at most this, spread over threads."""

PARALLEL_READ_BYTES = 64 * 1024 * 1024
"""Below this many bytes to read into live tensors, one thread does it all."""

MAX_READ_THREADS = 4


@dataclasses.dataclass(frozen=True)
class _Slice:
    """Part of one tensor's bytes, read with ``pread`` (threads share the descriptor)."""

    fd: int
    offset: int
    view: memoryview
    path: str
    key: str

    def read(self) -> None:
        _pread_exactly(self.fd, self.offset, self.view, self.path, self.key)


def _pread_exactly(fd: int, offset: int, view: memoryview, path: str, key: str) -> None:
    """Fill ``view`` from ``fd`` at ``offset``, or raise the after-the-checks error."""
    filled = 0
    try:
        while filled < len(view):
            n = os.preadv(fd, [view[filled:]], offset + filled)
            if not n:
                raise EOFError(f"the file ends at byte {offset + filled}")
            filled += n
    except (OSError, EOFError) as e:
        raise CorruptCheckpointError(
            f"reading into the live tensor failed after every check had passed ({e}); "
            "tensors loaded in place before it hold the checkpoint's values, the rest "
            "their old ones",
            path=path,
            key=key,
        ) from e


CAST_CHUNK_BYTES = 8 * 1024 * 1024
"""Bytes read at a time for a live tensor that needs a cast or lives on a GPU."""


def _read_cast(
    fd: int, offset: int, entry: TensorEntry, out: torch.Tensor, path: str, buffer: torch.Tensor
) -> None:
    """Read ``entry``'s bytes a chunk at a time into ``out``.

    Each chunk is cast (and moved to ``out``'s device) exactly as
    ``out.copy_(whole)`` would cast it.
    """
    itemsize = entry.dtype.itemsize
    step = max(itemsize, len(buffer) // itemsize * itemsize)
    flat = out.view(-1)
    for begin in range(0, entry.nbytes, step):
        n = min(step, entry.nbytes - begin)
        _pread_exactly(fd, offset + begin, tensor_bytes(buffer)[:n], path, entry.name)
        flat[begin // itemsize : (begin + n) // itemsize].copy_(buffer[:n].view(entry.dtype))


SPILL_MARGIN_BYTES = 256 * 1024 * 1024
"""Free space left on the local disk after a spill; with less, tensors go to memory."""


def _spill_room(nbytes: int) -> bool:
    """Whether ``nbytes`` of checked remote bytes fit in ``tempfile.gettempdir()`` with margin."""
    directory = tempfile.gettempdir()
    try:
        free = shutil.disk_usage(directory).free
    except OSError:
        return False
    if free < nbytes + SPILL_MARGIN_BYTES:
        logger.info(
            "not enough room in %s to spill %d bytes; restoring through memory", directory, nbytes
        )
        return False
    return True


def _copy_bytes(
    f: BinaryIO,
    to: BinaryIO,
    entry: TensorEntry,
    path: str,
    hasher: Hasher | None,
    buffer: bytearray,
) -> None:
    """Copy one tensor's bytes from ``f`` (positioned at them) to ``to``, hashing them."""
    view = memoryview(buffer)
    left = entry.nbytes
    while left:
        n = f.readinto(view[: min(len(view), left)])  # type: ignore[attr-defined]
        if not n:
            raise CorruptCheckpointError(
                f"file ends {left} bytes before the end of the tensor", path=path, key=entry.name
            )
        if hasher is not None:
            hasher.update(view[:n])
        to.write(view[:n])
        left -= n


MAX_HELD_FILES = 16
"""Checked files kept open from the checks to the reads into live tensors, at most (fewer
under a low ``RLIMIT_NOFILE``); beyond, files are reopened and their identity compared."""


def held_files_limit() -> int:
    """How many checked files a restore keeps open.

    :data:`MAX_HELD_FILES`, or an eighth of the soft descriptor limit if that is
    lower (at least 1).
    """
    try:
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    except (OSError, ValueError):
        return MAX_HELD_FILES
    if soft == resource.RLIM_INFINITY:
        return MAX_HELD_FILES
    return max(1, min(MAX_HELD_FILES, soft // 8))


@dataclasses.dataclass(frozen=True)
class _Reopen:
    """A checked file closed to bound open descriptors: reopened only if still identical."""

    storage: Storage
    identity: object
    parts: tuple[str, ...]


_Source = BinaryIO | _Reopen
_Read = tuple[TensorEntry, int, str, torch.Tensor]
"""A deferred read: the tensor's entry, its data start, the file's path, the live tensor."""


class PendingReads:
    """Reads straight into live tensors, held back until every check of a restore has passed.

    The bytes read are those checked, even if the checkpoint is replaced or
    deleted meanwhile: up to :func:`held_files_limit` checked files stay open
    until the reads; beyond that, local files are closed and reopened one at a
    time, and must still be the same file (device, inode, size, modification
    and change times), else the restore fails; object-store bytes wait in one
    unnamed local spill file. Open descriptors stay bounded however many files
    a checkpoint has. Use as a context manager, or call :meth:`close`.
    """

    def __init__(self) -> None:
        self._files = ExitStack()
        self._held = 0
        self._limit = held_files_limit()
        self._spill: BinaryIO | None = None
        self._reads: dict[int, tuple[_Source, list[_Read]]] = {}
        self._copies: list[tuple[torch.Tensor, torch.Tensor]] = []

    def __enter__(self) -> PendingReads:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def can_hold(self) -> bool:
        """Whether one more checked file may stay open until the reads."""
        return self._held < self._limit

    def hold(self, scope: ExitStack) -> None:
        """Keep what ``scope`` holds (one checked file) open until :meth:`close`."""
        self._held += 1
        self._files.push(scope)

    def spill(self, nbytes: int) -> BinaryIO | None:
        """The one unnamed local file where checked remote bytes wait, if ``nbytes`` more fit.

        It lives in ``tempfile.gettempdir()`` (``TMPDIR``) and disappears when
        closed or when the process dies.
        """
        if not _spill_room(nbytes):
            return None
        if self._spill is None:
            spill = tempfile.TemporaryFile(dir=tempfile.gettempdir())  # noqa: SIM115 - held
            self._spill = self._files.enter_context(spill)
        return self._spill

    def add(
        self, source: _Source, entry: TensorEntry, data_start: int, path: str, out: torch.Tensor
    ) -> None:
        """Schedule reading ``entry`` of ``source`` into ``out`` (cast to its dtype)."""
        self._reads.setdefault(id(source), (source, []))[1].append((entry, data_start, path, out))

    def copy(self, source: torch.Tensor, out: torch.Tensor) -> None:
        """Schedule copying ``source`` (checked bytes already in memory) into ``out``."""
        self._copies.append((source, out))

    def run(self) -> None:
        """Do the reads; large ones in slices on several threads.

        Files that were closed are first reopened one at a time and compared
        with what was checked, before any live tensor is touched.

        Raises:
            CorruptCheckpointError: A file was replaced since it was checked
                (nothing is touched), or a read failed (the file changed or the
                disk failed since the checks; the message says that live
                tensors may be partly overwritten).
        """
        groups, self._reads = list(self._reads.values()), {}
        for source, _ in groups:
            if isinstance(source, _Reopen):
                with source.storage.reopen(source.identity, *source.parts):
                    pass
        copies, self._copies = self._copies, []
        for tensor, out in copies:
            out.copy_(tensor)
        if self._spill is not None:
            self._spill.flush()
        _run_reads([(s, reads) for s, reads in groups if not isinstance(s, _Reopen)])
        for source, reads in groups:
            if isinstance(source, _Reopen):
                with source.storage.reopen(source.identity, *source.parts) as f:
                    _run_reads([(f, reads)])

    def close(self) -> None:
        """Close the files; reads not run are dropped."""
        self._reads = {}
        self._copies = []
        self._spill = None
        self._held = 0
        self._files.close()


def _run_reads(files: list[tuple[BinaryIO, list[_Read]]]) -> None:
    """Read each entry of the open files into its live tensor; large ones on several threads."""
    casts: list[tuple[int, _Read]] = []
    direct: list[tuple[int, _Read]] = []
    for f, reads in files:
        for r in reads:
            same_bytes = r[3].device.type == "cpu" and r[3].dtype == r[0].dtype
            (direct if same_bytes else casts).append((f.fileno(), r))
    if casts:
        pin = torch.cuda.is_available() and any(r[3].device.type == "cuda" for _, r in casts)
        largest = max(r[0].nbytes for _, r in casts)
        buffer = torch.empty(min(largest, CAST_CHUNK_BYTES), dtype=torch.uint8, pin_memory=pin)
        for fd, (entry, data_start, path, out) in casts:
            _read_cast(fd, data_start + entry.begin, entry, out, path, buffer)
    slices: list[_Slice] = []
    for fd, (entry, data_start, path, out) in direct:
        view = tensor_bytes(out)
        if len(view) != entry.nbytes:
            raise ValueError(f"{entry.name}: {len(view)} bytes to fill, not {entry.nbytes}")
        at = data_start + entry.begin
        for begin in range(0, entry.nbytes, READ_SLICE_BYTES):
            part = view[begin : begin + READ_SLICE_BYTES]
            slices.append(_Slice(fd, at + begin, part, path, entry.name))
    total = sum(len(piece.view) for piece in slices)
    workers = min(os.cpu_count() or 1, MAX_READ_THREADS)
    if workers >= 2 and total >= PARALLEL_READ_BYTES:
        with ThreadPoolExecutor(workers, thread_name_prefix="ckpt-read") as pool:
            try:
                done = pool.map(_Slice.read, slices)
            except RuntimeError:  # the interpreter is exiting: read on this thread
                pass
            else:
                for _ in done:
                    pass  # re-raises the first failure
                return
    for piece in slices:
        piece.read()


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
    by_file: dict[str, list[str]] = {}
    for name in names:
        record = manifest.tensors.get(name)
        if record is None:
            raise CorruptCheckpointError(
                "state refers to a tensor the manifest does not list",
                path=storage.path(directory, MANIFEST_NAME),
                key=name,
            )
        by_file.setdefault(record.file, []).append(name)
    out: dict[str, torch.Tensor] = {}
    reader = _FileReader(storage, directory, manifest, map_location, verify, into)
    with ExitStack() as on_error:
        on_error.push(reader.pending)
        for file_name, file_names in by_file.items():
            wanted: dict[str, Target] = {}
            for name in file_names:
                record = manifest.tensors[name]
                device, dtype = targets.get(name, (None, None))
                if device is None and not callable(map_location):
                    device = mapped_device(map_location, record.device)
                if device is not None and device.type == "meta":
                    out[name] = torch.empty(
                        record.shape, dtype=dtype or record.dtype, device="meta"
                    )
                else:
                    wanted[name] = (device, dtype)
            if wanted:
                out.update(reader.load(file_name, wanted))
        for cuda in reader.cuda_devices:  # pinned host copies are asynchronous: finish them
            torch.cuda.synchronize(cuda)
        on_error.pop_all()
    return out, reader.pending


class _FileReader:
    """Loads the wanted tensors of one file at a time for :func:`load_tensors`."""

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
        self._scratch = bytearray()

    def load(self, file_name: str, wanted: Mapping[str, Target]) -> dict[str, torch.Tensor]:
        """Read ``wanted`` from one file (hashing it whole), deferring reads into live tensors.

        Packed tensors are cut from their pack, which is read whole.
        """
        manifest = self.manifest
        path = _check_size(self.storage, self.directory, file_name, manifest)
        record = manifest.files[file_name]
        hasher = Hasher() if self.verify and record.checksum else None
        packed = {n: manifest.tensors[n] for n in wanted if manifest.tensors[n].pack is not None}
        direct = {n: t for n, t in wanted.items() if n not in packed}
        packs = {r.pack for r in packed.values() if r.pack is not None}
        in_place = {n for n in direct if n in self.into}
        spill = None
        out: dict[str, torch.Tensor] = {}
        buffers: dict[str, torch.Tensor] = {}
        if not self._scratch:
            self._scratch = bytearray(CHUNK_BYTES)
        with ExitStack() as file_scope:
            f = file_scope.enter_context(self.storage.open_read(self.directory, file_name))
            source: _Source = f
            identity = self.storage.file_identity(f) if in_place else None
            if in_place and identity is None:  # an object store: checked bytes wait locally
                spill = self.pending.spill(sum(manifest.tensors[n].nbytes for n in in_place))
                if spill is None:
                    in_place = set()  # no room: read them into fresh memory instead
            elif in_place and self.pending.can_hold():
                self.pending.hold(file_scope.pop_all())  # open until the pending reads ran
            elif in_place:  # closed now, reopened for the reads only if still the file checked
                source = _Reopen(self.storage, identity, (self.directory, file_name))
            entries, data_start = _read_header(f, path, record.size, hasher)
            for name in [*direct, *packs]:
                _matching_entry(entries, name, manifest.tensors[name], path)
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
                    hasher.skip(f, entry.nbytes, self._scratch)
        if hasher is not None:
            _check_digest(record, hasher, path, manifest.step)
        out.update(self._cut(packed, buffers, wanted))
        return out

    def _defer(
        self,
        f: BinaryIO,
        source: _Source,
        entry: TensorEntry,
        data_start: int,
        path: str,
        hasher: Hasher | None,
        spill: BinaryIO | None,
    ) -> torch.Tensor:
        """Hash a tensor's bytes now and schedule reading them into its live tensor."""
        live = self.into[entry.name]
        if spill is None:
            self.pending.add(source, entry, data_start, path, live)
            if hasher is not None:
                hasher.skip(f, entry.nbytes, self._scratch)
            return live
        at = spill.tell()
        _copy_bytes(f, spill, entry, path, hasher, self._scratch)
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


def verify_checkpoint_files(storage: Storage, directory: str, manifest: Manifest) -> int:
    """Read every file of a checkpoint whole and check it against the manifest.

    Checks each file's size, header (every tensor the manifest places in it, with
    its dtype and shape, and nothing else) and checksum.

    Returns:
        The number of bytes checked.

    Raises:
        CheckpointNotFoundError: A file is missing.
        CorruptCheckpointError: A file disagrees with the manifest.
    """
    in_file: dict[str, set[str]] = {name: set() for name in manifest.files}
    for name, tensor in manifest.tensors.items():
        if tensor.pack is None:  # packed tensors live inside their pack
            in_file[tensor.file].add(name)
    scratch = bytearray(CHUNK_BYTES)
    checked = 0
    for file_name, names in in_file.items():
        path = _check_size(storage, directory, file_name, manifest)
        record = manifest.files[file_name]
        hasher = Hasher()
        with storage.open_read(directory, file_name) as f:
            entries, data_start = _read_header(f, path, record.size, hasher)
            for name in names:
                _matching_entry(entries, name, manifest.tensors[name], path)
            extra = sorted(set(entries) - names)
            if extra:
                raise CorruptCheckpointError(
                    f"file holds tensors the manifest does not list: {extra[:5]}", path=path
                )
            hasher.skip(f, record.size - data_start, scratch)
        if record.checksum is not None:
            _check_digest(record, hasher, path, manifest.step)
        checked += record.size
    return checked


def _matching_entry(
    entries: Mapping[str, TensorEntry], name: str, record: TensorRecord, path: str
) -> TensorEntry:
    entry = entries.get(name)
    if entry is None:
        raise CorruptCheckpointError("tensor is missing from its file", path=path, key=name)
    if entry.dtype != record.dtype or entry.shape != record.shape:
        raise CorruptCheckpointError(
            f"file holds {entry.dtype} {list(entry.shape)} but the manifest says "
            f"{record.dtype} {list(record.shape)}",
            path=path,
            key=name,
        )
    return entry
