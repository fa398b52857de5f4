"""Copies shared by the ranks of a process group: each rank copies the files it wrote.

Rank 0's copier holds the target tier's writer lock and drives each copy
(:func:`ckpt.saving.copying.copy_step` with a :class:`RankShare`): it opens the
attempt, publishes it in a small JSON file at the tier's root
(``.ckpt-copy.step_<N>.json``: step, attempt directory, token), copies its own
files, and waits for one marker per other rank
(``.ckpt-copy.step_<N>.<token>.r<rank>.json``). Every other rank runs a
:class:`Follower` thread that polls the tiers for published attempts, copies its
own files of that step from the first tier into the attempt (verified against the
manifest's checksums), and writes its marker (with the error, if its part failed).
Once every marker says done, rank 0 writes the manifest: the copy commits once,
atomically, as the save does. No collective runs in these threads: the tier itself
carries the agreement, so they never interleave with the training's collectives.

A rank that never answers makes rank 0's copy fail after ``timeout`` seconds (the
attempt is removed, the copy retried later); a rank killed mid-copy leaves only
files of an uncommitted attempt, removed by rank 0 or the tier's next writer.
"""

from __future__ import annotations

import json
import logging
import re
import secrets
import threading
import time
from collections.abc import Callable, Sequence
from typing import BinaryIO

from ckpt.errors import (
    CheckpointError,
    CheckpointNotFoundError,
    CheckpointWriteError,
    CorruptCheckpointError,
)
from ckpt.format import Manifest, parse_temp_dir_name, step_dir_name
from ckpt.saving.commit_protocol import Attempt
from ckpt.saving.copying import copy_files, read_source_manifest
from ckpt.saving.pipeline import set_thread_nice
from ckpt.storage import Storage

__all__ = ["COPY_PREFIX", "POLL_SECONDS", "Follower", "RankShare", "rank_files"]

logger = logging.getLogger(__name__)

COPY_PREFIX = ".ckpt-copy."
"""Names at a tier's root that carry a shared copy's agreement (never a step)."""
POLL_SECONDS = 0.05
"""How often rank 0 looks for markers, and the followers for published copies (at first)."""
MAX_POLL_SECONDS = 1.0
"""The slowest polling interval (polling slows down while nothing happens)."""

MAX_ERROR_CHARS = 4096
"""A follower's error is cut to this many characters in its marker."""
SOURCE_WAIT_SECONDS = 10.0
"""How long a follower waits for a published step to appear in its own first tier."""

_PUBLISHED = re.compile(r"\.ckpt-copy\.(step_\d+)\.json")
_TOKEN = re.compile(r"[0-9a-f]{16}")
_SHARD_FILE = re.compile(r"rank(\d+)_shards[.]")
_RAISED_AS: dict[str, type[CheckpointError]] = {
    "CorruptCheckpointError": CorruptCheckpointError,
    "CheckpointNotFoundError": CheckpointNotFoundError,
}


def _published_name(step: int) -> str:
    return f"{COPY_PREFIX}{step_dir_name(step)}.json"


def _marker_name(step: int, token: str, rank: int) -> str:
    return f"{COPY_PREFIX}{step_dir_name(step)}.{token}.r{rank}.json"


def rank_files(manifest: Manifest, rank: int, world_size: int) -> list[str]:
    """The files of ``manifest`` that ``rank`` (of ``world_size`` ranks now) copies.

    The files a rank wrote: its shard file (``rank<r>_shards...``) and the files of
    its own items (its section of a version 3 manifest). Files of ranks beyond the
    current world size go to ``rank % world_size``; any other file (a checkpoint
    saved by one process) to rank 0.
    """
    owner: dict[str, int] = {}
    if manifest.sharded is not None:
        for r, section in enumerate(manifest.sharded.ranks):
            for record in section.tensors.values():
                owner[record.file] = r
    for name in manifest.files:
        match = _SHARD_FILE.match(name)
        if match is not None:
            owner[name] = int(match.group(1))
    return sorted(n for n in manifest.files if owner.get(n, 0) % world_size == rank)


