"""Rendering command output: aligned tables, sizes, and JSON. Pure: returns text."""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Sequence
from typing import Any

__all__ = ["dump_json", "human_bytes", "note", "out", "short_value", "table"]


def human_bytes(n: int) -> str:
    """``1536`` -> ``"1.5 KiB"``; below 1 KiB in bytes."""
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{n} B" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def short_value(value: Any) -> str:
    """A compact, single-line rendering of a JSON-like value."""
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.6g}"
    if isinstance(value, (dict, list)):
        return json.dumps(value, sort_keys=False, default=str, separators=(",", ":"))
    return str(value)


def table(header: Sequence[str], rows: Sequence[Sequence[str]], right: Sequence[int] = ()) -> str:
    """Columns padded to their widest cell (those in ``right`` right-aligned)."""
    widths = [len(h) for h in header]
    for i, column in enumerate(zip(*rows, strict=True)):
        widths[i] = max(widths[i], *map(len, column))
    # One format string for every row: formatting is then per row, not per cell.
    line = "  ".join(
        f"{{{i}:{'>' if i in right else '<'}{w}}}" for i, w in enumerate(widths)
    ).format
    return "\n".join([line(*row).rstrip() for row in [header, *rows]])


def dump_json(doc: Any) -> str:
    """The JSON text printed by ``--json``: one line; NaN and infinities as strings."""
    try:
        return json.dumps(doc, allow_nan=False)
    except ValueError:  # a non-finite number: strict JSON has none
        return json.dumps(_finite(doc), allow_nan=False)


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # "nan", "inf", "-inf": strict JSON has no such numbers
    if isinstance(value, dict):
        return {str(k): _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def out(text: str) -> None:
    """Write a command's data, and a newline, to stdout."""
    sys.stdout.write(text + "\n")


def note(text: str) -> None:
    """Write a diagnostic line to stderr."""
    sys.stderr.write(text + "\n")
