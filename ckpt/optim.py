"""Optimizer semantics: index packing, parameter names, validation and the cast policy.

``torch.optim.Optimizer.state_dict()`` packs parameters as integer indices in
the order of ``param_groups`` (group by group), and keys per-parameter state
by those indices. These pure functions describe each index (the parameter's
name in a module saved alongside, and its shape), check a saved state against
a live optimizer the way ``Optimizer.load_state_dict`` does (and a little
more), and decide where every saved tensor must be built so that handing the
result to ``load_state_dict`` is exact and copies nothing.
"""

from __future__ import annotations

from collections.abc import Mapping
from itertools import chain
from typing import Any

import torch
from torch import nn

from ckpt.errors import CorruptCheckpointError, IncompatibleCheckpointError

__all__ = [
    "Target",
    "cast_policy",
    "check_optimizer_state",
    "module_param_names",
    "optimizer_param_records",
    "optimizer_targets",
]

Target = tuple[torch.device | None, torch.dtype | None]
"""Where to build a tensor: ``(device, dtype)``; ``None`` keeps what was saved."""


def module_param_names(modules: Mapping[str, nn.Module]) -> dict[int, str]:
    """Map ``id(parameter)`` to ``"item.qualified.name"`` for every parameter of ``modules``.

    A parameter shared by several names (tied weights) gets its first name.
    """
    names: dict[int, str] = {}
    for item, module in modules.items():
        for qualified, param in module.named_parameters(remove_duplicate=False):
            names.setdefault(id(param), f"{item}.{qualified}")
    return names


def _live_params(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return list(chain.from_iterable(g["params"] for g in optimizer.param_groups))


def optimizer_param_records(
    optimizer: torch.optim.Optimizer, names: Mapping[int, str]
) -> list[dict[str, Any]]:
    """Describe each packed parameter index: ``{"name": str | None, "shape": [...]}``.

    Args:
        optimizer: The optimizer being saved.
        names: From :func:`module_param_names` over the modules saved in the same call.
    """
    return [{"name": names.get(id(p)), "shape": list(p.shape)} for p in _live_params(optimizer)]


def check_optimizer_state(
    item: str,
    state_dict: Any,
    optimizer: torch.optim.Optimizer,
    records: Any,
    live_names: Mapping[int, str],
    *,
    strict: bool,
) -> dict[int, torch.Tensor]:
    """Validate a saved optimizer state against a live optimizer; return the index map.

    Checks what ``Optimizer.load_state_dict`` checks (number of groups, size
    of each group, in torch's wording), then that each saved parameter had the
    live parameter's shape and, when ``strict`` and both are known, its name.

    Returns:
        ``{saved index: live parameter}``.

    Raises:
        CorruptCheckpointError: The state is not shaped like an optimizer state dict.
        IncompatibleCheckpointError: It does not fit ``optimizer``.
    """
    if not (
        isinstance(state_dict, dict)
        and isinstance(state_dict.get("state"), dict)
        and isinstance(state_dict.get("param_groups"), list)
        and all(
            isinstance(g, dict)
            and isinstance(g.get("params"), list)
            and all(isinstance(i, int) for i in g["params"])
            for g in state_dict["param_groups"]
        )
    ):
        raise CorruptCheckpointError(
            "saved optimizer state lacks 'state' or well-formed 'param_groups'", key=item
        )
    saved_groups = state_dict["param_groups"]
    groups = optimizer.param_groups
    if len(saved_groups) != len(groups):
        raise IncompatibleCheckpointError(
            "loaded state dict has a different number of parameter groups "
            f"(checkpoint {len(saved_groups)}, optimizer {len(groups)})",
            key=item,
        )
    for i, (saved, group) in enumerate(zip(saved_groups, groups, strict=True)):
        if len(saved["params"]) != len(group["params"]):
            raise IncompatibleCheckpointError(
                "loaded state dict contains a parameter group that doesn't match the size of "
                f"optimizer's group (group {i}: checkpoint {len(saved['params'])}, "
                f"optimizer {len(group['params'])})",
                key=item,
            )
    saved_ids = list(chain.from_iterable(g["params"] for g in saved_groups))
    live = _live_params(optimizer)
    id_map = dict(zip(saved_ids, live, strict=True))
    if not isinstance(records, list) or len(records) != len(live):
        raise CorruptCheckpointError(
            "optimizer parameter records do not match its groups", key=item
        )
    for position, (record, param) in enumerate(zip(records, live, strict=True)):
        where = f"{item}.param_groups params[{position}]"
        shape = record.get("shape") if isinstance(record, dict) else None
        if not isinstance(shape, list):
            raise CorruptCheckpointError("malformed optimizer parameter record", key=where)
        name, live_name = record.get("name"), live_names.get(id(param))
        label = f" ({name})" if name else ""
        if tuple(shape) != tuple(param.shape):
            raise IncompatibleCheckpointError(
                f"optimizer parameter {position}{label} had shape {tuple(shape)} in the "
                f"checkpoint, but the live parameter has shape {tuple(param.shape)}",
                key=where,
            )
        if strict and name and live_name and name != live_name:
            raise IncompatibleCheckpointError(
                f"optimizer parameter {position} was {name!r} in the checkpoint but is "
                f"{live_name!r} now; the parameter order changed (pass strict=False to "
                "load by position anyway)",
                key=where,
            )
    return id_map


def cast_policy(param: torch.Tensor, key: Any, fused_or_capturable: bool) -> Target:
    """Where torch's ``Optimizer.load_state_dict`` puts a per-parameter state tensor.

    Mirrors ``Optimizer._process_value_according_to_param_policy``: ``step`` is
    left as saved unless the group is ``fused`` or ``capturable`` (then float32
    on the parameter's device); floating-point parameters give their dtype and
    device; other parameters give only their device.
    """
    if key == "step":
        return (param.device, torch.float32) if fused_or_capturable else (None, None)
    if param.is_floating_point():
        return param.device, param.dtype
    return param.device, None


def optimizer_targets(
    state_dict: Mapping[str, Any], id_map: Mapping[int, torch.Tensor]
) -> dict[int, Target]:
    """Decide where each tensor of a saved optimizer state goes, as torch's load would.

    Walks the state like ``Optimizer.load_state_dict``'s ``_cast``: dict values
    are cast under their key, list and tuple items under no key; state of
    indices that are not parameters is left as saved.

    Args:
        state_dict: A saved optimizer state whose tensors may be placeholders.
        id_map: From :func:`check_optimizer_state`.

    Returns:
        ``{id(tensor in state_dict): target}``.
    """
    flags: dict[int, bool] = {}
    for group in state_dict["param_groups"]:
        special = bool(group.get("fused", False) or group.get("capturable", False))
        for index in group["params"]:
            flags.setdefault(index, special)
    targets: dict[int, Target] = {}

    def visit(param: torch.Tensor, value: Any, index: int, key: Any) -> None:
        if isinstance(value, torch.Tensor):
            targets.setdefault(id(value), cast_policy(param, key, flags.get(index, False)))
        elif isinstance(value, dict):
            for k, v in value.items():
                visit(param, v, index, k)
        elif isinstance(value, (list, tuple)):
            for v in value:
                visit(param, v, index, None)

    for index, value in state_dict["state"].items():
        if index in id_map:
            visit(id_map[index], value, index, None)
    return targets