def _write_json(storage: Storage, name: str, doc: dict[str, object]) -> None:
    data = json.dumps(doc, sort_keys=True).encode()

    def write(f: BinaryIO) -> int:
        f.write(data)
        return len(data)

    storage.write_file((name,), write, replace=True)


def _read_json(storage: Storage, name: str) -> dict[str, object] | None:
    """The JSON object in ``name``, or ``None`` while it is missing or half written."""
    try:
        doc = json.loads(storage.read_bytes(name))
    except (OSError, ValueError, CheckpointError):
        return None
    return doc if isinstance(doc, dict) else None


class RankShare:
    """Rank 0's side of a shared copy (a :class:`~ckpt.saving.copying.CopyShare`).

    Args:
        world_size: How many ranks take part.
        timeout: Seconds to wait for the other ranks' markers before the copy fails.
        stopping: Whether to give up at once (the manager is closing).
    """

    def __init__(self, world_size: int, timeout: float, stopping: Callable[[], bool]) -> None:
        self.world_size = world_size
        self.timeout = timeout
        self.stopping = stopping
        self._token = ""

    def own(self, manifest: Manifest) -> list[str]:
        """Rank 0's files of ``manifest``."""
        return rank_files(manifest, 0, self.world_size)

    def opened(self, target: Storage, attempt: Attempt, manifest: Manifest) -> None:
        """Remove what earlier copies left at the root, then publish this attempt."""
        for name in target.list_dir():
            if name.startswith(COPY_PREFIX):
                target.remove_file(name)  # only rank 0, under the lock, publishes
        self._token = secrets.token_hex(8)
        doc: dict[str, object] = {
            "step": attempt.step,
            "directory": attempt.directory,
            "token": self._token,
            "created_at": manifest.created_at,
            "world_size": self.world_size,
        }
        _write_json(target, _published_name(attempt.step), doc)

    def others(self, target: Storage, attempt: Attempt, manifest: Manifest) -> None:
        """Wait for every other rank's marker; raise what a rank's part failed with.

        Raises:
            CorruptCheckpointError: A rank's source file fails its checks.
            CheckpointNotFoundError: A rank's source file is missing.
            CheckpointWriteError: A rank failed otherwise, or did not answer in time.
        """
        step = attempt.step
        waiting = set(range(1, self.world_size))
        deadline = time.monotonic() + self.timeout
        where = target.url_of(step_dir_name(step))
        pause = POLL_SECONDS
        while waiting:
            present = set(target.list_dir())  # one listing, then only the markers there
            for rank in sorted(waiting):
                name = _marker_name(step, self._token, rank)
                doc = _read_json(target, name) if name in present else None
                if doc is None:
                    continue
                error = doc.get("error")
                if error is not None:
                    kind = str(doc.get("kind"))
                    cls = _RAISED_AS.get(kind, CheckpointWriteError)
                    raise cls(f"rank {rank} could not copy its files: {error}", path=where)
                waiting.discard(rank)
            if not waiting:
                break
            if self.stopping():
                raise CheckpointWriteError("the manager is closing", path=where)
            if time.monotonic() > deadline:
                raise CheckpointWriteError(
                    f"rank(s) {sorted(waiting)} did not copy their files within "
                    f"{self.timeout:g} s (a rank died, or cannot see this tier)",
                    path=where,
                )
            time.sleep(pause)
            pause = min(MAX_POLL_SECONDS, pause * 1.2)
        logger.debug("every rank copied its files of step %d to %s", step, target.url)

    def closed(self, target: Storage, step: int) -> None:
        """Withdraw the published attempt and the markers (quietly)."""
        try:
            for name in target.list_dir():
                if name.startswith(f"{COPY_PREFIX}{step_dir_name(step)}."):
                    target.remove_file(name)
        except OSError as e:
            logger.debug("could not remove the copy markers of step %d: %s", step, e)


