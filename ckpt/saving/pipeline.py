"""The save pipeline: validate -> capture -> layout -> commit, and the background saver."""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import secrets
import sys
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch

from ckpt.format import Manifest, step_dir_name
from ckpt.format.header import ManifestHeader
from ckpt.format.limits import check_metrics
from ckpt.saving.commit import commit_checkpoint, file_token
from ckpt.state.items import assemble_manifest, capture, check_flags, check_item_name
from ckpt.state.optim import module_param_names
from ckpt.state.rng import RNG_ITEM, RandomStreams
from ckpt.storage import Storage

__all__ = ["Saver", "capture_save", "check_save_args", "commit_and_log", "set_thread_nice"]

logger = logging.getLogger(__name__)

Files = dict[str, dict[str, torch.Tensor]]
"""Tensors to write: ``{file name: {tensor name: tensor}}``."""


def check_save_args(
    step: int,
    epoch: int | None,
    metrics: Mapping[str, float | int] | None,
    rng: bool,
    overwrite: bool,
    items: Mapping[str, Any],
    reserved: Iterable[str],
) -> tuple[str, dict[str, float | int]]:
    """Validate ``save``'s arguments; return the step's directory name and the checked metrics.

    Raises:
        TypeError: A flag is not a bool, or an item name is not a string.
        ValueError: A bad step, epoch, metric or item name, or no item at all.
    """
    step_name = step_dir_name(step)
    if epoch is not None and (isinstance(epoch, bool) or not isinstance(epoch, int)):
        raise ValueError(f"epoch must be an int or None, got {epoch!r}")
    checked_metrics = check_metrics(metrics)
    check_flags(rng=rng, overwrite=overwrite)
    if not items:
        raise ValueError("save() needs at least one item, e.g. save(step, model=model)")
    for name in items:
        check_item_name(name, reserved)
    return step_name, checked_metrics


def capture_save(
    storage: Storage,
    step: int,
    epoch: int | None,
    metrics: dict[str, float | int],
    rng: bool,
    overwrite: bool,
    items: dict[str, Any],
) -> tuple[Files, Manifest, str]:
    """Capture every item (and the random streams when ``rng``) and lay out its files.

    Returns:
        The files to write, the manifest describing them, and the save's token.
    """
    if rng:
        items[RNG_ITEM] = RandomStreams()
    modules = {n: o for n, o in items.items() if isinstance(o, torch.nn.Module)}
    param_names = module_param_names(modules)
    captured = {name: capture(name, obj, param_names) for name, obj in items.items()}
    token = secrets.token_hex(4)
    header = ManifestHeader.now()
    files, manifest = assemble_manifest(
        step,
        epoch,
        metrics,
        captured,
        created_at=header.created_at,
        versions=header.versions,
        file_token=file_token(storage, token, overwrite=overwrite),
    )
    return files, manifest, token


def commit_and_log(
    storage: Storage,
    step: int,
    files: Files,
    manifest: Manifest,
    token: str,
    overwrite: bool,
    guard: Callable[[], None] | None,
    start: float,
) -> Manifest:
    """Write and commit one checkpoint (:func:`~ckpt.saving.commit.commit_checkpoint`); log it."""
    manifest = commit_checkpoint(
        storage, step, files, manifest, token=token, overwrite=overwrite, guard=guard
    )
    nbytes = sum(r.size for r in manifest.files.values())
    logger.info(
        "saved step %d to %s (%d bytes in %.3f s)",
        step,
        storage.url_of(step_dir_name(step)),
        nbytes,
        time.perf_counter() - start,
    )
    return manifest


class Saver:
    """Runs at most one save in a background thread.

    A failure in the background is kept and raised by the next ``wait()``.
    Not thread-safe: one caller drives it, one save in flight at a time.

    The thread is a daemon, finished at the interpreter's exit (see :func:`_finish_at_exit`):
    a process that exits normally still commits its save in flight; a ``collective``
    saver's save is abandoned when the main thread died of an uncaught exception, so a
    failed rank never waits on its peers.

    Args:
        collective: The saves run collectives with other ranks.
    """

    def __init__(self, collective: bool = False) -> None:
        self.pending: threading.Thread | None = None
        self.collective = collective
        self._error: BaseException | None = None
        _SAVERS.add(self)

    def start(
        self, step: int, finish: Callable[..., object], args: tuple[Any, ...], nice: int | None
    ) -> None:
        """Run ``finish(*args)`` (the save of ``step``) in a background thread at ``nice``."""
        self.pending = threading.Thread(
            target=self._run,
            args=(step, finish, args, nice),
            name=f"ckpt-save-{step}",
            daemon=True,  # finished by _finish_at_exit, unless a collective save's process failed
        )
        self.pending.start()

    def _run(
        self, step: int, finish: Callable[..., object], args: tuple[Any, ...], nice: int | None
    ) -> None:
        if nice is not None:
            set_thread_nice(nice)
        try:
            finish(*args)
        except BaseException as e:
            logger.error("background save of step %d failed: %s", step, e)
            self._error = e

    def wait(self) -> None:
        """Block until the save in flight has finished; raise what it raised (once)."""
        pending, self.pending = self.pending, None
        if pending is not None:
            pending.join()
        error, self._error = self._error, None
        if error is not None:
            raise error


def set_thread_nice(nice: int) -> None:
    """Set the calling thread's CPU niceness (Linux applies it per thread)."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), nice)
    except (AttributeError, OSError) as e:  # not Linux, or lowering it is not permitted
        logger.debug("the background writer keeps its CPU priority: %s", e)


_SAVERS: weakref.WeakSet[Saver] = weakref.WeakSet()
"""Every live saver, for :func:`_finish_at_exit`."""


def _finish_at_exit() -> None:
    """At interpreter exit, wait for the saves in flight (their threads are daemons).

    After an uncaught exception in the main thread, a collective save is abandoned
    instead: its peers may be gone or stuck, and the rank must exit (its attempt is
    removed by the next save; the previous checkpoint stays the latest). The process
    then exits at once with status 1, as for any uncaught exception, after flushing
    logs and standard streams: finalizing the interpreter while the abandoned thread
    sits in a collective would abort the process instead.
    """
    crashed = getattr(sys, "last_value", None) or getattr(sys, "last_exc", None)
    abandoned = False
    for saver in list(_SAVERS):
        thread = saver.pending
        if thread is None or not thread.is_alive():
            continue
        if crashed is not None and saver.collective:
            logger.error(
                "%s: the main thread raised %s; the collective save in flight is abandoned",
                thread.name,
                type(crashed).__name__,
            )
            abandoned = True
            continue
        logger.info("%s: finishing the save in flight before the process exits", thread.name)
        thread.join()
    if abandoned:
        logging.shutdown()
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os._exit(1)


atexit.register(_finish_at_exit)
