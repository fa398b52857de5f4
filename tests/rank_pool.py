"""Multi-rank test harness: a pool of gloo ranks started once, and fresh ranks for kill tests.

Starting a process group costs a process and a gloo rendezvous per rank; on a
2-core machine that is most of a distributed test's time. :class:`RankPool` starts
``world_size`` workers once (forked from the session's fork server, torch already
imported), each joined to a gloo default group over loopback, and runs test
functions on every rank::

    def gather(rank, world_size, scale):          # module level, in a test module
        return rank * scale

    def test_gather(rank_pool):
        assert rank_pool.run(gather, 10) == [0, 10]

A function is sent by module and qualified name, so it must be defined at module
level of an importable module (test modules are: pytest puts ``tests/`` on
``sys.path`` before the fork server starts). Arguments and results travel by
pickle between the test process and its workers (the harness, not ckpt).

After any failure (an exception on a rank, a rank that died, a call past its
timeout) the workers are killed and a fresh pool starts with the next call, so one
test's broken group never leaks into the next. :func:`run_fresh_ranks` starts new
ranks for one function and reports each rank's exit code, for tests that SIGKILL a
rank or need a group of their own.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import multiprocessing
import multiprocessing.connection
import os
import pickle
import threading
import time
import traceback
from collections.abc import Callable, Mapping
from datetime import timedelta
from typing import Any

__all__ = ["PoolError", "RankError", "RankOutcome", "RankPool", "run_fresh_ranks"]

_INIT_TIMEOUT = 60.0  # seconds for a worker to join the default group


class PoolError(RuntimeError):
    """A rank died or a call ran past its timeout; the pool's workers were killed."""


class RankError(Exception):
    """A test function raised on one or more ranks.

    Attributes:
        failures: ``{rank: "TypeName: message\\n<remote traceback>"}``.
        exceptions: ``{rank: the exception}`` for those that could travel back.
    """

    def __init__(self, function: str, failures: dict[int, str], exceptions: dict[int, Any]):
        self.failures = failures
        self.exceptions = exceptions
        parts = [f"rank {rank} raised in {function}:\n{text}" for rank, text in failures.items()]
        super().__init__("\n".join(parts))


@dataclasses.dataclass
class RankOutcome:
    """What one fresh rank did.

    Attributes:
        rank: The rank.
        exitcode: Its exit code (negative: killed by that signal); None if it was
            still running at the timeout (then killed, and ``timed_out`` is True).
        result: What the function returned (None if it raised or died).
        error: ``"TypeName: message\\n<traceback>"`` if the function raised, else None.
        exception: The exception itself, when it could travel back.
        returned: Whether the function returned (False if it raised, died or hung).
        timed_out: Whether the rank was still running at the timeout.
    """

    rank: int
    exitcode: int | None
    result: Any = None
    error: str | None = None
    exception: BaseException | None = None
    returned: bool = False
    timed_out: bool = False


def default_context() -> multiprocessing.context.BaseContext:
    """The process's fork server, as it is (in pytest, pass the ``forkserver`` fixture instead).

    The preloads are left to whoever starts the server (conftest's ``forkserver``
    fixture preloads torch, torch.distributed, ckpt and this module), since a
    process has one fork server and the first start wins.
    """
    return multiprocessing.get_context("forkserver")


def function_reference(fn: Callable[..., Any]) -> tuple[str, str]:
    """``(module, qualified name)`` of a module-level function, checked to resolve to ``fn``."""
    module, qualname = getattr(fn, "__module__", None), getattr(fn, "__qualname__", "")
    if not module or module == "__main__" or "<locals>" in qualname or "<lambda>" in qualname:
        raise ValueError(f"{fn!r} must be a module-level function of an importable module")
    if _resolve(module, qualname) is not fn:
        raise ValueError(f"{module}.{qualname} does not resolve to {fn!r}")
    return module, qualname


