"""Recording one run of a training loop: per-step digests, losses and the final state.

A run's state is flattened to leaves keyed by ``(item, key path)``: every tensor
and plain value of every item's ``state_dict()`` (a dict item is its own state),
and of the random streams under the item ``"random streams"``. Each step
records a bitwise digest of every leaf, so two runs can be compared step by
step without keeping every step's tensors; the last step's leaves are kept
whole, for the size of a difference.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import xxhash

from ckpt.state.rng import capture_rng_state

__all__ = ["RNG_ITEM", "Leaf", "Trace", "attribute_digests", "digest", "loss_value", "snapshot"]

RNG_ITEM = "random streams"
"""The item name under which the process's random streams are recorded."""

Leaf = tuple[str, str]
"""An ``(item, key path)`` pair naming one tensor or value of a run's state."""


def _flatten(value: Any, prefix: str, out: dict[str, Any]) -> None:
    if isinstance(value, torch.Tensor):
        out[prefix] = value
    elif isinstance(value, Mapping):
        for key, child in value.items():
            _flatten(child, f"{prefix}.{key}" if prefix else str(key), out)
    elif isinstance(value, (list, tuple)):
        for index, child in enumerate(value):
            _flatten(child, f"{prefix}.{index}" if prefix else str(index), out)
    elif value is None or isinstance(value, (bool, int, float, str)):
        out[prefix] = value
    else:
        out[prefix] = repr(value)


def item_state(obj: Any) -> Any:
    """The state of an item as ckpt saves it: a dict as is, else its ``state_dict()``."""
    if isinstance(obj, Mapping):
        return obj
    return obj.state_dict()


def snapshot(items: Mapping[str, Any]) -> dict[Leaf, Any]:
    """Every leaf of the items' states and of the random streams, by ``(item, key)``."""
    leaves: dict[Leaf, Any] = {}
    for name, obj in items.items():
        flat: dict[str, Any] = {}
        _flatten(item_state(obj), "", flat)
        leaves.update({(name, key): value for key, value in flat.items()})
    flat = {}
    _flatten(capture_rng_state(), "", flat)
    leaves.update({(RNG_ITEM, key): value for key, value in flat.items()})
    return leaves


def digest(value: Any) -> str:
    """A bitwise fingerprint of a leaf: a tensor's dtype, shape, device and bytes, or a value."""
    if isinstance(value, torch.Tensor):
        data = value.detach()
        head = f"{data.dtype}|{tuple(data.shape)}|{data.device.type}|"
        raw = data.cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
        return head + xxhash.xxh3_64_hexdigest(raw.data)
    if isinstance(value, float) and math.isnan(value):
        return "float|nan"
    return f"{type(value).__name__}|{value!r}"


def loss_value(loss: Any) -> torch.Tensor | None:
    """A step's returned loss as a detached CPU tensor (``None`` when it returned none)."""
    if loss is None:
        return None
    if isinstance(loss, torch.Tensor):
        return loss.detach().cpu().clone()
    if isinstance(loss, (bool, int, float)):
        return torch.tensor(loss, dtype=torch.float64 if isinstance(loss, float) else torch.int64)
    raise TypeError(f"step() must return a tensor, a number or None, got {type(loss).__name__}")


def attribute_digests(items: Mapping[str, Any]) -> dict[Leaf, str]:
    """Digests of the public plain attributes (numbers, strings, tensors) of stateful items.

    Modules, optimizers and dicts are left out.

    Compared right after a restore with the saving run's at the saved step, they
    find fields an item's ``state_dict()`` leaves out.
    """
    out: dict[Leaf, str] = {}
    for name, obj in items.items():
        if isinstance(obj, (Mapping, torch.nn.Module, torch.optim.Optimizer)):
            continue
        for attr, value in getattr(obj, "__dict__", {}).items():
            if not attr.startswith("_") and isinstance(
                value, (bool, int, float, str, torch.Tensor)
            ):
                out[(name, attr)] = digest(value)
    return out


@dataclass
class Trace:
    """What one run recorded.

    Attributes:
        first_step: The first step this run ran (0, or the step after the restored one).
        digests: ``digests[i]``: each leaf's digest after step ``first_step + i``.
        losses: The loss each step returned, by step (steps that returned ``None`` absent).
        final: The leaves after the last step, whole.
        attributes: Plain attributes of stateful items when saved, or right after the
            restore (see :func:`attribute_digests`).
        restored: A resumed run's digests right after the restore, before any step.
        seconds: Wall time of the steps (without building the items and restoring).
    """

    first_step: int
    digests: list[dict[Leaf, str]] = field(default_factory=list)
    losses: dict[int, torch.Tensor] = field(default_factory=dict)
    final: dict[Leaf, Any] = field(default_factory=dict)
    attributes: dict[Leaf, str] = field(default_factory=dict)
    restored: dict[Leaf, str] = field(default_factory=dict)
    seconds: float = 0.0

    def record(self, step: int, items: Mapping[str, Any], loss: Any) -> None:
        """Record the state after ``step`` and its loss."""
        value = loss_value(loss)
        if value is not None:
            self.losses[step] = value
        self.digests.append({leaf: digest(v) for leaf, v in snapshot(items).items()})

    def digests_at(self, step: int) -> dict[Leaf, str] | None:
        """The digests after ``step``, or ``None`` when this run did not run it."""
        index = step - self.first_step
        return self.digests[index] if 0 <= index < len(self.digests) else None
