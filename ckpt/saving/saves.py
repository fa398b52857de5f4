"""A manager's saves: from one process or every rank of a group, now or in the background.

One process captures, takes the writer lock and commits through the writer; in a
group every rank meets at the entry (:mod:`ckpt.distributed.handshake`), writes
its part and one manifest commits them all (:mod:`ckpt.distributed.saving`). With
``async_save`` the state is staged and the commit runs on the background saver.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import torch

from ckpt.errors import CheckpointExistsError
from ckpt.format import Manifest, step_dir_name
from ckpt.policies.cadence import SaveTiming
from ckpt.reading.reader import Checkpoint, CheckpointReader
from ckpt.saving.pipeline import Saver, capture_save
from ckpt.saving.staging import StagingBuffers
from ckpt.saving.writer import CheckpointWriter
from ckpt.state.rng import RNG_ITEM, RandomStreams

__all__ = ["Saves"]

logger = logging.getLogger(__name__)

Files = dict[str, dict[str, torch.Tensor]]


class Saves:
    """Runs the saves of one manager.

    Not thread-safe: one caller; a background commit runs on ``saver``'s thread,
    one at a time.

    Args:
        writer: The root's writer (lock, commit, retention).
        checkpoints: Describes what was committed (the :class:`Checkpoint` returned).
        collective: The group's :class:`~ckpt.distributed.saving.CollectiveSave`, or ``None``.
        handshake: The group's entry meeting, or ``None``.
        timing: The cadence and preemption bookkeeping told of each save.
        staging: Host buffers an asynchronous save writes from.
        saver: The background saver.
        take_lock: Takes the writer lock (the manager's, so a test may stand in for it).
        retain: Applies retention (and queues tier copies) once a step has committed.
    """

    def __init__(
        self,
        writer: CheckpointWriter,
        checkpoints: CheckpointReader,
        collective: Any,
        handshake: Any,
        timing: SaveTiming,
        staging: StagingBuffers,
        saver: Saver,
        take_lock: Callable[[], None],
        retain: Callable[[int], None],
    ):
        self._writer = writer
        self._checkpoints = checkpoints
        self._collective = collective
        self._handshake = handshake
        self._timing = timing
        self._staging = staging
        self._saver = saver
        self._take_lock = take_lock
        self._retain = retain

    def save(
        self,
        step: int,
        epoch: int | None,
        metrics: dict[str, float | int],
        rng: bool,
        overwrite: bool,
        items: dict[str, Any],
        *,
        async_save: bool,
        nice: int | None,
    ) -> Checkpoint:
        """Save checked arguments as ``step`` (see :meth:`ckpt.CheckpointManager.save`)."""
        start = time.perf_counter()
        if self._collective is not None:
            return self._save_collective(
                step, epoch, metrics, rng, overwrite, items, async_save, nice, start
            )
        files, manifest, token = capture_save(
            self._writer.storage, step, epoch, metrics, rng, overwrite, items
        )
        self._take_lock()
        self._refuse_committed(step, overwrite)

        def finish(files: Files, signalled: bool) -> Checkpoint:
            return self._finish(step, files, manifest, token, overwrite, signalled, start)

        return self._commit_now_or_later(step, files, finish, manifest, async_save, nice, start)

    def _commit_now_or_later(
        self,
        step: int,
        files: Files,
        finish: Callable[[Files, bool], Checkpoint],
        template: Manifest,
        async_save: bool,
        nice: int | None,
        start: float,
    ) -> Checkpoint:
        """Run ``finish(files, signalled)`` now, or stage ``files`` and run it in the background.

        ``signalled`` (a stop was requested before this save) is read before staging, so
        the cadence knows this save answers the signal whichever thread commits it.
        """
        signalled = self._timing.stop_requested()
        if not async_save:
            return finish(files, signalled)
        staged = self._staging.stage(files)
        self._timing.staged(step, signalled)
        self._saver.start(step, finish, (staged, signalled), nice)
        logger.debug("step %d staged in %.3f s", step, time.perf_counter() - start)
        return self._checkpoints.info(template)

    def _refuse_committed(self, step: int, overwrite: bool) -> None:
        if not overwrite and self._writer.is_committed(step):
            raise CheckpointExistsError(
                f"step {step} is already saved; choose a new step or pass overwrite=True",
                path=self._writer.storage.url_of(step_dir_name(step)),
            )

    def _save_collective(
        self,
        step: int,
        epoch: int | None,
        metrics: dict[str, float | int],
        rng: bool,
        overwrite: bool,
        items: dict[str, Any],
        async_save: bool,
        nice: int | None,
        start: float,
    ) -> Checkpoint:
        """Every rank of the group together (see :mod:`ckpt.distributed.saving`)."""
        self._handshake.meet("save()", {"step": step, "overwrite": overwrite})
        if rng:
            items[RNG_ITEM] = RandomStreams()

        def prepare() -> None:  # on the coordinator only
            self._take_lock()
            self._refuse_committed(step, overwrite)

        pending = self._collective.begin(step, epoch, metrics, overwrite, items, prepare)

        def finish(files: Files, signalled: bool) -> Checkpoint:
            pending.captured.files = files
            return self._finish_collective(pending, signalled, start)

        return self._commit_now_or_later(
            step, pending.captured.files, finish, pending.template, async_save, nice, start
        )

    def _finish_collective(self, pending: Any, signalled: bool, start: float) -> Checkpoint:
        """Write, agree, commit (coordinator) and apply retention (coordinator)."""
        manifest = self._collective.finish(
            pending, self._writer.check_lock, lambda: self._retain(pending.step)
        )
        self._timing.committed(pending.step, signalled)
        logger.debug(
            "collective save of step %d took %.3f s", pending.step, time.perf_counter() - start
        )
        return self._checkpoints.info(manifest)

    def _finish(
        self,
        step: int,
        files: Files,
        manifest: Manifest,
        token: str,
        overwrite: bool,
        signalled: bool,
        start: float,
    ) -> Checkpoint:
        """Write, commit, log and apply retention (on the caller's thread or in the background)."""
        manifest = self._writer.commit(
            step, files, manifest, token=token, overwrite=overwrite, start=start
        )
        self._timing.committed(step, signalled)
        self._retain(step)
        return self._checkpoints.info(manifest)
