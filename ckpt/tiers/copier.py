"""The background copier: committed steps of the first tier, copied to the other tiers.

One daemon thread per manager (niced like the async saver) copies the pending
steps oldest first, each through the target tier's :class:`~ckpt.CheckpointWriter`
(its writer lock, its commit protocol, then its retention). A failed copy stays
pending and is retried with a growing delay (a warning each time); the training
thread never waits for a copy except in :meth:`Copier.wait`. Which steps are
pending is rebuilt when a manager starts: the first tier's steps that a tier's
cadence selects and that are newer than that tier's newest step.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Collection, Sequence

from ckpt.errors import CheckpointExistsError, CheckpointNotFoundError, CorruptCheckpointError
from ckpt.policies.retention import RetentionPolicy
from ckpt.reading.steps import StepReader
from ckpt.saving.copying import CopyShare, read_source_manifest
from ckpt.saving.pipeline import set_thread_nice
from ckpt.saving.writer import CheckpointWriter
from ckpt.storage import Storage
from ckpt.tiers.tier import Tier

__all__ = ["Copier", "checked_timeout"]

logger = logging.getLogger(__name__)

FIRST_RETRY = 0.5
"""Seconds before the first retry of a failed copy; doubled per failure."""
MAX_RETRY = 30.0
"""The longest wait between retries."""


class _TierState:
    """What the copier knows about one target tier (guarded by the copier's condition)."""

    def __init__(self, tier: Tier) -> None:
        self.tier = tier
        self.writer: CheckpointWriter | None = None
        self.pending: set[int] = set()
        self.discovered = False
        self.failures = 0
        self.retry_at = 0.0
        self.failed_in: int = -1
        """The ``wait`` generation in which a copy (or the listing) last failed."""


def checked_timeout(timeout: object) -> float | None:
    """``timeout`` in seconds as a wait takes it: ``None`` (or infinity) waits without bound.

    Raises:
        TypeError: ``timeout`` is not a number.
        ValueError: ``timeout`` is NaN.
    """
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, int | float):
        raise TypeError(f"timeout must be a number of seconds or None, got {timeout!r}")
    if math.isnan(timeout):
        raise ValueError("timeout must be a number of seconds or None, got nan")
    return None if math.isinf(timeout) and timeout > 0 else max(0.0, float(timeout))