class RankPool:
    """``world_size`` worker processes joined in a gloo default group, reused across tests.

    Not thread-safe: one call at a time. Workers start on the first :meth:`run` (or
    :meth:`start`) and again after any failure.

    Args:
        world_size: The number of ranks.
        context: A multiprocessing context; the fork server (with torch preloaded) when None.
        env: Environment variables set in every worker before it joins the group.
    """

    def __init__(
        self,
        world_size: int = 2,
        *,
        context: multiprocessing.context.BaseContext | None = None,
        env: Mapping[str, str] | None = None,
    ) -> None:
        if world_size < 1:
            raise ValueError(f"world_size must be at least 1, got {world_size}")
        self.world_size = world_size
        self.context = context or default_context()
        self.env = dict(env or {})
        self.starts = 0  # how many times workers were started (1 + restarts)
        self._workers: list[_Worker] = []
        self._store: Any = None

    @property
    def running(self) -> bool:
        """Whether workers are up (they start on the next call otherwise)."""
        return bool(self._workers)

    def start(self) -> None:
        """Start the workers and wait until each has joined the group (no-op if running)."""
        if self._workers:
            return
        self._store = _master_store()
        self.starts += 1
        try:
            self._workers = _start_workers(
                self.context, self.world_size, self._store.port, self.env, serve=True
            )
            deadline = time.monotonic() + _INIT_TIMEOUT
            replies = _collect(self._workers, deadline)
            for worker, reply in zip(self._workers, replies, strict=True):
                if reply is None or reply[0] != "ready":
                    raise PoolError(
                        f"rank {worker.rank} did not join the group: {_why(worker, reply)}"
                    )
        except BaseException:
            self.kill()
            raise

    def run(
        self, fn: Callable[..., Any], *args: Any, timeout: float = 120.0, **kwargs: Any
    ) -> list[Any]:
        """Run ``fn(rank, world_size, *args, **kwargs)`` on every rank at once.

        Args:
            fn: A module-level function.
            *args: Its arguments after ``rank, world_size`` (picklable).
            timeout: Seconds the call may take on all ranks together.
            **kwargs: Its keyword arguments (picklable).

        Returns:
            Each rank's result, by rank.

        Raises:
            RankError: ``fn`` raised on a rank (the message holds every failed rank's
                traceback); the workers restart with the next call.
            PoolError: A rank died or the call ran past ``timeout``; workers killed.
        """
        reference = function_reference(fn)
        self.start()
        name = ".".join(reference)
        try:
            for worker in self._workers:
                worker.conn.send(("call", reference, args, kwargs))
            replies = _collect(self._workers, time.monotonic() + timeout)
        except BaseException:
            self.kill()
            raise
        pairs = list(zip(self._workers, replies, strict=True))
        if any(reply is None for reply in replies):
            self.kill()
            problems = [
                f"rank {w.rank} {_why(w, r)}" for w, r in pairs if r is None or r[0] != "ok"
            ]
            message = f"{name} did not complete within {timeout:g} s on every rank:\n"
            raise PoolError(message + "\n".join(problems))
        failed = [(w.rank, r) for w, r in pairs if r is not None and r[0] == "error"]
        if failed:
            self.close()  # the group may be out of step: start afresh next time
            failures = {rank: r[1] for rank, r in failed}
            raise RankError(name, failures, {rank: r[2] for rank, r in failed if r[2] is not None})
        return [reply[1] for reply in replies if reply is not None]

    def close(self) -> None:
        """Stop the workers; the next call starts new ones."""
        for worker in self._workers:
            with contextlib.suppress(OSError):
                worker.conn.send(("exit",))
        deadline = time.monotonic() + 2.0
        for worker in self._workers:
            worker.process.join(max(0.0, deadline - time.monotonic()))
        self.kill()

    def kill(self) -> None:
        """SIGKILL every worker and forget them; the next call starts new ones."""
        _kill(self._workers)
        self._workers = []
        self._store = None

    def __enter__(self) -> RankPool:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def run_fresh_ranks(
    fn: Callable[..., Any],
    world_size: int = 2,
    timeout: float = 60.0,
    *,
    args: tuple[Any, ...] = (),
    kwargs: Mapping[str, Any] | None = None,
    env: Mapping[str, str] | None = None,
    context: multiprocessing.context.BaseContext | None = None,
) -> list[RankOutcome]:
    """Run ``fn(rank, world_size, *args, **kwargs)`` once on new ranks with a new gloo group.

    Each rank exits right after ``fn`` (0 if it returned, 1 if it raised); a rank may
    kill itself. Ranks still running at ``timeout`` are SIGKILLed; none is left behind.

    Args:
        fn: A module-level function.
        world_size: The number of ranks.
        timeout: Seconds for all ranks together, start-up included.
        args: Positional arguments after ``rank, world_size``.
        kwargs: Keyword arguments.
        env: Environment variables set in each rank before it joins the group.
        context: A multiprocessing context; the fork server when None.

    Returns:
        One :class:`RankOutcome` per rank, by rank.
    """
    reference = function_reference(fn)
    store = _master_store()
    workers = _start_workers(
        context or default_context(), world_size, store.port, env or {}, serve=False
    )
    deadline = time.monotonic() + timeout
    try:
        for worker in workers:
            worker.conn.send(("call", reference, args, dict(kwargs or {})))
        replies = _collect(workers, deadline, skip_ready=True)
    finally:
        for worker in workers:  # they exit by themselves once they replied
            worker.process.join(max(0.1, min(5.0, deadline - time.monotonic())))
        alive = [w for w in workers if w.process.is_alive()]
        _kill(workers)
    outcomes = []
    for worker, reply in zip(workers, replies, strict=True):
        outcome = RankOutcome(worker.rank, None if worker in alive else worker.process.exitcode)
        outcome.timed_out = worker in alive
        if reply is not None and reply[0] == "ok":
            outcome.result, outcome.returned = reply[1], True
        elif reply is not None and reply[0] == "error":
            outcome.error, outcome.exception = reply[1], reply[2]
        outcomes.append(outcome)
    return outcomes


