"""SaveCadence: a pure policy of steps and seconds."""

from __future__ import annotations

import pytest

from ckpt.policies.cadence import SaveCadence


def test_every_steps_counts_completed_steps_from_zero():
    cadence = SaveCadence(every_steps=3)
    due = [s for s in range(10) if cadence.due(s, seconds_since_save=0.0)]
    assert due == [2, 5, 8]


def test_every_seconds_is_due_once_the_time_has_passed():
    cadence = SaveCadence(every_seconds=60)
    assert not cadence.due(0, seconds_since_save=59.9)
    assert cadence.due(0, seconds_since_save=60.0)


def test_either_condition_suffices_and_neither_means_never():
    both = SaveCadence(every_steps=100, every_seconds=10)
    assert both.due(99, seconds_since_save=0) and both.due(5, seconds_since_save=11)
    assert not both.due(5, seconds_since_save=1)
    assert not SaveCadence().due(99, seconds_since_save=1e9)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"every_steps": 0},
        {"every_steps": True},
        {"every_steps": 1.5},
        {"every_seconds": 0},
        {"every_seconds": float("nan")},
        {"every_seconds": float("inf")},
        {"every_seconds": "60"},
    ],
)
def test_bad_settings_are_refused(kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        SaveCadence(**kwargs)
