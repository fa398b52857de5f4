"""Tensor dtypes by name, for decoding manifests with or without torch imported.

A manifest names each tensor's dtype (``"float32"``). Decoding turns the name
into torch's dtype when torch is already imported; in a process that has not
imported it (``ckpt ls`` and ``ckpt info``, which read manifests only), into a
:class:`NamedDtype`, which has the same ``str()`` and ``itemsize`` and is all
that describing a checkpoint needs. Nothing here imports torch unless a name is
missing from :data:`ITEMSIZES` (a newer torch's dtype): then torch decides.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any, Protocol

from ckpt.errors import CorruptCheckpointError

if TYPE_CHECKING:
    import torch

__all__ = [
    "ITEMSIZES",
    "STORABLE",
    "NamedDtype",
    "Typed",
    "check_stored_dtype",
    "dtype_of",
    "dtypes_by_name",
    "torch_loaded",
]

ITEMSIZES: dict[str, int] = {
    "uint8": 1,
    "int8": 1,
    "int16": 2,
    "int32": 4,
    "int64": 8,
    "float16": 2,
    "float32": 4,
    "float64": 8,
    "complex32": 4,
    "complex64": 8,
    "complex128": 16,
    "bool": 1,
    "qint8": 1,
    "quint8": 1,
    "qint32": 4,
    "bfloat16": 2,
    "quint4x2": 1,
    "quint2x4": 1,
    "bits1x8": 1,
    "bits2x4": 1,
    "bits4x2": 1,
    "bits8": 1,
    "bits16": 2,
    "float8_e5m2": 1,
    "float8_e4m3fn": 1,
    "float8_e5m2fnuz": 1,
    "float8_e4m3fnuz": 1,
    "uint16": 2,
    "uint32": 4,
    "uint64": 8,
    "uint1": 1,
    "uint2": 1,
    "uint3": 1,
    "uint4": 1,
    "uint5": 1,
    "uint6": 1,
    "uint7": 1,
    "int1": 1,
    "int2": 1,
    "int3": 1,
    "int4": 1,
    "int5": 1,
    "int6": 1,
    "int7": 1,
    "float8_e8m0fnu": 1,
    "float4_e2m1fn_x2": 1,
}
"""Every dtype name torch defines (``str(dtype)`` without ``torch.``), with its bytes per element.

``tests/test_cli_startup.py`` checks it against the installed torch."""

STORABLE = frozenset(
    {
        "float64",
        "float32",
        "float16",
        "bfloat16",
        "int64",
        "int32",
        "int16",
        "int8",
        "uint64",
        "uint32",
        "uint16",
        "uint8",
        "bool",
        "float8_e4m3fn",
        "float8_e5m2",
        "complex64",
    }
)
"""The dtypes ckpt writes: those with a safetensors name (``ckpt.format.tensorfile``)."""


class NamedDtype:
    """A dtype known by name only: ``str()`` and ``itemsize`` as torch's own dtype has them."""

    __slots__ = ("itemsize", "name")

    def __init__(self, name: str, itemsize: int) -> None:
        self.name = name
        self.itemsize = itemsize

    def __str__(self) -> str:
        return f"torch.{self.name}"

    __repr__ = __str__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, NamedDtype) and other.name == self.name

    def __hash__(self) -> int:
        return hash(self.name)


_NAMED: dict[str, Any] = {name: NamedDtype(name, size) for name, size in ITEMSIZES.items()}
_TORCH: list[dict[str, Any]] = []
"""torch's dtypes by name, once built (whole, then stored: safe to read from any thread)."""


def torch_loaded() -> bool:
    """Whether this process has imported torch (then decoding builds torch's dtypes)."""
    return "torch" in sys.modules


def dtypes_by_name() -> dict[str, torch.dtype]:
    """Dtypes by name: torch's once torch is imported, else :class:`NamedDtype` stand-ins.

    A name missing from the stand-ins but known to torch is looked up with
    :func:`dtype_of`, which imports torch.
    """
    if not torch_loaded():
        return _NAMED
    if _TORCH:
        return _TORCH[0]
    import torch  # noqa: PLC0415 - already imported: a lookup

    table = {
        str(d).removeprefix("torch."): d for d in vars(torch).values() if isinstance(d, torch.dtype)
    }
    if ITEMSIZES.keys() <= table.keys():  # not a torch still being imported: keep it
        _TORCH.append(table)
    return table


def dtype_of(name: str) -> torch.dtype | None:
    """The dtype named ``name`` (torch's when imported), or ``None`` if torch has none of that name.

    A name the stand-ins lack imports torch to decide (a dtype newer than this table).
    """
    found = dtypes_by_name().get(name)
    if found is None and name not in ITEMSIZES and not torch_loaded():
        import torch  # noqa: F401, PLC0415 - a name this table lacks: torch decides

        found = dtypes_by_name().get(name)
    return found


class Typed(Protocol):
    """A record of a stored tensor: it names the tensor's dtype."""

    @property
    def dtype(self) -> torch.dtype:
        """The stored dtype."""
        ...


_STORED: dict[Any, bool] = {}
"""Whether each dtype object seen is one ckpt writes (``str()`` once per dtype)."""


def check_stored_dtype(name: str, record: Typed) -> None:
    """Refuse a tensor record whose dtype ckpt never writes (``qint32``, say): corruption.

    The one check restore, verify, read, streaming and describe share: torch
    would otherwise fail on such a dtype with its own error, or build it.

    Raises:
        CorruptCheckpointError: Naming the tensor.
    """
    dtype = record.dtype
    stored = _STORED.get(dtype)
    if stored is None:
        stored = _STORED[dtype] = str(dtype).removeprefix("torch.") in STORABLE
    if not stored:
        raise CorruptCheckpointError(f"tensor has dtype {dtype}, which ckpt never writes", key=name)
