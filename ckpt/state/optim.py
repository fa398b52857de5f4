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
    "PARAM_SHAPED_KEYS",
    "Target",
    "cast_policy",
    "check_group_types",
    "check_optimizer_saved",
    "check_optimizer_state",
    "class_name",
    "module_param_names",
    "optimizer_param_records",
    "optimizer_targets",
    "state_keys",
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


PARAM_SHAPED_KEYS = frozenset(
    {
        "exp_avg",
        "exp_avg_sq",
        "max_exp_avg_sq",
        "momentum_buffer",
        "sum",
        "square_avg",
        "acc_delta",
        "exp_inf",
        "grad_avg",
        "ax",
        "prev",
        "step_size",
    }
)
"""Per-parameter state keys of torch's optimizers that hold a tensor of the parameter's shape."""

_SCALAR_KEYS = frozenset({"step", "mu_product", "eta", "mu"})

_KEYS: dict[str, tuple[frozenset[str], frozenset[str]]] = {
    # class -> (keys a non-empty per-parameter state must have, keys it may have)
    "SGD": (frozenset(), frozenset({"momentum_buffer"})),
    "Muon": (frozenset(), frozenset({"momentum_buffer"})),
    "Adam": (frozenset({"step", "exp_avg", "exp_avg_sq"}), frozenset({"max_exp_avg_sq"})),
    "AdamW": (frozenset({"step", "exp_avg", "exp_avg_sq"}), frozenset({"max_exp_avg_sq"})),
    "RAdam": (frozenset({"step", "exp_avg", "exp_avg_sq"}), frozenset()),
    "SparseAdam": (frozenset({"step", "exp_avg", "exp_avg_sq"}), frozenset()),
    "NAdam": (frozenset({"step", "mu_product", "exp_avg", "exp_avg_sq"}), frozenset()),
    "Adamax": (frozenset({"step", "exp_avg", "exp_inf"}), frozenset()),
    "Adagrad": (frozenset({"step", "sum"}), frozenset()),
    "Adadelta": (frozenset({"step", "square_avg", "acc_delta"}), frozenset()),
    "RMSprop": (frozenset({"step", "square_avg"}), frozenset({"momentum_buffer", "grad_avg"})),
    "ASGD": (frozenset({"step", "eta", "mu", "ax"}), frozenset()),
    "Rprop": (frozenset({"step", "prev", "step_size"}), frozenset()),
    "Adafactor": (frozenset({"step"}), frozenset({"row_var", "col_var", "variance"})),
    "LBFGS": (
        frozenset({"func_evals", "n_iter"}),
        frozenset(
            {"d", "t", "old_dirs", "old_stps", "ro", "H_diag", "prev_flat_grad", "prev_loss", "al"}
        ),
    ),
}


def class_name(optimizer: torch.optim.Optimizer) -> str:
    """The optimizer's class as recorded in a checkpoint: ``module.QualifiedName``."""
    cls = type(optimizer)
    return f"{cls.__module__}.{cls.__qualname__}"


def state_keys(recorded_class: str) -> tuple[frozenset[str], frozenset[str]] | None:
    """For one of torch's optimizers: (required, allowed) per-parameter state keys."""
    module, _, name = recorded_class.rpartition(".")
    if not module.startswith("torch.optim") or name not in _KEYS:
        return None
    required, optional = _KEYS[name]
    return required, required | optional


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_scalar(value: object) -> bool:
    if isinstance(value, torch.Tensor):
        return value.numel() == 1 and value.dtype != torch.bool
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_state_value(where: str, key: str, value: Any, shape: tuple[int, ...] | None) -> None:
    if isinstance(value, torch.Tensor):
        if key in _SCALAR_KEYS and (value.numel() != 1 or value.dtype == torch.bool):
            raise CorruptCheckpointError(
                f"optimizer state {key!r} must be a one-element tensor, got shape "
                f"{tuple(value.shape)} {value.dtype}",
                key=where,
            )
        if key in PARAM_SHAPED_KEYS and shape is not None and tuple(value.shape) != shape:
            raise CorruptCheckpointError(
                f"optimizer state {key!r} has shape {tuple(value.shape)} but its parameter "
                f"has shape {shape}",
                key=where,
            )
        return
    if key in _SCALAR_KEYS and not _is_scalar(value):
        raise CorruptCheckpointError(
            f"optimizer state {key!r} must be a number or a one-element tensor, "
            f"got {type(value).__name__}",
            key=where,
        )
    if key in PARAM_SHAPED_KEYS:
        raise CorruptCheckpointError(
            f"optimizer state {key!r} must be a tensor, got {type(value).__name__}", key=where
        )
    values = value if isinstance(value, (list, tuple)) else [value]
    for v in values:
        if not (v is None or isinstance(v, (torch.Tensor, int, float))):
            raise CorruptCheckpointError(
                f"optimizer state values must be tensors or numbers, got {type(v).__name__}",
                key=where,
            )


