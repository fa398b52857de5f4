"""A restore in a process group decided together: the same step, the same outcome on every rank.

Each rank reads and checks its part on its own; the ranks then exchange their
outcomes, and every rank acts on the same list: all go on, or all raise an
error of the same class (the class of the lowest failing rank's error), so an
``except CorruptCheckpointError`` never sends one rank down another path than
the others (which would leave them waiting on each other). With
``fallback_to_intact``, rank 0 lists the committed steps and every rank tries
the same ones, newest first, skipping those the ranks agreed are corrupt.
Loading, the ranks agree after each item (:class:`ApplyAgreement`), so an item
failing on one rank stops every rank after that same item.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from ckpt.distributed.group import RankGroup, describe_failure
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

if TYPE_CHECKING:
    from ckpt.restoring.pipeline import ApplyStep

__all__ = [
    "ApplyAgreement",
    "agree_on_candidates",
    "check_same_items",
    "first_agreed",
    "raise_agreed",
    "raise_agreed_sharing",
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
    _raise_failed(_failures(group, error), error, doing)


def _raise_failed(failed: list[tuple[int, str]], error: Exception | None, doing: str) -> None:
    if not failed:
        return
    cls = _agreed_class(failed)
    if error is not None and type(error) is cls:
        raise error
    where = "; ".join(f"rank {r}: {m}" for r, m in failed)
    raise cls(f"{doing} failed on another rank ({where}); nothing was changed") from error


def raise_agreed_sharing(
    group: RankGroup, error: Exception | None, doing: str, value: Json
) -> list[Json]:
    """:func:`raise_agreed`, each rank sending ``value`` in the same gather; every rank's value.

    One collective, raising as :func:`raise_agreed` does (the same class on every
    rank); an answer that is not of this form counts as that rank's failure.
    """
    failed, values = _gather_outcomes(group, error, value)
    _raise_failed(failed, error, doing)
    return values


def _gather_outcomes(
    group: RankGroup, error: Exception | None, value: Json
) -> tuple[list[tuple[int, str]], list[Json]]:
    """One gather of each rank's error and ``value``.

    Returns:
        The failed ranks (as :meth:`RankGroup.failures` gives them) and every rank's value.
    """
    described = None if error is None else describe_failure(error)
    sent = group.all_gather_json({"error": described, "value": value})
    failed: list[tuple[int, str]] = []
    for rank, answer in enumerate(sent):
        said = answer.get("error") if isinstance(answer, dict) else f"CollectiveError: {answer!r}"
        if said is not None:
            failed.append((rank, said if isinstance(said, str) else f"CollectiveError: {said!r}"))
    return failed, [answer.get("value") if isinstance(answer, dict) else None for answer in sent]


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


@dataclass
class ApplyAgreement:
    """How the ranks of a group apply a restore together: the same items, the same outcome.

    Every rank runs the same collectives in the same order, in every path (``n``
    steps, the items in apply order, the same names on every rank):

    1. Before anything changes, one gather carries each rank's recheck error and
       its step names (:func:`raise_agreed_sharing`, run by the caller). A file
       changed on any rank: every rank raises there (the same class), nothing is
       applied, and goes on to 3. Step names that differ between ranks (not
       expected: a rank that reseeds its streams applies a step named ``rng`` as
       the others do) leave :attr:`agreed` false on every rank: 2 is skipped
       everywhere and a failure while loading is agreed in 3 only (as before
       per-step agreement: the healthy ranks then load every item).
    2. After each step but the last, one gather (:meth:`step`): if the step failed
       on any rank, every rank raises the same
       :class:`~ckpt.errors.PartialRestoreError` (the same item, ``applied`` and
       ``not_applied``), which :func:`run_agreed_apply` raises as it is, with no
       further collective (a rank failing again after it, closing its files, logs
       that and raises it too): ``1 + k`` collectives for a failure at step ``k < n``,
       on one rank or on all. The last step is agreed in 3, which carries the
       item each rank failed at: its failure raises the same error as 2 would.
    3. Once every step is loaded (or 1 raised), one gather (:func:`run_agreed_apply`):
       a failure after the steps (an ``after_restore`` hook), in 1, or while
       loading without 2, raises :class:`~ckpt.errors.PartialRestoreError` on
       every rank. A success runs ``1 + (n - 1) + 1`` collectives.

    A rank that dies, or leaves a step by a ``BaseException`` (``KeyboardInterrupt``),
    leaves the others to raise :class:`~ckpt.errors.CollectiveError` after the
    timeout, as in any collective.

    Attributes:
        group: The ranks.
        where: The checkpoint, for errors.
        names: This rank's steps, in apply order.
        agreed: Every rank applies the same steps: each is agreed (2).
        applied: The steps loaded, once every one is.
        raised: The error :meth:`step` raised on every rank, if it did.
    """

    group: RankGroup
    where: str
    names: list[str] = field(default_factory=list)
    agreed: bool = False
    applied: list[str] = field(default_factory=list)
    raised: PartialRestoreError | None = None

    def step(self, step: ApplyStep, error: Exception | None) -> None:
        """Learn whether ``step`` loaded on every rank; else raise the same error on every rank.

        The last step is agreed by :func:`run_agreed_apply`'s gather instead (one
        collective less; nothing follows it to leave untouched).

        Raises:
            PartialRestoreError: The step failed on a rank: it names the step, the steps
                loaded before it and those not loaded, on every rank alike; chained from
                this rank's error, if any.
            CollectiveError: A rank died or did not answer in time.
        """
        if step.name == self.names[-1]:
            return
        failed = self.group.failures(error)
        if failed:
            self.raise_at(step.name, failed, error)

    def raise_at(self, name: str, failed: list[tuple[int, str]], error: Exception | None) -> None:
        """Raise, on every rank alike, that step ``name`` failed on the ``failed`` ranks."""
        at = self.names.index(name)
        before, rest = self.names[:at], self.names[at + 1 :]
        text = "; ".join(f"rank {r}: {m}" for r, m in failed)
        self.raised = PartialRestoreError(
            f"loading item {name!r} failed on rank(s) {[r for r, _ in failed]} ({text}). "
            f"On every rank, restored before it: {before}; not restored, unchanged: {rest}; "
            f"{name!r} itself may be partly loaded ("
            + ("this rank loaded it)" if error is None else "it failed on this rank too)"),
            path=self.where,
            key=name,
            item=name,
            applied=before,
            not_applied=rest,
        )
        raise self.raised from error


def run_agreed_apply(agreement: ApplyAgreement, apply: Callable[[], _T]) -> _T:
    """Apply on this rank, then learn whether every rank did: any failure raises everywhere.

    The last collective of :class:`ApplyAgreement` (3); a failure already agreed at
    its step (2) is raised as it is, without it (every rank does the same).

    Raises:
        PartialRestoreError: On every rank when an item's own code raised on any
            rank; a rank that restored everything lists every item as applied.
    """
    error: Exception | None = None
    result: Any = None
    try:
        result = apply()
    except Exception as e:
        if agreement.raised is not None:  # agreed at its step (2): every rank raises it, now
            if e is not agreement.raised:  # e.g. closing the files failed after it, here only
                logger.warning(
                    "after the agreed failure, this rank failed too: %s", describe_failure(e)
                )
                raise agreement.raised from agreement.raised.__cause__
            raise
        error = e
    mine = error if isinstance(error, PartialRestoreError) else None
    last = agreement.names[-1] if agreement.agreed and agreement.names else None
    sent = error
    if mine is not None and mine.item == last and isinstance(mine.__cause__, Exception):
        sent = mine.__cause__  # the last step's own error, as a step's agreement sends it
    failed, items = _gather_outcomes(agreement.group, sent, None if mine is None else mine.item)
    if not failed:
        return result  # type: ignore[no-any-return]
    if last is not None and last in items:  # the last step failed on a rank (see step)
        agreement.raise_at(last, failed, sent)
    text = "; ".join(f"rank {r}: {m}" for r, m in failed)
    applied = list(agreement.applied) if mine is None else list(mine.applied)
    raise PartialRestoreError(
        f"loading the restored state failed on rank(s) {[r for r, _ in failed]} ({text}); "
        + (
            "this rank restored every item"
            if error is None
            else "on this rank: see the items applied and not applied"
        ),
        path=agreement.where,
        key=None if mine is None else mine.key,
        item=None if mine is None else mine.item,
        applied=applied,
        not_applied=[n for n in agreement.names if n not in applied]
        if mine is None
        else mine.not_applied,
    ) from error
