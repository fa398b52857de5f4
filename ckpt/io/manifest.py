"""Reading a checkpoint's manifest: parsed and validated, or only its digest."""

from __future__ import annotations

from ckpt.errors import CorruptCheckpointError
from ckpt.format import MANIFEST_NAME, MAX_MANIFEST_BYTES, Manifest, decode_manifest
from ckpt.format.checksums import hash_bytes
from ckpt.storage import Storage

__all__ = ["manifest_digest", "read_manifest"]


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
