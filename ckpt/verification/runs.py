"""Running a training loop for :func:`ckpt.verify_resume`: reference, saving and resumed runs."""

from __future__ import annotations

import importlib
import time
from collections.abc import Callable, Mapping
from typing import Any

from ckpt.manager import CheckpointManager
from ckpt.verification.trace import Trace, attribute_digests, digest, snapshot

__all__ = [
    "BuildFn",
    "StepFn",
    "reference_of",
    "resolve",
    "run_reference",
    "run_resumed",
    "run_saving",
]

BuildFn = Callable[[], dict[str, Any]]
StepFn = Callable[[dict[str, Any], int], Any]


def resolve(target: Callable[..., Any] | str) -> Callable[..., Any]:
    """The callable ``target`` names: itself, or the function a ``"module:function"`` string names.

    Raises:
        ValueError: A string that is not ``"module:function"``, or names nothing.
        ImportError: Its module cannot be imported.
        TypeError: ``target`` (or what it names) is not callable.
    """
    if isinstance(target, str):
        module, sep, name = target.partition(":")
        if not sep or not module or not name:
            raise ValueError(f"expected 'module:function', got {target!r}")
        try:
            obj: Any = importlib.import_module(module)
        except ImportError as e:
            raise ImportError(f"cannot import {target!r}: {e}", name=e.name) from e
        for part in name.split("."):
            if not hasattr(obj, part):
                raise ValueError(f"{target!r} names nothing: {obj!r} has no attribute {part!r}")
            obj = getattr(obj, part)
        if not callable(obj):
            raise TypeError(f"{target!r} is not callable (it is a {type(obj).__name__})")
        return obj  # type: ignore[no-any-return]
    if not callable(target):
        raise TypeError(f"expected a callable or a 'module:function' string, got {target!r}")
    return target


def reference_of(target: Callable[..., Any] | str) -> str | None:
    """The ``"module:function"`` a new interpreter can import ``target`` by, or ``None``."""
    if isinstance(target, str):
        return target
    module = getattr(target, "__module__", None)
    name = getattr(target, "__qualname__", None)
    if not module or not name or module == "__main__" or "<" in name:
        return None
    return f"{module}:{name}"


def _build(build: BuildFn, run: str) -> dict[str, Any]:
    try:
        items = build()
    except Exception as e:
        e.add_note(f"raised by build() in the {run} of verify_resume")
        raise
    if not isinstance(items, dict):
        raise TypeError(
            "build() must return a dict of fresh items by name (e.g. {'model': model, "
            f"'optimizer': optimizer}}), got {type(items).__name__}"
        )
    for key, item in items.items():
        if not isinstance(key, str) or not key:
            raise TypeError(
                f"build() must return a dict of fresh items by name, got the key {key!r}: "
                "item names are non-empty strings"
            )
        _check_item(key, item)
    return items


def _check_item(name: str, item: Any) -> None:
    """Refuse an item ckpt cannot save, before the loop runs (a loader: save its sampler)."""
    if isinstance(item, Mapping) or (
        callable(getattr(item, "state_dict", None))
        and callable(getattr(item, "load_state_dict", None))
    ):
        return
    hint = (
        f"; for a DataLoader built by ckpt.resumable_loader, return {name}.sampler instead"
        if hasattr(item, "sampler") and hasattr(item, "dataset")
        else ""
    )
    raise TypeError(
        f"build() returned item {name!r}, a {type(item).__name__}: items are modules, "
        f"optimizers, objects with state_dict()/load_state_dict(), or dicts{hint}"
    )


def _run(
    items: dict[str, Any], step: StepFn, start: int, stop: int, trace: Trace, run: str
) -> None:
    for i in range(start, stop):
        began = time.perf_counter()
        try:
            loss = step(items, i)
        except Exception as e:
            e.add_note(f"raised by step(items, {i}) in the {run} of verify_resume")
            raise
        trace.seconds += time.perf_counter() - began
        try:
            trace.record(i, items, loss)
        except TypeError as e:  # a loss that is not a tensor, a number or None
            e.add_note(f"returned by step(items, {i}) in the {run} of verify_resume")
            raise


def run_reference(build: BuildFn, step: StepFn, steps: int) -> Trace:
    """Run steps ``0 .. steps-1`` without interruption."""
    trace = Trace(first_step=0)
    items = _build(build, "first uninterrupted run")
    _run(items, step, 0, steps, trace, "first uninterrupted run")
    trace.final = _cloned(snapshot(items))
    return trace


def _cloned(leaves: Mapping[Any, Any]) -> dict[Any, Any]:
    return {k: v.detach().clone() if hasattr(v, "detach") else v for k, v in leaves.items()}


def run_saving(
    build: BuildFn,
    step: StepFn,
    steps: int,
    save_at: int,
    directory: str,
    options: Mapping[str, Any],
) -> tuple[Trace, dict[str, Any]]:
    """Run all steps, saving after ``save_at`` into ``directory``; the second reference run.

    Returns:
        The trace (its ``attributes`` taken at ``save_at``) and the live items.
    """
    trace = Trace(first_step=0)
    run = "saving run"
    items = _build(build, run)
    with CheckpointManager(directory, **options) as manager:
        _run(items, step, 0, save_at + 1, trace, run)
        manager.save(save_at, **items)
        trace.attributes = attribute_digests(items)
        _run(items, step, save_at + 1, steps, trace, run)
        manager.wait()
    trace.final = _cloned(snapshot(items))
    return trace, items


def run_resumed(
    build: BuildFn,
    step: StepFn,
    steps: int,
    save_at: int,
    directory: str,
    storage_options: Mapping[str, Any] | None = None,
) -> Trace:
    """Build fresh items, restore ``save_at`` from ``directory`` and run to ``steps``.

    The trace's ``restored`` holds the digests right after the restore.
    """
    trace = Trace(first_step=save_at + 1)
    items = _build(build, "resumed run")
    manager = CheckpointManager(
        directory, storage_options=None if storage_options is None else dict(storage_options)
    )
    manager.restore(save_at, **items)
    trace.attributes = attribute_digests(items)
    trace.restored = {leaf: digest(value) for leaf, value in snapshot(items).items()}
    _run(items, step, save_at + 1, steps, trace, "resumed run")
    trace.final = _cloned(snapshot(items))
    return trace
