"""Retention: which committed checkpoints to delete after a save. Pure functions."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from ckpt.format.limits import float64_value

__all__ = ["RetentionPolicy", "steps_to_delete"]


@dataclass(frozen=True)
class RetentionPolicy:
    """Which checkpoints to keep; a checkpoint is kept when any rule keeps it.

    Attributes:
        keep_last: Keep the ``keep_last`` newest steps.
        keep_every: Keep every step that completes a multiple of ``keep_every``
            steps (``(step + 1) % keep_every == 0``, as ``every_steps`` saves them).
        keep_best: Keep the ``keep_best`` checkpoints with the best ``best_metric``.
        best_metric: The metric (as passed to ``save(metrics=...)``) that ranks them.
        best_mode: ``"min"`` (lower is better, the default) or ``"max"``.

    With no rule set, everything is kept. The newest checkpoint and the one just
    saved are always kept.
    """

    keep_last: int | None = None
    keep_every: int | None = None
    keep_best: int | None = None
    best_metric: str | None = None
    best_mode: str = "min"

    def __post_init__(self) -> None:
        for name in ("keep_last", "keep_every", "keep_best"):
            value = getattr(self, name)
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, int) or value < 1
            ):
                raise ValueError(f"{name} must be a positive int or None, got {value!r}")
        if (self.keep_best is None) != (self.best_metric is None):
            raise ValueError("keep_best and best_metric go together: set both or neither")
        if self.best_metric is not None and not isinstance(self.best_metric, str):
            raise ValueError(f"best_metric must be a str, got {self.best_metric!r}")
        if self.best_mode not in ("min", "max"):
            raise ValueError(f"best_mode must be 'min' or 'max', got {self.best_mode!r}")

    @property
    def keeps_all(self) -> bool:
        """No rule is set: nothing is ever deleted."""
        return self.keep_last is None and self.keep_every is None and self.keep_best is None


def best_steps(
    metrics: Mapping[int, Mapping[str, object]], metric: str, k: int, mode: str
) -> set[int]:
    """The ``k`` steps with the best ``metric``; ties go to the newer step.

    Only values that are finite float64 numbers rank: a step whose value is
    missing, NaN, infinite, an int beyond float64's range or not a number (an old
    or hand-edited manifest) is never among the best, and never raises.
    """
    scored = [
        (value, step)
        for step, values in metrics.items()
        if (value := float64_value(values.get(metric))) is not None
    ]
    if mode == "min":
        scored.sort(key=lambda vs: (vs[0], -vs[1]))
    else:
        scored.sort(key=lambda vs: (-vs[0], -vs[1]))
    return {step for _, step in scored[:k]}


def steps_to_delete(
    committed: Iterable[int],
    *,
    just_saved: int,
    policy: RetentionPolicy,
    metrics: Mapping[int, Mapping[str, object]] | None = None,
) -> list[int]:
    """Return the committed steps that retention deletes, ascending.

    Args:
        committed: Steps that are committed, including ``just_saved``.
        just_saved: The step whose save triggered retention.
        policy: The rules.
        metrics: ``{step: metrics}`` of the committed steps, for ``keep_best``.
    """
    steps = sorted(set(committed))
    if policy.keeps_all or not steps:
        return []
    keep = {steps[-1], just_saved}
    if policy.keep_last is not None:
        keep.update(steps[-policy.keep_last :])
    if policy.keep_every is not None:
        keep.update(s for s in steps if (s + 1) % policy.keep_every == 0)
    if policy.keep_best is not None and policy.best_metric is not None:
        keep |= best_steps(metrics or {}, policy.best_metric, policy.keep_best, policy.best_mode)
    return [s for s in steps if s not in keep]
