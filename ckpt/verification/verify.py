"""``verify_resume``: prove, bit for bit, that a training loop resumes exactly."""

from __future__ import annotations

import logging
import os
import tempfile
import time
from collections.abc import Callable, Mapping
from typing import Any

from ckpt.state.rng import capture_rng_state, set_rng_state
from ckpt.verification.child import run_in_fresh_process
from ckpt.verification.diagnosis import diagnose, outside_state
from ckpt.verification.report import ResumeReport, compare_traces
from ckpt.verification.runs import (
    reference_of,
    resolve,
    run_reference,
    run_resumed,
    run_saving,
)
from ckpt.verification.trace import Trace

__all__ = ["verify_resume"]

logger = logging.getLogger(__name__)


def _check_args(steps: object, save_at: object, manager_options: object) -> dict[str, Any]:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 2:
        raise ValueError(f"steps must be an int >= 2, got {steps!r}")
    if isinstance(save_at, bool) or not isinstance(save_at, int) or not 0 <= save_at < steps - 1:
        raise ValueError(f"save_at must be an int in [0, steps - 1), got {save_at!r}")
    if manager_options is not None and not isinstance(manager_options, Mapping):
        raise TypeError("manager_options must be a dict of CheckpointManager options")
    options = dict(manager_options or {})
    if "directory" in options:
        raise ValueError("manager_options cannot set directory: verify_resume uses a temporary one")
    return options


def _references(build: object, step: object, fresh_process: bool) -> tuple[str, str] | None:
    """The ``"module:function"`` names a new interpreter imports (``None`` in process)."""
    if not fresh_process:
        return None
    refs = (reference_of(build), reference_of(step))  # type: ignore[arg-type]
    if refs[0] is None or refs[1] is None:
        raise ValueError(
            "fresh_process=True needs build and step as module-level functions of an importable "
            "module (not __main__, a lambda or a nested function) or 'module:function' strings; "
            "or pass fresh_process=False"
        )
    return refs[0], refs[1]


def verify_resume(
    build: Callable[[], dict[str, Any]] | str,
    step: Callable[[dict[str, Any], int], Any] | str,
    *,
    steps: int,
    save_at: int,
    fresh_process: bool = True,
    manager_options: Mapping[str, Any] | None = None,
    timeout: float | None = None,
) -> ResumeReport:
    """Check that a loop resumes exactly: :func:`ckpt.verify_resume` (documented there)."""
    options = _check_args(steps, save_at, manager_options)
    _check_timeout(timeout)
    build_fn, step_fn = resolve(build), resolve(step)
    refs = _references(build, step, fresh_process)
    initial = capture_rng_state()
    began = time.perf_counter()
    storage = options.get("storage_options")

    def resume(workdir: str) -> Trace:
        set_rng_state(initial)
        if refs is not None:
            os.makedirs(workdir)
            return run_in_fresh_process(
                refs[0], refs[1], steps, save_at, checkpoint, workdir, storage, timeout
            )
        return run_resumed(build_fn, step_fn, steps, save_at, checkpoint, storage)

    repeated = False
    try:
        with tempfile.TemporaryDirectory(prefix="ckpt-verify-resume-") as root:
            checkpoint = os.path.join(root, "checkpoints")
            set_rng_state(initial)
            reference = run_reference(build_fn, step_fn, steps)
            set_rng_state(initial)
            saving, items = run_saving(build_fn, step_fn, steps, save_at, checkpoint, options)
            outside = outside_state([build_fn, step_fn], items)
            resumed = resume(os.path.join(root, "first"))
            reference_differences = compare_traces(reference, saving, 0, steps)
            differences = compare_traces(reference, resumed, save_at + 1, steps)
            if differences and not reference_differences:
                # The uninterrupted runs agreed; is the departure itself repeatable?
                again = resume(os.path.join(root, "second"))
                unstable = compare_traces(resumed, again, save_at + 1, steps)
                if unstable or not compare_traces(reference, again, save_at + 1, steps):
                    repeated = True
                    reference_differences = unstable or differences
    finally:
        set_rng_state(initial)
    diagnosis = diagnose(
        reference_differences, differences, outside, items, saving, resumed, save_at, repeated
    )
    total = time.perf_counter() - began
    report = ResumeReport(
        exact=not reference_differences and not differences,
        deterministic=not reference_differences,
        differences=differences,
        reference_differences=reference_differences,
        diagnosis=diagnosis,
        steps=steps,
        save_at=save_at,
        fresh_process=fresh_process,
        seconds={"plain": reference.seconds, "total": total},
    )
    logger.info("verify_resume: %s (%.2f s)", "exact" if report.exact else "NOT exact", total)
    return report


def _check_timeout(timeout: float | None) -> None:
    if timeout is None:
        return
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
        raise TypeError(f"timeout must be a number of seconds or None, got {timeout!r}")
    if not timeout > 0 or timeout == float("inf"):
        raise ValueError(f"timeout must be a positive, finite number of seconds: {timeout!r}")
