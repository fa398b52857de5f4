"""Agreement before a collective: every rank is here, for the same call, within a short time.

A collective that one rank never joins (``if rank == 0: mgr.save(...)``, a manager on
a subgroup called by some of its ranks, a rank that died or was stopped) would wait
for the long data-transfer timeout. :class:`Handshake` is a cheap meeting at the entry
of ``save`` and ``restore`` with its own, shorter timeout: each rank posts the call it
is making under a numbered key of the job's c10d store (the TCPStore every
``init_process_group`` has), then waits for every rank's key. The error names the
ranks that did not come and says what every rank must do.

:func:`open_agreement` also checks at construction that every rank configured its
manager's save decisions alike, and opens the small gloo group on which ``should_save``
agrees (see ``docs/distributed.md``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import secrets
from collections.abc import Callable
from datetime import timedelta
from typing import Any

from ckpt.distributed.group import CLOSED, MAX_TIMEOUT, RankGroup
from ckpt.errors import CollectiveError, RankMismatchError
from ckpt.state.tree import Json
from ckpt.torch_compat import default_store

__all__ = ["Handshake", "agreeing", "open_agreement", "open_manager_agreement"]

logger = logging.getLogger(__name__)


class Handshake:
    """The meeting of every rank of a group at the entry of a collective call.

    Not thread-safe: the main thread meets; every rank meets in the same order.

    Args:
        group: The ranks that meet.
        timeout: Seconds a rank waits for the others before raising.
        token: The same on every rank, new for each handshake (a group's name may
            come again).
        path: The checkpoint root, named when the ranks came for different calls.
    """

    def __init__(self, group: RankGroup, timeout: float, token: str, path: str | None = None):
        self.timeout = float(timeout)
        self.path = path
        self._group = group
        self._store: Any = default_store()
        self._prefix = f"ckpt/handshake/{group.name}/{token}/"  # token: this manager's
        self._count = 0

    def meet(self, call: str, details: dict[str, Json]) -> None:
        """Wait until every rank has called ``meet`` for the same ``call``.

        Args:
            call: What the ranks are about to do, e.g. ``"save()"``.
            details: What to show in an error (the step); the call itself checks that
                every rank passed the same.

        Raises:
            CollectiveError: A rank did not come within the timeout (named), or gave up
                waiting for this one; the manager's collectives are refused from then on.
            RankMismatchError: The ranks came for different calls (on every rank).
        """
        group, n = self._group, self._count
        if group.closed:  # before posting a key: the others are told this rank did not come
            raise CollectiveError(
                f"{call} on rank {group.rank}: {CLOSED}",
                operation="handshake",
                rank=group.rank,
                timeout=self.timeout,
            )
        if group.broken is not None:
            raise CollectiveError(
                f"{call} on rank {group.rank}: refused, an earlier collective failed: "
                f"{group.broken}",
                operation="handshake",
                rank=group.rank,
                timeout=self.timeout,
            )
        self._count += 1
        keys = [self._key(n, r) for r in range(group.world_size)]
        waited: Exception | None = None
        try:
            self._store.set(keys[group.rank], json.dumps({"call": call, **details}))
            if n >= 2:  # every rank has passed meeting n - 2: its keys are no longer read
                with contextlib.suppress(Exception):
                    self._store.delete_key(self._key(n - 2, group.rank))
                    self._store.delete_key(self._key(n - 2, "verdict"))
            try:
                self._store.wait(keys, timedelta(seconds=self.timeout))
            except Exception as e:  # the timeout, or the store is gone
                waited = e
            # One verdict per meeting, the first proposed: every rank goes on, or none.
            proposal = "go" if waited is None else f"rank {group.rank} gave up waiting"
            verdict = self._store.compare_set(self._key(n, "verdict"), "", proposal).decode()
            calls = [json.loads(v) for v in self._store.multi_get(keys)] if verdict == "go" else []
        except Exception as e:
            raise self._failed(call, keys, e) from e
        if verdict != "go":
            if waited is not None:
                raise self._failed(call, keys, waited) from waited
            raise self._broken(
                f"{call} on rank {group.rank}: {verdict} for this rank; every rank of the "
                f"group must call {call} together"
            )
        differing = [r for r, c in enumerate(calls) if c["call"] != calls[0]["call"]]
        if differing:
            raise RankMismatchError(
                f"every rank of the group must make the same call together: rank 0 called "
                f"{_show(calls[0])}, but "
                + "; ".join(f"rank {r} called {_show(calls[r])}" for r in differing),
                path=self.path,
            )

    def _key(self, n: int, rank: int | str) -> str:
        return f"{self._prefix}{n}/{rank}"

    def _failed(self, call: str, keys: list[str], cause: Exception) -> CollectiveError:
        """The error of a meeting that did not complete, naming the ranks that did not come."""
        group = self._group
        try:
            missing = [r for r, key in enumerate(keys) if not self._store.check([key])]
        except Exception:  # the store itself is gone: rank 0's process died
            return self._broken(
                f"{call} on rank {group.rank}: the job's store cannot be reached ({cause}); "
                "rank 0 may have died"
            )
        return self._broken(
            f"{call} on rank {group.rank}: rank(s) {missing} of the group's {group.world_size} "
            f"did not call {call} within {self.timeout:g} s (handshake_timeout): every rank of "
            f"the group must call {call} with the same step, together; not only rank 0 "
            f"(`if rank == 0: mgr.{call[:-2]}(...)` cannot work), not only some ranks of a "
            "subgroup's manager; a rank that died or is stopped shows up here too"
        )

    def _broken(self, message: str) -> CollectiveError:
        self._group.mark_broken(message)
        logger.error("%s", message)
        return CollectiveError(
            message, operation="handshake", rank=self._group.rank, timeout=self.timeout
        )


def agreeing(
    decisions: RankGroup, path: str | None = None
) -> Callable[[int, list[bool]], list[bool]]:
    """``should_save``'s agreement over ``decisions``: flags or-ed across the ranks.

    The same all-reduce compares the step every rank passed: ranks asking about
    different steps all raise a :class:`~ckpt.RankMismatchError` naming ``path``, the
    checkpoint root (they would save different steps). A
    rank that does not come within the group's timeout makes every other rank raise
    a :class:`~ckpt.CollectiveError` saying what every rank must do.
    """

    def agree(step: int, flags: list[bool]) -> list[bool]:
        try:
            *agreed, highest, lowest = decisions.max_of(
                [1 if f else 0 for f in flags] + [step, -step], "should_save"
            )
        except CollectiveError as e:
            raise CollectiveError(
                f"should_save(): {e.reason}. Every rank of the group must call "
                "should_save(step) for the same steps, together (with every_seconds or "
                "preemption_signals the ranks agree on the answer)",
                operation="should_save",
                rank=decisions.rank,
                timeout=decisions.timeout,
            ) from e
        if highest != -lowest:
            raise RankMismatchError(
                f"should_save(): the ranks passed different steps (from {-lowest} to "
                f"{highest}; rank {decisions.rank} passed {step}): every rank of the group "
                "must call should_save(step) with the same step, together; count steps the "
                "same way on every rank (the same number of batches per rank, as "
                "DistributedSampler or ckpt.resumable_loader give)",
                path=path,
            )
        return [bool(v) for v in agreed]

    return agree


def _show(call: Json) -> str:
    assert isinstance(call, dict)
    rest = ", ".join(f"{k}={v!r}" for k, v in call.items() if k != "call")
    return f"{call['call']} ({rest})" if rest else str(call["call"])


def open_agreement(
    group: RankGroup, process_group: Any, config: dict[str, Json], timeout: float
) -> tuple[Handshake, RankGroup | None]:
    """Check every rank's save-decision ``config`` is the same, and open what agrees on it.

    Collective over ``group`` (and, when a decision group is opened, over the default
    group, as ``new_group`` is). A decision group is opened when ``config`` has a clock
    (``every_seconds``) or watched signals: then ``should_save`` must agree.

    Returns:
        The handshake, and the gloo group ``should_save`` agrees on (or ``None``).

    Raises:
        RankMismatchError: The ranks configured their managers differently (on every
            rank); ``group`` is closed.
        ValueError: A bad ``timeout``; ``group`` is closed.
    """
    try:
        return _open(group, process_group, config, timeout)
    except BaseException:
        group.close()  # the manager is not built: its group goes with it
        raise


def open_manager_agreement(
    group: RankGroup, process_group: Any, config: dict[str, Json], timeout: float
) -> tuple[Handshake, RankGroup | None, Callable[[int, list[bool]], list[bool]] | None]:
    """A manager's handshake, its decision group and ``should_save``'s agreement over it.

    As :func:`open_agreement`, plus the agreement (``None`` without a decision group).
    """
    handshake, decisions = open_agreement(group, process_group, config, timeout)
    agree = None if decisions is None else agreeing(decisions, handshake.path)
    return handshake, decisions, agree


def _open(
    group: RankGroup, process_group: Any, config: dict[str, Json], timeout: float
) -> tuple[Handshake, RankGroup | None]:
    sent = group.all_gather_json({"config": config, "token": secrets.token_hex(8)})
    docs = [doc if isinstance(doc, dict) else {} for doc in sent]
    configs = [doc.get("config") for doc in docs]
    directory = config.get("directory")
    path = directory if isinstance(directory, str) else None
    differing = [r for r, c in enumerate(configs) if c != configs[0]]
    if differing:
        raise RankMismatchError(
            "every rank must construct its CheckpointManager with the same every_steps, "
            "every_seconds, preemption_signals, timeouts, fallback_to_intact, tiers and "
            "incremental, and the same directory (on storage every rank sees): rank 0 has "
            f"{configs[0]}, but " + "; ".join(f"rank {r} has {configs[r]}" for r in differing),
            path=path,
        )
    if isinstance(timeout, bool) or not 0 < timeout <= MAX_TIMEOUT:
        raise ValueError(f"handshake_timeout must be between 0 and {MAX_TIMEOUT:g} s: {timeout!r}")
    decisions = None
    if config.get("every_seconds") is not None or config.get("signals"):
        decisions = RankGroup(process_group, timeout=timeout)
    return Handshake(group, timeout, str(docs[0].get("token")), path), decisions
