"""Proving that a training loop resumes exactly: :func:`verify_resume` and its report.

The machinery (runs, a fresh interpreter, diagnosis) is imported on the first call.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from ckpt.verification.report import Difference, ResumeReport

__all__ = ["Difference", "ResumeReport", "verify_resume"]


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
    """Check that a training loop resumed from a checkpoint continues bit for bit.

    Runs the loop uninterrupted for ``steps`` steps; runs it again, saving after
    step ``save_at`` with a :class:`~ckpt.CheckpointManager` into a temporary
    directory (this run goes on to ``steps`` and is the second uninterrupted
    run); then builds fresh items (in a new interpreter when ``fresh_process``),
    restores and runs to ``steps``. After every step it compares every tensor and
    value of every item's state (parameters, buffers, optimizer, scheduler,
    scaler, sampler position), the random streams (Python, NumPy, torch CPU, every
    CUDA device) and the returned loss, bitwise. When the two uninterrupted runs
    differ, the report says so: the loop is not deterministic, and the resume is
    not blamed. The global random streams are set to their state at the call
    before each run, and back to it at the end.

    Args:
        build: Returns a dict of fresh items (model, optimizer, scheduler, scaler,
            ``loader.sampler``, dicts), as the training script builds them. With
            ``fresh_process``, a module-level function or a ``"module:function"`` string.
        step: ``step(items, i)`` runs training step ``i`` and may return the loss (a
            tensor or number). Same rules as ``build``.
        steps: Steps in each run (at least 2).
        save_at: The step after which the checkpoint is saved, in ``[0, steps - 1)``.
        fresh_process: Resume in a new interpreter (``sys.executable``), as a real
            restart does; ``False`` resumes in this process, with freshly built items.
        manager_options: Options for the saving ``CheckpointManager`` (``async_save``, ...).
        timeout: Seconds the resumed run in a fresh process may take (``None``: no
            limit); past it the process is killed, with those it started. A run in
            this process (``fresh_process=False``) cannot be bounded.

    Returns:
        The report; ``report.raise_if_inexact()`` fails a test with it.

    Raises:
        ValueError: Bad ``steps``/``save_at``/options, or ``fresh_process`` with a
            callable a new interpreter cannot import (a lambda, a nested function,
            one defined in ``__main__``).
        CheckpointError: Saving or restoring failed.
        TimeoutError: The resumed run in a fresh process ran past ``timeout``.

    Example:
        >>> report = ckpt.verify_resume("train:build", "train:step", steps=6, save_at=2)
        >>> report.raise_if_inexact()
    """
    from ckpt.verification.verify import verify_resume as run  # noqa: PLC0415

    return run(
        build,
        step,
        steps=steps,
        save_at=save_at,
        fresh_process=fresh_process,
        manager_options=manager_options,
        timeout=timeout,
    )
