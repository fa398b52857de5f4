"""Tiered checkpoints: commit to the first (fastest) root, copy to slower ones in the background.

See ``docs/tiers.md``.
"""

from __future__ import annotations

from ckpt.tiers.copier import Copier
from ckpt.tiers.tier import Tier

__all__ = ["Copier", "Tier"]
