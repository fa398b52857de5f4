"""The manifest header every save writes: when, and by which versions of ckpt, torch and Python.

Built here and nowhere else, for saves from one process and from several ranks
alike (the coordinator builds it once and sends it to the other ranks).
"""

from __future__ import annotations

import dataclasses
import platform
from datetime import datetime, timezone

import torch

from ckpt._version import __version__

__all__ = ["ManifestHeader"]


@dataclasses.dataclass(frozen=True)
class ManifestHeader:
    """A manifest's ``created_at`` and ``versions`` fields.

    Immutable, so safe to share between threads.
    """

    created_at: str
    """When the save started: ISO 8601 in UTC, to the microsecond."""
    versions: dict[str, str]
    """``{"ckpt": ..., "torch": ..., "python": ...}``."""

    @classmethod
    def now(cls) -> ManifestHeader:
        """The header of a save starting now, in this process."""
        return cls(
            created_at=datetime.now(timezone.utc).isoformat(timespec="microseconds"),
            versions={
                "ckpt": __version__,
                "torch": torch.__version__,
                "python": platform.python_version(),
            },
        )
