"""Version 4: tensors stored once per root, in a content-addressed store, and referenced.

Pure functions over names and bytes; no I/O. See ``docs/format.md`` ("Version 4").

A blob is a safetensors file ``.ckpt-blobs/<key>.safetensors`` in the root holding
one tensor named :data:`BLOB_TENSOR`; ``key`` is the XXH3-128 digest (32 lower-case
hex digits) of the tensor's dtype name, shape and raw little-endian bytes.

In a decoded :class:`~ckpt.format.records.Manifest` each reference to a blob is a
file of its own, named :func:`ref_name` (``.ckpt-blobs/<key>.safetensors#<tensor>``):
so every reader handles it as it handles a step's own file, and the one function
:func:`file_parts` tells every reader where that file lies below the root, while
:func:`ref_alias` says which tensor the blob's :data:`BLOB_TENSOR` stands for.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from types import MappingProxyType
from typing import TYPE_CHECKING

import xxhash

if TYPE_CHECKING:
    import torch

__all__ = [
    "BLOB_DIR",
    "BLOB_METADATA",
    "BLOB_TENSOR",
    "blob_file_name",
    "blob_key",
    "file_parts",
    "is_blob_key",
    "is_ref",
    "parse_blob_file_name",
    "ref_alias",
    "ref_key",
    "ref_name",
]

BLOB_DIR = ".ckpt-blobs"
"""The content store's directory in the root: never a step name, never a temporary one."""
BLOB_TENSOR = "data"
"""The name of the one tensor a blob file holds."""
BLOB_METADATA: Mapping[str, str] = MappingProxyType({"format": "pt"})
"""The ``__metadata__`` of every blob's safetensors header (as the safetensors library's
``save_file`` of torch tensors writes it)."""

_KEY = re.compile(r"[0-9a-f]{32}")
_SUFFIX = ".safetensors"
_REF_PREFIX = f"{BLOB_DIR}/"
_REF_HEAD = len(_REF_PREFIX) + 32 + len(_SUFFIX)


def blob_key(t: torch.Tensor, data: bytes | bytearray | memoryview) -> str:
    """The key of a tensor's blob: XXH3-128 over its dtype name, shape and ``data``.

    Args:
        t: The tensor (for its dtype and shape).
        data: Its raw bytes, contiguous and little-endian.
    """
    h = xxhash.xxh3_128()
    dtype = str(t.dtype).removeprefix("torch.")
    h.update(f"{dtype}:{list(t.shape)}:".encode())
    h.update(data)
    return h.hexdigest()


def is_blob_key(key: object) -> bool:
    """Whether ``key`` is 32 lower-case hex digits."""
    return isinstance(key, str) and _KEY.fullmatch(key) is not None


def blob_file_name(key: str) -> str:
    """The file name of blob ``key`` inside :data:`BLOB_DIR`."""
    return f"{key}{_SUFFIX}"


def parse_blob_file_name(name: str) -> str | None:
    """The key of a blob file name, or ``None`` if ``name`` is not one."""
    key = name.removesuffix(_SUFFIX)
    return key if key != name and is_blob_key(key) else None


def ref_name(key: str, tensor: str) -> str:
    """The file name a decoded manifest gives the reference of ``tensor`` to blob ``key``."""
    return f"{_REF_PREFIX}{blob_file_name(key)}#{tensor}"


def is_ref(file_name: str) -> bool:
    """Whether a manifest's file name is a blob reference (:func:`ref_name`)."""
    return file_name.startswith(_REF_PREFIX)


def ref_key(file_name: str) -> str | None:
    """The blob key of a reference, or ``None`` for a step's own file."""
    if not is_ref(file_name):
        return None
    return file_name[len(_REF_PREFIX) : len(_REF_PREFIX) + 32]


def ref_alias(file_name: str) -> str | None:
    """The tensor a reference's blob tensor stands for, or ``None`` for a step's own file."""
    return file_name[_REF_HEAD + 1 :] if is_ref(file_name) else None


def file_parts(directory: str, file_name: str) -> tuple[str, ...]:
    """Where a manifest's file lies below the root: the one resolution of blob references.

    A step's own file is ``directory/file_name``; a blob reference is its blob
    file in :data:`BLOB_DIR`, whatever the step.
    """
    if is_ref(file_name):
        return (BLOB_DIR, file_name[len(_REF_PREFIX) : _REF_HEAD])
    return (directory, file_name)
