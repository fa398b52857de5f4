"""Progress bars: tqdm when the ``progress`` extra is installed, nothing otherwise.

Long operations take a ``progress`` flag (off by default in the API; the ``ckpt``
command line turns it on when stderr is a terminal) and report through
:func:`progress_bar`. Without tqdm, or when disabled, the bar is a no-op (or,
where the caller asks for ``line``, one plain line on stderr rewritten at most
twice a second), so callers never branch on it.
"""

from __future__ import annotations

import importlib
import sys
import time
from types import TracebackType
from typing import Any

__all__ = ["LineBar", "ProgressBar", "progress_bar", "tqdm_available"]

_LINE_EVERY = 0.5
"""Seconds between rewrites of a :class:`LineBar`."""


def tqdm_available() -> bool:
    """Whether tqdm (the ``progress`` extra: ``pip install ckpt[progress]``) can be imported."""
    try:
        importlib.import_module("tqdm")
    except ImportError:
        return False
    return True


class ProgressBar:
    """A progress bar that is a no-op unless it wraps a tqdm bar (or a :class:`LineBar`).

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


class LineBar:
    """A one-line progress report on stderr, for when tqdm is not installed (tqdm's methods)."""

    def __init__(self, total: int | None, desc: str, unit: str, unit_scale: bool) -> None:
        self.n = 0
        self._total = total
        self._desc = desc
        self._unit = unit
        self._scale = unit_scale
        self._postfix = ""
        self._shown = 0.0
        self._width = 0

    def _amount(self, n: int) -> str:
        if not self._scale or n < 1000:
            return str(n)
        value = float(n)
        for prefix in ("k", "M", "G", "T"):
            value /= 1000
            if value < 1000 or prefix == "T":
                break
        return f"{value:.1f}{prefix}"

    def update(self, n: int = 1) -> None:
        """Count ``n`` more units; rewrite the line if it is time."""
        self.n += n
        now = time.monotonic()
        if now - self._shown >= _LINE_EVERY or (self._total is not None and self.n >= self._total):
            self._shown = now
            self._show()

    def set_postfix_str(self, text: str, refresh: bool = True) -> None:
        """Show ``text`` after the count."""
        self._postfix = text
        if refresh:
            self._show()

    def _show(self) -> None:
        done = self._amount(self.n)
        total = "" if self._total is None else f"/{self._amount(self._total)}"
        percent = f" {100 * self.n // self._total:3d}%" if self._total else ""
        line = f"{self._desc}:{percent} {done}{total} {self._unit} {self._postfix}".rstrip()
        sys.stderr.write("\r" + line.ljust(self._width))
        sys.stderr.flush()
        self._width = len(line)

    def close(self) -> None:
        """Erase the line."""
        if self._width:
            sys.stderr.write("\r" + " " * self._width + "\r")
            sys.stderr.flush()
            self._width = 0


def progress_bar(
    total: int | None,
    desc: str,
    *,
    enabled: bool,
    unit: str = "it",
    unit_scale: bool = False,
    line: bool = False,
) -> ProgressBar:
    """Return a bar on stderr counting to ``total``, or a no-op one.

    Args:
        total: The number of units expected (``None`` when unknown).
        desc: A short label shown before the bar.
        enabled: Whether to show one at all; without tqdm nothing is shown (unless ``line``).
        unit: The unit counted (``"B"`` with ``unit_scale`` for bytes).
        unit_scale: Scale large counts (``1.2 GB``).
        line: Without tqdm, show a :class:`LineBar` instead of nothing.

    Returns:
        A :class:`ProgressBar`.
    """
    if not enabled:
        return ProgressBar()
    try:
        tqdm = importlib.import_module("tqdm")
    except ImportError:
        return ProgressBar(LineBar(total, desc, unit, unit_scale) if line else None)
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
