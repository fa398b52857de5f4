"""Retention: which committed checkpoints to delete after a save. Pure functions."""

from __future__ import annotations

from collections.abc import Iterable

__all__ = ["steps_to_delete"]


def steps_to_delete(
    committed: Iterable[int], *, just_saved: int, keep_last: int | None
) -> list[int]:
    """Return the committed steps that retention deletes, ascending.

    Keeps the ``keep_last`` highest steps and always the step just saved
    (even if it is not among the highest); ``keep_last=None`` keeps everything.

    Args:
        committed: Steps that are committed, including ``just_saved``.
        just_saved: The step whose save triggered retention.
        keep_last: How many of the newest checkpoints to keep, or ``None``.
    """
    if keep_last is None:
        return []
    steps = sorted(set(committed))
    keep = set(steps[-keep_last:]) | {just_saved}
    return [s for s in steps if s not in keep]