# -- parent side ---------------------------------------------------------------------


@dataclasses.dataclass(eq=False)
class _Worker:
    rank: int
    process: Any
    conn: multiprocessing.connection.Connection
    lifeline: multiprocessing.connection.Connection


def _master_store() -> Any:
    """A TCP store on a free loopback port, held by this process for the workers' rendezvous."""
    import torch.distributed as dist

    return dist.TCPStore(
        "127.0.0.1", 0, None, True, timedelta(seconds=_INIT_TIMEOUT), wait_for_workers=False
    )


def _start_workers(
    context: multiprocessing.context.BaseContext,
    world_size: int,
    port: int,
    env: Mapping[str, str],
    *,
    serve: bool,
) -> list[_Worker]:
    workers = []
    try:
        for rank in range(world_size):
            conn, child_conn = context.Pipe()
            alive_r, alive_w = context.Pipe(duplex=False)
            process = context.Process(  # type: ignore[attr-defined]
                target=_worker_main,
                args=(rank, world_size, port, dict(env), child_conn, alive_r, serve),
                name=f"rank-{rank}",
                daemon=True,
            )
            process.start()
            child_conn.close()
            alive_r.close()
            workers.append(_Worker(rank, process, conn, alive_w))
    except BaseException:
        _kill(workers)
        raise
    return workers


