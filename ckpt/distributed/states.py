"""DCP's state-dict bridge: sharded modules' and optimizers' state, keyed by parameter name.

The item kinds of :mod:`ckpt.state.kinds.sharded` capture and load through
these narrow functions.

Modules (plain, DDP-wrapped, FSDP2, holding DTensors) are saved as DCP's
``get_model_state_dict`` gives them: keyed by fully qualified name, without
wrapper prefixes, sharded tensors as DTensors, and loaded with
``set_model_state_dict``. Optimizers are saved in the form
``get_optimizer_state_dict`` gives: per-parameter state keyed by parameter
name, so a checkpoint does not depend on how parameters were wrapped or
grouped. Both directions map names to the live optimizer's parameters here and
go through torch's own ``Optimizer.state_dict``/``load_state_dict`` (what DCP
does underneath), without DCP's trick of stepping an optimizer that has no
state yet: saving or checking never changes a live optimizer.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    set_model_state_dict,
)

from ckpt.torch_compat import fully_qualified_names

__all__ = [
    "load_optimizer_state",
    "module_state",
    "optimizer_param_names",
    "optimizer_state",
    "pair_optimizers",
    "parameter_names",
    "set_module_state",
    "sharded_state",
]


def pair_optimizers(items: Mapping[str, Any]) -> dict[str, str]:
    """Map each optimizer item to the module item holding all its parameters.

    Raises:
        ValueError: An optimizer's parameters are not all in one module item.
    """
    modules = {n: o for n, o in items.items() if isinstance(o, nn.Module)}
    owned = {n: {id(p) for p in m.parameters()} for n, m in modules.items()}
    pairs = {}
    for name, obj in items.items():
        if not isinstance(obj, torch.optim.Optimizer):
            continue
        params = {id(p) for g in obj.param_groups for p in g["params"]}
        owner = next((m for m, ids in owned.items() if params <= ids), None)
        if owner is None:
            raise ValueError(
                f"optimizer {name!r}: its parameters are not all in one module item; with a "
                "process group, save and restore an optimizer together with its model"
            )
        pairs[name] = owner
    return pairs


def parameter_names(model: nn.Module) -> set[str]:
    """The names of a model's parameters as ``get_model_state_dict`` keys them."""
    names: set[str] = set()
    for qualified, _ in model.named_parameters(remove_duplicate=False):
        names.update(fully_qualified_names(model, qualified))
    return names


def optimizer_param_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """The name of each of the optimizer's parameters, in torch's packing order.

    Names are as ``get_model_state_dict`` keys them (no ``module.`` or ``_orig_mod.``).
    """
    names: dict[int, str] = {}
    for qualified, param in model.named_parameters(remove_duplicate=False):
        fqns = fully_qualified_names(model, qualified)
        if len(fqns) == 1:
            names.setdefault(id(param), next(iter(fqns)))
    out = []
    for group in optimizer.param_groups:
        for param in group["params"]:
            if id(param) not in names:
                raise ValueError("an optimizer parameter has no name in its model")
            out.append(names[id(param)])
    return out


def module_state(model: nn.Module) -> dict[str, Any]:
    """A module's state as ``get_model_state_dict`` gives it (by parameter name, DTensor shards)."""
    return dict(get_model_state_dict(model, options=StateDictOptions(full_state_dict=False)))


def optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """An optimizer's state with its per-parameter state and groups keyed by parameter name."""
    names = optimizer_param_names(model, optimizer)
    packed = optimizer.state_dict()
    groups = [
        {**{k: v for k, v in g.items() if k != "params"}, "params": [names[i] for i in g["params"]]}
        for g in packed["param_groups"]
    ]
    return {"state": {names[i]: s for i, s in packed["state"].items()}, "param_groups": groups}


def sharded_state(name: str, items: Mapping[str, Any], pairs: Mapping[str, str]) -> dict[str, Any]:
    """A module or optimizer item's state, keyed by parameter name (shards as DTensors)."""
    obj = items[name]
    if isinstance(obj, nn.Module):
        return module_state(obj)
    return optimizer_state(items[pairs[name]], obj)


def set_module_state(
    model: nn.Module, state: dict[str, Any], strict: bool
) -> tuple[list[str], list[str]]:
    """Load a state keyed by parameter name (``set_model_state_dict``); missing, unexpected keys."""
    options = StateDictOptions(full_state_dict=False, strict=strict)
    result = set_model_state_dict(model, state, options=options)
    return list(result.missing_keys), list(result.unexpected_keys)


def load_optimizer_state(
    model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]
) -> None:
    """Load a state keyed by parameter name (see :func:`optimizer_state`): ``load_state_dict``."""
    names = optimizer_param_names(model, optimizer)
    index = {n: i for i, n in enumerate(names)}
    groups = [{**g, "params": [index[p] for p in g["params"]]} for g in state["param_groups"]]
    optimizer.load_state_dict(
        {"state": {index[n]: s for n, s in state["state"].items()}, "param_groups": groups}
    )
