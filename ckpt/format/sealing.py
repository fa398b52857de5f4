"""The manifest's own checksum: sealing the JSON on write and checking it on read."""

from __future__ import annotations

import re

from ckpt.errors import CorruptCheckpointError
from ckpt.format.checksums import Hasher, hash_bytes


def sealed(body: str) -> bytes:
    """The JSON object ``body`` with its own checksum added as the last field."""
    checksum = hash_bytes(body.encode("utf-8"))
    return (body[:-1] + f',"checksum":"{checksum}"}}\n').encode("utf-8")


_CHECKSUM_TAIL = re.compile(rb',"checksum":"(xxh3_64:[0-9a-f]{16})"\}\n?\Z')


def check_manifest_checksum(raw: bytes, source: str) -> bool:
    """Verify the manifest's own checksum, when it has one (manifests of ckpt 0.1.0 do not).

    Returns:
        Whether it has one.
    """
    tail = _CHECKSUM_TAIL.search(raw, max(0, len(raw) - 64))  # it can only be at the end
    if tail is None:
        if b'"checksum"' in raw[-64:]:
            raise CorruptCheckpointError("manifest checksum is malformed", path=source)
        return False
    hasher = Hasher()  # the bytes before the checksum, closed: hashed in place, not copied
    hasher.update(memoryview(raw)[: tail.start()])
    hasher.update(b"}")
    actual = hasher.digest()
    expected = tail.group(1).decode()
    if actual != expected:
        raise CorruptCheckpointError(
            f"manifest checksum mismatch: expected {expected}, actual {actual}",
            path=source,
            key="checksum",
        )
    return True
