"""The resumed run of :func:`ckpt.verify_resume` in a new interpreter, and its parent's side.

The parent starts ``sys.executable -c`` with a JSON job (the callables as
``"module:function"``, the parent's ``sys.path``); the child restores, runs
and hands its trace back through ckpt's own format (tensors) and a JSON file
(digests): no pickle either way.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import traceback
from typing import Any

import ckpt.errors
from ckpt.manager import CheckpointManager
from ckpt.verification.trace import Leaf, Trace

__all__ = ["main", "run_in_fresh_process"]

_CODE = (
    "import sys; sys.path.insert(0, sys.argv[2]); "
    "from ckpt.verification.child import main; sys.exit(main(sys.argv[1]))"
)
_PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _pairs(digests: dict[Leaf, str]) -> list[list[str]]:
    return [[item, key, value] for (item, key), value in digests.items()]


def _unpairs(rows: list[list[str]]) -> dict[Leaf, str]:
    return {(item, key): value for item, key, value in rows}


def _save_trace(trace: Trace, result: str) -> None:
    final: dict[str, dict[str, Any]] = {}
    for (item, key), value in trace.final.items():
        final.setdefault(item, {})[key] = value
    with CheckpointManager(os.path.join(result, "state")) as manager:
        manager.save(0, rng=False, final=final, losses=dict(trace.losses))
    meta = {
        "first_step": trace.first_step,
        "digests": [_pairs(d) for d in trace.digests],
        "attributes": _pairs(trace.attributes),
        "restored": _pairs(trace.restored),
        "seconds": trace.seconds,
    }
    with open(os.path.join(result, "trace.json"), "w", encoding="utf-8") as f:
        json.dump(meta, f)


def _load_trace(result: str) -> Trace:
    with open(os.path.join(result, "trace.json"), encoding="utf-8") as f:
        meta = json.load(f)
    state = CheckpointManager(os.path.join(result, "state")).read(0)
    trace = Trace(first_step=meta["first_step"], seconds=meta["seconds"])
    trace.digests = [_unpairs(rows) for rows in meta["digests"]]
    trace.attributes = _unpairs(meta["attributes"])
    trace.restored = _unpairs(meta["restored"])
    trace.losses = {int(k): v for k, v in state["losses"].items()}
    trace.final = {(i, k): v for i, leaves in state["final"].items() for k, v in leaves.items()}
    return trace


def main(job_path: str) -> int:
    """Run the job in ``job_path`` (a JSON file); 0 on success, 1 with ``error.json`` written."""
    with open(job_path, encoding="utf-8") as f:
        job = json.load(f)
    sys.path[:] = job["sys_path"]
    result = job["result"]
    try:
        from ckpt.verification.runs import resolve, run_resumed  # noqa: PLC0415

        trace = run_resumed(
            resolve(job["build"]),
            resolve(job["step"]),
            job["steps"],
            job["save_at"],
            job["checkpoint"],
            job["storage_options"],
        )
        _save_trace(trace, result)
    except Exception as e:  # handed to the parent, which raises it
        message = "\n".join([str(e), *getattr(e, "__notes__", ())])
        where = traceback.format_exc(limit=-3)
        with open(os.path.join(result, "error.json"), "w", encoding="utf-8") as f:
            json.dump({"type": type(e).__name__, "message": message, "traceback": where}, f)
        return 1
    return 0


def run_in_fresh_process(
    build: str,
    step: str,
    steps: int,
    save_at: int,
    checkpoint: str,
    workdir: str,
    storage_options: dict[str, Any] | None,
    timeout: float | None = None,
) -> Trace:
    """Run the resumed run in ``sys.executable -c`` and return its trace.

    With ``timeout``, the child runs in a session of its own: past ``timeout``
    seconds it is killed with every process it started (DataLoader workers, ...).

    Raises:
        CheckpointError: The restore failed in the child (the same class).
        RuntimeError: The child's own code failed, or the child died.
        TimeoutError: The child ran past ``timeout``.
    """
    result = os.path.join(workdir, "resumed")
    os.makedirs(result)
    job = {
        "sys_path": [p if p else os.getcwd() for p in sys.path],
        "build": build,
        "step": step,
        "steps": steps,
        "save_at": save_at,
        "checkpoint": checkpoint,
        "result": result,
        "storage_options": storage_options,
    }
    job_path = os.path.join(workdir, "job.json")
    with open(job_path, "w", encoding="utf-8") as f:
        json.dump(job, f)
    done = _run_child([sys.executable, "-c", _CODE, job_path, _PACKAGE_ROOT], timeout)
    error_path = os.path.join(result, "error.json")
    if os.path.exists(error_path):
        with open(error_path, encoding="utf-8") as f:
            error = json.load(f)
        cls = getattr(ckpt.errors, error["type"], None)
        if isinstance(cls, type) and issubclass(cls, ckpt.errors.CheckpointError):
            raise cls(f"in the fresh process: {error['message']}")
        raise RuntimeError(
            f"the resumed run in a fresh process failed: {error['type']}: {error['message']}\n"
            + str(error.get("traceback", ""))[-3000:]
        )
    if done.returncode != 0:
        raise RuntimeError(
            f"the resumed run in a fresh process exited with status {done.returncode}:\n"
            + done.stderr[-4000:]
        )
    return _load_trace(result)


def _run_child(command: list[str], timeout: float | None) -> subprocess.CompletedProcess[str]:
    """Run ``command``; past ``timeout`` kill it with every process it started, and raise.

    Only with a timeout does the child get a session of its own (so that it can be
    killed with its processes): without one it stays in this process's group, where
    a scheduler or a terminal stopping the group stops it too.
    """
    child = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
        start_new_session=timeout is not None,
    )
    try:
        out, err = child.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(child.pid, signal.SIGKILL)
        _, err = child.communicate()
        raise TimeoutError(
            f"the resumed run in a fresh process ran past timeout={timeout:g} s and was "
            "killed, with the processes it started; a step hangs, or raise the timeout"
            + (f"; its last output:\n{err[-2000:]}" if err else "")
        ) from None
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            if timeout is None:
                child.kill()
            else:
                os.killpg(child.pid, signal.SIGKILL)
        child.wait()
        raise
    return subprocess.CompletedProcess(command, child.returncode, out, err)