class Copier:
    """Copies committed steps of ``source`` to each tier its cadence selects, in one thread.

    Args:
        source: The first tier's root.
        tiers: The other tiers, fastest first.
        nice: The thread's CPU niceness (``None``: unchanged).
        share: In a process group (on rank 0): each copy is shared with the other
            ranks, which copy their own files (:mod:`ckpt.tiers.ranks`).
    """

    def __init__(
        self,
        source: Storage,
        tiers: Sequence[Tier],
        nice: int | None,
        share: CopyShare | None = None,
    ) -> None:
        self._source = source
        self._share = share
        self._states = [_TierState(t) for t in tiers]
        self._cond = threading.Condition()
        self._generation = 0
        self._flushing = False
        self._stopping = False
        self.copied: list[tuple[int, int]] = []
        """``(tier index, step)`` of every copy this copier committed, in order."""
        self._thread = threading.Thread(
            target=self._run, args=(nice,), name="ckpt-copier", daemon=True
        )
        self._thread.start()

    # ------------------------------------------------------------ the caller's side

    def committed(self, step: int) -> None:
        """``step`` committed in the first tier: queue it for the tiers that select it."""
        with self._cond:
            for index, state in enumerate(self._states):
                if state.tier.selects(step):
                    state.pending.add(step)
                    self._bound(index, state)
            self._cond.notify_all()

    def protected(self) -> set[int] | None:
        """Steps the first tier must keep (pending copies); ``None``: keep every step.

        Every step is kept until each tier has been listed once (what is pending
        is not known before).
        """
        with self._cond:
            if not all(s.discovered for s in self._states):
                return None
            return set().union(*(s.pending for s in self._states))

    def retain_source(self, writer: CheckpointWriter, policy: RetentionPolicy, step: int) -> None:
        """Apply the first tier's retention after ``step``, keeping pending copies."""
        keep: Collection[int] | None = self.protected()
        if keep is None:
            logger.debug("retention after step %d waits until every tier is listed", step)
            return
        writer.retain(policy, step, keep=keep)

    def pending(self) -> list[list[int]]:
        """The steps waiting to be copied, per tier (ascending)."""
        with self._cond:
            return [sorted(s.pending) for s in self._states]

    def wait(self, timeout: float | None = None) -> bool:
        """Copy what is pending now; return whether nothing is left pending.

        Returns early (``False``, with a warning) once every tier still behind has
        failed a copy since this call, or after ``timeout`` seconds: never hangs
        on an unreachable tier.
        """
        timeout = checked_timeout(timeout)
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            self._generation += 1
            generation = self._generation
            self._flushing = True
            self._cond.notify_all()
            try:
                while self._thread.is_alive():
                    behind = [s for s in self._states if s.pending or not s.discovered]
                    if all(s.failed_in == generation for s in behind):
                        break
                    left = None if deadline is None else deadline - time.monotonic()
                    if left is not None and left <= 0:
                        break
                    self._cond.wait(left)
            finally:
                self._flushing = False
            behind = [s for s in self._states if s.pending or not s.discovered]
        for state in behind:
            logger.warning(
                "tier %s is still %d step(s) behind (pending: %s); its copies go on in the "
                "background, and the next manager resumes them",
                state.tier.url,
                len(state.pending),
                sorted(state.pending)[:10],
            )
        return not behind

    @property
    def stopping(self) -> bool:
        """Whether the thread was told to stop (a copy in progress may give up)."""
        return self._stopping

    def stop_soon(self) -> None:
        """Stop the thread after the copy in progress, without waiting (the manager is gone)."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()

    def close(self, timeout: float | None = None) -> bool:
        """Wait for the pending copies (see :meth:`wait`), then stop the thread.

        A copy in progress is finished (or, at ``timeout``, left to the daemon
        thread, which releases its writers when done). Returns whether all copied.
        """
        start = time.monotonic()
        try:
            done = self.wait(timeout)
            timeout = checked_timeout(timeout)
        finally:
            self.stop_soon()  # also when ``timeout`` is refused
        left = None if timeout is None else max(0.0, timeout - (time.monotonic() - start))
        self._thread.join(left)
        return done

    # ------------------------------------------------------------ the thread's side

    def _run(self, nice: int | None) -> None:
        if nice is not None:
            set_thread_nice(nice)
        try:
            while True:
                with self._cond:
                    job = self._next_job()
                    while job is None and not self._stopping:
                        self._cond.wait(self._sleep())
                        job = self._next_job()
                    if self._stopping or job is None:
                        return
                    generation = self._generation
                index, step = job
                ok = self._do(index, step)
                state = self._states[index]
                with self._cond:
                    idle = ok and state.pending <= {step}
                if idle and state.writer is not None:
                    state.writer.close()  # the tier's lock is held only while copies are pending
                with self._cond:
                    self._finished(index, step, ok, generation)
        finally:
            for state in self._states:
                if state.writer is not None:
                    state.writer.close()

    def _next_job(self) -> tuple[int, int | None] | None:
        """The oldest pending step of a tier ready for it (``None`` step: list the tier)."""
        now = time.monotonic()
        best: tuple[int, int] | None = None
        for index, state in enumerate(self._states):
            flushed = self._flushing and state.failed_in != self._generation
            if state.retry_at > now and not flushed:
                continue
            if not state.discovered:
                return index, None
            if state.pending and (best is None or min(state.pending) < best[1]):
                best = index, min(state.pending)
        return best

    def _sleep(self) -> float | None:
        waiting = [s.retry_at for s in self._states if s.pending or not s.discovered]
        return None if not waiting else max(0.01, min(waiting) - time.monotonic())

    def _finished(self, index: int, step: int | None, ok: bool, generation: int) -> None:
        state = self._states[index]
        if ok:
            state.failures = 0
            state.retry_at = 0.0
            if step is not None:
                state.pending.discard(step)
        else:
            state.failures += 1
            state.failed_in = generation
            state.retry_at = time.monotonic() + min(
                MAX_RETRY, FIRST_RETRY * 2 ** (state.failures - 1)
            )
        self._cond.notify_all()

    def _bound(self, index: int, state: _TierState) -> None:
        """Drop the oldest pending steps beyond the tier's backlog (never the newest)."""
        limit = state.tier.max_backlog
        while len(state.pending) > limit:
            oldest = min(state.pending)
            state.pending.discard(oldest)
            logger.warning(
                "tier %d (%s) is %d steps behind, more than max_backlog=%d: step %d will "
                "not be copied there",
                index + 1,
                state.tier.url,
                len(state.pending) + 1,
                limit,
                oldest,
            )
        if len(state.pending) > max(1, limit // 2):
            logger.warning(
                "tier %d (%s) is %d steps behind (oldest pending: step %d)",
                index + 1,
                state.tier.url,
                len(state.pending),
                min(state.pending),
            )

    def _do(self, index: int, step: int | None) -> bool:
        """List the tier (``step`` is ``None``) or copy ``step`` to it; ``False``: retry later."""
        state = self._states[index]
        try:
            if state.writer is None:
                state.writer = CheckpointWriter(
                    state.tier.url, storage_options=state.tier.storage_options
                )
            if step is None:
                self._discover(index, state, state.writer)
            else:
                self._copy(index, step, state.writer)
            return True
        except (CheckpointNotFoundError, CorruptCheckpointError) as e:
            if step is None:
                logger.warning("cannot list tier %s: %s", state.tier.url, e)
                return False
            with self._cond:
                dropped = step not in state.pending
            if dropped:  # beyond max_backlog meanwhile: the first tier may delete it
                logger.info("step %d left the backlog of %s mid-copy: %s", step, state.tier.url, e)
                return True
            logger.warning(
                "step %d is not copied to tier %s: its copy in the first tier cannot be read (%s)",
                step,
                state.tier.url,
                e,
            )
            return True  # a missing or corrupt source is never copied
        except CheckpointExistsError as e:
            if step is None:
                raise
            # Something not ckpt's own holds the step's name in the tier (under the lock,
            # no copy of ours is in flight): retrying would block every newer step.
            logger.warning(
                "step %d is not copied to tier %s: %s; the newer steps go on",
                step,
                state.tier.url,
                e,
            )
            return True
        except Exception as e:
            logger.warning(
                "%s tier %s failed (training goes on; retrying, %d step(s) pending): %s",
                "listing" if step is None else f"copying step {step} to",
                state.tier.url,
                len(state.pending),
                e,
            )
            return False

    def _discover(self, index: int, state: _TierState, writer: CheckpointWriter) -> None:
        """Queue the first tier's steps selected for the tier and newer than its newest."""
        newest = StepReader(writer.storage).latest_step()
        steps = StepReader(self._source).all_steps()
        found = {s for s in steps if state.tier.selects(s) and (newest is None or s > newest)}
        with self._cond:
            state.pending |= found
            state.discovered = True
            self._bound(index, state)
        if found:
            logger.info(
                "tier %s: %d step(s) to copy from earlier runs: %s",
                state.tier.url,
                len(found),
                sorted(found)[:10],
            )

    def _copy(self, index: int, step: int, writer: CheckpointWriter) -> None:
        """Copy ``step`` (unless already there), then apply the tier's retention."""
        if writer.is_committed(step):
            logger.debug("step %d is already in tier %s", step, writer.directory)
            self._compare(step, writer)
            return
        writer.commit_copy(self._source, step, self._share)
        with self._cond:
            self.copied.append((index, step))
        writer.retain(self._states[index].tier.retention, step)

    def _compare(self, step: int, writer: CheckpointWriter) -> None:
        """Warn when the tier's ``step`` is not the first tier's (an overwrite, another run)."""
        try:
            theirs = read_source_manifest(writer.storage, step)[0]
            ours = read_source_manifest(self._source, step)[0]
        except Exception as e:  # the copy or the restore tells why
            logger.debug(
                "step %d: cannot compare the copy in tier %s: %s", step, writer.directory, e
            )
            return
        if theirs != ours:
            logger.warning(
                "step %d in tier %s differs from step %d in the first tier (saved again with "
                "overwrite=True, or another run shares the tier): the tier keeps its own copy",
                step,
                writer.directory,
                step,
            )
