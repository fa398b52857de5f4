"""Checksums: computed while bytes are written or read, never in a second pass.

ckpt uses XXH3-64 (from the ``xxhash`` library): it runs at memory speed, so
checking every byte on restore costs little next to reading it. A digest is
written as ``"xxh3_64:<16 hex digits>"`` so that the algorithm can change later.
"""

from __future__ import annotations

from typing import BinaryIO

import xxhash

__all__ = ["ALGORITHM", "Hasher", "HashingWriter", "format_digest", "hash_bytes"]

ALGORITHM = "xxh3_64"

CHUNK_BYTES = 8 * 1024 * 1024
"""Read size when bytes are hashed without being kept."""


class Hasher:
    """A running XXH3-64 digest."""

    def __init__(self) -> None:
        self._state = xxhash.xxh3_64()

    def update(self, data: bytes | bytearray | memoryview) -> None:
        """Add bytes to the digest."""
        self._state.update(data)

    def digest(self) -> str:
        """The digest so far, as ``"xxh3_64:<hex>"``."""
        return format_digest(self._state.hexdigest())

    def skip(self, f: BinaryIO, count: int, buffer: bytearray) -> int:
        """Read ``count`` bytes of ``f`` into the digest without keeping them.

        Returns:
            How many bytes were read (fewer only at the end of the file).
        """
        view = memoryview(buffer)
        done = 0
        while done < count:
            n = f.readinto(view[: min(len(buffer), count - done)])  # type: ignore[attr-defined]
            if not n:
                break
            self.update(view[:n])
            done += n
        return done


def format_digest(hexdigest: str) -> str:
    """Prefix a hex digest with the algorithm name."""
    return f"{ALGORITHM}:{hexdigest}"


def hash_bytes(data: bytes | bytearray | memoryview) -> str:
    """The digest of ``data``, as ``"xxh3_64:<hex>"``."""
    return format_digest(xxhash.xxh3_64_hexdigest(data))


class HashingWriter:
    """Wraps a binary file: everything written through it also goes into a digest."""

    def __init__(self, f: BinaryIO, hasher: Hasher):
        self._f = f
        self.hasher = hasher

    def write(self, data: bytes | bytearray | memoryview) -> int:
        """Hash ``data``, then write all of it."""
        self.hasher.update(data)
        return self._f.write(data)