def check_optimizer_saved(item: str, state_dict: Any, records: Any, recorded_class: Any) -> None:
    """Check a saved optimizer state's structure and every non-tensor value; no live optimizer.

    Raises:
        CorruptCheckpointError: Anything malformed, naming the key.
    """
    if not (
        isinstance(state_dict, dict)
        and set(state_dict) == {"state", "param_groups"}
        and isinstance(state_dict["state"], dict)
        and isinstance(state_dict["param_groups"], list)
    ):
        raise CorruptCheckpointError(
            "an optimizer state must be a dict of exactly 'state' and 'param_groups'", key=item
        )
    if recorded_class is not None and not isinstance(recorded_class, str):
        raise CorruptCheckpointError("the recorded optimizer class is not a str", key=item)
    indices: list[int] = []
    for g, group in enumerate(state_dict["param_groups"]):
        where = f"{item}.param_groups[{g}]"
        if not isinstance(group, dict) or not all(isinstance(k, str) for k in group):
            raise CorruptCheckpointError("a param group must be a dict with str keys", key=where)
        params = group.get("params")
        if not isinstance(params, list) or not all(_is_int(i) for i in params):
            raise CorruptCheckpointError("'params' must be a list of ints", key=where)
        indices.extend(params)
        for key, value in group.items():
            _check_group_value(f"{where}[{key!r}]", value)
    if len(set(indices)) != len(indices):
        raise CorruptCheckpointError("a parameter index appears twice in param_groups", key=item)
    if (
        not isinstance(records, list)
        or len(records) != len(indices)
        or not all(_valid_record(r) for r in records)
    ):
        raise CorruptCheckpointError(
            "optimizer parameter records do not match its groups", key=item
        )
    shapes = {i: tuple(r["shape"]) for i, r in zip(indices, records, strict=True)}
    index_set = set(indices)
    known = state_keys(recorded_class) if isinstance(recorded_class, str) else None
    for index, value in state_dict["state"].items():
        where = f"{item}.state[{index!r}]"
        if not _is_int(index) or index not in index_set:
            raise CorruptCheckpointError("state for an index that no param group lists", key=where)
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise CorruptCheckpointError(
                "per-parameter state must be a dict with str keys", key=where
            )
        for key, v in value.items():
            _check_state_value(f"{where}[{key!r}]", key, v, shapes.get(index))
        if known is not None and value:
            _check_keys_fit(item, where, value, known, str(recorded_class))


def _check_keys_fit(
    item: str,
    where: str,
    value: Mapping[str, Any],
    known: tuple[frozenset[str], frozenset[str]],
    saved_class: str,
    live_class: str | None = None,
) -> None:
    required, allowed = known
    missing, extra = sorted(required - set(value)), sorted(set(value) - allowed)
    if missing or extra:
        cls = saved_class if live_class is None else live_class
        origin = "" if live_class is None else f" (saved from {saved_class})"
        raise IncompatibleCheckpointError(
            f"per-parameter optimizer state with keys {sorted(value)} does not fit {cls}"
            f"{origin}: missing {missing}, unexpected {extra}",
            key=where,
        )


def _valid_record(record: object) -> bool:
    if not isinstance(record, dict):
        return False
    shape, name = record.get("shape"), record.get("name")
    return (
        isinstance(shape, list)
        and all(_is_int(d) and d >= 0 for d in shape)
        and (name is None or isinstance(name, str))
    )


def _check_group_value(where: str, value: Any) -> None:
    if isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _check_group_value(f"{where}[{i}]", v)
    elif not (value is None or isinstance(value, (bool, int, float, str, torch.Tensor))):
        raise CorruptCheckpointError(
            f"a param group value must be a number, str, bool, None or tensor, got "
            f"{type(value).__name__}",
            key=where,
        )


