"""Reading checked bytes into live tensors: sliced over threads, or cast a chunk at a time."""

from __future__ import annotations

import dataclasses
import os
from concurrent.futures import Executor, ThreadPoolExecutor
from typing import BinaryIO

import torch

from ckpt.errors import CorruptCheckpointError
from ckpt.format.tensorfile import TensorEntry, tensor_bytes

__all__ = [
    "CAST_CHUNK_BYTES",
    "PARALLEL_READ_BYTES",
    "READ_SLICE_BYTES",
    "DeferredRead",
    "run_reads",
]

DeferredRead = tuple[TensorEntry, int, str, torch.Tensor]
"""A deferred read: the tensor's entry, its data start, the file's path, the live tensor."""

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


def run_reads(
    files: list[tuple[BinaryIO, list[DeferredRead]]], pool: Executor | None = None
) -> None:
    """Read each entry of the open files into its live tensor; large ones on several threads.

    ``pool``: the threads to read on (reused across calls); by default, new ones
    when the reads are large enough.
    """
    casts: list[tuple[int, DeferredRead]] = []
    direct: list[tuple[int, DeferredRead]] = []
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
    if pool is not None and len(slices) > 1:
        _read_on(pool, slices)
        return
    total = sum(len(piece.view) for piece in slices)
    workers = read_threads()
    if workers >= 2 and total >= PARALLEL_READ_BYTES:
        with ThreadPoolExecutor(workers, thread_name_prefix="ckpt-read") as own:
            _read_on(own, slices)
        return
    for piece in slices:
        piece.read()


def read_threads() -> int:
    """How many threads large reads use."""
    return min(os.cpu_count() or 1, MAX_READ_THREADS)


def _read_on(pool: Executor, slices: list[_Slice]) -> None:
    """Read the slices on ``pool`` (on this thread if the interpreter is exiting)."""
    try:
        done = pool.map(_Slice.read, slices)
    except RuntimeError:  # the interpreter is exiting: read on this thread
        for piece in slices:
            piece.read()
        return
    for _ in done:
        pass  # re-raises the first failure
