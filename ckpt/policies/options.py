"""Checks of the manager's construction options that no policy object owns."""

from __future__ import annotations

from typing import Any

__all__ = ["check_manager_options"]


def check_manager_options(
    *, storage_options: Any, agree_every: object, background_nice: object
) -> None:
    """Refuse a malformed option before anything is opened.

    Raises:
        TypeError: ``storage_options`` is not a dict (or ``None``).
        ValueError: ``agree_every`` is not a positive int, or ``background_nice`` is
            neither ``None`` nor an int in 0..19.
    """
    if storage_options is not None and not isinstance(storage_options, dict):
        raise TypeError("storage_options must be a dict")
    if isinstance(agree_every, bool) or not isinstance(agree_every, int) or agree_every < 1:
        raise ValueError(f"agree_every must be a positive int, got {agree_every!r}")
    if background_nice is not None and (
        isinstance(background_nice, bool)
        or not isinstance(background_nice, int)
        or not 0 <= background_nice <= 19
    ):
        raise ValueError(f"background_nice must be None or 0..19, got {background_nice!r}")
