"""Retention policy: a pure function of the committed steps."""

from __future__ import annotations

import pytest

from ckpt.retention import steps_to_delete


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
def test_steps_to_delete(committed, just_saved, keep_last, deleted):
    assert steps_to_delete(committed, just_saved=just_saved, keep_last=keep_last) == deleted


def test_never_deletes_the_newest_or_the_just_saved():
    for keep in range(1, 5):
        for saved in range(6):
            gone = steps_to_delete(range(6), just_saved=saved, keep_last=keep)
            assert 5 not in gone and saved not in gone
