"""What each rank's ``save`` call asked for, and the refusal when the ranks' calls differ.

Every rank sends its call (step, epoch, metrics, overwrite, and the kind each
item is saved as) before anything is written; every rank sees every call, so
every rank decides alike whether to refuse. Pure functions; no collective.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from ckpt.distributed.capture import LocalCapture
from ckpt.errors import RankMismatchError

__all__ = ["refuse_different_calls", "save_call"]


def save_call(
    step: int,
    epoch: int | None,
    metrics: Mapping[str, float | int],
    overwrite: bool,
    items: Mapping[str, Any],
    local: LocalCapture | None,
) -> dict[str, Any]:
    """This rank's call, as JSON to compare with the other ranks'.

    ``local`` is the rank's capture (``None`` when it failed: the kinds are then unknown).
    """
    # metrics as text: NaN equals NaN there, so only values that differ differ
    shown = json.dumps(dict(metrics), sort_keys=True, separators=(",", ":"))
    return {
        "step": step,
        "epoch": epoch,
        "metrics": shown,
        "items": _kinds(items, local),
        "overwrite": overwrite,  # rank 0 decides it: every rank must ask the same
    }


def refuse_different_calls(step: int, calls: list[Any], path: str) -> RankMismatchError | None:
    """The error every rank raises when the ranks' calls differ (``None`` when they agree).

    Args:
        step: The step saved.
        calls: Every rank's :func:`save_call`, by rank.
        path: The step's directory, named in the error.
    """
    mismatch = _different_calls(step, calls)
    if mismatch is None:
        return None
    return RankMismatchError(mismatch, path=path, key=_differing_item(calls))


def _different_calls(step: int, calls: list[Any]) -> str | None:
    """Why the ranks' ``save`` calls differ (step, epoch, metrics or item names), or ``None``.

    The same on every rank, since every rank sees every call.
    """
    differing = [r for r, call in enumerate(calls) if call != calls[0]]
    if not differing:
        return None
    hint = ""
    if any(calls[r]["metrics"] != calls[0]["metrics"] for r in differing):
        hint = (
            " (metrics are stored once for the step and rank it for keep_best: reduce "
            "them across the ranks first, e.g. with dist.all_reduce, and pass the result "
            "on every rank)"
        )
    return (
        f"every rank must call save() with the same step, epoch and item names (each item "
        f"of the same kind on every rank), and the same metrics and overwrite: rank 0 saves "
        f"{calls[0]}, but "
        + "; ".join(f"rank {r} saves {calls[r]}" for r in differing)
        + f"{hint}; nothing of step {step} was written"
    )


def _differing_item(calls: list[Any]) -> str | None:
    """The one item whose name or kind differs between the ranks' calls, else ``None``."""
    kinds = [call["items"] for call in calls]
    names = set().union(*kinds)
    differing = {n for n in names if any(k.get(n, ...) != kinds[0].get(n, ...) for k in kinds)}
    return differing.pop() if len(differing) == 1 else None


def _kinds(items: Mapping[str, Any], local: LocalCapture | None) -> dict[str, str | None]:
    """``{item: the kind it is saved as}``, sorted (kinds unknown where the capture failed).

    Compared across the ranks before anything is written: the same name saved as a
    dict on one rank and a module on another would otherwise fail only at the
    commit, as a manifest whose ranks disagree.
    """
    if local is None:
        return dict.fromkeys(sorted(items))
    records = {**local.own.items, **local.sharded_items}
    return {name: records[name].kind if name in records else None for name in sorted(items)}
