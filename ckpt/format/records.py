"""What a manifest holds, as typed records: tensors, items, files and the manifest itself.

Format version 3 adds the records of a checkpoint saved by several ranks: the
chunks of each global tensor (:class:`ChunkRecord`, :class:`GlobalTensorRecord`),
what each rank saved for itself (:class:`RankSection`), and the section that
holds them (:class:`ShardedSection`, ``Manifest.sharded``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ckpt.errors import CheckpointNotFoundError
from ckpt.state.tree import Json

if TYPE_CHECKING:
    import torch

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


_new = object.__new__


def tensor_record(
    file: str,
    dtype: torch.dtype,
    shape: tuple[int, ...],
    device: str,
    pack: str | None = None,
    offset: int = 0,
) -> TensorRecord:
    """``TensorRecord(file, dtype, shape, device, pack, offset)``, built twice as fast.

    For decoding manifests of many thousand records: a frozen dataclass's
    ``__init__`` sets each field through ``object.__setattr__``; this fills the
    instance's ``__dict__`` at once. The result is equal to the constructor's.
    """
    record: TensorRecord = _new(TensorRecord)
    record.__dict__.update(
        file=file, dtype=dtype, shape=shape, device=device, pack=pack, offset=offset
    )
    return record


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
class ChunkRecord:
    """One saved chunk (shard) of a global tensor (format version 3).

    The chunk is the block ``offsets[d] : offsets[d] + sizes[d]`` of the global
    tensor, stored as one tensor of the safetensors file ``file`` whose data
    starts at the absolute byte offset ``begin`` of that file.
    """

    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    file: str
    begin: int
    checksum: str
    """``"xxh3_64:<16 hex>"`` of the chunk's bytes."""

    @property
    def numel(self) -> int:
        """The number of elements the chunk holds."""
        return math.prod(self.sizes)


@dataclass(frozen=True)
class GlobalTensorRecord:
    """A tensor saved in chunks by several ranks (format version 3).

    The chunks are disjoint, lie inside ``shape`` and cover it exactly; a tensor
    with no elements has one chunk, of its whole (empty) shape.
    """

    dtype: torch.dtype
    shape: tuple[int, ...]
    chunks: tuple[ChunkRecord, ...]

    def chunk_nbytes(self, chunk: ChunkRecord) -> int:
        """The number of bytes ``chunk`` (one of this tensor's) occupies in its file."""
        return chunk.numel * self.dtype.itemsize


@dataclass(frozen=True)
class RankSection:
    """What one rank saved for itself: version 2 tensor and item records, in its own files."""

    tensors: dict[str, TensorRecord]
    items: dict[str, ItemRecord]


@dataclass(frozen=True)
class ShardedSection:
    """A checkpoint saved by several ranks (format version 3).

    Attributes:
        world_size: How many ranks saved it (``len(ranks)``).
        tensors: The global tensors of the sharded items, by name.
        items: The sharded items (kind ``module`` or ``optimizer``); their state
            trees refer to global tensor names.
        ranks: What each rank saved for itself, by rank; every rank has the same
            item names and kinds.
    """

    world_size: int
    tensors: dict[str, GlobalTensorRecord]
    items: dict[str, ItemRecord]
    ranks: tuple[RankSection, ...]


@dataclass(frozen=True)
class Manifest:
    """The parsed, validated contents of ``manifest.json``.

    A checkpoint saved by several ranks (version 3) has ``sharded`` set; then
    ``files`` lists every rank's files, ``tensors`` is empty and ``items`` lists
    the sharded items followed by rank 0's own items (for listing only: read
    each rank's from ``sharded.ranks``).
    """

    step: int
    epoch: int | None
    metrics: dict[str, float | int]
    files: dict[str, FileRecord]
    tensors: dict[str, TensorRecord]
    items: dict[str, ItemRecord]
    created_at: str = ""
    versions: dict[str, str] = field(default_factory=dict)
    sharded: ShardedSection | None = None

    def require(self, names: Iterable[str], path: str | None = None) -> None:
        """Raise unless every item in ``names`` is in this checkpoint.

        Raises:
            CheckpointNotFoundError: Naming the first missing item and those held.
        """
        for name in names:
            if name not in self.items:
                raise CheckpointNotFoundError(
                    f"item {name!r} is not in checkpoint step {self.step} "
                    f"(it holds {sorted(self.items)})",
                    path=path,
                    key=name,
                )
