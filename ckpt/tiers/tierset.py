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
from ckpt.tiers.copier import Copier, checked_timeout
from ckpt.tiers.ranks import Follower, RankShare
from ckpt.tiers.tier import Tier

__all__ = ["TierSet", "open_tiers", "roots_overlap", "same_root_key"]

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
        node_local: ``first`` is this rank's own (it holds this rank's files only):
            restores and reads skip it, and every rank applies its retention.
    """

    def __init__(
        self,
        first: CheckpointReader,
        tiers: Sequence[Tier],
        nice: int | None,
        group: Any = None,
        node_local: bool = False,
    ) -> None:
        self.tiers = tuple(tiers)
        self.node_local = node_local
        self.readers = [
            CheckpointReader(os.fspath(t.url), storage_options=t.storage_options) for t in tiers
        ]
        self._all = [first, *self.readers]
        self._group = group
        self._saved: int | None = None
        self._closed: bool | None = None
        """What the first :meth:`close` returned (``None`` until then)."""
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
        elif self.node_local:
            self._retain_own(writer, policy, step)

    def _retain_own(self, writer: CheckpointWriter, policy: RetentionPolicy, step: int) -> None:
        """Node-local, on a rank other than 0: retention here, keeping the copies to come.

        Kept: the steps a tier's cadence selects that are newer than its newest step
        (what rank 0's copier has pending); everything while a tier cannot be listed.
        """
        keep: set[int] = set()
        try:
            steps = self._all[0].all_steps()
            for tier, reader in zip(self.tiers, self.readers, strict=True):
                newest = reader.latest_step()
                keep |= {s for s in steps if tier.selects(s) and (newest is None or s > newest)}
        except Exception as e:
            logger.info("retention after step %d waits: a tier cannot be listed (%s)", step, e)
            return
        writer.retain(policy, step, keep=keep)

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
        readers = self.readers if self.node_local else self._all
        found = across_tiers(
            [r.steps for r in readers],
            step,
            lambda i, s: readers[i].read(s, map_location=map_location, verify=verify),
            fallback=False,
            doing="read",
        )
        if found is None:
            return readers[0].read(None)  # raises: nothing saved
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
        if self.copier is None and self.node_local and self._saved is not None:
            self._retain_own(writer, policy, self._saved)  # after rank 0's copies
        return done

    def close(
        self,
        timeout: float | None = None,
        writer: CheckpointWriter | None = None,
        policy: RetentionPolicy | None = None,
    ) -> bool:
        """Wait for the pending copies up to ``timeout``, then stop the copier (or follower).

        With ``writer`` and ``policy``, the first tier's retention runs once more
        after the copies (as in :meth:`wait`). Idempotent: a second call returns
        what the first did, and runs nothing (no collective: the group is closed).

        Raises:
            TypeError: ``timeout`` is not a number (the copier is stopped all the same).
            ValueError: ``timeout`` is NaN (likewise).
        """
        try:
            checked_timeout(timeout)
        except (TypeError, ValueError):
            if self.copier is not None:
                self.copier.stop_soon()
            if self.follower is not None:
                self.follower.stop_soon()
            raise
        if self._closed is not None:
            return self._closed
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
        saved, own = self._saved, self.copier is None and self.node_local
        if own and saved is not None and writer is not None and policy is not None:
            self._retain_own(writer, policy, saved)  # after rank 0's copies
        self._closed = done
        return done

    def _bounded(self, timeout: float | None) -> float | None:
        """``timeout``, within the part of the group's timeout a collective may wait for."""
        timeout = checked_timeout(timeout)
        if self._group is None:
            return timeout
        limit = float(self._group.timeout) * WAIT_SHARE
        return limit if timeout is None else min(timeout, limit)


def node_directory(directory: str, process_group: Any, tiers: Sequence[Tier]) -> tuple[str, bool]:
    """``directory`` with ``{rank}`` replaced by this rank, and whether it is node-local.

    Raises:
        ValueError: ``{rank}`` without a process group or without tiers, in a URL
            that is not a local path, or ``{node}``.
    """
    if "{node}" in directory:
        raise ValueError(
            f"{{node}} in the directory ({directory!r}) is not supported: name each rank's "
            "own first tier with {rank}"
        )
    if "{rank}" not in directory:
        return directory, False
    import torch.distributed as dist  # noqa: PLC0415 - only for node-local tiers

    if process_group is False or not (dist.is_available() and dist.is_initialized()):
        raise ValueError(
            f"{{rank}} in the directory ({directory!r}) names each rank's own first tier: "
            "it needs a process group"
        )
    if not tiers:
        raise ValueError(
            f"a node-local directory ({directory!r}) needs tiers=[...] with a tier every rank "
            "sees: a checkpoint is restored from a tier that holds every rank's files"
        )
    if "://" in directory and not directory.startswith("file://"):
        raise ValueError(f"a node-local directory must be a local path, got {directory!r}")
    rank = dist.get_rank(None if process_group is None else process_group)
    return directory.replace("{rank}", str(rank)), True


def same_root_key(url: str) -> str:
    """What identifies the root ``url``: a local path (or ``file://``) resolved through links."""
    if "://" in url and not url.startswith("file://"):
        return url.rstrip("/")
    return os.path.realpath(url.removeprefix("file://"))


def roots_overlap(a: str, b: str) -> bool:
    """Whether the roots ``a`` and ``b`` are one directory, or one lies inside the other."""
    first, second = (same_root_key(u).rstrip("/") + "/" for u in (a, b))
    return first.startswith(second) or second.startswith(first)


def open_tiers(
    first: CheckpointReader,
    tiers: Sequence[Tier],
    group: Any,
    nice: int | None,
    *,
    node_local: bool = False,
) -> TierSet | None:
    """The manager's :class:`TierSet`, or ``None`` without tiers.

    In a process group (``group``), every rank must see every tier at the same
    path (shared storage), except a node-local first tier (``node_local``: the
    manager's directory named each rank's own with ``{rank}``).

    Raises:
        TypeError: A tier is not a :class:`~ckpt.Tier`.
        ValueError: A tier repeats the directory or another tier, or one lies inside
            the other (links resolved); ``{rank}`` or
            ``{node}`` in a tier's URL.
    """
    tiers = list(tiers)
    if not tiers:
        return None
    for tier in tiers:
        url = os.fspath(tier.url) if isinstance(tier, Tier) else ""
        if "{rank}" in url or "{node}" in url:
            raise ValueError(
                f"node-local tiers ({url!r}) are not supported: only the manager's directory "
                "may be each rank's own; every tier of tiers=[...] must be storage every rank "
                "sees at the same path; see docs/tiers.md"
            )
    seen = [first.directory]
    for tier in tiers:
        if not isinstance(tier, Tier):
            raise TypeError(f"tiers must hold ckpt.Tier objects, got {type(tier).__name__}")
        url = os.fspath(tier.url)
        for other in seen:
            if roots_overlap(url, other):
                raise ValueError(
                    f"tier {url!r} repeats the directory or another tier, or lies inside it or "
                    f"around it ({other!r}; links and file:// URLs resolved): a retention or "
                    "copy in one would reach into the other"
                )
        seen.append(url)
    return TierSet(first, tiers, nice, group, node_local)
