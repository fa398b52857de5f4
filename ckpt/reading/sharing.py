"""How much of a step's storage it shares with the other steps of its root: pure, no I/O.

Steps of an incremental root (format versions 4 and 5) reference blobs in the
root's content store; a blob referenced by several steps is shared, and deleting
one step frees only what no other step references (``ckpt info`` shows both).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from ckpt.format import Manifest
from ckpt.format.blobs import is_ref, ref_key
from ckpt.state.tree import Json

__all__ = ["Sharing", "describe_sharing"]


@dataclass(frozen=True)
class Sharing:
    """How much of a step's storage it shares with other steps (format version 4 blobs).

    Attributes:
        shared_nbytes: Bytes of its blobs that another listed step references too.
        own_nbytes: Bytes only it holds (its own files and the blobs no other listed
            step references): what deleting it alone frees.
        shared_with: The other steps referencing at least one of its blobs, ascending.
    """

    shared_nbytes: int
    own_nbytes: int
    shared_with: tuple[int, ...]

    def to_json(self) -> dict[str, Json]:
        """A JSON-compatible dict."""
        return {
            "shared_nbytes": self.shared_nbytes,
            "own_nbytes": self.own_nbytes,
            "shared_with": list(self.shared_with),
        }


def _blob_sizes(manifest: Manifest) -> dict[str, int]:
    """The blobs a manifest references: each key (once) with its file's size."""
    sizes: dict[str, int] = {}
    for name, record in manifest.files.items():
        key = ref_key(name)
        if key is not None:
            sizes[key] = record.size
    return sizes


def describe_sharing(manifest: Manifest, others: Iterable[Manifest]) -> Sharing:
    """Split a step's bytes (its :attr:`Description.nbytes`) into shared and its own; reads nothing.

    Args:
        manifest: The step described.
        others: The manifests of the other steps of its root (its own is skipped).
    """
    mine = _blob_sizes(manifest)
    shared: set[str] = set()
    steps: set[int] = set()
    for other in others:
        if other.step == manifest.step or not mine:
            continue
        common = mine.keys() & _blob_sizes(other).keys()
        if common:
            shared |= common
            steps.add(other.step)
    total = sum(mine.values()) + sum(r.size for n, r in manifest.files.items() if not is_ref(n))
    shared_nbytes = sum(mine[k] for k in shared)
    return Sharing(shared_nbytes, total - shared_nbytes, tuple(sorted(steps)))
