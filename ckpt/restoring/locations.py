"""``map_location``: where saved tensors are built, with ``torch.load``'s semantics.

Every stored tensor remembers the device it was saved from (its *location*,
such as ``"cpu"`` or ``"cuda:1"``). ``map_location`` maps that location to a
target exactly as ``torch.load`` does:

* ``None``: the saved location;
* a ``str`` or :class:`torch.device`: that device for every tensor;
* a ``dict``: ``{saved location: target location}``, other locations unchanged;
* a callable ``f(storage, location)``: given the tensor's CPU storage and its
  saved location, returns a storage on the target device (or ``None`` for the
  saved location).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TypeAlias

import torch

from ckpt.errors import IncompatibleCheckpointError

__all__ = ["MapLocation", "check_map_location", "mapped_device", "place"]

MapLocation: TypeAlias = (
    str
    | torch.device
    | Mapping[str, "str | torch.device"]
    | Callable[[torch.UntypedStorage, str], "torch.UntypedStorage | None"]
    | None
)
"""What ``map_location`` accepts: the same forms as ``torch.load``."""


def check_map_location(map_location: object) -> None:
    """Validate ``map_location`` up front.

    Raises:
        TypeError: It is none of the accepted forms.
        ValueError: A device string in it is not a valid device.
    """
    if map_location is None or (callable(map_location) and not isinstance(map_location, str)):
        return
    if isinstance(map_location, (str, torch.device)):
        _device(map_location)
        return
    if isinstance(map_location, Mapping):
        for key, value in map_location.items():
            if not isinstance(key, str) or not isinstance(value, (str, torch.device)):
                raise TypeError("a map_location dict must map location strings to devices")
            _device(value)
        return
    raise TypeError(
        "map_location must be None, a device, a string, a dict or a callable, "
        f"got {type(map_location).__name__}"
    )


def _device(value: str | torch.device) -> torch.device:
    try:
        return torch.device(value)
    except RuntimeError as e:
        raise ValueError(f"invalid device in map_location: {value!r}") from e


def mapped_device(map_location: MapLocation, saved: str) -> torch.device | None:
    """Return the device a tensor saved at ``saved`` goes to, or ``None`` for a callable."""
    if map_location is None:
        return torch.device(saved)
    if isinstance(map_location, (str, torch.device)):
        return torch.device(map_location)
    if isinstance(map_location, Mapping):
        return torch.device(map_location.get(saved, saved))
    return None


def place(
    cpu: torch.Tensor,
    device: torch.device | None,
    dtype: torch.dtype | None,
    *,
    map_location: MapLocation = None,
    saved: str = "cpu",
    key: str | None = None,
    non_blocking: bool = False,
) -> torch.Tensor:
    """Move a freshly read CPU tensor to its target device and dtype.

    Args:
        cpu: The tensor as read from the file.
        device: The target device; ``None`` asks a callable ``map_location``.
        dtype: The target dtype; ``None`` keeps the saved one.
        map_location: Consulted only when ``device`` is ``None``.
        saved: The tensor's saved location, passed to a callable ``map_location``.
        key: The tensor's name, for error messages.
        non_blocking: Copy asynchronously (``cpu`` must be pinned; the caller synchronizes).

    Raises:
        IncompatibleCheckpointError: The target device does not exist on this machine.
    """
    try:
        if device is None and callable(map_location):
            storage = map_location(cpu.untyped_storage(), saved)
            if storage is None:
                device = torch.device(saved)
            else:
                moved = torch.empty(0, dtype=cpu.dtype, device=storage.device)
                moved.set_(storage, cpu.storage_offset(), cpu.shape, cpu.stride())
                return moved if dtype is None else moved.to(dtype)
        return cpu.to(device=device, dtype=dtype, non_blocking=non_blocking)
    except (RuntimeError, AssertionError) as e:
        raise IncompatibleCheckpointError(
            f"cannot build a tensor saved on {saved!r} on {device}: {e}; "
            "pass map_location (for example map_location='cpu')",
            key=key,
        ) from e
