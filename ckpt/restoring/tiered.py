"""Choosing a step and a tier to read it from, across tiers (one process).

The newest step committed in any tier wins; it is read from the fastest tier
holding a copy that reads and verifies. A corrupt, truncated or missing copy
falls back to the next tier holding the step, with a warning naming the tier
and the reason; with ``fallback``, then to older steps.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import TypeVar

from ckpt.errors import CheckpointError, CheckpointNotFoundError, CorruptCheckpointError
from ckpt.reading.steps import StepReader

__all__ = ["across_tiers"]

logger = logging.getLogger(__name__)

T = TypeVar("T")


def _listed(tiers: Sequence[StepReader]) -> list[set[int]]:
    """Each tier's committed steps; a tier that cannot be listed lists none (warning)."""
    found: list[set[int]] = []
    for index, steps in enumerate(tiers):
        try:
            found.append(set(steps.all_steps()))
        except Exception as e:
            logger.warning("tier %d (%s) cannot be listed: %s", index, steps.storage.url, e)
            found.append(set())
    return found


def across_tiers(
    tiers: Sequence[StepReader],
    step: int | None,
    attempt: Callable[[int, int], T],
    *,
    fallback: bool,
    doing: str = "restored",
) -> tuple[int, T] | None:
    """Run ``attempt(tier index, step)`` on the newest step, fastest tier first.

    Args:
        tiers: Each tier's steps, fastest first.
        step: The step; the newest in any tier when ``None``.
        attempt: Reads the step from a tier; raises when that copy is unusable.
        fallback: With ``step`` ``None``, go on to older steps when no copy works.
        doing: What is done, for the warnings.

    Returns:
        ``(tier index, what attempt returned)``, or ``None`` when ``step`` is
        ``None`` and no tier holds any step.

    Raises:
        CheckpointNotFoundError: ``step`` is committed in no tier.
        CheckpointError: What the first copy tried raised, when no copy worked.
    """
    listed = _listed(tiers)
    if step is None:
        candidates = sorted(set().union(*listed), reverse=True)
        if not candidates:
            return None
        if not fallback:
            candidates = candidates[:1]
    else:
        if not any(step in steps for steps in listed):
            raise CheckpointNotFoundError(
                f"no committed checkpoint for step {step} in any tier "
                f"(newest per tier: {[max(s, default=None) for s in listed]})",
                path=tiers[0].storage.url,
            )
        candidates = [step]
    first: CheckpointError | None = None
    for candidate in candidates:
        holders = [i for i, steps in enumerate(listed) if candidate in steps]
        for position, index in enumerate(holders):
            try:
                return index, attempt(index, candidate)
            except (CorruptCheckpointError, CheckpointNotFoundError) as e:
                first = e if first is None else first
                more = position + 1 < len(holders)
                logger.warning(
                    "step %d in tier %d (%s) cannot be %s: %s%s",
                    candidate,
                    index,
                    tiers[index].storage.url,
                    doing,
                    e,
                    "; trying the next tier" if more else "",
                )
        if candidate != candidates[-1]:
            logger.warning("no tier holds an intact step %d; trying older steps", candidate)
    assert first is not None
    raise first
