"""The ``torch.optim.Optimizer`` kind: class, groups, names and every state value checked first."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ckpt.errors import CorruptCheckpointError
from ckpt.format import ItemRecord
from ckpt.restoring.inplace import optimizer_loads_plainly
from ckpt.state.kinds.base import ItemKind, ItemPlan, RestoreOptions
from ckpt.state.optim import (
    check_optimizer_saved,
    check_optimizer_state,
    class_name,
    optimizer_param_records,
    optimizer_targets,
)
from ckpt.state.tree import Json, tensors_by_path

__all__ = ["OptimizerKind"]


def _check_float64(where: str, value: Any) -> None:
    """Refuse an int (within lists and tuples too) that no float64 can hold."""
    if isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _check_float64(f"{where}[{i}]", v)
    elif isinstance(value, int) and not isinstance(value, bool):
        try:
            float(value)
        except OverflowError as e:
            raise CorruptCheckpointError(
                f"optimizer value (an int of {value.bit_length()} bits) is too big for "
                "a float64, as torch would need it",
                key=where,
            ) from e


def check_optimizer_numbers(item: str, state_dict: Mapping[str, Any]) -> None:
    """Every number in per-parameter state and param groups fits a float64.

    Optimizers turn these into floats or tensors when loading (``step``, ASGD's
    ``eta``, ``lr``, ...): an int beyond float64 fails there, after earlier items
    were loaded. Run after the structure checks.

    Raises:
        CorruptCheckpointError: Naming the key path.
    """
    for index, value in state_dict["state"].items():
        for key, v in value.items():
            _check_float64(f"{item}.state[{index!r}][{key!r}]", v)
    for g, group in enumerate(state_dict["param_groups"]):
        for key, v in group.items():
            _check_float64(f"{item}.param_groups[{g}][{key!r}]", v)


class OptimizerKind(ItemKind):
    """A ``torch.optim.Optimizer``: its class and parameter names are recorded at save."""

    stored = "optimizer"
    order = 1

    def accepts(self, obj: object) -> bool:
        """Whether ``obj`` is an optimizer."""
        return isinstance(obj, torch.optim.Optimizer)

    def capture_extra(self, name: str, obj: Any, param_names: Mapping[int, str]) -> dict[str, Json]:
        """Each parameter's name and shape, and the optimizer's class."""
        return {"params": optimizer_param_records(obj, param_names), "class": class_name(obj)}

    def check_saved(self, name: str, state: Any, record: ItemRecord) -> None:
        """Groups, indices, parameter records and every per-parameter value."""
        check_optimizer_saved(name, state, record.extra.get("params"), record.extra.get("class"))
        check_optimizer_numbers(name, state)

    def validate(
        self, plan: ItemPlan, options: RestoreOptions, live_names: Mapping[int, str]
    ) -> None:
        """Check against the live optimizer (see :func:`ckpt.state.optim.check_optimizer_state`)."""
        obj, saved = plan.obj, plan.saved
        id_map = check_optimizer_state(
            plan.name,
            saved,
            obj,
            plan.record.extra.get("params"),
            live_names,
            recorded_class=plan.record.extra.get("class"),
            class_change=options.optimizer_class_change,
            by_position=options.optimizer_by_position,
        )
        check_optimizer_numbers(plan.name, saved)
        natural = optimizer_targets(saved, id_map)
        if not options.override:
            plan.targets = {
                plan.placeholders[i]: t for i, t in natural.items() if i in plan.placeholders
            }
        plan.written = list(tensors_by_path(list(obj.state.values())).values())
        plainly = optimizer_loads_plainly(obj)
        plan.runs_user_code = not plainly
        if not plainly:
            return
        for index, value in saved["state"].items():
            live_state = obj.state.get(id_map[index]) if index in id_map else None
            if not isinstance(value, dict) or not isinstance(live_state, dict):
                continue
            for key, t in value.items():
                live_t = live_state.get(key)
                if id(t) in plan.placeholders and isinstance(live_t, torch.Tensor):
                    plan.counterparts.setdefault(plan.placeholders[id(t)], []).append(
                        (live_t, natural[id(t)])
                    )
