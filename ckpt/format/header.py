"""The manifest header every save writes: when, and by which versions of ckpt, torch and Python.

Built here and nowhere else, for saves from one process and from several ranks
alike (the coordinator builds it once and sends it to the other ranks).
"""

from __future__ import annotations

import dataclasses
import platform
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

import torch

from ckpt._version import __version__

if TYPE_CHECKING:
    from ckpt.format.records import Manifest

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

    @classmethod
    def of(cls, manifest: Manifest) -> ManifestHeader:
        """The header ``manifest`` was saved with (kept when a step is copied or re-sealed)."""
        return cls(manifest.created_at, dict(manifest.versions))

    def to_json(self) -> dict[str, Any]:
        """The header as JSON (inside a commit attempt)."""
        return {"created_at": self.created_at, "versions": dict(self.versions)}

    @classmethod
    def from_json(cls, doc: Any) -> ManifestHeader:
        """The header :meth:`to_json` described.

        Raises:
            KeyError, TypeError: ``doc`` is not such a description.
        """
        return cls(doc["created_at"], dict(doc["versions"]))
