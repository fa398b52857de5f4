"""What every item kind shares: the Stateful protocol, captured state, plans, and the handler base.

An item kind is a type (a subclass of :class:`ItemKind`) registered in
:mod:`ckpt.state.kinds`. Each has three separate steps:

* **capture** (save): the item's state as a typed-JSON tree and tensors;
* **validate** (restore, before anything is read or changed): the saved state
  against the live object, every key, shape, dtype and non-tensor value; pure;
* **apply** (restore, after every item has validated and every byte is checked):
  load the state into the live object.

:meth:`ItemKind.check_saved` is validation without a live object; ``verify()``
runs it on every item, and ``validate`` runs it first.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol, runtime_checkable

import torch

from ckpt.errors import CorruptCheckpointError, IncompatibleCheckpointError
from ckpt.format import ItemRecord
from ckpt.restoring.inplace import Counterpart
from ckpt.restoring.locations import MapLocation
from ckpt.state.optim import Target
from ckpt.state.tree import Json, flatten, unflatten

__all__ = [
    "Captured",
    "ItemKind",
    "ItemPlan",
    "RestoreOptions",
    "Stateful",
    "check_like",
    "is_number",
]


@runtime_checkable
class Stateful(Protocol):
    """An object whose state ckpt can save and restore.

    The same protocol as ``torch.distributed.checkpoint.stateful.Stateful``:
    ``state_dict()`` returns nested dicts/lists/tuples of tensors and plain
    values; ``load_state_dict(state)`` restores from such a value.
    """

    def state_dict(self) -> dict[str, Any]:
        """Return the object's state."""
        ...

    def load_state_dict(self, state_dict: dict[str, Any]) -> Any:
        """Restore the object's state from what ``state_dict()`` returned."""
        ...


@dataclass(frozen=True)
class Captured:
    """An item's state ready to be written: its kind, typed-JSON tree, tensors and extras."""

    kind: str
    tree: Json
    tensors: dict[str, torch.Tensor]
    extra: dict[str, Json] = field(default_factory=dict)


@dataclass(frozen=True)
class RestoreOptions:
    """The options of one ``restore`` call that decide how items are checked and loaded.

    Attributes:
        map_location: As given to ``restore``.
        strict: Module keys must match exactly.
        assign: Modules take the loaded tensors as theirs (``load_state_dict(assign=True)``).
        optimizer_class_change: Load an optimizer state saved from another optimizer class.
        optimizer_by_position: Load an optimizer whose parameter names differ, by position.
    """

    map_location: MapLocation = None
    strict: bool = True
    assign: bool = False
    optimizer_class_change: bool = False
    optimizer_by_position: bool = False

    @property
    def override(self) -> bool:
        """Whether ``map_location`` decides where every tensor is built."""
        return self.map_location is not None


@dataclass
class ItemPlan:
    """A validated restore of one item: where each tensor goes, and how to load it."""

    name: str
    kind: ItemKind
    obj: Any
    record: ItemRecord
    saved: Any
    """The saved state with meta placeholders for tensors."""
    placeholders: dict[int, str]
    """``id(placeholder) -> stored tensor name``, in first-reference order."""
    targets: dict[str, Target] = field(default_factory=dict)
    counterparts: dict[str, list[Counterpart]] = field(default_factory=dict)
    """Live tensors that loading would copy each stored tensor into unchanged."""
    written: list[torch.Tensor] = field(default_factory=list)
    """Every live tensor that loading this item may write."""
    runs_user_code: bool = False
    """Whether loading may run code that ckpt cannot check first (hooks, overrides)."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Kind-specific decisions made by validation (renamed keys, the index map, ...)."""

    @property
    def tensor_names(self) -> list[str]:
        """The stored tensors this item's state refers to, in first-reference order."""
        return list(dict.fromkeys(self.placeholders.values()))

    @property
    def order(self) -> int:
        """Restore position: modules, optimizers, other stateful objects, dicts, random streams."""
        return self.kind.order


