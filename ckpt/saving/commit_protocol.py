"""One commit protocol for saves from one process or from many ranks.

A save is an :class:`Attempt`: opened by the strategy its backend commits with,
then filled (every tensor file written and made durable, by one process or by
every rank), then either abandoned or finalized::

    attempt = strategy.open(storage, step, ...)     # one process, or the coordinator
    ... write every file into attempt.directory     # this process, or every rank
    guard(); write the manifest                      # the writer lock is checked first
    strategy.finalize(storage, attempt)  |  strategy.abandon(storage, attempt)

With several ranks the coordinator opens the attempt and broadcasts it
(:meth:`Attempt.to_json`); the ranks write; the coordinator, once every rank has
reported success, writes the manifest and finalizes, or abandons after any failure.

Why a crash at any instant leaves every committed checkpoint intact and lists
nothing half-written:

* **The commit point is one atomic operation**, after which the step is listed
  with all its files and before which it is not listed at all:

  - :class:`RenameDir` (local disk): files and manifest go into a temporary
    directory whose name never parses as a step; each is fsynced, then the
    directory, then it is renamed to the step's name with ``RENAME_NOREPLACE``
    (an overwrite swaps the two directories with ``RENAME_EXCHANGE``), and the
    root is fsynced. The rename is the commit point.
  - :class:`ManifestLast` (object stores; local disk where directories cannot
    swap): files with names unique to the attempt go straight into the step's
    directory, where no manifest lists them; the manifest is created only if
    absent (or replaced in one atomic PUT/rename for an overwrite) once every
    file is durable. Creating the manifest is the commit point.

* **Readers list a step only by its manifest**, and the manifest records every
  file's size and checksum, so files an attempt wrote before it died are never
  read. Files are durable before the manifest exists, so a committed manifest
  never names a file a crash could lose.
* **Two writers never both commit a step**: the writer lock keeps a second
  writer out; a writer that got past it anyway is stopped by the no-replace
  rename or the create-only manifest (:class:`~ckpt.CheckpointExistsError`).
  The guard re-checks the lock just before the manifest is written.
* **An overwrite never unlists the step**: a swap (local disk) or one atomic
  manifest replacement. Where old files must then be removed next to the new
  ones (:class:`ManifestLast` on local disk), a :data:`REPLACING` marker is made
  durable first, so the next writer finishes the cleanup if this one dies.
* **What a crash leaves behind is removable and recognisable**: temporary
  directories name their host and process; attempt files carry the attempt's
  token; :mod:`ckpt.saving.commit` removes them (dead writer, or older than a grace
  period) before the next save. Nothing else in the root is ever touched.
"""

from __future__ import annotations

import abc
import dataclasses
import logging
import os
import socket
from collections.abc import Iterable
from typing import Any, BinaryIO

from ckpt.errors import CheckpointWriteError
from ckpt.format import (
    MANIFEST_NAME,
    Manifest,
    is_tensor_file_name,
    step_dir_name,
    temp_dir_name,
)
from ckpt.format.header import ManifestHeader
from ckpt.storage import CommitStrategy, Storage
from ckpt.storage.local import NEW_FILE_PREFIX

__all__ = [
    "REPLACING",
    "Attempt",
    "CommitProtocol",
    "ManifestLast",
    "RenameDir",
    "protocol_for",
    "remove_quietly",
    "remove_unreferenced",
    "write_manifest",
]

logger = logging.getLogger(__name__)

REPLACING = ".ckpt-replacing"
"""Marker in a step directory whose files an overwrite is replacing (local disk without
``RENAME_EXCHANGE``); the next writer removes the files its manifest does not list."""


