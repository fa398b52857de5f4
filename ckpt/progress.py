"""Progress bars: tqdm when the ``progress`` extra is installed, nothing otherwise.

Long operations take a ``progress`` flag (off by default in the API; the ``ckpt``
command line turns it on when stderr is a terminal) and report through
:func:`progress_bar`. Without tqdm, or when disabled, the bar is a no-op, so
callers never branch on it.
"""

from __future__ import annotations

import importlib
import sys
from types import TracebackType
from typing import Any

__all__ = ["ProgressBar", "progress_bar", "tqdm_available"]


def tqdm_available() -> bool:
    """Whether tqdm (the ``progress`` extra: ``pip install ckpt[progress]``) can be imported."""
    try:
        importlib.import_module("tqdm")
    except ImportError:
        return False
    return True


class ProgressBar:
    """A progress bar that is a no-op unless it wraps a tqdm bar.

    Not thread-safe: update it from the thread that created it. Use it as a
    context manager, or call :meth:`close`.
    """

    def __init__(self, bar: Any = None) -> None:
        self._bar = bar

    @property
    def active(self) -> bool:
        """Whether a real bar is shown."""
        return self._bar is not None

    def update(self, n: int = 1) -> None:
        """Advance the bar by ``n`` units."""
        if self._bar is not None:
            self._bar.update(n)

    def describe(self, text: str) -> None:
        """Show ``text`` after the bar (the current file, step or tensor)."""
        if self._bar is not None:
            self._bar.set_postfix_str(text, refresh=False)

    def close(self) -> None:
        """Remove the bar; idempotent."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> ProgressBar:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def progress_bar(
    total: int | None, desc: str, *, enabled: bool, unit: str = "it", unit_scale: bool = False
) -> ProgressBar:
    """Return a bar on stderr counting to ``total``, or a no-op one.

    Args:
        total: The number of units expected (``None`` when unknown).
        desc: A short label shown before the bar.
        enabled: Whether to show one at all; without tqdm nothing is shown either way.
        unit: The unit counted (``"B"`` with ``unit_scale`` for bytes).
        unit_scale: Scale large counts (``1.2 GB``).

    Returns:
        A :class:`ProgressBar`.
    """
    if not enabled:
        return ProgressBar()
    try:
        tqdm = importlib.import_module("tqdm")
    except ImportError:
        return ProgressBar()
    bar = tqdm.tqdm(
        total=total,
        desc=desc,
        unit=unit,
        unit_scale=unit_scale,
        file=sys.stderr,
        leave=False,
        dynamic_ncols=True,
    )
    return ProgressBar(bar)
