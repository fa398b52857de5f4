"""How large a manifest may be, and how far a compressed one may inflate.

Read these limits as attributes of this module (``bounds.MAX_MANIFEST_BYTES``) at
call time, so that one assignment here changes them for writers and readers alike.
"""

from __future__ import annotations

import zlib

from ckpt.errors import CorruptCheckpointError

MAX_MANIFEST_BYTES = 64 * 1024 * 1024
"""Largest manifest, compressed or not, read or written (400,000 tensors is about 60 MB of JSON)."""
MAX_MANIFEST_VALUES = 2**22
"""Most JSON values (and object members) a manifest may hold, counted as the bytes ``,``,
``[`` and ``{`` in its JSON: it bounds the time and memory parsing takes (about 10
values per tensor)."""
MAX_COMPRESSION_RATIO = 64
"""A compressed manifest may inflate to at most this many times its size (or to
:data:`INFLATE_FREELY`); a manifest that compresses better is stored plain."""
INFLATE_FREELY = 1024 * 1024
"""Any compressed manifest may inflate this far, whatever its ratio."""
COMPRESS_MANIFEST_ABOVE = 64 * 1024
"""Manifests whose JSON is larger than this are stored zlib-compressed (version 2)."""
MIN_BLOB_BYTES = 64 * 1024
"""An incremental save (version 4) stores tensors of at least this many bytes (not
packed) in the root's content store; smaller ones stay in the step's own files."""


def checked_size(raw: bytes, step: int, *, inflated: int = 0) -> bytes:
    """``raw``, when a reader accepts a manifest of its size."""
    if max(len(raw), inflated) > MAX_MANIFEST_BYTES:
        raise ValueError(
            f"the manifest of step {step} would be {max(len(raw), inflated)} bytes, more than "
            f"the {MAX_MANIFEST_BYTES} a reader accepts; store long lists as tensors"
        )
    return raw


def inflate_limit(compressed: int) -> int:
    """How far a compressed manifest of ``compressed`` bytes may inflate."""
    return min(MAX_MANIFEST_BYTES, max(INFLATE_FREELY, MAX_COMPRESSION_RATIO * compressed))


def decompressed(raw: bytes, source: str) -> bytes:
    """The JSON of a manifest, inflating a compressed one within the size limit."""
    if not raw.startswith(b"x"):  # zlib's first byte; JSON text cannot start with it
        return raw
    limit = inflate_limit(len(raw))
    inflate = zlib.decompressobj()
    try:
        out = inflate.decompress(raw, limit + 1)
    except zlib.error as e:
        raise CorruptCheckpointError(f"compressed manifest is damaged: {e}", path=source) from e
    if len(out) > limit:
        raise CorruptCheckpointError(
            f"compressed manifest of {len(raw)} bytes inflates past the {limit} bytes allowed "
            f"({MAX_COMPRESSION_RATIO} times its size, at most {MAX_MANIFEST_BYTES})",
            path=source,
        )
    if not inflate.eof or inflate.unused_data:
        raise CorruptCheckpointError(
            "compressed manifest is truncated or followed by other bytes", path=source
        )
    return out
