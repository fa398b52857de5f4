"""Pausing Python's cyclic garbage collector while a checkpoint is built or parsed.

Saving or restoring a state of many tensors creates tens of thousands of small
objects (JSON nodes, records, tensor handles). Each batch of allocations
triggers a collection that walks every tracked object, which made those calls
about twice as slow. None of these objects form cycles that need collecting
meanwhile, so the collector is paused for the call and resumed after it.
"""

from __future__ import annotations

import gc
import threading
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["paused_gc"]


class _Pauses:
    """How many pauses are active, and whether the collector ran before the first."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.depth = 0
        self.resume = False


_PAUSES = _Pauses()


@contextmanager
def paused_gc() -> Iterator[None]:
    """Disable the cyclic collector inside the block; nestable and thread-safe.

    The collector is re-enabled when the outermost pause ends, and only if it
    was enabled when the first one began.
    """
    with _PAUSES.lock:
        if _PAUSES.depth == 0:
            _PAUSES.resume = gc.isenabled()
            gc.disable()
        _PAUSES.depth += 1
    try:
        yield
    finally:
        with _PAUSES.lock:
            _PAUSES.depth -= 1
            if _PAUSES.depth == 0 and _PAUSES.resume:
                gc.enable()
