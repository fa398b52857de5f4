"""What a manifest holds, as typed records: tensors, items, files and the manifest itself."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ckpt.tree import Json

ITEM_KINDS = ("module", "optimizer", "stateful", "dict", "rng")


@dataclass(frozen=True)
class TensorRecord:
    """What the manifest says about one stored tensor.

    A packed tensor (format version 2) is not a tensor of its file: its bytes
    sit at ``offset`` in the ``uint8`` tensor named ``pack``, which is.
    """

    file: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    device: str
    pack: str | None = None
    offset: int = 0

    @property
    def nbytes(self) -> int:
        """The number of bytes the tensor's data occupies."""
        return math.prod(self.shape) * self.dtype.itemsize


@dataclass(frozen=True)
class ItemRecord:
    """One saved item: its kind, its typed-JSON state tree and kind-specific extras."""

    kind: str
    state: Json
    extra: dict[str, Json] = field(default_factory=dict)


@dataclass(frozen=True)
class FileRecord:
    """One tensor file of a checkpoint: its size and checksum (``None`` in ckpt 0.1.0 files)."""

    size: int
    checksum: str | None = None


@dataclass(frozen=True)
class Manifest:
    """The parsed, validated contents of ``manifest.json``."""

    step: int
    epoch: int | None
    metrics: dict[str, float | int]
    files: dict[str, FileRecord]
    tensors: dict[str, TensorRecord]
    items: dict[str, ItemRecord]
    created_at: str = ""
    versions: dict[str, str] = field(default_factory=dict)
