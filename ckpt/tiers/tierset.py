"""A manager's tiers together: readers of each, the copier, reads across them."""

from __future__ import annotations

import logging
import os
import weakref
from collections.abc import Sequence
from typing import Any

from ckpt.errors import CollectiveError
from ckpt.policies.retention import RetentionPolicy
from ckpt.reading.reader import CheckpointReader
from ckpt.restoring.locations import MapLocation
from ckpt.restoring.tiered import across_tiers
from ckpt.saving.writer import CheckpointWriter
from ckpt.tiers.copier import Copier
from ckpt.tiers.ranks import Follower, RankShare
from ckpt.tiers.tier import Tier

__all__ = ["TierSet", "open_tiers"]

logger = logging.getLogger(__name__)

SHARE_TIMEOUT = 0.5
"""Rank 0 waits this share of the group's timeout for the other ranks' part of a copy."""
WAIT_SHARE = 0.8
"""``wait``/``close`` in a group wait at most this share of the group's timeout for copies
(the other ranks wait in a collective meanwhile)."""


class TierSet:
    """The first tier's reader, the other tiers' readers, and the copier between them.

    In a process group rank 0 runs the copier (its copies shared with the other
    ranks, :mod:`ckpt.tiers.ranks`) and every other rank a follower; ``wait`` and
    ``close`` end with one collective, so that every rank learns rank 0's outcome
    and no follower stops while rank 0 still waits for its part.

    Args:
        first: The reader of the manager's directory.
        tiers: The other tiers, fastest first.
        nice: The copier thread's CPU niceness.
        group: ckpt's rank group, or ``None`` in one process.
    """

    def __init__(
        self,
        first: CheckpointReader,
        tiers: Sequence[Tier],
        nice: int | None,
        group: Any = None,
    ) -> None:
        self.tiers = tuple(tiers)
        self.readers = [
            CheckpointReader(os.fspath(t.url), storage_options=t.storage_options) for t in tiers
        ]
        self._all = [first, *self.readers]
        self._group = group
        self._saved: int | None = None
        self.copier: Copier | None = None
        self.follower: Follower | None = None
        source = first.steps.storage
        if group is not None and group.rank != 0:
            targets = [r.steps.storage for r in self.readers]
            self.follower = Follower(source, targets, group.rank, group.world_size, nice)
            weakref.finalize(self, self.follower.stop_soon)  # a manager dropped without close()
            return
        share = None
        if group is not None and group.world_size > 1:
            share = RankShare(group.world_size, group.timeout * SHARE_TIMEOUT, lambda: False)
        copier = self.copier = Copier(source, tiers, nice, share)
        if share is not None:
            share.stopping = lambda: copier.stopping
        weakref.finalize(self, copier.stop_soon)  # a manager dropped without close()

    def committed(self, step: int, writer: CheckpointWriter, policy: RetentionPolicy) -> None:
        """``step`` committed in the first tier: queue its copies, apply retention there.

        Rank 0's only (it commits and retains); nothing on other ranks.
        """
        self._saved = step
        if self.copier is not None:
            self.copier.committed(step)
            self.copier.retain_source(writer, policy, step)

    def pending(self) -> list[list[int]]:
        """The steps waiting to be copied, per tier (rank 0 knows; other ranks see none)."""
        if self.copier is None:
            return [[] for _ in self.tiers]
        return self.copier.pending()

    def latest_steps(self) -> list[int | None]:
        """The newest committed step of each tier, the first tier first."""
        return [r.latest_step() for r in self._all]

    def read(self, step: int | None, map_location: MapLocation, verify: bool) -> dict[str, Any]:
        """Read ``step`` (the newest in any tier) from the fastest tier whose copy reads."""
        found = across_tiers(
            [r.steps for r in self._all],
            step,
            lambda i, s: self._all[i].read(s, map_location=map_location, verify=verify),
            fallback=False,
            doing="read",
        )
        if found is None:
            return self._all[0].read(None)  # raises: nothing saved
        return found[1]

    def wait(
        self, writer: CheckpointWriter, policy: RetentionPolicy, timeout: float | None = None
    ) -> bool:
        """Wait for the pending copies (see :meth:`Copier.wait`), then retain in the first tier.

        Retention runs again only after a save of this manager's (it holds the lock),
        so that the steps just copied go if the rules drop them. In a process group,
        collective: every rank returns rank 0's outcome.
        """
        done = True
        if self.copier is not None:
            done = self.copier.wait(self._bounded(timeout))
            if self._saved is not None:
                self.copier.retain_source(writer, policy, self._saved)
        if self._group is not None:
            done = bool(self._group.broadcast_json(done))
        return done

    def close(
        self,
        timeout: float | None = None,
        writer: CheckpointWriter | None = None,
        policy: RetentionPolicy | None = None,
    ) -> bool:
        """Wait for the pending copies up to ``timeout``, then stop the copier (or follower).

        With ``writer`` and ``policy``, the first tier's retention runs once more
        after the copies (as in :meth:`wait`).
        """
        done = True
        if self.copier is not None:
            done = self.copier.close(self._bounded(timeout))
            if writer is not None and policy is not None and self._saved is not None:
                self.copier.retain_source(writer, policy, self._saved)
        if self._group is not None:
            try:
                done = bool(self._group.broadcast_json(done))
            except CollectiveError as e:
                logger.warning("the ranks could not agree on the copies at close: %s", e)
                done = False
        if self.follower is not None:
            self.follower.stop(self._bounded(timeout))
        return done

    def _bounded(self, timeout: float | None) -> float | None:
        """``timeout``, within the part of the group's timeout a collective may wait for."""
        if self._group is None:
            return timeout
        limit = float(self._group.timeout) * WAIT_SHARE
        return limit if timeout is None else min(timeout, limit)


def open_tiers(
    first: CheckpointReader, tiers: Sequence[Tier], group: Any, nice: int | None
) -> TierSet | None:
    """The manager's :class:`TierSet`, or ``None`` without tiers.

    In a process group (``group``), every rank must see every tier, the first
    included, at the same path (shared storage); node-local first tiers are not
    supported yet.

    Raises:
        TypeError: A tier is not a :class:`~ckpt.Tier`.
        ValueError: A tier repeats the directory or another tier; a per-node or
            per-rank first tier (``{rank}`` or ``{node}`` in the directory).
    """
    tiers = list(tiers)
    if not tiers:
        return None
    for url in [first.directory, *(os.fspath(t.url) for t in tiers if isinstance(t, Tier))]:
        if "{rank}" in url or "{node}" in url:
            raise ValueError(
                f"node-local tiers ({url!r}) are not supported yet: with tiers, every rank "
                "must see every tier, the manager's directory included, at the same path "
                "(a shared filesystem or an object store); see docs/tiers.md"
            )
    urls = [first.directory]
    for tier in tiers:
        if not isinstance(tier, Tier):
            raise TypeError(f"tiers must hold ckpt.Tier objects, got {type(tier).__name__}")
        url = os.fspath(tier.url)
        if url in urls or os.path.abspath(url) in [os.path.abspath(u) for u in urls]:
            raise ValueError(f"tier {url!r} repeats the directory or another tier")
        urls.append(url)
    return TierSet(first, tiers, nice, group)
