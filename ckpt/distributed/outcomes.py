"""A restore in a process group decided together: the same step, the same outcome on every rank.

Each rank reads and checks its part on its own; the ranks then exchange their
outcomes, and every rank acts on the same list: all go on, or all raise an
error of the same class (the class of the lowest failing rank's error), so an
``except CorruptCheckpointError`` never sends one rank down another path than
the others (which would leave them waiting on each other). With
``fallback_to_intact``, rank 0 lists the committed steps and every rank tries
the same ones, newest first, skipping those the ranks agreed are corrupt.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from ckpt.distributed.group import RankGroup
from ckpt.errors import (
    CheckpointError,
    CheckpointNotFoundError,
    CheckpointReadError,
    CollectiveError,
    CorruptCheckpointError,
    IncompatibleCheckpointError,
    PartialRestoreError,
    RankMismatchError,
)
from ckpt.state.tree import Json

__all__ = [
    "agree_on_candidates",
    "check_same_items",
    "first_agreed",
    "raise_agreed",
    "run_agreed_apply",
]

logger = logging.getLogger(__name__)

_T = TypeVar("_T")

_SHARED: dict[str, type[Exception]] = {
    cls.__name__: cls
    for cls in (
        CheckpointError,
        CheckpointNotFoundError,
        CheckpointReadError,
        CollectiveError,
        CorruptCheckpointError,
        IncompatibleCheckpointError,
        PartialRestoreError,
        RankMismatchError,
        ValueError,
        TypeError,
    )
}
"""The error classes every rank can raise for another rank's failure; any other is a
:class:`~ckpt.CheckpointError` on every rank."""


def _failures(group: RankGroup | None, error: BaseException | None) -> list[tuple[int, str]]:
    if group is not None:
        return group.failures(error)
    return [] if error is None else [(0, f"{type(error).__name__}: {error}")]


def _agreed_class(failed: list[tuple[int, str]]) -> type[Exception]:
    """The class every rank raises: the lowest failing rank's, when every rank can raise it."""
    name = failed[0][1].split(":", 1)[0]
    return _SHARED.get(name, CheckpointError)


def raise_agreed(group: RankGroup | None, error: Exception | None, doing: str) -> None:
    """Raise on every rank when any rank failed, an error of the same class on every rank.

    A rank raises its own error when it is of the agreed class; otherwise (it
    succeeded, or failed otherwise) an error of that class naming every failed
    rank, chained from its own.

    Raises:
        CollectiveError: A rank died or did not answer in time.
    """
    failed = _failures(group, error)
    if not failed:
        return
    cls = _agreed_class(failed)
    if error is not None and type(error) is cls:
        raise error
    where = "; ".join(f"rank {r}: {m}" for r, m in failed)
    raise cls(f"{doing} failed on another rank ({where}); nothing was changed") from error


def check_same_items(group: RankGroup, names: list[str], *, path: str | None = None) -> None:
    """Refuse, on every rank, a restore whose ranks name different items.

    Args:
        group: The ranks.
        names: This rank's item names.
        path: The checkpoint root, named in the error.

    Raises:
        RankMismatchError: On every rank, naming what each rank restores.
    """
    _refuse_different_items(group.all_gather_json(sorted(names)), path)


def _refuse_different_items(asked: list[Json], path: str | None) -> None:
    if any(a != asked[0] for a in asked):
        raise RankMismatchError(
            "every rank must restore the same items: "
            + "; ".join(f"rank {r} restores {a}" for r, a in enumerate(asked)),
            path=path,
            key=_the_differing_item(asked),
        )


def _the_differing_item(asked: list[Json]) -> str | None:
    """The one item name that some ranks restore and others do not, else ``None``."""
    if not all(isinstance(a, list) for a in asked):
        return None
    named = [{str(n) for n in a} for a in asked if isinstance(a, list)]
    differing = set[str]().union(*named) - named[0].intersection(*named[1:])
    return differing.pop() if len(differing) == 1 else None


