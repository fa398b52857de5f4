"""The bytes :class:`~ckpt.distributed.group.RankGroup` moves: JSON as UTF-8, lengths first.

A collective's first message is :func:`pack`'s fixed-size tensor, a payload's length and,
when it fits in :data:`INLINE_BYTES`, the payload itself; every rank reads every length
from it, so that all of them know alike whether a second message (the longer payloads)
follows.
"""

from __future__ import annotations

import ctypes
import json

import torch

from ckpt.state.tree import Json

__all__ = [
    "HEADER_BYTES",
    "INLINE_BYTES",
    "NOTHING",
    "as_bytes",
    "as_tensor",
    "encode",
    "pack",
    "unpack",
]

# A length a rank sends instead of its payload's when it has nothing valid to send
# (its value is not JSON, or it is the source and gave no bytes), so that every rank
# leaves the collective together and raises, rather than the others hanging.
NOTHING = -1
# A payload (JSON or bytes) of at most this many bytes travels with its length in one
# collective (most values: outcomes, steps, names, plans); a longer one takes a second.
INLINE_BYTES = 1024
HEADER_BYTES = 8  # a payload's length, int64 little-endian, before its inline bytes


def encode(value: Json) -> tuple[bytes | None, TypeError | None]:
    """JSON-encode ``value`` as UTF-8 (lone surrogates kept), or say why not."""
    try:
        text = json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    except (TypeError, ValueError, RecursionError) as e:
        error = TypeError(f"cannot send {type(value).__name__} as JSON: {e}")
        error.__cause__ = e
        return None, error
    return text.encode("utf-8", "surrogatepass"), None


def pack(payload: bytes | None) -> torch.Tensor:
    """``payload``'s length (``NOTHING`` for None) and, if at most INLINE_BYTES, its bytes."""
    length = NOTHING if payload is None else len(payload)
    packed = torch.zeros(HEADER_BYTES + INLINE_BYTES, dtype=torch.uint8)
    packed[:HEADER_BYTES] = as_tensor(length.to_bytes(HEADER_BYTES, "little", signed=True))
    if payload is not None and 0 < length <= INLINE_BYTES:
        packed[HEADER_BYTES : HEADER_BYTES + length] = as_tensor(payload)
    return packed


def unpack(packed: torch.Tensor) -> tuple[int, bytes]:
    """The length and the inline bytes (all INLINE_BYTES of them) of a :func:`pack` tensor."""
    data = as_bytes(packed)
    return int.from_bytes(data[:HEADER_BYTES], "little", signed=True), data[HEADER_BYTES:]


def as_tensor(data: bytes) -> torch.Tensor:
    """A writable uint8 CPU tensor holding a copy of ``data``."""
    if not data:
        return torch.empty(0, dtype=torch.uint8)
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def as_bytes(tensor: torch.Tensor) -> bytes:
    """A copy of a uint8 CPU tensor's bytes (without numpy, an optional torch dependency)."""
    tensor = tensor.contiguous()
    return ctypes.string_at(tensor.data_ptr(), tensor.numel()) if tensor.numel() else b""
