"""Retention policy: a pure function of the committed steps and their metrics."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ckpt.policies.retention import RetentionPolicy, best_steps, steps_to_delete


def delete(committed, just_saved, metrics=None, **policy):
    return steps_to_delete(
        committed, just_saved=just_saved, policy=RetentionPolicy(**policy), metrics=metrics
    )


@pytest.mark.parametrize(
    ("committed", "just_saved", "keep_last", "deleted"),
    [
        ([1, 2, 3], 3, None, []),
        ([1, 2, 3], 3, 1, [1, 2]),
        ([1, 2, 3], 3, 5, []),
        ([10, 2, 100, 9], 100, 2, [2, 9]),
        ([1, 5, 9], 1, 2, []),  # an older step just saved is kept
        ([1, 5, 9, 3], 3, 1, [1, 5]),
    ],
)
def test_keep_last(committed, just_saved, keep_last, deleted):
    assert delete(committed, just_saved, keep_last=keep_last) == deleted


def test_keep_every_keeps_completed_multiples():
    assert delete(range(10), 9, keep_every=4, keep_last=1) == [0, 1, 2, 4, 5, 6, 8]
    assert delete(range(10), 9, keep_every=4) == [0, 1, 2, 4, 5, 6, 8]


def test_keep_best_ranks_by_the_metric_and_ignores_missing_or_nan():
    metrics = {0: {"loss": 3.0}, 1: {"loss": 1.0}, 2: {"loss": math.nan}, 3: {}, 4: {"loss": 2.0}}
    assert delete(range(6), 5, metrics, keep_best=2, best_metric="loss") == [0, 2, 3]
    assert delete(range(6), 5, metrics, keep_best=1, best_metric="loss", best_mode="max") == [
        1,
        2,
        3,
        4,
    ]


def test_rules_combine_as_a_union():
    metrics = {s: {"acc": s % 3} for s in range(12)}
    gone = delete(range(12), 11, metrics, keep_last=2, keep_every=5, keep_best=1,
                  best_metric="acc", best_mode="max")  # fmt: skip
    assert sorted(set(range(12)) - set(gone)) == [4, 9, 10, 11]  # best: 11 (a tie with 2, 5, 8)


def test_ties_keep_the_newer_step():
    assert best_steps({1: {"m": 0}, 2: {"m": 0}}, "m", 1, "min") == {2}


@pytest.mark.parametrize(
    "kwargs",
    [
        {"keep_last": 0},
        {"keep_every": True},
        {"keep_best": 2},
        {"best_metric": "loss"},
        {"keep_best": 1, "best_metric": "loss", "best_mode": "lowest"},
    ],
)
def test_bad_policies_are_refused(kwargs):
    with pytest.raises(ValueError):
        RetentionPolicy(**kwargs)


@given(
    steps=st.sets(st.integers(0, 50), min_size=1, max_size=20),
    keep_last=st.none() | st.integers(1, 5),
    keep_every=st.none() | st.integers(1, 7),
    keep_best=st.none() | st.integers(1, 3),
    values=st.lists(st.floats(allow_nan=True) | st.none(), min_size=51, max_size=51),
    pick=st.integers(0, 19),
)
def test_never_deletes_the_newest_the_just_saved_or_a_best(
    steps, keep_last, keep_every, keep_best, values, pick
):
    ordered = sorted(steps)
    just_saved = ordered[pick % len(ordered)]
    metrics = {s: ({} if values[s] is None else {"m": values[s]}) for s in ordered}
    policy = {"keep_last": keep_last, "keep_every": keep_every}
    if keep_best is not None:
        policy.update(keep_best=keep_best, best_metric="m")
    gone = delete(ordered, just_saved, metrics, **policy)
    assert set(gone) <= set(ordered)
    assert ordered[-1] not in gone and just_saved not in gone
    if keep_best is not None:
        assert not best_steps(metrics, "m", keep_best, "min") & set(gone)
    if keep_last is not None:
        assert not set(ordered[-keep_last:]) & set(gone)
