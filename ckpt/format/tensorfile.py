"""The safetensors file format, written from and read into tensor memory.

A safetensors file is an 8-byte little-endian header length ``N``, ``N`` bytes
of JSON (padded with spaces to a multiple of 8), then the raw little-endian
bytes of every tensor back to back. The header maps each tensor name to
``{"dtype", "shape", "data_offsets": [begin, end]}`` relative to the data
section, plus an optional ``"__metadata__"`` map of strings.

Header building and parsing are pure functions over bytes; the two streaming
helpers take an open binary file. Writing goes straight from each tensor's
memory (no intermediate ``bytes`` copy of the tensor); reading goes straight
into preallocated tensor memory. The files are byte-compatible with the
``safetensors`` library, which the tests use as the reference.
"""

from __future__ import annotations

import ctypes
import json
import struct
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import BinaryIO, Protocol

import torch

from ckpt.errors import CorruptCheckpointError
from ckpt.format.checksums import hash_bytes
from ckpt.format.dtypes import Typed, check_stored_dtype
from ckpt.format.limits import byte_count
from ckpt.state.tree import loads_strict

__all__ = [
    "MAX_HEADER_BYTES",
    "TensorEntry",
    "Typed",
    "check_stored_dtype",
    "cpu_contiguous",
    "dtype_from_name",
    "dtype_name",
    "encode_header",
    "layout",
    "pack_tensors",
    "parse_header",
    "read_tensor",
    "tensor_bytes",
    "write_tensors",
]

if sys.byteorder != "little":  # pragma: no cover - no big-endian CI machine
    raise ImportError("ckpt supports little-endian machines only (safetensors is little-endian)")

MAX_HEADER_BYTES = 100 * 1024 * 1024
"""Largest header accepted when reading (the safetensors library's own limit)."""

_SAFETENSORS_DTYPES: dict[torch.dtype, str] = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint64: "U64",
    torch.uint32: "U32",
    torch.uint16: "U16",
    torch.uint8: "U8",
    torch.bool: "BOOL",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
    torch.complex64: "C64",
}
_DTYPES_BY_NAME = {name: dtype for dtype, name in _SAFETENSORS_DTYPES.items()}


def dtype_name(dtype: torch.dtype) -> str:
    """Return the safetensors name of ``dtype`` (``torch.float32`` -> ``"F32"``).

    Raises:
        TypeError: safetensors has no name for this dtype.
    """
    try:
        return _SAFETENSORS_DTYPES[dtype]
    except KeyError:
        raise TypeError(f"dtype {dtype} cannot be stored in a safetensors file") from None


def dtype_from_name(name: str) -> torch.dtype | None:
    """Return the torch dtype for a safetensors dtype name, or ``None`` if unknown."""
    return _DTYPES_BY_NAME.get(name)


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor's bytes sit in the data section of a safetensors file."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        """The number of bytes the tensor occupies."""
        return self.end - self.begin


def layout(tensors: Mapping[str, torch.Tensor]) -> list[TensorEntry]:
    """Assign data offsets to tensors: widest element type first, then by name.

    Ordering by element size keeps every tensor aligned to its element size
    (the data section itself starts 8-byte aligned).
    """
    order = sorted(tensors, key=lambda name: (-tensors[name].element_size(), name))
    entries = []
    offset = 0
    for name in order:
        t = tensors[name]
        dtype_name(t.dtype)  # refuse unsupported dtypes before anything is written
        nbytes = t.numel() * t.element_size()
        entries.append(TensorEntry(name, t.dtype, tuple(t.shape), offset, offset + nbytes))
        offset += nbytes
    return entries


def pack_tensors(tensors: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, int]]:
    """Concatenate the bytes of ``tensors`` into one ``uint8`` CPU tensor.

    Tensors are placed as :func:`layout` places them (widest element first, then
    by name), so each offset is a multiple of its tensor's element size.

    Returns:
        The pack, and each tensor's byte offset in it.
    """
    entries = layout(tensors)
    pieces = [_contiguous(tensors[e.name]).reshape(-1).view(torch.uint8) for e in entries]
    if len({p.device for p in pieces}) > 1:
        pieces = [p.cpu() for p in pieces]
    # Concatenated where the tensors live (one copy to the host for a GPU, not one each).
    pack = torch.cat(pieces).cpu() if pieces else torch.empty(0, dtype=torch.uint8)
    return pack, {e.name: e.begin for e in entries}


