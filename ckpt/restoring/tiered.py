"""Choosing a step and a tier to read it from, across tiers.

The newest step committed in any tier wins; it is read from the fastest tier
holding a copy that reads and verifies. A corrupt, truncated or missing copy
falls back to the next tier holding the step, with a warning naming the tier
and the reason; with ``fallback``, then to older steps. In a process group
(:func:`agreed_across_tiers`) rank 0 lists the tiers, and the ranks try the
same ``(step, tier)`` pairs in the same order, agreeing on each outcome, so all
restore the same step from the same tier or all raise alike.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from ckpt.errors import CheckpointError, CheckpointNotFoundError, CorruptCheckpointError
from ckpt.reading.steps import StepReader

__all__ = ["across_tiers", "agreed_across_tiers"]

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


def _pairs(listed: list[set[int]], step: int | None, fallback: bool) -> list[list[int]]:
    """The ``[step, tier]`` pairs to try in order: newest step first, fastest tier first."""
    if step is None:
        steps = sorted(set().union(*listed), reverse=True)
        steps = steps if fallback else steps[:1]
    else:
        steps = [step]
    return [[s, i] for s in steps for i, found in enumerate(listed) if s in found]


def agreed_across_tiers(
    group: Any,
    tiers: Sequence[StepReader],
    step: int | None,
    attempt: Callable[[int, int], T],
    *,
    fallback: bool,
) -> tuple[int, T] | None:
    """:func:`across_tiers` on every rank of ``group`` together (collective).

    Rank 0 lists the tiers; every rank tries the same pairs, and a copy that is
    corrupt or missing on any rank is skipped by every rank (a warning each).

    Returns:
        ``(tier index, what attempt returned)``, or ``None`` when ``step`` is
        ``None`` and no tier holds any step.

    Raises:
        ValueError: The ranks asked for different steps.
        CheckpointNotFoundError: ``step`` is committed in no tier.
        CheckpointError: The agreed error of the first copy tried, when none worked.
    """
    from ckpt.distributed import outcomes  # noqa: PLC0415 - only in a process group

    asked = group.all_gather_json(step)
    if any(a != asked[0] for a in asked):
        raise ValueError(
            "every rank must restore the same step: they asked for "
            + ", ".join(f"rank {r}: {a}" for r, a in enumerate(asked))
        )
    pairs = group.broadcast_json(
        _pairs(_listed(tiers), step, fallback) if group.is_coordinator else None
    )
    assert isinstance(pairs, list)
    if not pairs:
        if step is None:
            return None
        raise CheckpointNotFoundError(
            f"no committed checkpoint for step {step} in any tier (listed by rank 0)",
            path=tiers[0].storage.url,
        )
    first: CheckpointError | None = None
    for candidate, index in pairs:
        result: Any = None
        error: Exception | None = None
        try:
            result = attempt(index, candidate)
        except Exception as e:
            error = e
        try:
            outcomes.raise_agreed(group, error, f"restoring step {candidate} from tier {index}")
        except (CorruptCheckpointError, CheckpointNotFoundError) as e:
            first = e if first is None else first
            logger.warning(
                "step %d in tier %d (%s) cannot be restored: %s",
                candidate,
                index,
                tiers[index].storage.url,
                e,
            )
            continue
        return index, result
    assert first is not None
    raise first
