"""The local spill of checked object-store bytes: whether they fit, and copying them there."""

from __future__ import annotations

import logging
import shutil
import tempfile
from typing import BinaryIO

from ckpt.errors import CorruptCheckpointError
from ckpt.format.checksums import Hasher
from ckpt.format.tensorfile import TensorEntry

__all__ = ["SPILL_MARGIN_BYTES", "copy_bytes", "spill_room"]

logger = logging.getLogger(__name__)

SPILL_MARGIN_BYTES = 256 * 1024 * 1024
"""Free space left on the local disk after a spill; with less, tensors go to memory."""


def spill_room(nbytes: int) -> bool:
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


def copy_bytes(
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
