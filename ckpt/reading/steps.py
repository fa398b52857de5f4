"""Open committed steps of one root read-only, whatever writers do meanwhile.

Another process may commit, replace or delete checkpoints at any moment (its
``keep_last`` retention deletes the step this one is reading). Nothing here
locks; instead every answer is checked against a second look:

- a listing is taken again when a step it named vanished before its manifest
  was checked, so a committed checkpoint is never missed because the one
  listed was deleted and its successor was not listed yet;
- an operation on a step compares the manifest's digest before and after: if
  it failed and the step changed meanwhile, it runs again (on the new latest
  step when none was asked for); an explicit step deleted meanwhile is a
  :class:`~ckpt.CheckpointNotFoundError` that says so.

Retrying is bounded: after :data:`RETRY_SECONDS` of checkpoints changing under
every attempt, a :class:`~ckpt.CheckpointError` says so.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TypeVar

from ckpt.errors import CheckpointError, CheckpointNotFoundError, CorruptCheckpointError
from ckpt.format import MANIFEST_NAME, Manifest, parse_step_dir_name, step_dir_name
from ckpt.io import manifest_digest, read_manifest
from ckpt.storage import Storage

__all__ = ["RETRY_SECONDS", "StepReader"]

_T = TypeVar("_T")

logger = logging.getLogger(__name__)

RETRY_SECONDS = 60.0
"""How long an operation keeps retrying while the checkpoints it reads keep changing."""

MIN_ATTEMPTS = 3
"""Attempts made before :data:`RETRY_SECONDS` can end the retrying (a slow read still retries)."""

LIST_ATTEMPTS = 10
"""Listings taken at most while steps keep vanishing between listing and checking."""


class StepReader:
    """Lists the committed steps of a root and runs read-only operations on one of them.

    Not thread-safe (one per manager); any number of readers in any processes may
    work on one root alongside its writer.

    Args:
        storage: The checkpoint root.
    """

    def __init__(self, storage: Storage) -> None:
        self.storage = storage

    # ----------------------------------------------------------------- listing

    def _listed(self) -> dict[int, str]:
        """``{step: directory name}`` of the entries named like steps (committed or not)."""
        out = {}
        for name in self.storage.list_dir():
            step = parse_step_dir_name(name)
            if step is not None:
                out[step] = name
        return out

    def _committed(self, newest_only: bool) -> list[int]:
        """The committed steps, ascending (only the newest, if asked).

        A step listed but without a manifest when checked is either not committed
        (a save in flight, a half-deleted step) or was deleted meanwhile, in which
        case its successor may be missing from the listing: the listing is taken
        again, and the answer stands once two listings agree.
        """
        listed = self._listed()
        for _ in range(LIST_ATTEMPTS):
            found, vanished = [], False
            for step in sorted(listed, reverse=True):
                if self.storage.exists(listed[step], MANIFEST_NAME):
                    found.append(step)
                    if newest_only:
                        break
                else:
                    vanished = True
            again = self._listed() if vanished else listed
            if again.keys() == listed.keys():
                return sorted(found)
            listed = again
        if found:  # each was committed when checked; newer ones may be missing
            return sorted(found)
        raise CheckpointError(
            f"checkpoints kept changing while being listed ({LIST_ATTEMPTS} listings "
            "disagreed): another process is saving and deleting faster than this one can "
            "list; retry, or keep more checkpoints",
            path=self.storage.url_of(),
        )

    def all_steps(self) -> list[int]:
        """Return the steps of all committed checkpoints, ascending."""
        return self._committed(newest_only=False)

    def latest_step(self) -> int | None:
        """Return the newest committed step, or ``None`` if there is none."""
        newest = self._committed(newest_only=True)
        return newest[-1] if newest else None

    def is_committed(self, step: int) -> bool:
        """Whether ``step`` has a manifest now."""
        return self.storage.exists(step_dir_name(step), MANIFEST_NAME)

    # ---------------------------------------------------------------- manifest

    def manifest(self, step: int | None) -> tuple[str, Manifest] | None:
        """Read the manifest of ``step`` (the latest when ``None``, then ``None`` if there is none).

        Raises:
            CheckpointNotFoundError: ``step`` is not committed.
            CorruptCheckpointError: The manifest is malformed, or the step directory is a link.
        """
        if step is None:
            step = self.latest_step()
            if step is None:
                return None
        step_name = step_dir_name(step)
        url = self.storage.url_of(step_name)
        if self.storage.is_link(step_name):
            raise CorruptCheckpointError(
                "checkpoint directory is a symbolic link; ckpt never follows links in its root",
                path=url,
            )
        if not self.storage.exists(step_name, MANIFEST_NAME):
            raise CheckpointNotFoundError(
                f"no committed checkpoint for step {step} (committed: {self.all_steps()})",
                path=url,
            )
        manifest = read_manifest(self.storage, step_name)
        if manifest.step != step:
            raise CorruptCheckpointError(
                f"manifest says step {manifest.step} but lives in the directory of step {step}",
                path=self.storage.path(step_name, MANIFEST_NAME),
                key="step",
            )
        return step_name, manifest

    def identity(self, step: int) -> str | None:
        """A digest of the step's manifest bytes, or ``None`` if it cannot be read.

        Tells a replaced or deleted checkpoint apart without parsing the manifest again.
        """
        try:
            return manifest_digest(self.storage, step_dir_name(step))
        except (CheckpointError, OSError):
            return None

    def _changed(self, step: int, before: str | None) -> tuple[bool, str | None]:
        """Whether ``step`` changed (or vanished) since its identity was ``before``; and now."""
        now = self.identity(step)
        if now is not None:
            return now != before, now
        # Unreadable now: gone, unless its manifest is still there (unreadable all along).
        return before is not None or not self.is_committed(step), now

    # ---------------------------------------------------------------- retrying

    def retrying(
        self, step: int | None, attempt: Callable[[int | None], _T], doing: str = "read"
    ) -> _T:
        """Run ``attempt`` on ``step``, again whenever it failed because the step changed.

        With ``step`` ``None`` it works on the latest step, listing again after a
        change; ``attempt(None)`` runs only when nothing is committed.

        Raises:
            CheckpointNotFoundError: ``step`` was deleted meanwhile (or is not committed).
            CheckpointError: Checkpoints kept changing for :data:`RETRY_SECONDS`; or
                what ``attempt`` raised, when the step did not change.
        """
        deadline = _Deadline(doing, self.storage.url_of())
        while True:
            target = step if step is not None else self.latest_step()
            if target is None:
                return attempt(None)
            before = self.identity(target)
            try:
                return attempt(target)
            except (CorruptCheckpointError, CheckpointNotFoundError) as e:
                changed, now = self._changed(target, before)
                if not changed:
                    raise
                if step is not None and now is None:
                    if before is None:
                        raise  # it was not there to begin with
                    raise CheckpointNotFoundError(
                        f"step {target} was deleted while being {doing} (by retention in "
                        "another process?); nothing was loaded",
                        path=self.storage.url_of(step_dir_name(target)),
                    ) from e
                deadline.check(e)
                logger.info("step %d changed while being %s; again", target, doing)

    def newest_intact(
        self, attempt: Callable[[int | None], _T | None], doing: str = "restored"
    ) -> _T | None:
        """Run ``attempt`` on the newest step it succeeds on, skipping corrupt ones with a warning.

        Returns ``None`` when nothing is committed.

        Raises:
            CorruptCheckpointError: Every committed step is corrupt.
            CheckpointError: What ``attempt`` raised for another reason (an item it
                lacks, say), or checkpoints kept changing for :data:`RETRY_SECONDS`.
        """
        deadline = _Deadline(doing, self.storage.url_of())
        corrupt: list[int] = []
        while True:
            change = self._newest_intact_once(attempt, corrupt)
            if not isinstance(change, CheckpointError):
                if corrupt and change is not None:
                    logger.warning(
                        "using step %d, the newest intact checkpoint; skipped corrupt %s",
                        change[0],
                        corrupt,
                    )
                return None if change is None else change[1]
            deadline.check(change)
            logger.info("checkpoints changed while being %s; listing again", doing)

    def _newest_intact_once(
        self, attempt: Callable[[int | None], _T | None], corrupt: list[int]
    ) -> tuple[int, _T | None] | CheckpointError | None:
        """One pass over the listing, newest first.

        Returns the step and result, or a change seen (then list again), or ``None``.
        """
        for candidate in reversed(self.all_steps()):
            if candidate in corrupt:
                continue
            before = self.identity(candidate)
            try:
                return candidate, attempt(candidate)
            except CorruptCheckpointError as e:
                if self._changed(candidate, before)[0]:
                    return e
                logger.warning(
                    "checkpoint step %d is corrupt, trying an older one: %s", candidate, e
                )
                corrupt.append(candidate)
            except CheckpointNotFoundError as e:
                if not self._changed(candidate, before)[0]:
                    raise  # not a deleted step: an item is missing, say
                return e
        if corrupt:
            raise CorruptCheckpointError(
                f"no intact checkpoint to restore: step(s) {corrupt} are corrupt",
                path=self.storage.url_of(),
            )
        return None


class _Deadline:
    """Ends retrying once checkpoints have kept changing for :data:`RETRY_SECONDS`."""

    def __init__(self, doing: str, where: str) -> None:
        self.doing, self.where = doing, where
        self.start = time.monotonic()
        self.attempts = 0

    def check(self, last: CheckpointError) -> None:
        self.attempts += 1
        waited = time.monotonic() - self.start
        if self.attempts >= MIN_ATTEMPTS and waited > RETRY_SECONDS:
            raise CheckpointError(
                f"checkpoints kept changing while being {self.doing}: {self.attempts} attempts "
                f"in {waited:.0f} s each found its step replaced or deleted by another process "
                "(saving with keep_last faster than this one can read?); nothing was loaded; "
                f"retry, or keep more checkpoints. Last: {last.reason}",
                path=self.where,
            ) from last
