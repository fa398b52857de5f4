"""Read-only access to the manifests of a checkpoint root: list and describe.

:class:`ManifestReader` is the part of :class:`~ckpt.CheckpointReader` that
reads manifests only (``ckpt ls`` and ``ckpt info`` use it alone): neither it
nor what it imports loads torch, so those commands start without it.
:class:`~ckpt.CheckpointReader` adds verifying and reading tensors.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any, Self

from ckpt.errors import CheckpointError, CheckpointNotFoundError
from ckpt.format import MANIFEST_NAME, Manifest
from ckpt.gc_pause import paused_gc
from ckpt.reading.describe import Description, describe_manifest, format_version_of
from ckpt.reading.steps import LIST_ATTEMPTS, StepReader
from ckpt.storage import Storage, storage_of

__all__ = ["ManifestReader", "located"]


class ManifestReader:
    """Lists the committed steps of a root and describes them from their manifests alone.

    Never creates a directory, never takes the writer lock, never writes, reads no
    tensor data. Safe alongside a writer and other readers; not thread-safe.

    Args:
        directory: A local path or fsspec URL (``memory://run``, ``s3://bucket/run``).
        storage_options: Passed to the fsspec filesystem (credentials, endpoint, ...).
        storage: An opened root to share with its owner, instead of ``directory``.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str] | None = None,
        *,
        storage_options: dict[str, Any] | None = None,
        storage: Storage | None = None,
    ) -> None:
        storage = storage_of(directory, storage_options, storage)
        self._steps = StepReader(storage)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.directory!r})"

    def __enter__(self) -> Self:
        """A reader holds nothing open between calls; ``with`` is accepted for symmetry."""
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    @property
    def _storage(self) -> Storage:
        return self._steps.storage

    @property
    def steps(self) -> StepReader:
        """The listing and manifest access under this reader (its owner may share it)."""
        return self._steps

    @property
    def directory(self) -> str:
        """The root directory, as given."""
        return self._storage.url

    # ----------------------------------------------------------------- listing

    def all_steps(self) -> list[int]:
        """Return the steps of all committed checkpoints, ascending (``[]`` for a missing root).

        Safe against another process committing and deleting meanwhile: a step
        deleted while being listed is never taken for the last committed one.
        """
        return self._steps.all_steps()

    def latest_step(self) -> int | None:
        """Return the newest committed step, or ``None`` if there is none."""
        return self._steps.latest_step()

    @paused_gc()
    def describe(self, step: int | None = None) -> Description:
        """Describe a checkpoint (the latest when ``step`` is ``None``) from its manifest alone.

        Reads no tensor data: items, every tensor's key, dtype, shape and bytes,
        optimizer classes, hyperparameters and parameter names, metrics, world size.

        Raises:
            CheckpointNotFoundError: No checkpoint (or no directory), or ``step`` is not committed.
            CorruptCheckpointError: Its manifest is malformed.
        """
        for _ in range(LIST_ATTEMPTS):
            target = step if step is not None else self.latest_step()
            if target is None:
                raise self.nothing_saved()
            try:
                return self._describe(target)
            except CheckpointNotFoundError:
                # Only the manifest is read, so no digest is taken first (it would read it
                # twice): the latest step deleted meanwhile means listing again.
                if step is not None or self._steps.is_committed(target):
                    raise
        raise CheckpointError(
            f"checkpoints kept changing while being described ({LIST_ATTEMPTS} attempts each "
            "found the latest step deleted); retry, or keep more checkpoints",
            path=self.directory,
        )

    def _describe(self, step: int | None) -> Description:
        step_name, manifest = self.found(step)
        version = None
        if format_version_of(manifest) == 1:  # or 2, if its manifest was compressed
            with self._storage.open_read(step_name, MANIFEST_NAME) as f:
                version = format_version_of(manifest, compressed=f.read(1) == b"x")
        with located(self._storage.path(step_name, MANIFEST_NAME)):
            return describe_manifest(manifest, format_version=version)

    # ---------------------------------------------------------------- helpers

    def manifest(self, step: int | None) -> tuple[str, Manifest] | None:
        """The step directory and manifest of ``step`` (the latest when ``None``; ``None`` if none).

        Raises:
            CheckpointNotFoundError: ``step`` is not committed.
            CorruptCheckpointError: The manifest is malformed.
        """
        return self._steps.manifest(step)

    def found(self, step: int | None) -> tuple[str, Manifest]:
        """Like :meth:`manifest`, but raise when nothing is saved.

        Raises:
            CheckpointNotFoundError: Nothing is saved (naming a missing root), or
                ``step`` is not committed.
            CorruptCheckpointError: The manifest is malformed.
        """
        found = self._steps.manifest(step)
        if found is None:
            raise self.nothing_saved()
        return found

    def _root_exists(self) -> bool:
        try:
            return bool(self._storage.fs.exists(self._storage.path()))
        except (OSError, ValueError):  # cannot tell: say nothing was saved
            return True

    def nothing_saved(self) -> CheckpointNotFoundError:
        """The error for a root where nothing is committed (saying whether it exists)."""
        if not self._root_exists():
            return CheckpointNotFoundError(
                "no checkpoint directory: it does not exist", path=self.directory
            )
        return CheckpointNotFoundError("no checkpoint has been saved", path=self.directory)


@contextlib.contextmanager
def located(path: str) -> Iterator[None]:
    """Fill in ``path`` on checkpoint errors raised inside that name no file."""
    try:
        yield
    except CheckpointError as e:
        found = e.located(path)
        if found is e:
            raise
        raise found from e
