"""Every use of torch's private names in ckpt, behind one small wrapper each.

torch does not promise these across releases: when a torch upgrade breaks one,
this is the only module to change. Checked against torch 2.13.0; each wrapper
names what it relies on. No other ckpt module may touch a private name of torch
(``tests/test_private_names.py`` fails if one does).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

__all__ = [
    "default_store",
    "fully_qualified_names",
    "has_module_load_hooks",
    "has_optimizer_load_hooks",
    "load_from_state_dict_owner",
    "module_metadata",
    "scheduler_last_lr",
    "with_module_metadata",
]


def module_metadata(state: Any) -> Any:
    """The ``_metadata`` (module versions) ``nn.Module.state_dict`` attaches, or ``None``.

    Relies on: ``state_dict()`` returning an ``OrderedDict`` with a ``_metadata``
    attribute ``{prefix: {"version": ...}}`` (torch 1.x to 2.13).
    """
    return getattr(state, "_metadata", None)


def with_module_metadata(state: OrderedDict[str, Any], metadata: Mapping[str, Any] | None) -> None:
    """Attach ``metadata`` to ``state`` as ``load_state_dict`` reads it (``_metadata``)."""
    if metadata is not None:
        state._metadata = metadata  # type: ignore[attr-defined]


def load_from_state_dict_owner(module: nn.Module) -> str:
    """The module defining the ``_load_from_state_dict`` that ``module``'s class uses.

    Relies on: ``nn.Module._load_from_state_dict`` being the per-module loading hook.
    """
    return getattr(type(module)._load_from_state_dict, "__module__", "") or ""


def has_module_load_hooks(module: nn.Module) -> bool:
    """Whether ``module`` itself has load-state-dict pre or post hooks.

    Relies on: ``_load_state_dict_pre_hooks`` and ``_load_state_dict_post_hooks``.
    """
    return bool(module._load_state_dict_pre_hooks or module._load_state_dict_post_hooks)


def has_optimizer_load_hooks(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer`` has load-state-dict pre or post hooks.

    Relies on: ``_optimizer_load_state_dict_pre_hooks`` and ``..._post_hooks`` (absent
    on optimizers that never called ``Optimizer.__init__``: treated as none).
    """
    return bool(
        getattr(optimizer, "_optimizer_load_state_dict_pre_hooks", None)
        or getattr(optimizer, "_optimizer_load_state_dict_post_hooks", None)
    )


def scheduler_last_lr(scheduler: object) -> Any:
    """A scheduler's last computed learning rates (``_last_lr``), or ``None``.

    Relies on: ``LRScheduler._last_lr``, which ``get_last_lr()`` returns (absent
    before the first step).
    """
    return getattr(scheduler, "_last_lr", None)


def fully_qualified_names(model: nn.Module, name: str) -> set[str]:
    """The names ``get_model_state_dict`` gives the parameter ``name`` of ``model``.

    Without wrapper prefixes (``module.``, ``_orig_mod.``, FSDP's). Relies on:
    ``torch.distributed.checkpoint.state_dict._get_fqns`` (imported when called).
    """
    from torch.distributed.checkpoint.state_dict import _get_fqns  # noqa: PLC0415 (lazy)

    return set(_get_fqns(model, name))


def default_store() -> Any:
    """The c10d key-value store of the default process group (torchrun's, or the default init).

    Relies on: ``torch.distributed.distributed_c10d._get_default_store()`` (torch 1.x to 2.13),
    called after the default group is initialized.
    """
    import torch.distributed.distributed_c10d as c10d  # noqa: PLC0415 - only inside a group

    return c10d._get_default_store()
