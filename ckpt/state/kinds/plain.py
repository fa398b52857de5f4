"""Plain dicts and the process's random streams."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ckpt.format import ItemRecord
from ckpt.state.kinds.base import ItemKind, ItemPlan, RestoreOptions
from ckpt.state.rng import RandomStreams, check_rng_state, check_rng_values
from ckpt.state.tree import tensors_by_path, unflatten

__all__ = ["DictKind", "RandomStreamsKind"]

_CPU = torch.device("cpu")


class DictKind(ItemKind):
    """A plain ``dict``: saved as it is, restored by replacing its contents.

    Nothing about the live content is checked (any saved dict fits); the saved
    tree itself is decoded and checked like every other.
    """

    stored = "dict"
    order = 3

    def accepts(self, obj: object) -> bool:
        """Whether ``obj`` is a dict."""
        return isinstance(obj, dict)

    def state_of(self, name: str, obj: Any) -> Any:
        """The dict itself."""
        return obj

    def validate(
        self, plan: ItemPlan, options: RestoreOptions, live_names: Mapping[int, str]
    ) -> None:
        """The saved tree is a dict; tensors are built where same-path live tensors are."""
        self.check_saved(plan.name, plan.saved, plan.record)
        if not options.override:
            live_devices = {p: t.device for p, t in tensors_by_path(plan.obj).items()}
            for path, t in tensors_by_path(plan.saved).items():
                if id(t) in plan.placeholders:
                    plan.targets[plan.placeholders[id(t)]] = (live_devices.get(path), None)

    def apply(self, plan: ItemPlan, state: Any) -> tuple[list[str], list[str]]:
        """Replace the dict's contents."""
        plan.obj.clear()
        plan.obj.update(state)
        return [], []


class RandomStreamsKind(ItemKind):
    """The process's random streams (:class:`ckpt.state.rng.RandomStreams`): restored last."""

    stored = "rng"
    order = 4

    def accepts(self, obj: object) -> bool:
        """Whether ``obj`` is the random streams item."""
        return isinstance(obj, RandomStreams)

    def check_saved(self, name: str, state: Any, record: ItemRecord) -> None:
        """Every field of every stream's state (the rank is checked only at restore)."""
        check_rng_state(state, live=False)

    def validate(
        self, plan: ItemPlan, options: RestoreOptions, live_names: Mapping[int, str]
    ) -> None:
        """The full check, with this process's rank; states are built in host memory."""
        check_rng_state(plan.saved)
        # Generators take their states from host memory, whatever map_location says.
        for t in tensors_by_path(plan.saved).values():
            if id(t) in plan.placeholders:
                plan.targets[plan.placeholders[id(t)]] = (_CPU, None)

    def build(self, plan: ItemPlan, tensors: Mapping[str, torch.Tensor]) -> Any:
        """Assemble the state and dry-run it on scratch generators."""
        state = unflatten(plan.record.state, tensors)
        check_rng_values(state)
        return state
