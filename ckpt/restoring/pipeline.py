"""The restore pipeline: plan every item, validate every item, read and check every byte, apply.

1. **Plan and validate** (:func:`plan_items`): each live item gets its kind's
   handler, which checks the saved state against the live object (structure,
   keys, shapes, dtypes, every non-tensor value) and decides where each stored
   tensor is built. Items are validated in apply order, then by name, so the
   order of the keyword arguments never changes the outcome. Nothing is read
   or changed.
2. **Read and check** (:func:`prepare_restore`): every file is read and its
   checksum compared; the states are assembled, and small stateful objects
   (and modules' own-way loaders) are dry-run on copies. Still nothing changed.
3. **Apply** (:meth:`PreparedRestore.apply`): bytes go straight into live tensors where
   that is exact (see :mod:`ckpt.restoring.inplace`), then each item is loaded, in kind
   order (modules, optimizers, other stateful objects, dicts, random streams).
   If an item's own code raises now (a hook, a ``load_state_dict`` override),
   a :class:`~ckpt.errors.PartialRestoreError` names it, the items already
   loaded, and the items not yet loaded, which are untouched.

:func:`prepare_own` prepares the items a process restores from whole files:
every item of a one-process restore, and each rank's own items in a group. A
restore in a process group (or of a checkpoint saved by several ranks) reads
its modules and optimizers by chunks (:mod:`ckpt.distributed.restoring`) and
its own items through :func:`prepare_own`; both prepared forms are a
:class:`Prepared`, and both apply their items through :func:`apply_steps`.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, Protocol

import torch
from torch import nn

from ckpt.errors import CorruptCheckpointError, IncompatibleCheckpointError, PartialRestoreError
from ckpt.format import Manifest
from ckpt.io import PendingReads, load_tensors
from ckpt.restoring.inplace import choose_destinations
from ckpt.state.items import check_stored_dtype, skeleton
from ckpt.state.kinds import ItemPlan, RestoreOptions, kind_of, kind_of_record
from ckpt.state.optim import module_param_names
from ckpt.state.rng import RNG_ITEM, RandomStreams
from ckpt.storage import Storage

__all__ = [
    "ApplyStep",
    "Keys",
    "Prepared",
    "PreparedRestore",
    "RestoreRequest",
    "apply_steps",
    "check_items",
    "plan_items",
    "prepare_own",
    "prepare_restore",
]

logger = logging.getLogger(__name__)

Keys = dict[str, list[str]]
"""Missing (or unexpected) keys of non-strict module loads, by item."""


@dataclass(frozen=True)
class RestoreRequest:
    """What one ``restore`` call asks for, as it travels from the restorer to each rank.

    Attributes:
        options: How every item is checked and loaded (``strict`` among them).
        rng: Restore the random streams.
        verify: Compare every byte read with its checksum.
        group: ckpt's rank group (:class:`~ckpt.distributed.group.RankGroup`),
            or ``None`` in one process.
    """

    options: RestoreOptions
    rng: bool
    verify: bool
    group: Any = None


class Prepared(Protocol):
    """A restore that has passed every check and read every byte; nothing is changed yet.

    One process or one rank of a group alike: :class:`PreparedRestore`, or
    :class:`~ckpt.distributed.restoring.ShardedRestore`.
    """

    @property
    def step_name(self) -> str:
        """The step's directory name."""
        ...

    @property
    def manifest(self) -> Manifest:
        """The step's manifest, as saved."""
        ...

    @property
    def nbytes(self) -> int:
        """The bytes of tensor data read."""
        ...

    def apply(self, where: str) -> tuple[Keys, Keys]:
        """Load every item (``where`` names the checkpoint in errors); missing, unexpected keys.

        Raises:
            PartialRestoreError: An item's own code raised while it was loaded.
        """
        ...

    def close(self) -> None:
        """Let go of the files held for reads into live tensors (when not applied)."""
        ...


@dataclass(frozen=True)
class ApplyStep:
    """One item to load, in apply order.

    Attributes:
        name: The item.
        load: Loads it (reading its own checked bytes first, if any); returns its
            missing and unexpected keys. What it raises is the item's failure.
        read_first: Bytes held back until now, read into live tensors before the
            item is loaded; what it raises is raised as it is.
    """

    name: str
    load: Callable[[], tuple[list[str], list[str]]]
    read_first: Callable[[], None] | None = None


