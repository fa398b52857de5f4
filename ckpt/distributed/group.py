"""ckpt's own collectives among the ranks of a process group: pickle-free, with a timeout.

torch's object collectives (``all_gather_object``, ``broadcast_object_list``) pickle
their values, and a collective on the training's group can interleave with the
training's own. :class:`RankGroup` instead runs on a dedicated gloo subgroup of the
same ranks (CPU tensors, whatever the default backend: gloo or nccl) and moves only
JSON, as UTF-8 bytes in ``uint8`` tensors, or raw bytes. Every collective is bounded
by the group's timeout: a rank that dies (gloo notices the closed connection at
once) or stalls makes every other rank raise :class:`~ckpt.errors.CollectiveError`
instead of hanging.

Example:
    >>> group = RankGroup(timeout=60)
    >>> outcomes = group.failures(error)        # same list on every rank
    >>> sizes = group.all_gather_json(my_size)  # one value per rank, by rank
    >>> group.close()
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable
from datetime import timedelta
from typing import TypeVar

import torch
import torch.distributed as dist

from ckpt.distributed import wire
from ckpt.distributed.kept_groups import destroy, keep, take_idle
from ckpt.distributed.wire import INLINE_BYTES
from ckpt.errors import CollectiveError
from ckpt.state.tree import Json

__all__ = ["CLOSED", "INLINE_BYTES", "RankGroup", "describe_failure"]

logger = logging.getLogger(__name__)

_T = TypeVar("_T")

# The longest timeout, in seconds (about 31 years; gloo counts milliseconds in 64 bits).
MAX_TIMEOUT = 1e9
# A failure's message is cut to this many characters before it is gathered.
MAX_FAILURE_CHARS = 4096


CLOSED = (
    "this rank's CheckpointManager was closed; a manager in a process group runs no "
    "collective after close(): every rank closes its manager together, and every rank "
    "creates a new CheckpointManager to save or restore again"
)


class RankGroup:
    """ckpt's collectives among a process group's ranks: own gloo group, pickle-free, timeout.

    Construct it on every rank of the default group at once, in the same order as
    any other ``new_group`` call: creating the subgroup is collective over the whole
    default group. For a group of some of the ranks (one dimension of a device mesh)
    only its ranks create it, in the same order as their other groups of those ranks.
    A rank outside ``process_group`` cannot take part (it only gets
    ``NON_GROUP_MEMBER`` from torch) and gets a ``ValueError``.
    Then call each collective on every rank of the group in the same order. Values are
    JSON as :func:`json.loads` gives them back (tuples become lists, dictionary keys
    strings); nothing is ever pickled.

    Not thread-safe: one thread at a time per instance. Use one instance per thread
    that runs collectives (a background saver gets its own).

    Attributes:
        rank: This process's rank within the group.
        world_size: The number of ranks in the group.
        timeout: Seconds each collective may take before it raises.
    """

    def __init__(self, process_group: dist.ProcessGroup | None = None, *, timeout: float = 600.0):
        """Create the gloo subgroup over the ranks of ``process_group``.

        Args:
            process_group: The group whose ranks take part; the default group when None.
            timeout: Seconds each collective (and the subgroup's creation) may take.

        Raises:
            ValueError: No process group is initialized, ``timeout`` is not a number of
                seconds in ``(0, MAX_TIMEOUT]``, or this process is not a member of
                ``process_group``.
            CollectiveError: A rank did not join the subgroup within the timeout.
        """
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
            raise ValueError(f"timeout must be a number of seconds, got {timeout!r}")
        if not math.isfinite(timeout) or not 0 < timeout <= MAX_TIMEOUT:
            raise ValueError(f"timeout must be between 0 and {MAX_TIMEOUT:g} seconds: {timeout!r}")
        if not (dist.is_available() and dist.is_initialized()):
            raise ValueError(
                "RankGroup needs an initialized torch.distributed process group "
                "(call torch.distributed.init_process_group first)"
            )
        if process_group is None:
            process_group = dist.group.WORLD
        outsider: object = dist.GroupMember.NON_GROUP_MEMBER
        if process_group is None or process_group is outsider:
            raise ValueError(
                f"rank {dist.get_rank()} is not a member of that process group (new_group gave "
                "it GroupMember.NON_GROUP_MEMBER): construct a manager on a group only on the "
                "group's ranks, or pass process_group=False for one private to this process"
            )
        try:
            ranks = dist.get_process_group_ranks(process_group)
        except (KeyError, ValueError, RuntimeError) as e:
            raise ValueError(f"process_group is not a live process group: {e}") from e
        self.timeout = float(timeout)
        self.rank = ranks.index(dist.get_rank()) if dist.get_rank() in ranks else -1
        self.world_size = len(ranks)
        self._broken: str | None = None
        self._closed = False
        # A group of some of the ranks (one dimension of a device mesh): only its ranks
        # create it, under a name made from its ranks, so that disjoint groups created
        # at once (every rank its own replica's) never share a rendezvous. torch may give
        # a destroyed group's name again, with its rendezvous keys still in the store, so
        # such groups are kept when closed and taken up again (see close()).
        some = len(ranks) < dist.get_world_size()
        self._idle_key = (tuple(ranks), self.timeout) if some else None
        try:
            group = take_idle(self._idle_key) or dist.new_group(
                ranks=ranks,
                backend="gloo",
                timeout=timedelta(seconds=self.timeout),
                use_local_synchronization=some,
            )
        except Exception as e:
            hint = (
                f"; a rank of {ranks} did not join within the timeout: every rank of the "
                "group constructs each CheckpointManager together, in the same order (not "
                "only rank 0: `if rank == 0: CheckpointManager(...)` cannot work)"
            )
            raise self._error("creating the gloo group", e, hint) from e
        if group is None or group == dist.GroupMember.NON_GROUP_MEMBER:
            raise ValueError(f"rank {dist.get_rank()} is not in the process group (ranks {ranks})")
        self._held: dist.ProcessGroup | None = group
        self._name = str(group.group_name)
        self.rank = dist.get_rank(group)
        # Global rank of each group rank (torch < 2.6 broadcasts take a global src).
        self._global = dist.get_process_group_ranks(group)
        logger.debug("ckpt gloo group over ranks %s (timeout %g s)", ranks, self.timeout)

    @property
    def is_coordinator(self) -> bool:
        """Whether this is rank 0 of the group, the one that commits."""
        return self.rank == 0

    def all_gather_json(self, value: Json) -> list[Json]:
        """Gather one JSON value from every rank.

        Args:
            value: This rank's value (anything :func:`json.dumps` accepts).

        Returns:
            Every rank's value, indexed by rank; the same list on every rank.

        Raises:
            TypeError: This rank's value is not JSON (the other ranks raise CollectiveError).
            CollectiveError: A rank failed, died or did not answer within the timeout.
        """
        payload, encode_error = wire.encode(value)
        first = self._run("all_gather_json", lambda: self._gather_lengths(payload))
        lengths = [length for length, _ in first]
        _check_lengths("all_gather_json", lengths, encode_error, self)
        payload = payload or b""  # not None here: _check_lengths raised otherwise
        longest = max(lengths)
        if longest <= INLINE_BYTES:  # every value came with its length: one collective
            datas = [inline[:length] for length, inline in first]
        else:
            datas = self._gather_payloads(payload, lengths)
        return [_decode(data, "all_gather_json", rank, self) for rank, data in enumerate(datas)]

    def broadcast_json(self, value: Json | None, src: int = 0) -> Json:
        """Send one JSON value from rank ``src`` to every rank.

        Args:
            value: The value, on ``src`` (ignored on the other ranks).
            src: The sending rank, within the group.

        Returns:
            ``src``'s value, on every rank.

        Raises:
            ValueError: ``src`` is not a rank of the group.
            TypeError: On ``src``, the value is not JSON (the others raise CollectiveError).
            CollectiveError: A rank failed, died or did not answer within the timeout.
        """
        self._check_src(src)
        payload, encode_error = wire.encode(value) if self.rank == src else (b"", None)
        data = self._broadcast("broadcast_json", payload, src, encode_error)
        return _decode(data, "broadcast_json", src, self)

    def broadcast_bytes(self, data: bytes | None, src: int = 0) -> bytes:
        """Send bytes from rank ``src`` to every rank.

        Args:
            data: The bytes (any bytes-like object), on ``src`` (ignored on the others).
            src: The sending rank, within the group.

        Returns:
            ``src``'s bytes, on every rank.

        Raises:
            ValueError: ``src`` is not a rank of the group.
            TypeError: On ``src``, ``data`` is not bytes-like (the others raise CollectiveError).
            CollectiveError: A rank failed, died or did not answer within the timeout.
        """
        self._check_src(src)
        payload: bytes | None = b""
        error: TypeError | None = None
        if self.rank == src:
            try:
                payload = bytes(memoryview(data))  # type: ignore[arg-type]
            except TypeError as e:
                payload = None
                kind = type(data).__name__
                error = TypeError(f"broadcast_bytes needs bytes on rank {src}, got {kind}")
                error.__cause__ = e
        return self._broadcast("broadcast_bytes", payload, src, error)

    def barrier(self) -> None:
        """Wait until every rank of the group has reached this call.

        Raises:
            CollectiveError: A rank died or did not arrive within the timeout.
        """
        flag = torch.zeros(1, dtype=torch.int64)
        self._run("barrier", lambda: dist.all_reduce(flag, group=self._pg))

    def max_of(self, values: list[int], operation: str = "max_of") -> list[int]:
        """For each position, the largest value any rank passed there (one small all_reduce).

        Args:
            values: This rank's integers (int64); every rank passes as many.
            operation: The name an error gives the collective.

        Raises:
            CollectiveError: A rank died or did not arrive within the timeout.
        """
        tensor = torch.tensor(values, dtype=torch.int64)
        self._run(
            operation,
            lambda: dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=self._pg),
        )
        return [int(v) for v in tensor.tolist()]

    @property
    def name(self) -> str:
        """The gloo subgroup's name: the same on every rank, unique within the job."""
        return self._name

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called: every later collective is refused."""
        return self._closed

    @property
    def broken(self) -> str | None:
        """Why the group refuses every collective (an earlier one failed), or ``None``."""
        return self._broken

    def mark_broken(self, reason: str) -> None:
        """Refuse every later collective (after a failure that left the ranks out of step)."""
        if self._broken is None:
            self._broken = reason

    def failures(self, error: BaseException | None) -> list[tuple[int, str]]:
        """Gather each rank's outcome: the ranks that failed, and how.

        Args:
            error: This rank's error, or None if it succeeded.

        Returns:
            ``[(rank, "TypeName: message"), ...]`` for the ranks that passed an error,
            by rank; the same list on every rank (empty when all succeeded).

        Raises:
            CollectiveError: A rank died or did not answer within the timeout.
        """
        outcomes = self.all_gather_json(None if error is None else describe_failure(error))
        failed: list[tuple[int, str]] = []
        for rank, outcome in enumerate(outcomes):
            if outcome is None:
                continue
            if not isinstance(outcome, str):
                raise self._error("failures", TypeError(f"rank {rank} sent {outcome!r}"))
            failed.append((rank, outcome))
        return failed

    def close(self) -> None:
        """Let go of the gloo subgroup; later collectives raise. Idempotent.

        Unless a collective failed on it (then it is destroyed), the gloo group is kept
        (:mod:`ckpt.distributed.kept_groups`): a group of some of the ranks for the next
        :class:`RankGroup` over the same ranks (its ranks close and open theirs in the
        same order, as every collective call); a group of every rank alive but unused,
        since destroying it joins its threads (about 20 ms on 2 CPU ranks), which a
        manager's ``close()`` need not wait for. Those are never reused (a rank whose
        group failed would create a new one while the others took up the old).
        """
        if self._closed:
            return
        self._closed = True
        # Let go of the group here, not when this object is garbage collected: a manager
        # in a reference cycle is collected at any later allocation, possibly in a forked
        # DataLoader worker, where destroying a gloo group (whose threads the fork did not
        # copy) crashes the worker.
        group, self._held = self._held, None
        assert group is not None
        if self._broken is not None:
            destroy(group)
        else:
            keep(group, self._idle_key)

    def __enter__(self) -> RankGroup:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        size, timeout = self.world_size, self.timeout
        return f"RankGroup(rank={self.rank}, world_size={size}, timeout={timeout:g})"

    # -- internals -------------------------------------------------------------------

    @property
    def _pg(self) -> dist.ProcessGroup:
        """The gloo group (only until :meth:`close`; collectives check ``closed`` first)."""
        if self._held is None:
            raise RuntimeError(CLOSED)
        return self._held

    def _check_src(self, src: int) -> None:
        if isinstance(src, bool) or not isinstance(src, int) or not 0 <= src < self.world_size:
            last = self.world_size - 1
            raise ValueError(f"src must be a rank of the group (0 to {last}), got {src!r}")

    def _gather_lengths(self, payload: bytes | None) -> list[tuple[int, bytes]]:
        """Each rank's payload length (``wire.NOTHING``: none) and, if that fits, its bytes.

        A payload of at most :data:`INLINE_BYTES` travels with its length, in the same
        collective; every rank sees every length, so all of them know alike whether a
        second collective (:meth:`_gather_payloads`) follows.
        """
        mine = wire.pack(payload)
        parts = [torch.empty_like(mine) for _ in range(self.world_size)]
        dist.all_gather(parts, mine, group=self._pg)
        return [wire.unpack(part) for part in parts]

    def _gather_payloads(self, payload: bytes, lengths: list[int]) -> list[bytes]:
        """Every rank's whole payload, when one is longer than :data:`INLINE_BYTES`."""
        longest = max(lengths)
        buffer = torch.zeros(longest, dtype=torch.uint8)
        buffer[: len(payload)] = wire.as_tensor(payload)
        parts = [torch.empty(longest, dtype=torch.uint8) for _ in range(self.world_size)]
        self._run("all_gather_json", lambda: dist.all_gather(parts, buffer, group=self._pg))
        return [wire.as_bytes(part[:length]) for part, length in zip(parts, lengths, strict=True)]

    def _broadcast(
        self, operation: str, payload: bytes | None, src: int, error: TypeError | None
    ) -> bytes:
        """Broadcast ``payload`` (None: src has nothing valid) from ``src``.

        Its length goes first, with the payload itself when that is at most
        :data:`INLINE_BYTES` (one collective); a longer payload follows in a second.
        """
        head = wire.pack(payload if self.rank == src else b"")
        root = self._global[src]
        self._run(operation, lambda: dist.broadcast(head, src=root, group=self._pg))
        size, inline = wire.unpack(head)
        if size == wire.NOTHING:
            if error is not None:
                raise error
            raise self._error(operation, ValueError(f"rank {src} had nothing valid to send"))
        if size <= INLINE_BYTES:
            return inline[:size]
        if self.rank == src:
            buffer = wire.as_tensor(payload or b"")
        else:
            buffer = torch.empty(size, dtype=torch.uint8)
        self._run(operation, lambda: dist.broadcast(buffer, src=root, group=self._pg))
        return wire.as_bytes(buffer)

    def _run(self, operation: str, collective: Callable[[], _T]) -> _T:
        """Run one collective; any failure breaks the group and raises CollectiveError."""
        if self._closed:
            raise self._error(operation, RuntimeError(CLOSED))
        if self._broken is not None:
            earlier = RuntimeError(f"an earlier collective failed: {self._broken}")
            raise self._error(operation, earlier)
        try:
            return collective()
        except Exception as e:
            self._broken = f"{operation}: {type(e).__name__}: {e}"
            hint = (
                "; a rank died, left or did not answer within the timeout. This manager "
                "refuses every later collective: restart the job on every rank; "
                "restore() resumes from the newest committed step"
            )
            raise self._error(operation, e, hint) from e

    def _error(self, operation: str, cause: BaseException, hint: str = "") -> CollectiveError:
        return CollectiveError(
            f"{operation} failed on rank {getattr(self, 'rank', '?')} of "
            f"{getattr(self, 'world_size', '?')} (timeout {self.timeout:g} s): "
            f"{describe_failure(cause)}{hint}",
            operation=operation,
            rank=getattr(self, "rank", None),
            timeout=self.timeout,
        )


def _check_lengths(
    operation: str,
    lengths: list[int],
    encode_error: TypeError | None,
    group: RankGroup,
) -> None:
    """Raise on every rank when any rank had nothing valid to send."""
    bad = [r for r, length in enumerate(lengths) if length < 0]
    if not bad:
        return
    if encode_error is not None:
        raise encode_error
    raise group._error(operation, ValueError(f"rank(s) {bad} could not encode their value as JSON"))


def _decode(data: bytes, operation: str, rank: int, group: RankGroup) -> Json:
    try:
        return json.loads(data.decode("utf-8", "surrogatepass"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        bad = ValueError(f"rank {rank} sent bytes that are not JSON: {e}")
        raise group._error(operation, bad) from e


def describe_failure(error: BaseException) -> str:
    """``"TypeName: message"``, cut to MAX_FAILURE_CHARS; never raises (as ranks send errors)."""
    try:
        message = str(error)
    except Exception:
        message = "<unprintable message>"
    text = f"{type(error).__name__}: {message}" if message else type(error).__name__
    if len(text) > MAX_FAILURE_CHARS:
        text = text[: MAX_FAILURE_CHARS - 3] + "..."
    return text
