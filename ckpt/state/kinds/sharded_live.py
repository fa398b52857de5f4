"""The live objects a restore of sharded items refuses before reading anything.

A module item restored into a state dict (DCP's ``get_model_state_dict`` habit),
an optimizer item into a dict, or ``assign=True`` into a module on the meta
device is refused with what to do, instead of an unrelated message or a restore
that returns and loads nothing.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ckpt.errors import IncompatibleCheckpointError
from ckpt.format import Manifest

__all__ = ["check_live_items"]


def check_live_items(manifest: Manifest, items: Mapping[str, Any], *, assign: bool) -> None:
    """Refuse live objects a module or optimizer item cannot be restored into.

    Raises:
        IncompatibleCheckpointError: A module item given anything but a module, an
            optimizer item given a dict, or (with ``assign``) a module on the meta
            device; the message names the item and what to pass instead.
    """
    records = manifest.items if manifest.sharded is None else manifest.sharded.items
    for name, obj in items.items():
        record = records.get(name)
        kind = None if record is None else record.kind
        not_module = kind == "module" and not isinstance(obj, torch.nn.Module)
        if not_module or (kind == "optimizer" and isinstance(obj, Mapping)):
            raise IncompatibleCheckpointError(
                f"item {name!r} was saved as a {kind}, so it restores into a live {kind} "
                f"({name}={name}), not into {_what(obj)}; read() returns its full tensors",
                key=name,
            )
        if assign and isinstance(obj, torch.nn.Module) and _on_meta(obj):
            raise IncompatibleCheckpointError(
                f"item {name!r} is on the meta device: restore(assign=True) does not assign "
                "tensors from a checkpoint saved by several ranks, or in a process group; "
                f"materialize the module first ({name}.to_empty(device=...)), then restore "
                "without assign: its tensors are read in place",
                key=name,
            )


def _on_meta(module: torch.nn.Module) -> bool:
    return any(t.is_meta for t in (*module.parameters(), *module.buffers()))


def _what(obj: Any) -> str:
    """``"a dict (a state dict, ...)"`` for a mapping, else ``"a <type name>"``."""
    if isinstance(obj, Mapping):
        return "a dict (a state dict, such as get_model_state_dict returns)"
    return f"a {type(obj).__name__}"