def apply_steps(
    steps: Sequence[ApplyStep],
    where: str,
    agree: Callable[[ApplyStep, Exception | None], None] | None = None,
) -> tuple[Keys, Keys]:
    """Load every item in order; the one loop of every restore.

    Args:
        steps: The items, in apply order.
        where: The checkpoint, for errors.
        agree: In a process group whose ranks apply the same steps: called on every
            rank after each step, with what it raised on this rank (its
            ``read_first`` too) or ``None``; it raises on every rank when the step
            failed on any (see :class:`ckpt.distributed.outcomes.ApplyAgreement`).

    Returns:
        Missing and unexpected keys of non-strict module loads, by item.

    Raises:
        PartialRestoreError: An item's ``load`` raised: it names the item, the
            items loaded before it, and those not loaded (unchanged).
    """
    missing: Keys = {}
    unexpected: Keys = {}
    applied: list[str] = []
    for i, step in enumerate(steps):
        if step.read_first is not None and agree is None:
            step.read_first()  # raised as it is
        error: Exception | None = None
        try:
            if step.read_first is not None and agree is not None:
                step.read_first()  # in a group: this step's failure, agreed as one
            miss, unexp = step.load()
        except Exception as e:
            error = e
        if agree is not None:
            agree(step, error)  # raises on every rank if the step failed on any
        if error is not None:
            rest = [s.name for s in steps[i + 1 :]]
            raise PartialRestoreError(
                f"loading item {step.name!r} raised {type(error).__name__}: {_message(error)}. "
                f"Restored before it: {applied}; not restored, unchanged: {rest}; "
                f"{step.name!r} itself may be partly loaded",
                path=where,
                key=step.name,
                item=step.name,
                applied=applied,
                not_applied=rest,
            ) from error
        applied.append(step.name)
        if miss:
            missing[step.name] = miss
        if unexp:
            unexpected[step.name] = unexp
    return missing, unexpected


def _message(error: BaseException) -> str:
    """``str(error)``, or a placeholder when it raises (the item's error is still raised)."""
    try:
        return str(error)
    except Exception:
        return "<unprintable message>"


@dataclass
class PreparedRestore:
    """A one-process restore that has passed every check and read every byte; nothing changed.

    A :class:`Prepared`.
    """

    step_name: str
    manifest: Manifest
    plans: list[ItemPlan]
    """In apply order."""
    states: list[Any]
    """Each plan's assembled state."""
    loaded: dict[str, torch.Tensor]
    pending: PendingReads

    @property
    def nbytes(self) -> int:
        """The bytes of tensor data read."""
        return sum(t.numel() * t.element_size() for t in self.loaded.values())

    def steps(self) -> list[ApplyStep]:
        """The items to load, in order; the held-back bytes are read before the first."""
        return [
            ApplyStep(
                plan.name,
                partial(plan.kind.apply, plan, state),
                self._read_held if i == 0 else None,
            )
            for i, (plan, state) in enumerate(zip(self.plans, self.states, strict=True))
        ]

    def finish(self) -> None:
        """Run each kind's hook after every item was loaded."""
        restored = {id(plan.obj) for plan in self.plans}
        for plan in self.plans:
            plan.kind.after_restore(plan, restored)

    def apply(self, where: str) -> tuple[Keys, Keys]:
        """Read the held-back bytes into live tensors, then load every item in order.

        Raises:
            PartialRestoreError: An item's own code raised while it was loaded.
        """
        try:
            missing, unexpected = apply_steps(self.steps(), where)
        finally:
            self.close()
        self.finish()
        return missing, unexpected

    def close(self) -> None:
        """Let go of the files held for the reads into live tensors."""
        self.pending.close()

    def _read_held(self) -> None:
        with self.pending:
            self.pending.run()  # every check has passed: read straight into live tensors


def _saved_state(name: str, manifest: Manifest) -> tuple[Any, dict[int, str]]:
    record = manifest.items[name]
    try:
        return skeleton(record.state, manifest.tensors, name)
    except CorruptCheckpointError as e:
        raise CorruptCheckpointError(
            f"item {name!r} of step {manifest.step}: {e.reason}", key=e.key or name
        ) from e


def check_items(manifest: Manifest) -> None:
    """Check every item's saved state without live objects (what ``verify()`` runs).

    Raises:
        CorruptCheckpointError: An item's tree or a value in it is malformed, or a
            tensor has a dtype ckpt never writes; the key names where.
    """
    for name, record in manifest.items.items():
        kind = kind_of_record(name, record)
        state, _ = _saved_state(name, manifest)
        try:
            kind.check_saved(name, state, record)
        except IncompatibleCheckpointError as e:  # no live object: a value that cannot be
            raise CorruptCheckpointError(e.reason, key=e.key) from e
    for tensor_name, tensor in manifest.tensors.items():
        check_stored_dtype(tensor_name, tensor)


