"""A manager's tiers together: readers of each, the copier, reads across them."""

from __future__ import annotations

import os
import weakref
from collections.abc import Sequence
from typing import Any

from ckpt.policies.retention import RetentionPolicy
from ckpt.reading.reader import CheckpointReader
from ckpt.restoring.locations import MapLocation
from ckpt.restoring.tiered import across_tiers
from ckpt.saving.writer import CheckpointWriter
from ckpt.tiers.copier import Copier
from ckpt.tiers.tier import Tier

__all__ = ["TierSet", "open_tiers"]


class TierSet:
    """The first tier's reader, the other tiers' readers, and the copier between them.

    Args:
        first: The reader of the manager's directory.
        tiers: The other tiers, fastest first.
        nice: The copier thread's CPU niceness.
    """

    def __init__(self, first: CheckpointReader, tiers: Sequence[Tier], nice: int | None) -> None:
        self.tiers = tuple(tiers)
        self.readers = [
            CheckpointReader(os.fspath(t.url), storage_options=t.storage_options) for t in tiers
        ]
        self._all = [first, *self.readers]
        self.copier = Copier(first.steps.storage, tiers, nice)
        weakref.finalize(self, self.copier.stop_soon)  # a manager dropped without close()
        self._saved: int | None = None

    def committed(self, step: int, writer: CheckpointWriter, policy: RetentionPolicy) -> None:
        """``step`` committed in the first tier: queue its copies, apply retention there."""
        self._saved = step
        self.copier.committed(step)
        self.copier.retain_source(writer, policy, step)

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
        so that the steps just copied go if the rules drop them.
        """
        done = self.copier.wait(timeout)
        if self._saved is not None:
            self.copier.retain_source(writer, policy, self._saved)
        return done

    def close(self, timeout: float | None = None) -> bool:
        """Wait for the pending copies up to ``timeout``, then stop the copier."""
        return self.copier.close(timeout)


def open_tiers(
    first: CheckpointReader, tiers: Sequence[Tier], group: Any, nice: int | None
) -> TierSet | None:
    """The manager's :class:`TierSet`, or ``None`` without tiers.

    Raises:
        NotImplementedError: Tiers inside a process group (not supported yet).
        TypeError: A tier is not a :class:`~ckpt.Tier`.
        ValueError: A tier repeats the directory or another tier.
    """
    tiers = list(tiers)
    if not tiers:
        return None
    if group is not None:
        raise NotImplementedError(
            "tiers= is not supported inside a process group yet (multi-rank tiers, "
            "issue 19 item 5); pass process_group=False for a manager private to this "
            "process, or copy with `ckpt copy`"
        )
    urls = [first.directory]
    for tier in tiers:
        if not isinstance(tier, Tier):
            raise TypeError(f"tiers must hold ckpt.Tier objects, got {type(tier).__name__}")
        url = os.fspath(tier.url)
        if url in urls or os.path.abspath(url) in [os.path.abspath(u) for u in urls]:
            raise ValueError(f"tier {url!r} repeats the directory or another tier")
        urls.append(url)
    return TierSet(first, tiers, nice)
