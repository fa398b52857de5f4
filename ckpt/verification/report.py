"""Comparing two runs bit for bit, and the :class:`ResumeReport` of :func:`ckpt.verify_resume`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ckpt.errors import InexactResumeError
from ckpt.verification.trace import Leaf, Trace, digest

__all__ = ["LOSS_ITEM", "Difference", "ResumeReport", "compare_traces"]

LOSS_ITEM = "loss"
"""The item name under which differences of the returned losses are reported."""


@dataclass(frozen=True)
class Difference:
    """One tensor or value that differs between two runs.

    Attributes:
        item: The item (``"loss"`` for the returned loss, ``"random streams"`` for
            the random streams).
        key: The key path inside the item's state (dot-separated).
        step: The first step after which the two runs differ there.
        max_abs_diff: The largest absolute difference where it was measurable (at
            ``step`` for a loss, after the last step for state), else ``None``.
    """

    item: str
    key: str
    step: int
    max_abs_diff: float | None = None

    def __str__(self) -> str:
        where = f"{self.item}: {self.key}" if self.key else self.item
        size = "" if self.max_abs_diff is None else f", max abs difference {self.max_abs_diff:.3g}"
        return f"{where} (from step {self.step}{size})"

    def to_json(self) -> dict[str, Any]:
        """As a JSON-able dict."""
        return {
            "item": self.item,
            "key": self.key,
            "step": self.step,
            "max_abs_diff": self.max_abs_diff,
        }


def _max_abs(a: Any, b: Any) -> float | None:
    if not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor) or a.shape != b.shape:
        if isinstance(a, (int, float)) and isinstance(b, (int, float)):
            return abs(float(a) - float(b))
        return None
    if a.numel() == 0 or a.is_complex() or b.is_complex():
        return None
    diff = (a.detach().cpu().double() - b.detach().cpu().double()).abs()
    return float(diff.max())


def compare_traces(a: Trace, b: Trace, start: int, stop: int) -> list[Difference]:
    """The leaves and losses that differ between ``a`` and ``b`` after steps ``start .. stop-1``.

    Sorted by first differing step, then item and key.
    """
    first: dict[Leaf, int] = {}
    for step in range(start, stop):
        da, db = a.digests_at(step) or {}, b.digests_at(step) or {}
        for leaf in da.keys() | db.keys():
            if leaf not in first and da.get(leaf) != db.get(leaf):
                first[leaf] = step
    out = [
        Difference(i, k, s, _max_abs(a.final.get((i, k)), b.final.get((i, k))))
        for (i, k), s in first.items()
    ]
    for step in range(start, stop):
        la, lb = a.losses.get(step), b.losses.get(step)
        if (la is None) != (lb is None) or (la is not None and digest(la) != digest(lb)):
            out.append(Difference(LOSS_ITEM, "", step, _max_abs(la, lb)))
            break
    return sorted(out, key=lambda d: (d.step, d.item, d.key))


def _listed(differences: list[Difference], limit: int = 8) -> list[str]:
    lines = [f"  - {d}" for d in differences[:limit]]
    if len(differences) > limit:
        lines.append(f"  ... and {len(differences) - limit} more")
    return lines


@dataclass
class ResumeReport:
    """What :func:`ckpt.verify_resume` found.

    Attributes:
        exact: The resumed run matched the uninterrupted one bit for bit (state,
            random streams, losses, data position), and the loop is deterministic.
        deterministic: Two uninterrupted runs matched bit for bit (and, when the
            resumed run departed, a second resume from the same checkpoint repeated
            that departure exactly).
        differences: Where the resumed run departed from the uninterrupted one.
        reference_differences: Where runs that should be equal departed from each
            other: two uninterrupted runs (the loop's own nondeterminism, no
            checkpoint involved), or else two resumes from the same checkpoint.
        diagnosis: Likely causes, in words, with what to do.
        steps: The number of steps of each run.
        save_at: The step after which the checkpoint was saved.
        fresh_process: Whether the resumed run ran in a new interpreter.
        seconds: Wall times: ``"plain"`` (the steps of one uninterrupted run),
            ``"total"`` (the whole verification).
    """

    exact: bool
    deterministic: bool
    differences: list[Difference]
    reference_differences: list[Difference]
    diagnosis: list[str]
    steps: int
    save_at: int
    fresh_process: bool
    seconds: dict[str, float] = field(default_factory=dict)

    def __str__(self) -> str:
        where = "a fresh process" if self.fresh_process else "this process"
        head = f"resume after step {self.save_at} of {self.steps} (in {where}): "
        if self.exact:
            return head + "exact, bit for bit"
        lines = [head + "NOT exact"]
        if not self.deterministic:
            lines.append("the loop is not deterministic; runs that should be equal differ:")
            lines += _listed(self.reference_differences)
        if self.differences:
            lines.append("the resumed run differs from the uninterrupted one:")
            lines += _listed(self.differences)
        lines += [f"diagnosis: {d}" for d in self.diagnosis]
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        """As a JSON-able dict (the ``ckpt verify-resume --json`` output)."""
        return {
            "exact": self.exact,
            "deterministic": self.deterministic,
            "steps": self.steps,
            "save_at": self.save_at,
            "fresh_process": self.fresh_process,
            "differences": [d.to_json() for d in self.differences],
            "reference_differences": [d.to_json() for d in self.reference_differences],
            "diagnosis": list(self.diagnosis),
            "seconds": dict(self.seconds),
        }

    def raise_if_inexact(self) -> None:
        """Raise :class:`~ckpt.InexactResumeError` (with this report) unless ``exact``."""
        if self.exact:
            return
        found = self.reference_differences or self.differences
        first = found[0] if found else None
        raise InexactResumeError(
            str(self),
            key=None if first is None else f"{first.item}/{first.key}".rstrip("/"),
            report=self,
        )