class ItemKind:
    """One kind of item. Subclasses are registered in :data:`ckpt.state.kinds.KINDS`."""

    stored: ClassVar[str] = ""
    """The kind written in the manifest."""
    order: ClassVar[int] = 0
    """Apply order: lower first."""

    def accepts(self, obj: object) -> bool:
        """Whether ``obj`` is an item of this kind."""
        raise NotImplementedError

    def accepts_record(self, record: ItemRecord) -> bool:
        """Whether a saved record is this kind's (more specific kinds check the saved class)."""
        return record.kind == self.stored

    def state_of(self, name: str, obj: Any) -> Any:
        """The live object's state, as ``state_dict()`` returns it."""
        state = obj.state_dict()
        if not isinstance(state, dict):
            raise TypeError(
                f"item {name!r}: state_dict() returned {type(state).__name__}, not a dict"
            )
        return state

    def capture(self, name: str, obj: Any, param_names: Mapping[int, str]) -> Captured:
        """Capture one item's state for saving.

        Raises:
            TypeError: The item's state cannot be stored without pickle.
        """
        tree, tensors = flatten(self.state_of(name, obj), name)
        return Captured(self.stored, tree, tensors, self.capture_extra(name, obj, param_names))

    def capture_extra(self, name: str, obj: Any, param_names: Mapping[int, str]) -> dict[str, Json]:
        """Kind-specific extras recorded next to the state."""
        return {}

    def check_saved(self, name: str, state: Any, record: ItemRecord) -> None:
        """Check a saved state's structure and every non-tensor value, without a live object.

        Raises:
            CorruptCheckpointError: The state is malformed; the key names where.
        """
        if not isinstance(state, dict):
            raise CorruptCheckpointError(f"a {self.stored} state must be a dict", key=name)

    def validate(
        self, plan: ItemPlan, options: RestoreOptions, live_names: Mapping[int, str]
    ) -> None:
        """Check the saved state against the live object and fill in the plan; mutates nothing.

        Raises:
            IncompatibleCheckpointError: The state does not fit the live object.
            CorruptCheckpointError: The state is malformed.
        """
        self.check_saved(plan.name, plan.saved, plan.record)

    def build(self, plan: ItemPlan, tensors: Mapping[str, torch.Tensor]) -> Any:
        """Assemble the state from the loaded tensors, and check what needs the data."""
        return unflatten(plan.record.state, tensors)

    def apply(self, plan: ItemPlan, state: Any) -> tuple[list[str], list[str]]:
        """Load ``state`` into the live object; return (missing, unexpected) keys."""
        plan.obj.load_state_dict(state)
        return [], []

    def after_restore(self, plan: ItemPlan, restored: set[int]) -> None:
        """Run once every item is applied; ``restored`` holds ``id()`` of every applied object."""


def is_number(value: object) -> bool:
    """An int or float (not a bool), or a tensor of one element."""
    if isinstance(value, torch.Tensor):
        return value.numel() == 1 and value.dtype != torch.bool
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _category(value: object) -> str:
    if value is None:
        return "None"
    if isinstance(value, bool):
        return "bool"
    if is_number(value) and not isinstance(value, torch.Tensor):
        return "number"
    if isinstance(value, torch.Tensor):
        return "tensor"
    if isinstance(value, str):
        return "str"
    if isinstance(value, (list, tuple)):
        return "sequence"
    if isinstance(value, dict):
        return "dict"
    return type(value).__name__


def check_like(saved: Any, live: Any, where: str, *, same_keys: bool = True) -> None:
    """Check that a saved value has the shape and types of the live one, recursively.

    Numbers may be ints or floats (or one-element tensors); a live ``None``
    accepts anything; sequences must have the
    live length; dicts the live keys (all of them when ``same_keys``).

    Raises:
        IncompatibleCheckpointError: Naming the key path and both types.
    """
    if live is None:
        return
    if is_number(live) and is_number(saved):
        return
    saved_kind, live_kind = _category(saved), _category(live)
    if saved_kind != live_kind:
        raise IncompatibleCheckpointError(
            f"saved value is a {saved_kind} ({_short(saved)}) but the live object holds "
            f"a {live_kind} there",
            key=where,
        )
    if live_kind == "sequence":
        if len(saved) != len(live):
            raise IncompatibleCheckpointError(
                f"saved sequence has {len(saved)} entries, the live one {len(live)}", key=where
            )
        for i, (s, v) in enumerate(zip(saved, live, strict=True)):
            check_like(s, v, f"{where}[{i}]", same_keys=same_keys)
    elif live_kind == "dict":
        if same_keys and set(saved) != set(live):
            raise IncompatibleCheckpointError(
                f"saved keys {sorted(map(str, saved))} differ from the live ones "
                f"{sorted(map(str, live))}",
                key=where,
            )
        for k in saved.keys() & live.keys():
            check_like(saved[k], live[k], f"{where}[{k!r}]", same_keys=same_keys)
    elif live_kind == "tensor" and (saved.shape != live.shape or saved.dtype != live.dtype):
        raise IncompatibleCheckpointError(
            f"saved tensor is {saved.dtype}{list(saved.shape)}, the live one "
            f"{live.dtype}{list(live.shape)}",
            key=where,
        )


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."
