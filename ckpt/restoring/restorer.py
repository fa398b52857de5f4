"""Restoring one step into live items, as a manager does: choose the step, prepare, apply.

One process or every rank of a group alike: the step is chosen (the latest, or
the newest intact one with ``fallback``), every item is checked and every byte
read before anything changes, then the items are applied in kind order.
Which bytes each item is read from is decided in one place,
:func:`prepare_step`: a process's own items from whole files
(:func:`ckpt.restoring.pipeline.prepare_own`), modules and optimizers by
chunks wherever ranks are involved (:mod:`ckpt.distributed.restoring`);
either gives a :class:`~ckpt.restoring.pipeline.Prepared`, which the restorer
applies without knowing which. The options travel as one
:class:`~ckpt.restoring.pipeline.RestoreRequest`. In a group the ranks agree at
each of those points (:mod:`ckpt.distributed.outcomes`), so all go on or all
raise alike.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Collection, Iterable, Sequence
from functools import partial
from typing import Any, cast

from ckpt.distributed import prepare_collective
from ckpt.format import MANIFEST_NAME, Manifest, step_dir_name
from ckpt.reading.reader import Checkpoint, CheckpointReader, located
from ckpt.reading.steps import StepReader
from ckpt.restoring.locations import MapLocation, check_map_location
from ckpt.restoring.pipeline import Keys, Prepared, RestoreRequest, prepare_own
from ckpt.restoring.tiered import across_tiers, agreed_across_tiers
from ckpt.state.items import check_flags, check_item_name
from ckpt.state.kinds import RestoreOptions
from ckpt.storage import Storage

__all__ = ["Prepared", "Restorer", "apply_prepared", "prepare_step", "restore_options"]

logger = logging.getLogger(__name__)


def restore_options(
    map_location: MapLocation, names: Iterable[str], reserved: Collection[str], **flags: bool
) -> RestoreOptions:
    """Check ``restore()``'s arguments up front; the options every item follows.

    ``flags`` are ``strict``, ``rng``, ``verify``, ``assign``,
    ``optimizer_class_change`` and ``optimizer_by_position``.

    Raises:
        TypeError: A flag is not a bool, or ``map_location`` has no accepted form.
        ValueError: An item name is reserved or not an identifier; a bad device.
    """
    check_map_location(map_location)
    for name in names:
        check_item_name(name, reserved)
    check_flags(**flags)
    return RestoreOptions(
        map_location,
        flags["strict"],
        flags["assign"],
        flags["optimizer_class_change"],
        flags["optimizer_by_position"],
    )


def prepare_step(
    storage: Storage,
    step_name: str,
    manifest: Manifest,
    items: dict[str, Any],
    request: RestoreRequest,
) -> Prepared:
    """Check a checkpoint against the live items and read its tensors; mutate nothing.

    The one place that decides how each item's bytes are read. A process
    restores its own items (random streams, schedulers, samplers, ...) from
    whole files, as it saved them (:func:`ckpt.restoring.pipeline.prepare_own`).
    Modules and optimizers are read the same way in one process from a
    checkpoint one process saved; otherwise (a checkpoint saved by several
    ranks, or any restore in a process group) each rank reads the chunks of
    them that its part of every live tensor needs, as DCP's load planner maps
    them (:mod:`ckpt.distributed.restoring`, which prepares the rank's own
    items through the same ``prepare_own``).

    Raises:
        CheckpointNotFoundError: An item is not in the checkpoint.
        IncompatibleCheckpointError: An item does not fit its live object.
        CorruptCheckpointError: Anything in the checkpoint is malformed.
    """
    with located(storage.path(step_name, MANIFEST_NAME)):
        if manifest.sharded is not None or request.group is not None:
            return prepare_collective(storage, step_name, manifest, items, request)
        return prepare_own(storage, step_name, manifest, items, request)


def apply_prepared(prepared: Prepared, where: str) -> tuple[Keys, Keys]:
    """Load what :func:`prepare_step` read into the live items; warn about non-strict keys.

    Returns:
        Missing and unexpected keys of non-strict module loads, by item.

    Raises:
        PartialRestoreError: An item's own code raised while it was loaded.
    """
    missing, unexpected = prepared.apply(where)
    for name in missing.keys() | unexpected.keys():
        logger.warning(
            "restored %r non-strictly: missing keys %s, unexpected keys %s",
            name,
            missing.get(name, []),
            unexpected.get(name, []),
        )
    return missing, unexpected


class Restorer:
    """Restores committed steps of one root into live items.

    Not thread-safe: one restore at a time (the manager's caller's thread).

    Args:
        steps: Lists and opens the root's committed steps (and reads through its storage).
        checkpoints: Describes a committed step (the :class:`Checkpoint` returned).
        group: ckpt's rank group, or ``None`` in one process.
        tiers: Readers of the slower tiers: a restore takes the newest step of any
            tier, from the fastest tier whose copy verifies (in a group, as the
            ranks agree; see :mod:`ckpt.restoring.tiered`).
        node_local: The first root is this rank's own, holding its files only: a
            restore reads from the other tiers.
    """

    def __init__(
        self,
        steps: StepReader,
        checkpoints: CheckpointReader,
        group: Any,
        tiers: Sequence[CheckpointReader] = (),
        node_local: bool = False,
    ):
        self._steps = steps
        self._checkpoints = checkpoints
        self._group = group
        self._readers = [checkpoints, *tiers]
        self._skip = 1 if node_local and tiers else 0

    def restore(
        self,
        step: int | None,
        items: dict[str, Any],
        options: RestoreOptions,
        *,
        rng: bool,
        verify: bool,
        fallback: bool,
    ) -> Checkpoint | None:
        """Restore ``step`` (the latest, or the newest intact with ``fallback``) into ``items``.

        Returns ``None`` when ``step`` is ``None`` and nothing is committed. Raises
        as :meth:`ckpt.CheckpointManager.restore` documents.
        """
        start = time.perf_counter()
        request = RestoreRequest(options, rng, verify, self._group)
        tier, checkpoints = 0, self._checkpoints
        if len(self._readers) > 1:
            search: Callable[..., Any] = across_tiers
            if self._group is not None:
                from ckpt.distributed import outcomes  # noqa: PLC0415 - only in a process group

                outcomes.check_same_items(
                    self._group, list(items), path=self._steps.storage.url_of()
                )
                search = partial(agreed_across_tiers, self._group)
            skip = self._skip  # a node-local first tier holds this rank's files only
            found = search(
                [r.steps for r in self._readers[skip:]],
                step,
                lambda i, s: self._prepare(s, dict(items), request, i + skip),
                fallback=step is None and fallback,
            )
            prepared = None if found is None else found[1]
            tier = 0 if found is None else found[0] + skip
            checkpoints = self._readers[tier]
        else:
            prepared = self._prepare_with_fallback(
                step,
                lambda s: self._prepare(s, dict(items), request),
                list(items),
                fallback=step is None and fallback,
            )
        if prepared is None:
            return None
        where = checkpoints.steps.storage.url_of(prepared.step_name)
        # in a group, apply is collective: the ranks agree on each item as it is loaded
        # and on the end (ckpt.distributed.outcomes.ApplyAgreement)
        missing, unexpected = apply_prepared(prepared, where)
        logger.info(
            "restored step %d from %s (%d bytes in %.3f s)",
            prepared.manifest.step,
            where,
            prepared.nbytes,
            time.perf_counter() - start,
        )
        info = checkpoints.info(prepared.manifest)
        return Checkpoint(
            info.step, info.epoch, info.metrics, info.path, info.items, missing, unexpected, tier
        )

    def _prepare_with_fallback(
        self,
        step: int | None,
        prepare: Callable[[int | None], Prepared | None],
        names: list[str],
        *,
        fallback: bool,
    ) -> Prepared | None:
        """Run ``prepare`` on ``step`` (the latest intact one, with ``fallback``).

        In a process group every rank tries the same steps and learns every rank's
        outcome (see :mod:`ckpt.distributed.outcomes`): all go on, or all raise an
        error of the same class; a step they agree is corrupt is skipped alike.
        """
        if self._group is None:
            if not fallback:
                return self._steps.retrying(step, prepare, "restored")
            return cast("Prepared | None", self._steps.newest_intact(prepare, "restored"))
        from ckpt.distributed import outcomes  # noqa: PLC0415 - only in a process group

        def listed() -> list[int]:  # on rank 0 only
            if fallback:
                return self._checkpoints.all_steps()
            latest = self._checkpoints.latest_step()
            return [] if latest is None else [latest]

        root = self._steps.storage.url_of()
        candidates = outcomes.agree_on_candidates(
            self._group, step, listed, fallback, names, path=root
        )
        seen = self._committed if step is None else None  # rank 0 chose the candidates
        found = outcomes.first_agreed(self._group, candidates, prepare, fallback, seen)
        return None if found is None else found[1]

    def _committed(self, step: int) -> bool:
        """Whether this rank sees ``step`` committed now."""
        return self._steps.storage.exists(step_dir_name(step), MANIFEST_NAME)

    def _prepare(
        self,
        step: int | None,
        items: dict[str, Any],
        request: RestoreRequest,
        tier: int = 0,
    ) -> Prepared | None:
        """Check ``step`` of tier ``tier`` (latest if ``None``) against the items; None: none."""
        steps = self._readers[tier].steps
        found = steps.manifest(step)
        if found is None:
            return None
        return prepare_step(steps.storage, *found, items, request)
