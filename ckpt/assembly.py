"""The parts of a :class:`~ckpt.CheckpointManager`, assembled from its construction options.

A manager composes a writer, a reader, a restorer, its tiers and its
policies; in a process group also the group, its collective save and the
agreement of the ranks on the manager's options. This module checks the
options and builds those parts, in the order each needs the others; the
manager itself only tells the story of a save and a restore.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from ckpt.distributed import collective_save, open_rank_group
from ckpt.policies.cadence import SaveCadence, SaveTiming
from ckpt.policies.options import check_manager_options
from ckpt.policies.preemption import PreemptionWatch, watched_signals
from ckpt.policies.retention import RetentionPolicy
from ckpt.reading.reader import CheckpointReader
from ckpt.reading.steps import StepReader
from ckpt.restoring.restorer import Restorer
from ckpt.saving.pipeline import Saver
from ckpt.saving.saves import Saves
from ckpt.saving.staging import StagingBuffers
from ckpt.saving.writer import CheckpointWriter
from ckpt.state.tree import Json
from ckpt.storage import Storage
from ckpt.tiers import Tier
from ckpt.tiers.tierset import TierSet, node_directory, open_tiers

__all__ = ["ManagerOptions", "ManagerParts", "assemble_manager"]


@dataclass
class ManagerParts:
    """What a manager is made of (see :func:`assemble_manager`)."""

    writer: CheckpointWriter
    storage: Storage
    checkpoints: CheckpointReader
    reader: StepReader
    group: Any
    """ckpt's :class:`~ckpt.distributed.group.RankGroup`, or ``None`` without a process group."""
    tiers: TierSet | None
    restorer: Restorer
    handshake: Any
    """The entry meeting of ``save``/``restore`` in a process group (else ``None``)."""
    decisions: Any
    """The agreement of ``should_save`` in a process group (else ``None``)."""
    staging: StagingBuffers
    saver: Saver
    timing: SaveTiming
    saves: Saves

    def close(self, timeout: float | None, retention: RetentionPolicy) -> None:
        """Finish a save in flight and the tiers' copies, then :meth:`release`.

        Raises:
            Exception: What a background save raised, if it failed.
        """
        try:
            self.saver.wait()
        finally:
            try:
                if self.tiers is not None:
                    self.tiers.close(timeout, self.writer, retention)
            finally:
                self.release()

    def release(self) -> None:
        """Stop watching signals, release the writer lock, close ckpt's groups."""
        self.timing.close()
        if self.decisions is not None:
            self.decisions.close()
        self.writer.close()
        if self.group is not None:
            self.group.close()  # ckpt's gloo group; a closed manager runs no collective


@dataclass(frozen=True)
class ManagerOptions:
    """A manager's construction options: as the :class:`~ckpt.CheckpointManager` arguments."""

    fallback_to_intact: bool = False
    storage_options: dict[str, Any] | None = None
    every_steps: int | None = None
    every_seconds: float | None = None
    preemption_signals: bool | Iterable[int] = False
    background_nice: int | None = 19
    process_group: Any = None
    collective_timeout: float = 600.0
    handshake_timeout: float = 300.0
    agree_every: int = 1
    tiers: Sequence[Tier] = ()
    incremental: bool = False


def assemble_manager(
    directory: str | os.PathLike[str],
    options: ManagerOptions,
    take_lock: Callable[[], None],
    retain: Callable[[int], None],
) -> ManagerParts:
    """Check a manager's options and build its parts (in a process group: collectively).

    Args:
        directory: As given to the manager.
        options: The manager's other options.
        take_lock: Takes the writer lock before the first save.
        retain: Called with each step once it has committed (retention, copies).

    Raises:
        TypeError: ``storage_options`` is not a dict.
        ValueError: A malformed option.
        CollectiveError: In a process group, the ranks did not agree on the options.
    """
    o = options
    check_manager_options(
        storage_options=o.storage_options,
        agree_every=o.agree_every,
        background_nice=o.background_nice,
    )
    cadence = SaveCadence(o.every_steps, o.every_seconds)
    given = os.fspath(directory)
    root, node_local = node_directory(given, o.process_group, o.tiers)
    writer = CheckpointWriter(root, storage_options=o.storage_options, incremental=o.incremental)
    storage = writer.storage
    checkpoints = CheckpointReader(storage=storage)
    group = open_rank_group(o.process_group, float(o.collective_timeout))
    blobs = writer.blob_index if o.incremental else None  # format version 5
    collective = None if group is None else collective_save(storage, group, node_local, blobs)
    tierset = open_tiers(checkpoints, o.tiers, group, o.background_nice, node_local=node_local)
    readers = tierset.readers if tierset else ()
    restorer = Restorer(checkpoints.steps, checkpoints, group, readers, node_local)
    signals = watched_signals(o.preemption_signals)
    handshake: Any = None
    decisions: Any = None
    agree = None
    if group is not None:
        config = _agreed_config(o, given if node_local else storage.url, signals)
        handshake, decisions, agree = _agree(group, o.process_group, config, o.handshake_timeout)
    staging = StagingBuffers()
    saver = Saver(collective=group is not None)
    watch = PreemptionWatch(signals) if signals else None
    timing = SaveTiming(cadence, watch, agree, o.agree_every)
    saves = Saves(
        writer, checkpoints, collective, handshake, timing, staging, saver, take_lock, retain
    )
    return ManagerParts(
        writer,
        storage,
        checkpoints,
        checkpoints.steps,
        group,
        tierset,
        restorer,
        handshake,
        decisions,
        staging,
        saver,
        timing,
        saves,
    )


def _agreed_config(
    options: ManagerOptions, directory: str, signals: Sequence[int]
) -> dict[str, Json]:
    """The options every rank of a process group must give alike."""
    o = options
    return {
        "directory": directory,
        "fallback_to_intact": o.fallback_to_intact,  # every rank tries the same steps
        "every_steps": o.every_steps,
        "every_seconds": o.every_seconds,
        "signals": [int(s) for s in signals],
        "agree_every": o.agree_every,
        "timeouts": [float(o.collective_timeout), float(o.handshake_timeout)],
        "tiers": [[os.fspath(t.url), t.every_steps] for t in o.tiers],  # rank 0 copies
        "incremental": bool(o.incremental),  # the blob plan is collective
    }


def _agree(group: Any, process_group: Any, config: dict[str, Json], timeout: float) -> Any:
    """The ranks' agreement on ``config``: the handshake, decision group and ``should_save``'s."""
    from ckpt.distributed.handshake import open_manager_agreement  # noqa: PLC0415

    return open_manager_agreement(group, process_group, config, float(timeout))
