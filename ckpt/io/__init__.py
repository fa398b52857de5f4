"""Reading and writing one checkpoint directory through a :class:`~ckpt.storage.Storage`.

The edge between the pure format modules and the filesystem, one concern per module:

- :mod:`ckpt.io.write`: the tensor files, then the manifest last.
- :mod:`ckpt.io.manifest`: reading a manifest back (or only its digest).
- :mod:`ckpt.io.checks`: one file's size, header and checksum against the manifest.
- :mod:`ckpt.io.read`: the checked read of tensors.
- :mod:`ckpt.io.pending`: the in-place second pass, run once every check has passed.
- :mod:`ckpt.io.held_files`: the checked files kept for that pass (held open, or
  reopened only if unchanged) and the spill, for one process or a rank of a group.
- :mod:`ckpt.io.live_reads`: reading checked bytes straight into live tensors.
- :mod:`ckpt.io.spill`: where checked object-store bytes wait locally.
- :mod:`ckpt.io.verify`: checking every file of a checkpoint without loading it.
- :mod:`ckpt.io.chunks`: chunks of global tensors (version 3): read, assembled, verified.
- :mod:`ckpt.io.held_chunks`: chunks checked once, their files held, then read into
  live tensors from those files (a restore in a process group).

Tunables (``READ_SLICE_BYTES``, ``MAX_HELD_FILES``, ...) live in, and are
read from, their own module; they are deliberately not re-exported here.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ckpt.format import MAX_MANIFEST_BYTES

if TYPE_CHECKING:
    from ckpt.io.chunks import (
        assemble_tensor,
        chunk_checksum,
        data_offsets,
        read_chunk,
        read_chunk_slice,
        verify_sharded_files,
    )
    from ckpt.io.manifest import manifest_digest, read_manifest
    from ckpt.io.pending import PendingReads
    from ckpt.io.read import load_tensors
    from ckpt.io.verify import verify_checkpoint_files
    from ckpt.io.write import write_checkpoint_files

_HOMES = {
    "assemble_tensor": "chunks",
    "chunk_checksum": "chunks",
    "data_offsets": "chunks",
    "read_chunk": "chunks",
    "read_chunk_slice": "chunks",
    "verify_sharded_files": "chunks",
    "manifest_digest": "manifest",
    "read_manifest": "manifest",
    "PendingReads": "pending",
    "load_tensors": "read",
    "verify_checkpoint_files": "verify",
    "write_checkpoint_files": "write",
}
"""Each name's module, imported on first use: reading a manifest (``ckpt ls``) needs no torch."""


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        return _submodule(name)
    value = getattr(importlib.import_module(f"{__name__}.{home}"), name)
    globals()[name] = value
    return value


def _submodule(name: str) -> Any:
    """``ckpt.io.write`` after ``import ckpt.io``, as when this package imported every module."""
    if name.startswith("_"):
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    try:
        return importlib.import_module(f"{__name__}.{name}")
    except ModuleNotFoundError as e:
        if e.name != f"{__name__}.{name}":
            raise
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None


def __dir__() -> list[str]:
    return sorted({*globals(), *_HOMES})


__all__ = [
    "MAX_MANIFEST_BYTES",
    "PendingReads",
    "assemble_tensor",
    "chunk_checksum",
    "data_offsets",
    "load_tensors",
    "manifest_digest",
    "read_chunk",
    "read_chunk_slice",
    "read_manifest",
    "verify_checkpoint_files",
    "verify_sharded_files",
    "write_checkpoint_files",
]
