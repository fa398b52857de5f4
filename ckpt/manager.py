"""The checkpoint manager: numbered steps, atomic commits, restore and retention.

Its parts (writer, reader, restorer, tiers, policies; in a process group the
group and its agreement) are assembled from its options by :mod:`ckpt.assembly`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from ckpt.assembly import ManagerOptions, assemble_manager
from ckpt.format import step_dir_name
from ckpt.gc_pause import paused_gc
from ckpt.policies.retention import RetentionPolicy
from ckpt.reading.reader import Checkpoint
from ckpt.restoring.locations import MapLocation
from ckpt.restoring.restorer import restore_options
from ckpt.saving.pipeline import check_save_args
from ckpt.saving.writer_lock import LOCK_NAME  # noqa: F401 (re-exported)
from ckpt.saving.writer_lock import release_quietly as _release_quietly  # noqa: F401
from ckpt.state.items import reserved_names
from ckpt.tiers import Tier

__all__ = ["Checkpoint", "CheckpointManager"]

logger = logging.getLogger(__name__)


class CheckpointManager:
    """Saves and restores numbered checkpoints of training state in one directory.

    Each ``save(step, ...)`` writes one checkpoint directory atomically: files
    go into a temporary sibling, are fsynced, the manifest is written last, and
    the directory is renamed into place. Only committed checkpoints are ever
    listed or restored. Every save also captures the process's random streams,
    and every restore puts them back last (``rng=False`` opts out). Every file
    carries a checksum, verified as it is read. Retention rules (``keep_*``) are
    combined: a checkpoint is kept when any rule keeps it, and deletion happens
    only after a new checkpoint has committed; with no rule, all are kept. The
    first save takes the directory's writer lock until ``close()``: a second
    writer fails at once with :class:`~ckpt.CheckpointLockedError`; any number
    may read. An instance is not thread-safe.

    Args:
        directory: A local path or fsspec URL (``memory://run``, ``s3://bucket/run``).
            In a process group with ``tiers``, ``{rank}`` in a local path makes it each
            rank's own (node-local) first tier (see ``docs/tiers.md``).
        keep_last: Keep the this many newest checkpoints.
        keep_every: Also keep every checkpoint that completes a multiple of this many steps.
        keep_best: Also keep the this many checkpoints with the best ``best_metric``.
        best_metric: The metric (from ``save(metrics=...)``) ranking ``keep_best``.
        best_mode: ``"min"`` or ``"max"``: which ``best_metric`` values are best.
        fallback_to_intact: When the latest checkpoint is corrupt, ``restore()`` (with no
            step) restores the newest intact one instead, with a warning naming what
            it skipped. Off by default: a corrupt latest checkpoint raises.
        storage_options: Passed to the fsspec filesystem (credentials, endpoint, ...).
        every_steps: ``should_save(step)`` is true after every this many steps.
        every_seconds: ``should_save(step)`` is true once this long has passed since
            the last save (or since the manager was created).
        preemption_signals: ``True`` for SIGTERM and SIGUSR1, or the signals to watch.
            A watched signal only sets a flag: ``should_save`` is then true at the next
            step boundary, and ``should_stop`` once that save has committed. The
            previous handlers come back on ``close()``. In a process group, a signal
            to any rank makes every rank save the same step and then stop.
        async_save: ``save()`` returns once the state is copied into staging buffers
            (reused from one save to the next; pinned for CUDA tensors) and writes
            in a background thread. At most one save is in flight: the next
            ``save()`` waits for it. ``wait()`` and ``close()`` flush it; a failure
            in the background is raised by the next ``save()``, ``wait()``,
            ``restore()``, ``read()``, ``verify()`` or ``close()``. A process that
            exits without ``wait()`` still finishes the save (at exit), except a rank
            of a process group whose main thread died of an uncaught exception: it
            abandons the save and exits. One that is killed leaves a complete
            checkpoint or none (the next save removes what it left).
        background_nice: The background writer's CPU niceness (Linux, per thread).
            The default 19 makes it yield to training whenever both want a core, so
            steps keep their speed; on a machine whose cores training keeps busy, the
            save then takes longer to commit. ``0`` shares the CPU evenly; ``None``
            leaves the priority alone.
        process_group: Inside an initialized process group the manager is
            collective: every rank constructs it and calls ``save``, ``restore``,
            ``wait`` and ``close`` together (``read``, ``verify`` and the listing
            run no collective; see ``docs/distributed.md``). ``None`` uses the
            default group when one is initialized; pass a ``ProcessGroup`` for a
            subgroup (whose ranks hold every saved tensor in full together, e.g.
            one replica's ranks of a 2-D mesh), or ``False`` for a manager private
            to this process.
        collective_timeout: Seconds a collective of ckpt's waits for the other
            ranks before raising :class:`~ckpt.CollectiveError` (a rank died).
        handshake_timeout: In a process group, seconds a rank waits at the entry of
            ``save``/``restore`` (and at ``should_save``'s agreement) for the other
            ranks before raising :class:`~ckpt.CollectiveError` naming the ranks that
            did not come (one rank saving alone, a rank that died or is stopped).
        agree_every: In a process group whose manager has ``every_seconds`` or
            ``preemption_signals``, ``should_save`` agrees across ranks (one small
            collective) on steps that are multiples of this; other steps answer by
            ``every_steps`` alone, so a signal or the clock is acted on up to this many
            steps later. ``every_steps`` alone needs no agreement.
        tiers: Slower, more durable roots (:class:`~ckpt.Tier`, fastest first) that
            committed steps are copied to in the background, each with its own
            cadence and retention; ``directory`` is the first tier. ``restore`` and
            ``read`` take the newest step of any tier from the fastest tier whose
            copy verifies; ``wait`` and ``close`` also wait for the copies. In a
            process group each rank copies the files it wrote, and every tier must
            be storage every rank sees. See ``docs/tiers.md``.
        incremental: Store each large tensor once per root (format version 4): a
            tensor whose bytes the root already holds is referenced, not written.
            One process only for now. See ``docs/usage.md``.

    Example:
        >>> mgr = ckpt.CheckpointManager("runs/exp1", keep_last=3, every_steps=500)
        >>> info = mgr.restore(model=model, optimizer=opt)
        >>> start = 0 if info is None else info.next_step
        >>> for step in range(start, total_steps):
        ...     train_one_step()
        ...     if mgr.should_save(step):
        ...         mgr.save(step, model=model, optimizer=opt)
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        keep_last: int | None = None,
        keep_every: int | None = None,
        keep_best: int | None = None,
        best_metric: str | None = None,
        best_mode: str = "min",
        fallback_to_intact: bool = False,
        storage_options: dict[str, Any] | None = None,
        every_steps: int | None = None,
        every_seconds: float | None = None,
        preemption_signals: bool | Iterable[int] = False,
        async_save: bool = False,
        background_nice: int | None = 19,
        process_group: Any = None,
        collective_timeout: float = 600.0,
        handshake_timeout: float = 300.0,
        agree_every: int = 1,
        tiers: Sequence[Tier] = (),
        incremental: bool = False,
    ):
        self.retention = RetentionPolicy(keep_last, keep_every, keep_best, best_metric, best_mode)
        self.fallback_to_intact = bool(fallback_to_intact)
        options = ManagerOptions(
            fallback_to_intact=self.fallback_to_intact,
            storage_options=storage_options,
            every_steps=every_steps,
            every_seconds=every_seconds,
            preemption_signals=preemption_signals,
            background_nice=background_nice,
            process_group=process_group,
            collective_timeout=collective_timeout,
            handshake_timeout=handshake_timeout,
            agree_every=agree_every,
            tiers=tiers,
            incremental=incremental,
        )
        take_lock = lambda: self._take_lock()  # noqa: E731, PLW0108 - looked up at each call
        parts = assemble_manager(directory, options, take_lock, self._retain)
        self.async_save = bool(async_save)
        self.background_nice = background_nice
        self._parts = parts
        self._writer, self._storage = parts.writer, parts.storage
        self._checkpoints, self._reader = parts.checkpoints, parts.reader
        self._group, self._tiers, self._restorer = parts.group, parts.tiers, parts.restorer
        self._handshake, self._decisions = parts.handshake, parts.decisions
        self._staging, self._saver, self._timing = parts.staging, parts.saver, parts.timing

    def __repr__(self) -> str:
        return f"CheckpointManager({self._storage.url!r}, {self.retention})"

    def __enter__(self) -> CheckpointManager:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self, timeout: float | None = None) -> None:
        """Finish a save in flight, release the writer lock, restore signal handlers; idempotent.

        Args:
            timeout: With ``tiers``, how long to wait for the pending copies (``None``:
                until each is copied or has failed once); the next manager on the
                same directory resumes those left.

        Raises:
            Exception: What a background save raised, if it failed.
        """
        self._parts.close(timeout, self.retention)

    def _release(self) -> None:
        self._parts.release()

    def _take_lock(self) -> None:
        self._writer.lock()

    # ------------------------------------------------------------------ cadence

    @property
    def preempted(self) -> bool:
        """Whether a watched signal was received (in a group: here, or by a rank, as agreed)."""
        return self._timing.preempted

    @property
    def should_stop(self) -> bool:
        """Whether a preemption signal was received and a checkpoint has committed since.

        With ``async_save``, a save requested after the signal is waited for here. In a
        process group, runs no collective and answers the same on every rank: the
        signal counts once ``should_save`` has agreed on it.
        """
        timing = self._timing
        requested = timing.stop_requested() and timing.requested_after_signal
        if requested and not timing.saved_since_signal:
            self._saver.wait()
        return timing.should_stop()

    def should_save(self, step: int) -> bool:
        """Whether to save after completing ``step``: the cadence is due, or a stop was requested.

        Never true twice for the same step once it has been saved. In a process group,
        every rank calls it with the same step and gets the same answer: with
        ``every_seconds`` or ``preemption_signals``, the ranks agree (one small
        collective, see ``agree_every``).

        Args:
            step: The step just completed (counting from 0).
        """
        step_dir_name(step)  # validates the step
        return self._timing.should_save(step)

    @property
    def directory(self) -> str:
        """The root directory, as given."""
        return self._storage.url

    # ----------------------------------------------------------------- listing

    def all_steps(self) -> list[int]:
        """Return the steps of all committed checkpoints, ascending (as the reader lists them)."""
        return self._checkpoints.all_steps()

    def latest_step(self) -> int | None:
        """Return the newest committed step, or ``None`` if there is none."""
        return self._checkpoints.latest_step()

    def checkpoint(self, step: int | None = None) -> Checkpoint | None:
        """Describe a committed checkpoint (the latest when ``step`` is ``None``) without loading.

        Returns ``None`` when ``step`` is ``None`` and nothing is committed.
        """
        return self._checkpoints.checkpoint(step)

    def latest_steps(self) -> list[int | None]:
        """The newest committed step of each tier (``directory`` first, then ``tiers``)."""
        if self._tiers is None:
            return [self.latest_step()]
        return self._tiers.latest_steps()

    def pending_copies(self) -> list[list[int]]:
        """The steps waiting to be copied to each of ``tiers`` (ascending; ``[]`` without tiers)."""
        return [] if self._tiers is None else self._tiers.pending()

    # -------------------------------------------------------------------- save

    @paused_gc()
    def save(
        self,
        step: int,
        *,
        epoch: int | None = None,
        metrics: Mapping[str, float | int] | None = None,
        rng: bool = True,
        overwrite: bool = False,
        **items: Any,
    ) -> Checkpoint:
        """Save items as the checkpoint of ``step``, atomically.

        Args:
            step: The step just completed; a non-negative int not saved before.
            epoch: The epoch, stored for bookkeeping.
            metrics: Numbers to store with the checkpoint (loss, accuracy, ...).
            rng: Also save the random streams of Python, NumPy, torch CPU and CUDA.
            overwrite: Replace ``step`` if it is already saved. On local disk the
                old checkpoint and the new one are swapped atomically: readers see
                one or the other, never neither.
            **items: What to save, by name: ``nn.Module``, ``Optimizer``, any object
                with ``state_dict()``/``load_state_dict()``, or a dict.

        Returns:
            The committed checkpoint.

        Raises:
            CheckpointExistsError: ``step`` is already committed (and not ``overwrite``).
            CheckpointLockedError: Another writer holds the directory.
            CheckpointWriteError: Writing failed (disk full, I/O error); the partial
                checkpoint is removed and earlier checkpoints are intact.
            TypeError: An item, or a value in its state, cannot be stored without pickle.
            ValueError: A bad step, epoch or item name.
        """
        self._saver.wait()  # at most one save in flight; an earlier failure surfaces here
        _, checked_metrics = check_save_args(
            step, epoch, metrics, rng, overwrite, items, RESERVED_NAMES
        )
        return self._parts.saves.save(
            step,
            epoch,
            checked_metrics,
            rng,
            overwrite,
            items,
            async_save=self.async_save,
            nice=self.background_nice,
        )

    def _retain(self, step: int) -> None:
        """Once ``step`` has committed: retention, or (with tiers) the copies it queues."""
        if self._tiers is None:
            self._writer.retain(self.retention, step)
        else:  # queue the copies; retention keeps the steps waiting for one
            self._tiers.committed(step, self._writer, self.retention)

    def wait(self) -> None:
        """Block until the save in flight (``async_save=True``) has committed.

        With ``tiers``, then also until the pending copies are done, or each tier
        still behind has failed a copy since (a warning says how far behind); in a
        process group every rank waits for rank 0's copies (one collective).

        Raises:
            Exception: What the background save raised, if it failed (raised once).
        """
        self._saver.wait()
        if self._tiers is not None:
            self._tiers.wait(self._writer, self.retention)

    # ----------------------------------------------------------------- restore

    @paused_gc()
    def restore(
        self,
        step: int | None = None,
        *,
        map_location: MapLocation = None,
        strict: bool = True,
        rng: bool = True,
        verify: bool = True,
        assign: bool = False,
        optimizer_class_change: bool = False,
        optimizer_by_position: bool = False,
        **items: Any,
    ) -> Checkpoint | None:
        """Load a checkpoint into live objects, in place.

        Every item is validated and every byte read and checked before any item
        is touched, so a failed restore leaves every item as it was; the one
        exception is an item's own code (a hook, a ``load_state_dict`` override)
        raising while items are loaded: see :class:`~ckpt.PartialRestoreError`.
        Modules are loaded first, then optimizers, then other stateful objects
        (schedulers after their optimizers), then dicts, and the random streams
        last; the order of the keyword arguments does not matter. A scheduler
        restored without its optimizer sets its groups' lr to its last lr.
        In a process group, when any rank fails every rank raises an error of the
        same class, and nothing changes on any rank until every rank has checked
        everything (see ``docs/distributed.md``).

        Args:
            step: The step to restore; the latest committed one when ``None``.
            map_location: Where to build tensors, as for ``torch.load``; by default
                each tensor is built where its live counterpart lives (optimizer
                state following ``Optimizer.load_state_dict``'s cast rules).
            strict: Module keys must match exactly (keys that differ only by the
                wrapper prefixes ``_orig_mod.`` and ``module.`` are matched up).
            rng: Restore the random streams saved with the checkpoint, if it has
                them; pass ``False`` for a warm start.
            verify: Check every file read against its checksum as it streams in.
            assign: Modules take the loaded tensors as their parameters and buffers
                (``load_state_dict(assign=True)``), e.g. for a model built on the
                ``meta`` device.
            optimizer_class_change: Load an optimizer state saved from another
                optimizer class (its per-parameter state must still fit the live class).
            optimizer_by_position: Load an optimizer whose parameters had other names
                when saved, matching them by position.
            **items: The live objects to load into, by the names they were saved under.

        Returns:
            The restored checkpoint, or ``None`` when ``step`` is ``None`` and
            nothing has been saved yet.

        Raises:
            CheckpointNotFoundError: ``step`` or an item is not in the checkpoint.
            IncompatibleCheckpointError: The checkpoint does not fit the live objects.
            CorruptCheckpointError: A file is missing, malformed, fails its checksum
                or disagrees with the manifest (for the latest step, unless
                ``fallback_to_intact`` found an intact older one).
            PartialRestoreError: An item's own code raised while it was loaded; the
                error lists the items restored before it and those left untouched.
        """
        self._saver.wait()
        options = restore_options(
            map_location,
            items,
            RESERVED_NAMES,
            strict=strict,
            rng=rng,
            verify=verify,
            assign=assign,
            optimizer_class_change=optimizer_class_change,
            optimizer_by_position=optimizer_by_position,
        )
        if self._group is not None:
            self._handshake.meet("restore()", {"step": step})
        return self._restorer.restore(
            step, items, options, rng=rng, verify=verify, fallback=self.fallback_to_intact
        )

    def read(
        self, step: int | None = None, *, map_location: MapLocation = "cpu", verify: bool = True
    ) -> dict[str, Any]:
        """Load a checkpoint's items as plain state dicts, without live objects.

        As :meth:`CheckpointReader.read` (a save in flight is waited for first).

        Raises:
            CheckpointNotFoundError: No checkpoint, or ``step`` is not committed.
            CorruptCheckpointError: A file is malformed or disagrees with the manifest.
        """
        self._saver.wait()
        if self._tiers is not None:
            return self._tiers.read(step, map_location, verify)
        return self._checkpoints.read(step, map_location=map_location, verify=verify)

    def verify(self, step: int | None = None) -> Checkpoint:
        """Check a checkpoint completely without loading it (see :meth:`CheckpointReader.verify`).

        Raises:
            CheckpointNotFoundError: No checkpoint, or ``step`` is not committed.
            CorruptCheckpointError: Anything is wrong; the message names the step and file.
        """
        self._saver.wait()
        return self._checkpoints.verify(step)


RESERVED_NAMES = reserved_names(CheckpointManager.save, CheckpointManager.restore)
"""Option names of ``save`` and ``restore``, which no item may take."""