@dataclasses.dataclass(frozen=True)
class Attempt:
    """One uncommitted save of a step: where its files go and how it commits.

    Immutable, so safe to share between threads; :meth:`to_json` and
    :meth:`from_json` carry it from the coordinator to the other ranks.
    """

    step: int
    strategy: str
    """The :class:`~ckpt.storage.CommitStrategy` value: ``"rename"`` or ``"manifest"``."""
    directory: str
    """Where the files go, below the root: a temporary directory, or the step's own."""
    token: str
    """8 hex digits unique to the attempt."""
    file_token: str | None
    """The token the files' names carry (``None``: plain names)."""
    overwrite: bool
    """Whether the attempt replaces a committed step."""
    replaced: bool
    """:class:`ManifestLast` only: a committed manifest exists and is replaced."""
    marked: bool
    """:class:`ManifestLast` only: the :data:`REPLACING` marker was written."""
    header: ManifestHeader

    @property
    def renames(self) -> bool:
        """Whether the attempt commits by renaming its directory."""
        return self.strategy == CommitStrategy.RENAME_DIR.value

    @property
    def replaces_manifest(self) -> bool:
        """Whether its manifest is written over a committed one (an overwrite in place)."""
        return self.overwrite and not self.renames

    def to_json(self) -> dict[str, Any]:
        """The attempt as a JSON object (for a broadcast)."""
        doc = dataclasses.asdict(self)
        doc["header"] = self.header.to_json()
        return doc

    @classmethod
    def from_json(cls, doc: Any) -> Attempt:
        """The attempt :meth:`to_json` described.

        Raises:
            ValueError: ``doc`` is not such a description.
        """
        try:
            attempt = cls(**{**doc, "header": ManifestHeader.from_json(doc["header"])})
        except (KeyError, TypeError) as e:
            raise ValueError(f"not a commit attempt: {doc!r}") from e
        if attempt.strategy not in _PROTOCOLS:
            raise ValueError(f"unknown commit strategy {attempt.strategy!r}")
        return attempt

    @property
    def protocol(self) -> CommitProtocol:
        """The strategy that opened the attempt, which abandons or finalizes it."""
        return _PROTOCOLS[self.strategy]


class CommitProtocol(abc.ABC):
    """How a backend makes a finished checkpoint visible at once (see the module doc).

    Stateless: one instance serves every save, from any thread.
    """

    strategy: CommitStrategy

    @abc.abstractmethod
    def open(
        self,
        storage: Storage,
        step: int,
        *,
        overwrite: bool,
        token: str,
        header: ManifestHeader,
        collective: bool = False,
    ) -> Attempt:
        """Prepare an uncommitted checkpoint of ``step`` (``collective``: ranks write it).

        Raises:
            CheckpointWriteError: ``overwrite`` of a collective save where not supported.
            OSError: Storage failed; nothing of the attempt is left.
        """

    @abc.abstractmethod
    def abandon(
        self, storage: Storage, attempt: Attempt, file_names: Iterable[str] | None = None
    ) -> None:
        """Remove what the attempt wrote (quietly: a later save removes what is left).

        Args:
            storage: The root.
            attempt: The attempt.
            file_names: The files it wrote, when known; otherwise every file
                carrying its token.
        """

    @abc.abstractmethod
    def finalize(self, storage: Storage, attempt: Attempt, manifest: Manifest) -> None:
        """Once the manifest is written: commit (rename), or clean up after the commit."""


class RenameDir(CommitProtocol):
    """Write into a temporary directory, then rename (or swap) it to the step's name."""

    strategy = CommitStrategy.RENAME_DIR

    def open(
        self,
        storage: Storage,
        step: int,
        *,
        overwrite: bool,
        token: str,
        header: ManifestHeader,
        collective: bool = False,
    ) -> Attempt:
        """Create the temporary directory, named after this host, process and ``token``."""
        temp = temp_dir_name(step, socket.gethostname(), os.getpid(), token)
        attempt = Attempt(
            step,
            self.strategy.value,
            temp,
            token,
            token if storage.unique_file_names(overwrite) else None,
            overwrite,
            replaced=False,
            marked=False,
            header=header,
        )
        try:
            storage.makedirs(temp)
        except BaseException:
            self.abandon(storage, attempt)
            raise
        return attempt

    def abandon(
        self, storage: Storage, attempt: Attempt, file_names: Iterable[str] | None = None
    ) -> None:
        """Remove the temporary directory."""
        remove_quietly(storage, attempt.directory, tree=True)

    def finalize(self, storage: Storage, attempt: Attempt, manifest: Manifest) -> None:
        """Rename the directory to the step's name: the commit point."""
        storage.commit_dir(
            attempt.directory, step_dir_name(attempt.step), replace=attempt.overwrite
        )