class Follower:
    """A rank other than 0: copies its own files of each copy rank 0 publishes, in one thread.

    Args:
        source: This rank's first tier (where its files are).
        targets: The other tiers' storages.
        rank: This rank.
        world_size: How many ranks take part.
        nice: The thread's CPU niceness (``None``: unchanged).
    """

    def __init__(
        self,
        source: Storage,
        targets: Sequence[Storage],
        rank: int,
        world_size: int,
        nice: int | None,
    ) -> None:
        self._source = source
        self._targets = list(targets)
        self._rank = rank
        self._world_size = world_size
        self._done: set[tuple[int, str]] = set()
        self._stop = threading.Event()
        self.copied: list[tuple[int, int]] = []
        """``(tier index, step)`` of every part this rank copied, in order."""
        self._thread = threading.Thread(
            target=self._run, args=(nice,), name="ckpt-copy-follower", daemon=True
        )
        self._thread.start()

    def stop(self, timeout: float | None = None) -> None:
        """Stop the thread after the part in progress (waiting up to ``timeout``)."""
        self._stop.set()
        self._thread.join(timeout)

    def stop_soon(self) -> None:
        """Stop the thread after the part in progress, without waiting."""
        self._stop.set()

    def _run(self, nice: int | None) -> None:
        if nice is not None:
            set_thread_nice(nice)
        pause = POLL_SECONDS
        while not self._stop.wait(pause):
            busy = False
            for index, target in enumerate(self._targets):
                try:
                    busy = self._scan(index, target) or busy
                except Exception as e:  # an unreachable tier: rank 0 times out and retries
                    logger.debug("cannot look for copies in %s: %s", target.url, e)
            pause = POLL_SECONDS if busy else min(MAX_POLL_SECONDS, pause * 1.5)

    def _scan(self, index: int, target: Storage) -> bool:
        """Do this rank's part of each copy published in ``target``; whether there was one."""
        found = False
        for name in target.list_dir():
            if self._stop.is_set():
                break
            if _PUBLISHED.fullmatch(name) is None:
                continue
            doc = _read_json(target, name)
            if doc is None:
                continue
            found = True
            token = str(doc.get("token"))
            if _TOKEN.fullmatch(token) is None or (index, token) in self._done:
                continue
            self._done.add((index, token))
            self._part(index, target, doc, token)
        return found

    def _source_manifest(self, step: int) -> Manifest:
        """The manifest of ``step`` in this rank's first tier, waiting a while for its commit.

        A node-local first tier commits on this rank just after rank 0's commit, so a
        copy may be published first.
        """
        deadline = time.monotonic() + SOURCE_WAIT_SECONDS
        while True:
            try:
                return read_source_manifest(self._source, step)[1]
            except CheckpointNotFoundError:
                if time.monotonic() > deadline or self._stop.is_set():
                    raise
            time.sleep(POLL_SECONDS)

    def _part(self, index: int, target: Storage, doc: dict[str, object], token: str) -> None:
        """Copy this rank's files of the published step; write the marker saying how it went."""
        step = doc.get("step")
        marker: dict[str, object] = {"rank": self._rank, "error": None}
        try:
            if not isinstance(step, int) or isinstance(step, bool):
                raise ValueError(f"not a step: {step!r}")
            directory = str(doc.get("directory"))
            if directory != step_dir_name(step) and parse_temp_dir_name(directory) is None:
                raise ValueError(f"not an attempt of step {step}: {directory!r}")
            manifest = self._source_manifest(step)
            if manifest.created_at != doc.get("created_at"):
                raise CheckpointWriteError(
                    f"this rank's step {step} is another save than rank 0's "
                    f"({manifest.created_at} against {doc.get('created_at')})",
                    path=self._source.url_of(step_dir_name(step)),
                )
            names = rank_files(manifest, self._rank, self._world_size)
            copy_files(self._source, target, step_dir_name(step), directory, manifest, names)
            self.copied.append((index, step))
            logger.info("rank %d copied its %d file(s) of step %d", self._rank, len(names), step)
        except Exception as e:
            logger.warning("rank %d could not copy its files of step %s: %s", self._rank, step, e)
            marker["error"] = str(e)[:MAX_ERROR_CHARS]
            marker["kind"] = type(e).__name__
        if not isinstance(step, int):
            return
        current = _read_json(target, _published_name(step))
        if current is None or current.get("token") != token:
            logger.debug("the copy of step %d was withdrawn meanwhile", step)
            return  # rank 0 gave up on it (or died): no marker to leave behind
        _write_json(target, _marker_name(step, token, self._rank), marker)
