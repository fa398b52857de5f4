"""Stateful objects: schedulers, gradient scalers, samplers and any user class.

Their states are small, so besides the checks a kind knows, each is first
loaded into a copy of the live object (a dry run): a ``load_state_dict`` that
refuses the state does so before anything changes. The saved class is recorded
so that ``verify()`` can check the structure of the kinds it knows.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ckpt.data.sampler import ResumableSampler
from ckpt.data.sampler_state import check_fields
from ckpt.errors import CorruptCheckpointError, IncompatibleCheckpointError
from ckpt.format import ItemRecord
from ckpt.state.kinds.base import ItemKind, ItemPlan, RestoreOptions, Stateful, check_like
from ckpt.state.schedulers import align_lr_to_scheduler, scheduler_optimizer
from ckpt.state.tree import Json, tensors_by_path, unflatten

__all__ = ["SamplerKind", "ScalerKind", "SchedulerKind", "StatefulKind"]

logger = logging.getLogger(__name__)

DRY_RUN_MAX_BYTES = 64 * 1024 * 1024
"""Objects whose state holds at most this many tensor bytes are first loaded into a copy."""


def _class_name(obj: object) -> str:
    cls = type(obj)
    return f"{cls.__module__}.{cls.__qualname__}"


class StatefulKind(ItemKind):
    """Any object with ``state_dict()``/``load_state_dict()``; dry-run on a copy first."""

    stored = "stateful"
    order = 2
    classes: tuple[type, ...] = ()
    """Live classes this kind handles (the generic kind: any :class:`Stateful`)."""
    saved_classes: tuple[str, ...] = ()
    """Recorded classes whose saved state this kind can check without a live object."""

    def accepts(self, obj: object) -> bool:
        """Whether ``obj`` is one of this kind's classes (any Stateful for the generic kind)."""
        if not self.classes:
            return isinstance(obj, Stateful) and not isinstance(
                obj, (nn.Module, torch.optim.Optimizer)
            )
        return isinstance(obj, self.classes)

    def accepts_record(self, record: ItemRecord) -> bool:
        """A record saved from one of this kind's classes (any, for the generic kind)."""
        if record.kind != self.stored:
            return False
        return not self.saved_classes or record.extra.get("class") in self.saved_classes

    def capture_extra(self, name: str, obj: Any, param_names: Mapping[int, str]) -> dict[str, Json]:
        """The live object's class, so that ``verify()`` knows what to check."""
        return {"class": _class_name(obj)}

    def check_saved(self, name: str, state: Any, record: ItemRecord) -> None:
        """A dict (and a str class, if recorded)."""
        if not isinstance(state, dict):
            raise CorruptCheckpointError("a stateful object's state must be a dict", key=name)
        saved = record.extra.get("class")
        if saved is not None and not isinstance(saved, str):
            raise CorruptCheckpointError("the recorded class is not a str", key=name)

    def validate(
        self, plan: ItemPlan, options: RestoreOptions, live_names: Mapping[int, str]
    ) -> None:
        """Structure, then checks against the live object; tensors go where live ones are."""
        self.check_saved(plan.name, plan.saved, plan.record)
        self.check_live(plan)
        plan.runs_user_code = True
        live = self.state_of(plan.name, plan.obj)
        live_tensors = tensors_by_path(live)
        plan.extra["dry_run"] = sum(t.nbytes for t in live_tensors.values()) <= DRY_RUN_MAX_BYTES
        if not options.override:
            live_devices = {p: t.device for p, t in live_tensors.items()}
            for path, t in tensors_by_path(plan.saved).items():
                if id(t) in plan.placeholders:
                    plan.targets[plan.placeholders[id(t)]] = (live_devices.get(path), None)

    def check_live(self, plan: ItemPlan) -> None:
        """Kind-specific checks of the saved state against the live object (none here)."""

    def build(self, plan: ItemPlan, tensors: Mapping[str, torch.Tensor]) -> Any:
        """Assemble the state and load it into a copy of the live object, to see it accepted."""
        state = unflatten(plan.record.state, tensors)
        if not plan.extra.get("dry_run"):
            return state  # too big to copy: checked by its own load, in apply
        memo: dict[int, Any] = {}
        for value in vars(plan.obj).values() if hasattr(plan.obj, "__dict__") else ():
            if isinstance(value, (torch.optim.Optimizer, nn.Module)):
                memo[id(value)] = value  # shared, never copied (nor written: see below)
        try:
            scratch = copy.deepcopy(plan.obj, memo)
        except Exception as e:
            logger.debug("item %r cannot be copied for a dry run: %s", plan.name, e)
            return state
        try:
            scratch.load_state_dict(copy.deepcopy(state))
        except Exception as e:
            raise IncompatibleCheckpointError(
                f"{type(plan.obj).__qualname__}.load_state_dict refused the saved state "
                f"(tried on a copy; nothing changed): {type(e).__name__}: {e}",
                key=plan.name,
            ) from e
        return state