class ManifestLast(CommitProtocol):
    """Write attempt-unique files into the step directory; the manifest commits them.

    On object stores the manifest is created only if absent (or replaced in one
    PUT); on local disk (an overwrite where directories cannot be swapped) it is
    renamed over the old one, after a marker that lets the next writer finish
    the cleanup if this one dies: the step is never unlisted and no old file is
    stranded.
    """

    strategy = CommitStrategy.MANIFEST_LAST

    def open(
        self,
        storage: Storage,
        step: int,
        *,
        overwrite: bool,
        token: str,
        header: ManifestHeader,
        collective: bool = False,
    ) -> Attempt:
        """Create the step's directory, and the :data:`REPLACING` marker where one is needed."""
        step_name = step_dir_name(step)
        if overwrite and collective:
            raise CheckpointWriteError(
                "overwrite=True is not supported for saves from several ranks on this "
                "storage; save a new step",
                path=storage.url_of(step_name),
            )
        replaced = overwrite and storage.exists(step_name, MANIFEST_NAME)
        marked = replaced and storage.atomic_rename
        attempt = Attempt(
            step, self.strategy.value, step_name, token, token, overwrite, replaced, marked, header
        )
        try:
            storage.makedirs(step_name)
            if marked:
                # Replaced into place, so the marker is durable before any new file exists.
                storage.write_file(
                    (step_name, REPLACING), lambda f: f.write(token.encode()), replace=True
                )
        except BaseException:
            self.abandon(storage, attempt, ())
            raise
        return attempt

    def abandon(
        self, storage: Storage, attempt: Attempt, file_names: Iterable[str] | None = None
    ) -> None:
        """Remove the attempt's files (and its marker); the committed ones stay."""
        if file_names is None:
            try:
                listed = storage.list_dir(attempt.directory)
            except Exception as e:  # leftovers are removed by a later save
                logger.warning("could not list the abandoned save %s: %s", attempt.directory, e)
                listed = []
            file_names = [n for n in listed if attempt.token in n and n != REPLACING]
        for file_name in file_names:
            remove_quietly(storage, attempt.directory, file_name)
        if attempt.marked:
            remove_quietly(storage, attempt.directory, REPLACING)

    def finalize(self, storage: Storage, attempt: Attempt, manifest: Manifest) -> None:
        """After the manifest committed: remove the replaced files, then the marker."""
        if attempt.replaced:
            remove_unreferenced(storage, attempt.directory, manifest, grace=0.0)
        if attempt.marked:
            remove_quietly(storage, attempt.directory, REPLACING)


_PROTOCOLS: dict[str, CommitProtocol] = {p.strategy.value: p for p in (RenameDir(), ManifestLast())}


def protocol_for(storage: Storage, step: int, overwrite: bool) -> CommitProtocol:
    """The strategy a save of ``step`` commits with on ``storage``."""
    return _PROTOCOLS[storage.commit_strategy(step_dir_name(step), overwrite).value]


def write_manifest(storage: Storage, attempt: Attempt, raw: bytes) -> None:
    """Write an encoded manifest into the attempt (the commit point of :class:`ManifestLast`)."""

    def write(f: BinaryIO) -> int:
        f.write(raw)
        return len(raw)

    storage.write_file((attempt.directory, MANIFEST_NAME), write, replace=attempt.replaces_manifest)


def remove_unreferenced(
    storage: Storage, step_name: str, manifest: Manifest | None, *, grace: float
) -> None:
    """Remove ckpt tensor files in ``step_name`` that ``manifest`` does not list.

    Only those untouched for ``grace`` seconds, so that a save in flight keeps its files.
    """
    keep = set() if manifest is None else set(manifest.files)
    for file_name in storage.list_dir(step_name):
        ours = is_tensor_file_name(file_name) or file_name.startswith(NEW_FILE_PREFIX)
        if file_name in keep or not ours:
            continue
        age = storage.age_seconds(step_name, file_name)
        if age is not None and age >= grace:
            logger.info("removing abandoned upload %s", storage.url_of(step_name, file_name))
            remove_quietly(storage, step_name, file_name)


def remove_quietly(storage: Storage, *parts: str, tree: bool = False) -> None:
    """Remove a file (or a directory tree); a failure is logged, never raised."""
    try:
        if tree:
            storage.remove_tree(*parts)
        else:
            storage.remove_file(*parts)
    except Exception as e:
        logger.warning("could not remove %s: %s", storage.url_of(*parts), e)