def _collect(
    workers: list[_Worker], deadline: float, *, skip_ready: bool = False
) -> list[tuple[Any, ...] | None]:
    """One reply per worker, or None for a worker that died or did not answer by ``deadline``."""
    replies: dict[int, tuple[Any, ...] | None] = {}
    waiting = {w.conn: w for w in workers}
    while waiting:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        for conn in multiprocessing.connection.wait(list(waiting), timeout=remaining):
            worker = waiting[conn]  # type: ignore[index]
            try:
                reply = conn.recv()  # type: ignore[union-attr]
            except (EOFError, OSError):
                reply = None
            if skip_ready and reply is not None and reply[0] == "ready":
                continue
            replies[worker.rank] = reply
            del waiting[conn]  # type: ignore[arg-type]
    return [replies.get(w.rank) for w in workers]


def _why(worker: _Worker, reply: tuple[Any, ...] | None) -> str:
    if reply is not None and reply[0] == "error":
        return f"raised {reply[1]}"
    if reply is not None:
        return f"answered {reply!r}"[:2000]
    worker.process.join(0.2)
    code = worker.process.exitcode
    if code is None:
        return "did not answer in time (killed)"
    return f"died with exit code {code}"


def _kill(workers: list[_Worker]) -> None:
    for worker in workers:
        if worker.process.is_alive():
            worker.process.kill()
    for worker in workers:
        worker.process.join(10.0)
        worker.conn.close()
        worker.lifeline.close()


# -- worker side ---------------------------------------------------------------------


def _resolve(module: str, qualname: str) -> Any:
    obj: Any = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def _watch_parent(lifeline: multiprocessing.connection.Connection) -> None:
    """Exit at once when the test process goes away (its end of the lifeline closes)."""
    with contextlib.suppress(EOFError, OSError):
        lifeline.recv()
    os._exit(70)


def _worker_main(
    rank: int,
    world_size: int,
    port: int,
    env: dict[str, str],
    conn: multiprocessing.connection.Connection,
    lifeline: multiprocessing.connection.Connection,
    serve: bool,
) -> None:
    threading.Thread(target=_watch_parent, args=(lifeline,), daemon=True).start()
    os.environ.update(
        {"MASTER_ADDR": "127.0.0.1", "RANK": str(rank), "WORLD_SIZE": str(world_size)}
    )
    if os.path.isdir("/sys/class/net/lo"):
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # loopback only
    os.environ.update(env)
    import torch.distributed as dist

    store = dist.TCPStore("127.0.0.1", port, None, False, timedelta(seconds=_INIT_TIMEOUT))
    dist.init_process_group(
        "gloo", store=store, rank=rank, world_size=world_size,
        timeout=timedelta(seconds=_INIT_TIMEOUT),
    )  # fmt: skip
    conn.send(("ready",))
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            break
        if message[0] != "call":
            break
        _, (module, qualname), args, kwargs = message
        reply = _call(rank, world_size, module, qualname, args, kwargs)
        try:
            # Plain pickle, not multiprocessing's: tensors travel by value, not as shared
            # memory a worker that exits right after (fresh ranks) would take with it.
            conn.send_bytes(pickle.dumps(reply))
        except Exception as e:  # an unpicklable result or exception
            conn.send(("error", f"its reply could not be sent back: {_describe(e)}", None))
        if not serve:
            conn.close()
            os._exit(0 if reply[0] == "ok" else 1)  # never wait on a group a peer may have left
    os._exit(0)  # no teardown of the group: a peer may be gone, and the process ends anyway


def _call(
    rank: int, world_size: int, module: str, qualname: str, args: Any, kwargs: Any
) -> tuple[Any, ...]:
    try:
        result = _resolve(module, qualname)(rank, world_size, *args, **kwargs)
    except BaseException as e:
        text = f"{_describe(e)}\n{''.join(traceback.format_exception(e))}"
        return ("error", text, _portable(e))
    return ("ok", result)


def _portable(error: BaseException) -> BaseException | None:
    """The exception if it survives a round trip through pickle (the harness's, not ckpt's)."""
    import pickle

    try:
        pickle.loads(pickle.dumps(error))
    except Exception:
        return None
    error.__traceback__ = None
    return error


def _describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"