def plan_items(
    manifest: Manifest, items: Mapping[str, Any], options: RestoreOptions
) -> list[ItemPlan]:
    """Validate every live item against the checkpoint; reads no tensor data, changes nothing.

    Args:
        manifest: The checkpoint's manifest; every item name must be in it.
        items: The live objects by item name.
        options: The restore's options.

    Returns:
        One plan per item, in apply order (kind order, then name).

    Raises:
        IncompatibleCheckpointError: An item does not fit its live object.
        CorruptCheckpointError: An item's saved state is malformed.
    """
    kinds = {name: kind_of(name, obj) for name, obj in items.items()}
    live_names = module_param_names({n: o for n, o in items.items() if isinstance(o, nn.Module)})
    plans = []
    for name in sorted(items, key=lambda n: (kinds[n].order, n)):
        kind, record = kinds[name], manifest.items[name]
        if record.kind != kind.stored:
            raise IncompatibleCheckpointError(
                f"item {name!r} was saved as a {record.kind} but a {kind.stored} was given",
                key=name,
            )
        saved, placeholders = _saved_state(name, manifest)
        plan = ItemPlan(name, kind, items[name], record, saved, placeholders)
        kind.validate(plan, options, live_names)
        plans.append(plan)
    user_code = False
    for plan in plans:
        if user_code:
            plan.counterparts.clear()  # code that may fail runs first: read these fresh
        user_code = user_code or plan.runs_user_code
    return plans


def prepare_restore(
    storage: Storage,
    step_name: str,
    manifest: Manifest,
    items: Mapping[str, Any],
    options: RestoreOptions,
    *,
    verify: bool,
) -> PreparedRestore:
    """Validate every item, read and check every byte, assemble and dry-run every state.

    Raises:
        CheckpointNotFoundError: A tensor file is missing.
        IncompatibleCheckpointError: An item does not fit, or refused its state on a copy.
        CorruptCheckpointError: Anything in the checkpoint is malformed.
    """
    plans = plan_items(manifest, items, options)
    names = list(dict.fromkeys(n for plan in plans for n in plan.tensor_names))
    targets = {n: t for plan in plans for n, t in plan.targets.items()}
    into = choose_destinations(
        {n: c for plan in plans for n, c in plan.counterparts.items()},
        [t for plan in plans for t in plan.written],
        manifest.tensors,
        options.map_location,
    )
    loaded, pending = load_tensors(
        storage,
        step_name,
        manifest,
        names,
        targets,
        options.map_location,
        verify=verify,
        into=into,
    )
    with contextlib.ExitStack() as on_error:
        on_error.push(pending)
        states = [plan.kind.build(plan, loaded) for plan in plans]
        on_error.pop_all()
    return PreparedRestore(step_name, manifest, plans, states, loaded, pending)


def prepare_own(
    storage: Storage,
    step_name: str,
    manifest: Manifest,
    items: Mapping[str, Any],
    request: RestoreRequest,
    *,
    streams: bool = True,
    warn: bool = True,
) -> PreparedRestore:
    """Prepare the items this process restores from whole files, as it (or rank 0) saved them.

    Every item of a one-process restore of a one-process checkpoint; in a group, a
    rank's own items (``manifest`` is then that rank's view, see
    :func:`ckpt.format.rank_manifest`). With ``request.rng`` the saved random
    streams are restored too, unless ``streams`` is false (another rank's
    streams: the caller seeds this rank's afresh); ``warn`` logs that the
    checkpoint holds none.

    Raises:
        CheckpointNotFoundError: An item is not in the checkpoint.
        IncompatibleCheckpointError: An item does not fit its live object.
        CorruptCheckpointError: Anything in the checkpoint is malformed.
    """
    manifest.require(items)
    own = dict(items)
    if request.rng and RNG_ITEM in manifest.items:
        if streams:
            own[RNG_ITEM] = RandomStreams()
    elif request.rng and warn:
        logger.warning(
            "checkpoint step %d holds no random state; the random streams are not restored",
            manifest.step,
        )
    return prepare_restore(
        storage, step_name, manifest, own, request.options, verify=request.verify
    )
