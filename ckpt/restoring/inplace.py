"""Restoring in place: which live tensors a restore may read file bytes straight into.

A restore that stages every tensor in fresh memory before loading costs a
second copy of the state and a page fault per fresh page, which is most of its
time. Instead, once every file has been checked, ckpt reads a tensor's bytes
straight into the live tensor that would end up holding them, and hands that
same tensor to ``load_state_dict`` (whose copy of a tensor onto itself does
nothing). A cast to the live tensor's dtype or a copy to its GPU happens on the
way, a chunk at a time. This is exact only when the live tensor is where
torch's own load would put the value:

* it is a plain, contiguous CPU or CUDA tensor of the saved shape, in the dtype
  and on the device torch's load would give the value (for a module, any: its
  ``load_state_dict`` copies into it, casting; the read casts the same way);
* the object loads the standard way: a module whose classes all keep torch's
  ``_load_from_state_dict``, an optimizer that keeps torch's ``load_state_dict``;
* no other tensor the restore writes shares any of its memory (tied weights
  that the checkpoint also stores as one tensor are fine).

Everything else is read into fresh memory as before. These functions are pure:
they look at live objects and decide; the reading is :mod:`ckpt.io`'s.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import nn

from ckpt.format import TensorRecord
from ckpt.restoring.locations import MapLocation, mapped_device
from ckpt.state.optim import Target
from ckpt.torch_compat import (
    has_module_load_hooks,
    has_optimizer_load_hooks,
    load_from_state_dict_owner,
)

__all__ = [
    "Counterpart",
    "choose_destinations",
    "loads_own_way",
    "module_loads_plainly",
    "optimizer_loads_plainly",
]

Counterpart = tuple[torch.Tensor, Target | None]
"""A live tensor that would receive a stored tensor, and the cast torch's load applies
first: an optimizer's target (see :func:`ckpt.state.optim.cast_policy`), or ``None`` for a
module, whose ``load_state_dict`` copies the value into the live tensor, casting it."""

_CPU = torch.device("cpu")
_WRITABLE_DEVICES = ("cpu", "cuda")


def loads_own_way(module: nn.Module) -> bool:
    """Whether a module's class loads its own tensors with code outside ``torch.nn.modules``.

    torch's own overrides there (batch norm's, for one) only read the given
    state; others (quantization observers, user classes) may resize buffers or
    read a parameter's old value.
    """
    owner = load_from_state_dict_owner(module)
    return not owner.startswith("torch.nn.modules.")


def module_loads_plainly(module: nn.Module) -> bool:
    """Whether loading ``module`` runs only torch's own code that copies into its tensors.

    That is: ``load_state_dict`` is torch's, no submodule loads its own way (see
    :func:`loads_own_way`) or has load hooks (lazy modules, old-style spectral
    norm and user hooks have them), and no tensor is swapped instead of copied into.
    """
    if torch.__future__.get_swap_module_params_on_conversion():
        return False  # load_state_dict would swap tensors instead of copying into them
    if type(module).load_state_dict is not nn.Module.load_state_dict:
        return False
    return not any(loads_own_way(sub) or has_module_load_hooks(sub) for sub in module.modules())


def optimizer_loads_plainly(optimizer: torch.optim.Optimizer) -> bool:
    """Whether the optimizer keeps torch's ``load_state_dict`` and has no load hooks."""
    return type(
        optimizer
    ).load_state_dict is torch.optim.Optimizer.load_state_dict and not has_optimizer_load_hooks(
        optimizer
    )


def _writable(t: object) -> bool:
    return (
        type(t) in (torch.Tensor, nn.Parameter)
        and isinstance(t, torch.Tensor)
        and t.device.type in _WRITABLE_DEVICES
        and t.is_contiguous()
        and not t.is_conj()
        and not t.is_neg()
        and t.numel() > 0
    )


def _span(t: torch.Tensor) -> tuple[str, int, int]:
    """The memory ``t`` may touch: device, and byte range (its whole storage unless contiguous)."""
    if t.is_contiguous():
        start = t.data_ptr()
        return str(t.device), start, start + t.numel() * t.element_size()
    storage = t.untyped_storage()
    return str(t.device), storage.data_ptr(), storage.data_ptr() + storage.nbytes()


def _lands_in(
    live: torch.Tensor,
    target: Target | None,
    record: TensorRecord,
    map_location: MapLocation,
) -> bool:
    """Whether torch's load would leave the stored value in ``live``.

    That is: same shape, and the value cast to ``live``'s dtype and device (which a
    module's ``load_state_dict`` always does).
    """
    if not _writable(live) or tuple(live.shape) != record.shape:
        return False
    if map_location is not None:
        if callable(map_location) and not isinstance(map_location, (str, torch.device)):
            return False
        if mapped_device(map_location, record.device) not in (_CPU, live.device):
            return False  # keep torch's error for a device that does not exist
    if target is None:
        return True
    device, dtype = target
    final_device = device if device is not None else torch.device(record.device)
    return final_device == live.device and (dtype or record.dtype) == live.dtype


def choose_destinations(
    counterparts: Mapping[str, list[Counterpart]],
    written: Iterable[torch.Tensor],
    records: Mapping[str, TensorRecord],
    map_location: MapLocation,
) -> dict[str, torch.Tensor]:
    """Pick the stored tensors to read straight into live memory, and where.

    Args:
        counterparts: For each stored tensor name, the live tensors its value
            would be loaded into (several when the state refers to it twice).
        written: Every live tensor the restore may write, counterpart or not;
            a destination must share memory with none of them but its own.
        records: The manifest's tensor records.
        map_location: As given to ``restore``.

    Returns:
        ``{stored tensor name: live tensor}``.
    """
    spans: dict[tuple[str, int, int], set[str | None]] = {}
    for t in written:
        if isinstance(t, torch.Tensor) and t.device.type in _WRITABLE_DEVICES and t.numel() > 0:
            spans.setdefault(_span(t), set()).add(None)
    chosen: dict[str, torch.Tensor] = {}
    for name, lives in counterparts.items():
        record = records[name]
        if not lives or not all(_lands_in(t, g, record, map_location) for t, g in lives):
            continue
        own = {_span(t) for t, _ in lives}
        if len(own) != 1:
            continue  # the state loads one stored tensor into two different places
        (span,) = own
        names = spans.setdefault(span, set())
        names.discard(None)
        names.add(name)
        chosen[name] = lives[0][0]
    return {name: chosen[name] for name in _unshared(spans) if name in chosen}


def _unshared(spans: Mapping[tuple[str, int, int], set[str | None]]) -> set[str]:
    """Names whose span overlaps no other span and is claimed by that name alone."""
    ok: set[str] = set()
    ordered = sorted(spans.items())
    reach: tuple[str, int] = ("", -1)  # the furthest end among earlier spans on a device
    for i, ((device, start, end), names) in enumerate(ordered):
        overlaps_before = reach[0] == device and start < reach[1]
        following = ordered[i + 1][0] if i + 1 < len(ordered) else None
        overlaps_after = following is not None and following[0] == device and following[1] < end
        reach = (device, max(reach[1], end) if reach[0] == device else end)
        if overlaps_before or overlaps_after or len(names) != 1:
            continue
        (only,) = names
        if only is not None:
            ok.add(only)
    return ok