def agree_on_candidates(
    group: RankGroup,
    step: int | None,
    steps: Callable[[], list[int]],
    fallback: bool,
    names: list[str],
    *,
    path: str | None = None,
) -> list[int]:
    """The steps every rank tries, in order: ``step``, or rank 0's newest (all, with ``fallback``).

    One exchange: each rank sends its item ``names`` and ``step``, and rank 0 (when it
    asks for the latest) the steps it lists; every rank checks the same answers in the
    same order (items, then steps, then rank 0's listing). ``path``, the checkpoint
    root, is named in the errors.

    Raises:
        RankMismatchError: The ranks name different items, or asked for different steps
            (on every rank).
        CheckpointError: Rank 0 could not list the steps (on every rank).
    """
    found: Json = None
    if group.is_coordinator and step is None:
        try:
            listed = sorted(steps(), reverse=True)
            found = {"steps": listed if fallback else listed[:1]}
        except CheckpointError as e:  # every rank raises it, none waits for a step
            found = {"error": f"{type(e).__name__}: {e}"}
    sent = group.all_gather_json({"items": sorted(names), "step": step, "found": found})
    answers = [a if isinstance(a, dict) else {} for a in sent]
    _refuse_different_items([a.get("items") for a in answers], path)
    asked = [a.get("step") for a in answers]
    if any(a != asked[0] for a in asked):
        raise RankMismatchError(
            "every rank must restore the same step: they asked for "
            + ", ".join(f"rank {r}: {a}" for r, a in enumerate(asked)),
            path=path,
        )
    if step is not None:
        return [step]
    decided = answers[0].get("found")
    if not isinstance(decided, dict) or "error" in decided:
        error = decided.get("error") if isinstance(decided, dict) else decided
        raise CheckpointError(f"rank 0 could not find the latest step: {error}")
    return [int(s) for s in decided["steps"]]


def first_agreed(
    group: RankGroup,
    candidates: list[int],
    attempt: Callable[[int], _T],
    fallback: bool,
    seen: Callable[[int], bool] | None = None,
) -> tuple[int, _T] | None:
    """Run ``attempt`` on the candidates in order until it succeeds on every rank.

    With ``fallback``, a step the ranks agree is corrupt is skipped (one warning
    names each skipped step once a step succeeds); otherwise every failure is raised.
    ``seen``: whether this rank sees a step committed, when the candidates are rank
    0's listing (a rank that does not see one is told the root may not be shared).

    Returns:
        The step and this rank's result; ``None`` when there is no candidate.

    Raises:
        CorruptCheckpointError: Every candidate is corrupt (on every rank).
        Exception: The agreed error of a failed attempt (see :func:`raise_agreed`).
    """
    corrupt: list[tuple[int, str]] = []
    for candidate in candidates:
        result: Any = None
        error: Exception | None = None
        try:
            result = attempt(candidate)
        except CheckpointNotFoundError as e:
            error = e if seen is None else _unseen(group, candidate, e, seen)
        except Exception as e:
            error = e
        try:
            raise_agreed(group, error, f"restoring step {candidate}")
        except CorruptCheckpointError as e:
            if not fallback:
                raise
            corrupt.append((candidate, str(e)))
            continue
        if corrupt:
            logger.warning(
                "using step %d, the newest intact checkpoint; skipped corrupt %s",
                candidate,
                "; ".join(f"step {s}: {why}" for s, why in corrupt),
            )
        return candidate, result
    if corrupt:
        raise CorruptCheckpointError(
            f"no intact checkpoint to restore: step(s) {[s for s, _ in corrupt]} are corrupt "
            f"({'; '.join(f'step {s}: {why}' for s, why in corrupt)})"
        )
    return None


def _unseen(
    group: RankGroup, step: int, error: CheckpointNotFoundError, seen: Callable[[int], bool]
) -> Exception:
    """A step rank 0 listed that this rank cannot find: the root may not be shared."""
    try:
        if group.rank == 0 or seen(step):
            return error
    except OSError:
        pass
    return CheckpointNotFoundError(
        f"{error.reason}; rank 0 listed step {step}, which this rank does not see: the "
        "checkpoint root must be on storage every rank sees at the same path (a shared "
        "filesystem or an object store, not each node's local disk), or another process "
        "deleted the step meanwhile",
        path=error.path,
        key=error.key,
    )


def run_agreed_apply(
    group: RankGroup,
    apply: Callable[[], _T],
    items: Mapping[str, Any],
    where: str,
) -> _T:
    """Apply on this rank, then learn whether every rank did: any failure raises everywhere.

    Raises:
        PartialRestoreError: On every rank when an item's own code raised on any
            rank; a rank that restored everything lists every item as applied.
    """
    error: Exception | None = None
    result: Any = None
    try:
        result = apply()
    except Exception as e:
        error = e
    failed = group.failures(error)
    if not failed:
        return result  # type: ignore[no-any-return]
    text = "; ".join(f"rank {r}: {m}" for r, m in failed)
    mine = error if isinstance(error, PartialRestoreError) else None
    raise PartialRestoreError(
        f"loading the restored state failed on rank(s) {[r for r, _ in failed]} ({text}); "
        + (
            "this rank restored every item"
            if error is None
            else "on this rank: see the items applied and not applied"
        ),
        path=where,
        key=None if mine is None else mine.key,
        item=None if mine is None else mine.item,
        applied=sorted(items) if error is None else ([] if mine is None else mine.applied),
        not_applied=[] if error is None else (sorted(items) if mine is None else mine.not_applied),
    ) from error
