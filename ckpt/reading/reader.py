"""Read-only access to a checkpoint root: list, describe, verify, read and stream.

:class:`CheckpointReader` never creates a directory, never takes the writer
lock and never writes: any number of readers, in any processes, may work on a
root while its one writer saves and deletes checkpoints (every answer is
checked against a second look, see :mod:`ckpt.reading.steps`). The manager reads
through one of these.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from ckpt.distributed import read_consolidated, verify_sharded
from ckpt.errors import CheckpointNotFoundError, CorruptCheckpointError
from ckpt.format import MANIFEST_NAME, Manifest, step_dir_name
from ckpt.gc_pause import paused_gc
from ckpt.io import load_tensors, verify_checkpoint_files
from ckpt.reading.describe import item_tensor_keys
from ckpt.reading.manifests import ManifestReader, located
from ckpt.reading.streaming import stream_item
from ckpt.restoring.locations import MapLocation, check_map_location
from ckpt.restoring.pipeline import check_items
from ckpt.state.items import build_state
from ckpt.state.tree import tensor_refs
from ckpt.storage import Storage

__all__ = ["Checkpoint", "CheckpointReader", "located"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Checkpoint:
    """A committed checkpoint, as returned by ``save`` and ``restore``.

    Attributes:
        step: The step it was saved at (the last completed step).
        epoch: The epoch passed to ``save``, or ``None``.
        metrics: The metrics passed to ``save``.
        path: The checkpoint directory (a local path or a URL).
        items: The names of the items it holds.
        missing_keys: For a non-strict restore, module keys the checkpoint lacked, by item.
        unexpected_keys: For a non-strict restore, checkpoint keys the module lacked, by item.
        tier: Which tier it was read from: 0 for the manager's directory, ``i`` for
            ``tiers[i - 1]`` (see :class:`~ckpt.Tier`).
    """

    step: int
    epoch: int | None
    metrics: Mapping[str, float | int]
    path: str
    items: tuple[str, ...]
    missing_keys: Mapping[str, list[str]] = field(default_factory=dict)
    unexpected_keys: Mapping[str, list[str]] = field(default_factory=dict)
    tier: int = 0

    @property
    def next_step(self) -> int:
        """The step to run next when resuming from this checkpoint: ``step + 1``."""
        return self.step + 1


class CheckpointReader(ManifestReader):
    """Read-only access to the checkpoints of one root: lists, describes, verifies and reads.

    Never creates a directory, never takes the writer lock, never writes. A root
    that does not exist lists no steps, and ``describe``, ``read``, ``verify``
    and ``iter_tensors`` raise :class:`~ckpt.CheckpointNotFoundError` naming it.
    Safe alongside a writer and other readers in any processes; an instance is
    not thread-safe.

    Args:
        directory: A local path or fsspec URL (``memory://run``, ``s3://bucket/run``).
        storage_options: Passed to the fsspec filesystem (credentials, endpoint, ...).
        fallback_to_intact: When the latest checkpoint is corrupt, ``read()`` (with
            no step) reads the newest intact one instead, with a warning.
        storage: An opened root to share with its owner (a
            :class:`~ckpt.CheckpointWriter`'s ``storage``), instead of ``directory``.

    Example:
        >>> reader = ckpt.CheckpointReader("runs/exp1")
        >>> reader.describe().items[0].tensors[0]
        TensorInfo(key='0.weight', dtype='float32', shape=(4, 2), nbytes=32, file=..., shards=1)
        >>> weights = dict(reader.iter_tensors(item="model"))
    """

    def __init__(
        self,
        directory: str | os.PathLike[str] | None = None,
        *,
        storage_options: dict[str, Any] | None = None,
        fallback_to_intact: bool = False,
        storage: Storage | None = None,
    ) -> None:
        super().__init__(directory, storage_options=storage_options, storage=storage)
        self.fallback_to_intact = bool(fallback_to_intact)

    @paused_gc()
    def checkpoint(self, step: int | None = None) -> Checkpoint | None:
        """Describe a committed checkpoint (the latest when ``step`` is ``None``) without loading.

        Returns ``None`` when ``step`` is ``None`` and nothing is committed.

        Raises:
            CheckpointNotFoundError: ``step`` is not committed.
            CorruptCheckpointError: Its manifest is malformed.
            CheckpointError: Checkpoints kept changing under every attempt for a minute.
        """
        found = self.steps.retrying(step, self.manifest, "described")
        return None if found is None else self.info(found[1])

    # ------------------------------------------------------------------ verify

    @paused_gc()
    def verify(self, step: int | None = None) -> Checkpoint:
        """Check a checkpoint completely without loading it anywhere.

        Reads the manifest and every file whole: sizes, headers (each tensor the
        manifest lists, with its dtype and shape, and nothing more), checksums,
        and every item's state tree.

        Args:
            step: The step to check; the latest committed one when ``None``.

        Returns:
            The checkpoint, when it is intact.

        Raises:
            CheckpointNotFoundError: No checkpoint, or ``step`` is not committed.
            CorruptCheckpointError: Anything is wrong; the message names the step,
                the file and, for checksums, the expected and actual digests.
        """
        return self.steps.retrying(step, self._verify)

    def _verify(self, step: int | None) -> Checkpoint:
        start = time.perf_counter()
        step_name, manifest = self.found(step)
        with located(self.steps.storage.path(step_name, MANIFEST_NAME)):
            if manifest.sharded is not None:
                nbytes = verify_sharded(self.steps.storage, step_name, manifest)
            else:
                check_items(manifest)
                nbytes = verify_checkpoint_files(self.steps.storage, step_name, manifest)
        unchecked = [n for n, r in manifest.files.items() if r.checksum is None]
        if unchecked:
            logger.warning(
                "step %d predates checksums: %s checked for size and structure only",
                manifest.step,
                unchecked,
            )
        logger.info(
            "verified step %d at %s (%d bytes in %.3f s)",
            manifest.step,
            self.steps.storage.url_of(step_name),
            nbytes,
            time.perf_counter() - start,
        )
        return self.info(manifest)

    # -------------------------------------------------------------------- read

    @paused_gc()
    def read(
        self,
        step: int | None = None,
        *,
        map_location: MapLocation = "cpu",
        verify: bool = True,
        items: Iterable[str] | None = None,
    ) -> dict[str, Any]:
        """Load a checkpoint's items as plain state dicts, without live objects.

        Module states come back as ``OrderedDict`` (with torch's ``_metadata``);
        optimizer states in torch's index-packed form; the random streams (if
        saved) under ``"rng"``. A checkpoint saved by several ranks comes back
        with its sharded tensors whole, and rank 0's own items.

        Args:
            step: The step to read; the latest committed one when ``None``.
            map_location: Where to build tensors, as for ``torch.load``
                (``None`` keeps the devices they were saved from).
            verify: Check every file read against its checksum.
            items: Read only these items (only their files are read).

        Returns:
            ``{item name: state}``.

        Raises:
            CheckpointNotFoundError: No checkpoint, ``step`` is not committed, or
                an item asked for is not in it.
            CorruptCheckpointError: A file is malformed or disagrees with the manifest.
            CheckpointError: Checkpoints kept changing under every attempt for a minute.
        """
        check_map_location(map_location)
        wanted = _item_names(items)

        def attempt(s: int | None) -> dict[str, Any]:
            return self._read(s, map_location, verify, wanted)

        if step is None and self.fallback_to_intact:
            found = self.steps.newest_intact(attempt, "read")
            if found is None:
                raise self.nothing_saved()
            return found
        return self.steps.retrying(step, attempt)

    def _read(
        self,
        step: int | None,
        map_location: MapLocation,
        verify: bool,
        items: tuple[str, ...] | None,
    ) -> dict[str, Any]:
        step_name, manifest = self.found(step)
        manifest_path = self.steps.storage.path(step_name, MANIFEST_NAME)
        if items is not None:
            manifest = _only(manifest, items, manifest_path)
        with located(manifest_path):
            if manifest.sharded is not None:
                return read_consolidated(
                    self.steps.storage, step_name, manifest, map_location, verify
                )
            names = list(
                dict.fromkeys(n for r in manifest.items.values() for _, n in tensor_refs(r.state))
            )
            loaded, _ = load_tensors(
                self.steps.storage, step_name, manifest, names, {}, map_location, verify=verify
            )
            return {name: build_state(r, loaded, name) for name, r in manifest.items.items()}

    def iter_tensors(
        self, step: int | None = None, *, item: str, verify: bool = True
    ) -> Iterator[tuple[str, torch.Tensor]]:
        """Stream one item's tensors, one at a time, as ``(key, CPU tensor)``.

        Keys are as :meth:`describe` lists them (``"0.weight"``,
        ``"state/0/exp_avg"``); a tied tensor comes once per key, as the same
        tensor. Each file is read once, front to back, so tensors come in file
        order (``describe`` gives the state order); memory is one tensor (plus
        one chunk of a tensor saved by several ranks, which comes whole). The
        checkpoint is looked up now; its data is read as the iterator advances.

        Args:
            step: The step to read; the latest committed one when ``None``.
            item: The item whose tensors to stream.
            verify: Hash every file as it streams (a mismatch raises once the
                file's last byte is read, after its earlier tensors were
                yielded) and check every chunk before it is yielded.

        Raises:
            CheckpointNotFoundError: No checkpoint, ``step`` is not committed, or
                ``item`` is not in it.
            CorruptCheckpointError: A file disagrees with the manifest (possibly
                while iterating).
        """
        if not isinstance(item, str):
            raise TypeError(f"item must be an item name, got {type(item).__name__}")

        def lookup(s: int | None) -> tuple[str, Manifest, list[tuple[str, str]]]:
            step_name, manifest = self.found(s)
            with located(self.steps.storage.path(step_name, MANIFEST_NAME)):
                _only(manifest, (item,), self.steps.storage.path(step_name, MANIFEST_NAME))
                return step_name, manifest, item_tensor_keys(manifest, item)

        with paused_gc():  # not while iterating: the caller's code runs then
            step_name, manifest, keys = self.steps.retrying(step, lookup)
            before = self.steps.identity(manifest.step)
        sharded = manifest.sharded is not None and item in manifest.sharded.items
        stream = stream_item(
            self.steps.storage, step_name, manifest, keys, sharded=sharded, verify=verify
        )
        return self._guarded(stream, manifest.step, before)

    def _guarded(
        self, stream: Iterator[tuple[str, torch.Tensor]], step: int, before: str | None
    ) -> Iterator[tuple[str, torch.Tensor]]:
        """``stream``, telling a step deleted or replaced meanwhile from a corrupt one."""
        step_name = step_dir_name(step)
        try:
            with located(self.steps.storage.path(step_name, MANIFEST_NAME)):
                yield from stream
        except (CorruptCheckpointError, CheckpointNotFoundError) as e:
            if before is None or self.steps.identity(step) == before:
                raise
            raise CheckpointNotFoundError(
                f"step {step} was deleted or replaced while being streamed (by retention in "
                "another process?); what was yielded before is from the step as it was",
                path=self.steps.storage.url_of(step_name),
            ) from e

    # ---------------------------------------------------------------- helpers

    def info(self, manifest: Manifest) -> Checkpoint:
        """The :class:`Checkpoint` a manifest describes (its path below this root)."""
        return Checkpoint(
            step=manifest.step,
            epoch=manifest.epoch,
            metrics=dict(manifest.metrics),
            path=self.steps.storage.url_of(step_dir_name(manifest.step)),
            items=tuple(manifest.items),
        )


def _item_names(items: Iterable[str] | None) -> tuple[str, ...] | None:
    if items is None:
        return None
    if isinstance(items, str):
        raise TypeError(f"items must be an iterable of item names, not a str ({items!r})")
    names = tuple(items)
    for name in names:
        if not isinstance(name, str):
            raise TypeError(f"items must be item names (str), got {type(name).__name__}")
    return names


def _only(manifest: Manifest, items: tuple[str, ...], path: str) -> Manifest:
    """The manifest with only ``items`` (every one of which must be in it)."""
    manifest.require(items, path)
    keep = set(items)
    section = manifest.sharded
    if section is None:
        return replace(manifest, items={n: r for n, r in manifest.items.items() if n in keep})
    ranks = tuple(
        replace(rank, items={n: r for n, r in rank.items.items() if n in keep})
        for rank in section.ranks
    )
    section = replace(
        section, items={n: r for n, r in section.items.items() if n in keep}, ranks=ranks
    )
    return replace(
        manifest,
        items={n: r for n, r in manifest.items.items() if n in keep},
        sharded=section,
    )
