"""Comparing two tensors and two JSON values, for ``ckpt diff``. Pure; no I/O."""

from __future__ import annotations

import math
from typing import Any

import torch

__all__ = ["CHUNK_ELEMENTS", "tensor_difference", "value_changes"]

CHUNK_ELEMENTS = 1 << 22
"""Elements compared at a time (the float64 temporaries of one chunk: 32 MiB each)."""


def _as_float64(t: torch.Tensor) -> torch.Tensor:
    if t.is_complex():
        return t.to(torch.complex128)
    if t.dtype == torch.bool:
        return t.to(torch.uint8).to(torch.float64)
    return t.to(torch.float64)


def _chunk_difference(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    """Max absolute and relative difference of two same-shape 1-D float64 tensors.

    Equal values (also the same infinity, and NaN against NaN) differ by 0; NaN
    against a number, or opposite infinities, by infinity. The relative
    difference is ``|a - b| / |a|`` (infinity where ``a`` is 0 and ``b`` is not).
    """
    same = (a == b) | (torch.isnan(a) & torch.isnan(b))
    diff = (a - b).abs()
    diff = torch.where(same, torch.zeros_like(diff), diff)
    diff = torch.nan_to_num(diff, nan=math.inf, posinf=math.inf)
    scale = a.abs()
    rel = torch.where(same, torch.zeros_like(diff), diff / scale)
    rel = torch.nan_to_num(rel, nan=math.inf, posinf=math.inf)
    if diff.numel() == 0:
        return 0.0, 0.0
    return float(diff.max()), float(rel.max())


def tensor_difference(a: torch.Tensor, b: torch.Tensor) -> tuple[bool, float, float]:
    """Compare two tensors of one shape and dtype, bit for bit and in value.

    Memory: the two tensors plus float64 copies of :data:`CHUNK_ELEMENTS` elements.

    Returns:
        ``(identical, max_abs, max_rel)``: ``identical`` when every element has the
        same bits; the largest absolute and relative difference in value (see
        :func:`_chunk_difference`), computed in float64.
    """
    if a.shape != b.shape or a.dtype != b.dtype:
        raise ValueError("tensor_difference needs tensors of one shape and dtype")
    flat_a, flat_b = a.reshape(-1), b.reshape(-1)
    if _same_bits(flat_a, flat_b):
        return True, 0.0, 0.0
    max_abs = max_rel = 0.0
    for start in range(0, flat_a.numel(), CHUNK_ELEMENTS):
        ca = _as_float64(flat_a[start : start + CHUNK_ELEMENTS])
        cb = _as_float64(flat_b[start : start + CHUNK_ELEMENTS])
        d_abs, d_rel = _chunk_difference(ca, cb)
        max_abs, max_rel = max(max_abs, d_abs), max(max_rel, d_rel)
    return False, max_abs, max_rel


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.numel() == 0:
        return True
    if a.dtype.is_floating_point or a.is_complex():
        return bool(torch.equal(_bytes(a), _bytes(b)))
    return bool(torch.equal(a, b))


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.uint8)


def value_changes(a: Any, b: Any, path: str = "") -> list[dict[str, Any]]:
    """The leaves of two JSON-like trees that differ, as ``{"path", "a", "b"}`` records.

    A key on one side only has ``None`` on the other, with ``"missing": "a"`` or ``"b"``.
    NaN equals NaN.
    """
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for key in list(a) + [k for k in b if k not in a]:
            sub = f"{path}/{key}" if path else str(key)
            if key not in b:
                out.append({"path": sub, "a": a[key], "b": None, "missing": "b"})
            elif key not in a:
                out.append({"path": sub, "a": None, "b": b[key], "missing": "a"})
            else:
                out.extend(value_changes(a[key], b[key], sub))
        return out
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)) and len(a) == len(b):
        out = []
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            out.extend(value_changes(x, y, f"{path}/{i}" if path else str(i)))
        return out
    if _same(a, b):
        return []
    return [{"path": path, "a": a, "b": b}]


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return type(a) is type(b) and bool(a == b)