_SCHEDULER_COUNTERS = frozenset(
    {"last_epoch", "_step_count", "num_bad_epochs", "cooldown_counter", "T_i", "T_0"}
)


class SchedulerKind(StatefulKind):
    """A learning-rate scheduler: restored after its optimizer, or its groups' lr aligned to it."""

    classes = (torch.optim.lr_scheduler.LRScheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)

    def accepts_record(self, record: ItemRecord) -> bool:
        """A record saved from one of torch's schedulers."""
        saved = record.extra.get("class")
        return (
            record.kind == self.stored
            and isinstance(saved, str)
            and saved.startswith("torch.optim.lr_scheduler.")
        )

    def check_saved(self, name: str, state: Any, record: ItemRecord) -> None:
        """A dict with str keys, as every torch scheduler's state is."""
        super().check_saved(name, state, record)
        if not all(isinstance(k, str) for k in state):
            raise CorruptCheckpointError("a scheduler state must have str keys", key=name)

    def check_live(self, plan: ItemPlan) -> None:
        """Every key and value type of the live scheduler's state; counters are ints."""
        check_like(plan.saved, self.state_of(plan.name, plan.obj), plan.name)
        for key in _SCHEDULER_COUNTERS & plan.saved.keys():
            value = plan.saved[key]
            if isinstance(value, bool) or not isinstance(value, int):
                raise IncompatibleCheckpointError(
                    f"must be an int, got {value!r}", key=f"{plan.name}[{key!r}]"
                )

    def after_restore(self, plan: ItemPlan, restored: set[int]) -> None:
        """Align the optimizer's lr to the scheduler when the optimizer was not restored with it."""
        optimizer = scheduler_optimizer(plan.obj)
        if optimizer is not None and id(optimizer) not in restored:
            align_lr_to_scheduler(plan.name, plan.obj)


_SCALER_FIELDS = {
    "scale": float,
    "growth_factor": float,
    "backoff_factor": float,
    "growth_interval": int,
    "_growth_tracker": int,
}


_FLOAT32_MAX = float(torch.finfo(torch.float32).max)
_INT32_MAX = 2**31 - 1
_INT64_MAX = 2**63 - 1


def _as_float(value: float) -> float | None:
    """``value`` as a finite float64, or None (an int too big for float64, inf, nan)."""
    try:
        number = float(value)
    except OverflowError:
        return None
    return number if math.isfinite(number) else None


def _short_number(value: float) -> str:
    """A number for a message: huge ints by their size (their digits could be thousands)."""
    if isinstance(value, int) and value.bit_length() > 64:
        return f"an int of {value.bit_length()} bits"
    return repr(value)


def _scaler_range_problems(state: Mapping[str, Any]) -> dict[str, str]:
    """Each scaler field outside what torch can store (checked after the types).

    ``load_state_dict`` fills ``scale`` into a float32 tensor and ``_growth_tracker``
    into an int32 one; ``growth_interval`` goes to ``_amp_update_scale_`` as an
    int64, the factors as doubles; the constructor requires ``growth_factor > 1``
    and ``backoff_factor < 1``.
    """
    problems: dict[str, str] = {}
    scale = _as_float(state["scale"])
    if scale is None or not 0.0 < scale <= _FLOAT32_MAX:
        problems["scale"] = "must be a finite positive number representable in float32"
    growth = _as_float(state["growth_factor"])
    if growth is None or not growth > 1.0:
        problems["growth_factor"] = "must be a finite number above 1"
    backoff = _as_float(state["backoff_factor"])
    if backoff is None or not 0.0 < backoff < 1.0:
        problems["backoff_factor"] = "must be a number in (0, 1)"
    if not 0 < state["growth_interval"] <= _INT64_MAX:
        problems["growth_interval"] = "must be a positive int that fits in int64"
    if not 0 <= state["_growth_tracker"] <= _INT32_MAX:
        problems["_growth_tracker"] = "must be a non-negative int that fits in int32"
    return problems