def check_optimizer_state(
    item: str,
    state_dict: Any,
    optimizer: torch.optim.Optimizer,
    records: Any,
    live_names: Mapping[int, str],
    *,
    recorded_class: str | None = None,
    class_change: bool = False,
    by_position: bool = False,
) -> dict[int, torch.Tensor]:
    """Validate a saved optimizer state against a live optimizer; return the index map.

    Checks the structure (:func:`check_optimizer_saved`); the class (when
    recorded); what ``Optimizer.load_state_dict`` checks (number of groups, size
    of each group, in torch's wording); each saved parameter's shape and, when
    both are known, its name (wrapper prefixes aside); the per-parameter state
    keys against the live class; and every param-group value's type against the
    live group's.

    Args:
        item: The item name.
        state_dict: The saved state (tensors may be meta placeholders).
        optimizer: The live optimizer.
        records: The saved per-index parameter records.
        live_names: ``id(parameter) -> name`` over the modules restored in the same call.
        recorded_class: The class the state was saved from, when recorded.
        class_change: Accept a state saved from another class (keys still checked).
        by_position: Accept parameters whose names differ, matching them by position.

    Returns:
        ``{saved index: live parameter}``.

    Raises:
        CorruptCheckpointError: The state is not shaped like an optimizer state dict.
        IncompatibleCheckpointError: It does not fit ``optimizer``.
    """
    check_optimizer_saved(item, state_dict, records, recorded_class)
    live_class = class_name(optimizer)
    if recorded_class is not None and recorded_class != live_class and not class_change:
        raise IncompatibleCheckpointError(
            f"the optimizer state was saved from {recorded_class} but the live optimizer is "
            f"{live_class}; their states do not match (pass optimizer_class_change=True to "
            "load it anyway)",
            key=item,
        )
    saved_groups = state_dict["param_groups"]
    groups = optimizer.param_groups
    if len(saved_groups) != len(groups):
        raise IncompatibleCheckpointError(
            "loaded state dict has a different number of parameter groups "
            f"(checkpoint {len(saved_groups)}, optimizer {len(groups)}): build the optimizer "
            "with the param groups it was saved with (`ckpt info` lists them)",
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
        check_group_types(f"{item}.param_groups[{i}]", saved, group)
    saved_ids = list(chain.from_iterable(g["params"] for g in saved_groups))
    live = _live_params(optimizer)
    _check_params(item, records, live, live_names, by_position=by_position)
    id_map = dict(zip(saved_ids, live, strict=True))
    live_known = state_keys(live_class)
    if live_known is not None and recorded_class != live_class:  # else checked with the state
        for index, value in state_dict["state"].items():
            if value:
                _check_keys_fit(
                    item,
                    f"{item}.state[{index!r}]",
                    value,
                    live_known,
                    recorded_class or "an unrecorded class",
                    live_class,
                )
    return id_map


def _check_params(
    item: str,
    records: Any,
    live: list[torch.Tensor],
    live_names: Mapping[int, str],
    *,
    by_position: bool,
) -> None:
    """Each saved parameter had the live one's shape and (unless ``by_position``) name."""
    renamed = []
    for position, (record, param) in enumerate(zip(records, live, strict=True)):
        name, live_name = record.get("name"), live_names.get(id(param))
        label = f" ({name})" if name else ""
        if tuple(record["shape"]) != tuple(param.shape):
            raise IncompatibleCheckpointError(
                f"optimizer parameter {position}{label} had shape {tuple(record['shape'])} in "
                f"the checkpoint, but the live parameter has shape {tuple(param.shape)}",
                key=f"{item}.param_groups params[{position}]",
            )
        if name and live_name and _bare_name(name) != _bare_name(live_name):
            renamed.append(f"{position}: {name!r} saved, {live_name!r} now")
    if renamed and not by_position:
        more = f"; and {len(renamed) - 10} more" if len(renamed) > 10 else ""
        raise IncompatibleCheckpointError(
            f"{len(renamed)} optimizer parameter(s) have other names than when saved (the "
            f"parameter order changed?): {'; '.join(renamed[:10])}{more}. Pass "
            "optimizer_by_position=True to load them by position anyway",
            key=item,
        )


def _bare_name(name: str) -> str:
    """A recorded parameter name without wrapper prefixes after the item name."""
    item, _, rest = name.partition(".")
    parts = rest.split(".")
    i = 0
    while i < len(parts) - 1 and parts[i] in ("_orig_mod", "module"):
        i += 1
    return item + "." + ".".join(parts[i:])


def check_group_types(where: str, saved: Mapping[str, Any], live: Mapping[str, Any]) -> None:
    """Each saved group value must have the live group's type (keys both have; not params)."""
    for key in saved.keys() & live.keys():
        if key in ("params", "param_names"):
            continue
        s, v = saved[key], live[key]
        if v is None or (s is None and key in ("foreach", "fused")):
            continue
        if _is_scalar(v) and not isinstance(v, bool):
            ok = _is_scalar(s)
        elif isinstance(v, bool):
            ok = isinstance(s, bool)
        elif isinstance(v, (list, tuple)):
            ok = (
                isinstance(s, (list, tuple))
                and len(s) == len(v)
                and all(_is_scalar(a) == _is_scalar(b) for a, b in zip(s, v, strict=True))
            )
        else:
            ok = type(s) is type(v)
        if not ok:
            raise IncompatibleCheckpointError(
                f"param group value {key!r} is {s!r} in the checkpoint; the live optimizer "
                f"holds a {type(v).__name__} ({v!r})",
                key=f"{where}[{key!r}]",
            )


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