def encode_header(entries: Iterable[TensorEntry], metadata: Mapping[str, str] | None) -> bytes:
    """Return the 8-byte length prefix plus the padded JSON header for ``entries``."""
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = dict(metadata)
    for e in entries:
        header[e.name] = {
            "dtype": dtype_name(e.dtype),
            "shape": list(e.shape),
            "data_offsets": [e.begin, e.end],
        }
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


def _is_index(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def parse_header(
    prefix: bytes, file_size: int, source: str
) -> tuple[dict[str, TensorEntry], dict[str, str], int]:
    """Parse and validate a safetensors header.

    Args:
        prefix: At least the first ``8 + N`` bytes of the file (``N`` from the
            length prefix); call with the first 8 bytes to learn ``N`` first.
        file_size: The file's size in bytes.
        source: The file's path, for error messages.

    Returns:
        The entries by name, the ``__metadata__`` map, and the offset of the
        data section from the start of the file.

    Raises:
        CorruptCheckpointError: The header is truncated, too large, not JSON,
            has duplicate keys, unknown dtypes, or offsets that overlap, leave
            gaps, disagree with the shape or run past the end of the file.
    """
    if file_size < 8 or len(prefix) < 8:
        raise CorruptCheckpointError("file is too short for a safetensors header", path=source)
    (n,) = struct.unpack("<Q", prefix[:8])
    if n > MAX_HEADER_BYTES or n > file_size - 8:
        raise CorruptCheckpointError(
            f"safetensors header length {n} exceeds the limit or the file size {file_size}",
            path=source,
        )
    if len(prefix) < 8 + n:
        raise CorruptCheckpointError("safetensors header is truncated", path=source)
    try:
        header = loads_strict(prefix[8 : 8 + n])
    except (ValueError, RecursionError) as e:
        raise CorruptCheckpointError(
            f"safetensors header is not valid JSON: {e}", path=source
        ) from e
    if not isinstance(header, dict):
        raise CorruptCheckpointError("safetensors header is not a JSON object", path=source)
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise CorruptCheckpointError("safetensors __metadata__ must map str to str", path=source)
    entries: dict[str, TensorEntry] = {}
    for name, info in header.items():
        entries[name] = _parse_entry(name, info, source)
    data_start = 8 + n
    expected = 0
    for entry in sorted(entries.values(), key=lambda x: (x.begin, x.end)):
        if entry.begin != expected:
            raise CorruptCheckpointError(
                f"tensor data offsets overlap or leave a gap at byte {entry.begin}",
                path=source,
                key=entry.name,
            )
        expected = entry.end
    if expected != file_size - data_start:
        raise CorruptCheckpointError(
            f"tensor data covers {expected} bytes but the file holds {file_size - data_start}",
            path=source,
        )
    return entries, metadata, data_start


def _parse_entry(name: str, info: object, source: str) -> TensorEntry:
    if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
        raise CorruptCheckpointError("malformed tensor entry", path=source, key=name)
    dtype = dtype_from_name(info["dtype"]) if isinstance(info["dtype"], str) else None
    shape, offsets = info["shape"], info["data_offsets"]
    if (
        dtype is None
        or not isinstance(shape, list)
        or not all(_is_index(d) for d in shape)
        or not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(_is_index(o) for o in offsets)
        or offsets[0] > offsets[1]
    ):
        raise CorruptCheckpointError("malformed tensor entry", path=source, key=name)
    nbytes = byte_count(shape, dtype.itemsize)  # stops early: a hostile shape costs no bignums
    if nbytes is None:
        raise CorruptCheckpointError(
            f"shape of {len(shape)} dimensions overflows a byte count", path=source, key=name
        )
    if nbytes != offsets[1] - offsets[0]:
        raise CorruptCheckpointError(
            f"byte count {offsets[1] - offsets[0]} does not match dtype {info['dtype']} "
            f"and shape {shape if len(shape) <= 8 else [*shape[:8], '...']}",
            path=source,
            key=name,
        )
    return TensorEntry(name, dtype, tuple(shape), offsets[0], offsets[1])


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """Return a writable byte view of a contiguous CPU tensor's memory (no copy).

    The view does not keep ``t`` alive: hold a reference to ``t`` while using it.
    """
    if t.device.type != "cpu" or not t.is_contiguous():
        raise ValueError("tensor_bytes needs a contiguous CPU tensor")
    nbytes = t.numel() * t.element_size()
    if nbytes == 0:
        return memoryview(bytearray())
    return memoryview((ctypes.c_ubyte * nbytes).from_address(t.data_ptr())).cast("B")


def _contiguous(t: torch.Tensor) -> torch.Tensor:
    t = t.detach()
    if t.is_conj():
        t = t.resolve_conj()
    if t.is_neg():
        t = t.resolve_neg()
    return t.contiguous()


def cpu_contiguous(t: torch.Tensor) -> torch.Tensor:
    """``t``'s values as a contiguous CPU tensor (``t`` itself when it already is one)."""
    return _contiguous(t).to("cpu").contiguous()


class Writer(Protocol):
    """Anything with a binary ``write`` (a file, or a wrapper that hashes as it writes)."""

    def write(self, data: bytes | bytearray | memoryview, /) -> int:
        """Write all of ``data``."""
        ...


WRITE_CHUNK_BYTES = 16 * 1024 * 1024
"""Tensor bytes go to the file in slices of at most this, so a writer that buffers
(an object-store upload) never holds a copy of a whole large tensor."""


def write_tensors(
    f: Writer,
    tensors: Mapping[str, torch.Tensor],
    metadata: Mapping[str, str] | None = None,
    *,
    digests: dict[str, tuple[int, str]] | None = None,
) -> int:
    """Write ``tensors`` to ``f`` as a safetensors file; return the bytes written.

    Tensors on other devices are copied to CPU one at a time, so the extra
    memory is bounded by the largest tensor.

    Args:
        f: Where to write.
        tensors: The tensors by name.
        metadata: The header's ``__metadata__``.
        digests: Filled with each tensor's first byte in the file and the
            checksum of its bytes (the chunks of a multi-rank save).
    """
    entries = layout(tensors)
    header = encode_header(entries, metadata)
    f.write(header)
    written = len(header)
    for e in entries:
        t = cpu_contiguous(tensors[e.name])
        view = tensor_bytes(t)
        if digests is not None:
            digests[e.name] = (len(header) + e.begin, hash_bytes(view))
        for at in range(0, e.nbytes, WRITE_CHUNK_BYTES):  # bounds a buffering writer's copy
            f.write(view[at : at + WRITE_CHUNK_BYTES])
        written += e.nbytes
    return written


def read_tensor(
    f: BinaryIO, entry: TensorEntry, data_start: int, source: str, *, pin_memory: bool = False
) -> torch.Tensor:
    """Read one tensor's bytes from ``f`` into a new CPU tensor of the entry's dtype and shape.

    Args:
        f: The open file.
        entry: The tensor's header entry.
        data_start: Offset of the data section in the file.
        source: The file's path, for error messages.
        pin_memory: Allocate page-locked memory (for a fast, asynchronous copy to a GPU).

    Raises:
        CorruptCheckpointError: The file ends before the tensor's last byte.
    """
    out = torch.empty(entry.shape, dtype=entry.dtype, pin_memory=pin_memory)
    if entry.nbytes == 0:
        return out
    f.seek(data_start + entry.begin)
    view = tensor_bytes(out)
    filled = 0
    while filled < entry.nbytes:
        n = f.readinto(view[filled:])  # type: ignore[attr-defined]
        if not n:
            raise CorruptCheckpointError(
                f"file ends after {filled} of {entry.nbytes} bytes of tensor data",
                path=source,
                key=entry.name,
            )
        filled += n
    return out
