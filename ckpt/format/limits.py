"""The ranges every number ckpt stores must fall in. Pure functions, no I/O.

A limit holds at both ends: what ``save`` accepts can always be listed and read
back, and what a reader accepts never costs more than the limit allows.
"""

from __future__ import annotations

import math
import numbers
import sys
from collections.abc import Iterable, Mapping
from typing import Any

from ckpt.state.tree import check_text

__all__ = [
    "MAX_BYTES",
    "MAX_STEP",
    "byte_count",
    "check_metrics",
    "float64_value",
]

MAX_STEP = 10**20 - 1
"""The largest step: the most a step directory name holds (``step_`` and 20 digits)."""

MAX_BYTES = 2**63 - 1
"""The largest byte count or offset of a tensor (what an ``int64`` holds, as torch needs)."""

_FLOAT_MAX = sys.float_info.max


def byte_count(shape: Iterable[int], itemsize: int) -> int | None:
    """Return the bytes a contiguous ``shape`` occupies; ``None`` past :data:`MAX_BYTES`.

    The strides count too: every dimension counts as at least 1, so a shape such
    as ``[0, 2**62, 2**62]`` (zero bytes, but strides torch cannot hold) is
    refused as well. Stops multiplying as soon as the bound is passed, so a
    hostile shape costs time in proportion to its length only.
    """
    total = itemsize
    empty = False
    for dim in shape:
        if dim == 0:
            empty = True
        total *= max(dim, 1)
        if total > MAX_BYTES:
            return None
    return 0 if empty else total


def float64_value(value: object) -> float | None:
    """Return ``value`` as a finite float64 when it is a number that has one, else ``None``.

    ``bool`` is not a number here; an ``int`` beyond float64's range has none.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    if isinstance(value, int) and abs(value) > _FLOAT_MAX:
        return None
    number = float(value)
    return number if math.isfinite(number) else None


def _plain_number(given: object) -> object:
    """A Python number for a 1-element tensor or array, or a NumPy (or other ``numbers``) scalar."""
    if isinstance(given, bool):
        return given
    if isinstance(given, int):  # a subclass (an IntEnum, say) is stored as a plain int
        return int(given)
    if isinstance(given, float):  # NumPy's float64 is a float subclass
        return float(given)
    torch = sys.modules.get("torch")  # not imported: nothing given is a tensor
    if torch is not None and isinstance(given, torch.Tensor):
        return given.item() if given.numel() == 1 and given.device.type != "meta" else given
    if isinstance(given, numbers.Integral) and not _is_boolean(given):
        return int(given)
    if isinstance(given, numbers.Real):
        return float(given)
    item, size = getattr(given, "item", None), getattr(given, "size", None)
    if callable(item) and size == 1:  # a 1-element NumPy array (its item may be a NumPy scalar)
        scalar = item()
        return scalar if scalar is given else _plain_number(scalar)
    return given


def _finite_in_own_type(given: Any) -> bool:
    """Whether ``given`` is finite compared in its own type (a ``longdouble``, an array).

    NaN compares false, so only a finite value is below infinity.
    """
    try:
        return bool(abs(given) < math.inf)
    except (TypeError, ValueError, ArithmeticError):
        return False


def _is_boolean(value: object) -> bool:
    return type(value).__name__ in ("bool", "bool_")


def check_metrics(metrics: Mapping[str, Any] | None) -> dict[str, float | int]:
    """Validate the metrics passed to ``save``: numbers that float64 can hold, by str key.

    Python ``int`` and ``float``, NumPy scalars and 1-element tensors or arrays
    are accepted; ints are kept as ints. NaN and the infinities are float64
    values and are kept (a loss overflows now and then; the save must not fail
    for it), but never rank in ``keep_best``. ``bool``, ints beyond float64's
    range and values finite in their own type (a NumPy ``longdouble``, a
    ``Decimal``) that float64 cannot hold are refused, and so are names that are
    not valid Unicode text (a lone surrogate cannot be encoded as UTF-8).

    Raises:
        TypeError: ``metrics`` is not a mapping, a key is not a ``str`` (or not valid
            Unicode text), or a value is not a number.
        ValueError: A value is finite but too large for float64.
    """
    if metrics is None:
        return {}
    if not isinstance(metrics, Mapping):
        raise TypeError(f"metrics must be a dict of numbers, got {type(metrics).__name__}")
    out: dict[str, float | int] = {}
    for key, given in metrics.items():
        if isinstance(key, str):
            check_text(key, f"the metric name {key!r}")
        try:
            value = _plain_number(given)
        except OverflowError:  # a Fraction, say, beyond float64's range
            raise _out_of_range(key, f"a {type(given).__name__} beyond float64's range") from None
        if (
            not isinstance(key, str)
            or isinstance(value, bool)
            or not isinstance(value, (int, float))
        ):
            raise TypeError(f"metrics[{key!r}] must be a number with a str key, got {given!r}")
        if isinstance(value, int) and float64_value(value) is None:
            raise _out_of_range(key, _short(value))
        # finite as given (a longdouble, say), infinite only once made a float64:
        if isinstance(value, float) and not math.isfinite(value) and _finite_in_own_type(given):
            raise _out_of_range(key, f"a finite {type(given).__name__} beyond float64's range")
        out[key] = value
    return out


def _out_of_range(key: str, what: str) -> ValueError:
    return ValueError(
        f"metrics[{key!r}] must be a number that float64 can hold, got {what}; "
        "store it in an item instead, or leave it out"
    )


def _short(value: int) -> str:
    return f"an int of {value.bit_length()} bits"  # str() of a huge int may itself fail