class ScalerKind(StatefulKind):
    """``torch.amp.GradScaler``: the enabled flag must match; every field is type-checked."""

    classes = (torch.amp.GradScaler,)
    saved_classes = ("torch.amp.grad_scaler.GradScaler", "torch.cuda.amp.grad_scaler.GradScaler")

    def check_saved(self, name: str, state: Any, record: ItemRecord) -> None:
        """Empty (saved disabled) or exactly the scaler's fields, each a number of its type."""
        super().check_saved(name, state, record)
        if not state:
            return
        if set(state) != set(_SCALER_FIELDS):
            raise CorruptCheckpointError(
                f"a GradScaler state must have the keys {sorted(_SCALER_FIELDS)}, "
                f"not {sorted(state)}",
                key=name,
            )
        for key, kind in _SCALER_FIELDS.items():
            value = state[key]
            ok = isinstance(value, (int, float)) if kind is float else isinstance(value, int)
            if isinstance(value, bool) or not ok:
                raise CorruptCheckpointError(
                    f"GradScaler {key} must be a{'n int' if kind is int else ' number'}, "
                    f"got {value!r}",
                    key=f"{name}.{key}",
                )
        for key, problem in _scaler_range_problems(state).items():
            raise CorruptCheckpointError(
                f"GradScaler {key} {problem}, got {_short_number(state[key])}",
                key=f"{name}.{key}",
            )

    def check_live(self, plan: ItemPlan) -> None:
        """A scaler saved enabled restores only into an enabled one, and the reverse."""
        saved_enabled = bool(plan.saved)
        if saved_enabled != plan.obj.is_enabled():
            was, now = ("enabled", "disabled") if saved_enabled else ("disabled", "enabled")
            raise IncompatibleCheckpointError(
                f"the GradScaler was {was} when saved but the live one is {now}", key=plan.name
            )


class SamplerKind(StatefulKind):
    """:class:`ckpt.ResumableSampler`: the dataset size and shuffle setting must match."""

    classes = (ResumableSampler,)
    saved_classes = ("ckpt.data.sampler.ResumableSampler",)
    _FIELDS = ("size", "shuffle", "seed", "epoch", "position", "generator")

    def check_saved(self, name: str, state: Any, record: ItemRecord) -> None:
        """Exactly the sampler's fields, each of its type."""
        super().check_saved(name, state, record)
        missing = [k for k in self._FIELDS if k not in state]
        if missing:
            raise CorruptCheckpointError(f"the sampler state lacks {missing}", key=name)
        for key in ("size", "seed", "epoch", "position"):
            value = state[key]
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise CorruptCheckpointError(
                    f"must be a non-negative int, got {value!r}", key=f"{name}.{key}"
                )
        if not isinstance(state["shuffle"], bool):
            raise CorruptCheckpointError("must be a bool", key=f"{name}.shuffle")
        if state["position"] > state["size"]:
            raise CorruptCheckpointError(
                f"position {state['position']} is past the size {state['size']}",
                key=f"{name}.position",
            )
        generator = state["generator"]
        if (
            not isinstance(generator, torch.Tensor)
            or generator.dtype != torch.uint8
            or generator.dim() != 1
        ):
            raise CorruptCheckpointError("must be a 1-d uint8 tensor", key=f"{name}.generator")
        try:  # the rest (the split over ranks, the batch layout), as load_state_dict checks it
            check_fields(state, generator=False)
        except ValueError as e:
            raise CorruptCheckpointError(str(e), key=name) from e

    def check_live(self, plan: ItemPlan) -> None:
        """The dataset size and shuffle setting of the live sampler."""
        sampler, state = plan.obj, plan.saved
        if state["size"] != sampler.size or state["shuffle"] != sampler.shuffle:
            raise IncompatibleCheckpointError(
                f"the sampler was saved for {state['size']} indices with shuffle="
                f"{state['shuffle']}, but the live one has {sampler.size} with "
                f"shuffle={sampler.shuffle}",
                key=plan.name,
            )
