"""Applying retention: delete what the policy drops, after a new checkpoint has committed."""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Mapping

from ckpt.errors import CheckpointError
from ckpt.format import step_dir_name
from ckpt.io import read_manifest
from ckpt.policies.retention import RetentionPolicy, steps_to_delete
from ckpt.saving.commit import delete_checkpoint
from ckpt.storage import Storage

__all__ = ["Retainer"]

logger = logging.getLogger(__name__)


class Retainer:
    """Applies a :class:`~ckpt.policies.retention.RetentionPolicy`, caching steps' metrics.

    Not thread-safe: one save applies it at a time.
    """

    def __init__(self) -> None:
        self._metrics: dict[int, Mapping[str, float | int]] = {}

    def forget(self, step: int) -> None:
        """Drop the cached metrics of ``step`` (it is being written or was deleted)."""
        self._metrics.pop(step, None)

    def apply(
        self,
        storage: Storage,
        policy: RetentionPolicy,
        committed: Callable[[], list[int]],
        just_saved: int,
        keep: Collection[int] = (),
    ) -> list[int]:
        """Delete what the rules drop, never a step of ``keep``; a failure is only a warning.

        Returns:
            The steps deleted (or tried).
        """
        if policy.keeps_all:
            return []
        deleted: list[int] = []
        try:
            self._delete_dropped(storage, policy, committed(), just_saved, keep, deleted)
        except Exception as e:  # an unreadable root, a hostile manifest: the save stands
            logger.warning(
                "retention after step %d failed (the save stands; the next one retries): %s",
                just_saved,
                e,
            )
        return deleted

    def dropped(
        self, storage: Storage, policy: RetentionPolicy, committed: list[int], just_saved: int
    ) -> list[int]:
        """The steps of ``committed`` that ``policy`` drops once ``just_saved`` has committed."""
        metrics = self._committed_metrics(storage, committed) if policy.keep_best else {}
        return steps_to_delete(committed, just_saved=just_saved, policy=policy, metrics=metrics)

    def _delete_dropped(
        self,
        storage: Storage,
        policy: RetentionPolicy,
        committed: list[int],
        just_saved: int,
        keep: Collection[int],
        deleted: list[int],
    ) -> None:
        for old in self.dropped(storage, policy, committed, just_saved):
            if old in keep:
                continue
            self.forget(old)
            deleted.append(old)
            delete_checkpoint(storage, old, str(policy))

    def _committed_metrics(
        self, storage: Storage, steps: list[int]
    ) -> dict[int, Mapping[str, float | int]]:
        """Each step's metrics, from its manifest (cached: manifests do not change)."""
        for step in steps:
            if step not in self._metrics:
                try:
                    manifest = read_manifest(storage, step_dir_name(step))
                except CheckpointError as e:
                    logger.warning("cannot rank step %d for keep_best: %s", step, e)
                    manifest = None
                self._metrics[step] = {} if manifest is None else manifest.metrics
        return {step: self._metrics[step] for step in steps}
