"""SIGKILL a process while it saves; afterwards only complete checkpoints exist.

Each trial runs in a child forked from a fork server (torch imported once).
After every kill this process checks the directory: every listed step passes
``verify`` and reads back exactly what was saved, the latest included; no
temporary directory is ever listed; a new writer then continues.
"""

from __future__ import annotations

import os
import random
import signal
import time

import crash_worker
import pytest
from conftest import assert_same_state
from crash_worker import ARMED_STEP, BIG_STEPS, KEEP_LAST, POINTS, STEPS, state

import ckpt
import ckpt.manager

SEED = int(os.environ.get("CKPT_KILL_SEED", random.SystemRandom().randrange(2**32)))
TRIALS = 100
S3_TRIALS = 8
SLOW_TRIALS = 1000


def launch(context, root, point=None, kill_after=None, options=None, big=False) -> int:
    process = context.Process(target=crash_worker.run, args=(str(root), point, options, big))
    process.start()
    process.join(timeout=kill_after)
    if process.exitcode is None and kill_after is not None:
        process.kill()
    process.join(timeout=120)
    assert process.exitcode is not None, "worker hung"
    return process.exitcode


def check_only_complete_checkpoints(root, context: str, options=None, big=False) -> list[int]:
    mgr = ckpt.CheckpointManager(root, storage_options=options)
    steps = mgr.all_steps()
    for step in steps:
        mgr.verify(step)
        assert_same_state(mgr.read(step)["data"], state(step, big))
    if steps:
        assert mgr.checkpoint().step == steps[-1]
    return steps


POINT_TRIALS = [
    ("makedirs", 1),
    ("write_file", 1),
    ("mid_write", 1),  # the header, before any tensor bytes
    ("mid_write", 2),  # between two tensors
    ("mid_write", 3),  # the last tensor
    ("write_file", 2),  # the manifest
    ("fsync", 1),  # the data file
    ("fsync", 2),  # the manifest
    ("fsync", 3),  # the temporary directory
    ("rename", 1),
    ("fsync", 4),  # the root, after the rename
    ("remove_manifest", 1),  # retention: the oldest step's manifest
    ("remove_tree", 1),  # retention: its files, after its manifest
]


def test_every_protocol_point_is_covered():
    assert {name for name, _ in POINT_TRIALS} == set(POINTS)


@pytest.mark.parametrize(("name", "nth"), POINT_TRIALS, ids=[f"{n}-{k}" for n, k in POINT_TRIALS])
def test_a_kill_at_each_point_of_the_commit_protocol_leaves_complete_checkpoints(
    tmp_path, forkserver, name, nth
):
    assert launch(forkserver, tmp_path, (name, nth)) == -signal.SIGKILL
    steps = check_only_complete_checkpoints(tmp_path, f"killed at {name} #{nth}")
    assert steps[-1] in (ARMED_STEP - 1, ARMED_STEP)  # the old latest, or the new one
    if name in ("remove_manifest", "remove_tree"):
        assert steps[-1] == ARMED_STEP
    assert launch(forkserver, tmp_path) == 0  # a new writer continues and cleans up
    assert check_only_complete_checkpoints(tmp_path, "after resuming") == list(
        range(STEPS - KEEP_LAST, STEPS)
    )
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".ckpt-tmp")]


def timed_trials(tmp_path, forkserver, trials: int) -> dict[str, int]:
    rng = random.Random(SEED)
    durations = []
    for run in range(3):  # the median of three uninterrupted runs: one slow run skews no trial
        began = time.monotonic()
        assert launch(forkserver, tmp_path / f"timing{run}") == 0
        durations.append(time.monotonic() - began)
    duration = sorted(durations)[1]
    counts = {"killed": 0, "finished": 0}
    root = tmp_path / "run0"
    for trial in range(trials):
        code = launch(forkserver, root, kill_after=rng.uniform(0, duration))
        counts["killed" if code == -signal.SIGKILL else "finished"] += 1
        assert code in (0, -signal.SIGKILL)
        steps = check_only_complete_checkpoints(root, f"trial {trial}, kill seed {SEED}")
        # Retention runs after each commit, so kills between a commit and its retention
        # can leave extra steps; the next save that completes removes them all.
        if code == 0:
            assert len(steps) <= KEEP_LAST, f"trial {trial}: retention left {steps}"
        if steps and steps[-1] == STEPS - 1:
            root = tmp_path / f"run{trial + 1}"  # finished: start a fresh run
    return counts


def test_kills_at_random_moments_leave_only_complete_checkpoints(tmp_path, forkserver):
    counts = timed_trials(tmp_path, forkserver, TRIALS)
    assert counts["killed"] >= TRIALS // 2, counts


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_many_more_kills_at_random_moments(tmp_path, forkserver):
    counts = timed_trials(tmp_path, forkserver, SLOW_TRIALS)
    assert counts["killed"] >= SLOW_TRIALS // 2, counts


@pytest.mark.s3
def test_kills_in_the_middle_of_s3_uploads_leave_only_complete_checkpoints(s3_bucket, forkserver):
    """12 MiB files go up in 5 MiB parts; kills land inside multipart uploads."""
    bucket, options = s3_bucket
    options = {**options, "default_block_size": 5 * 2**20}
    rng = random.Random(f"{SEED}-s3")
    began = time.monotonic()
    assert launch(forkserver, f"s3://{bucket}/timing", options=options, big=True) == 0
    duration = time.monotonic() - began
    killed, run = 0, 0
    for trial in range(S3_TRIALS):
        root = f"s3://{bucket}/run{run}"
        delay = rng.uniform(0, duration)
        code = launch(forkserver, root, kill_after=delay, options=options, big=True)
        killed += code == -signal.SIGKILL
        context = f"s3 trial {trial}, seed {SEED}"
        steps = check_only_complete_checkpoints(root, context, options, big=True)
        if steps and steps[-1] == BIG_STEPS - 1:
            run += 1  # finished: the next trial starts a fresh run
    assert killed >= S3_TRIALS // 2, killed
    mgr = ckpt.CheckpointManager(f"s3://{bucket}/run{run}", storage_options=options)
    mgr.save(BIG_STEPS + 1, data={"x": 1})  # a first save aborts unfinished uploads
    assert mgr._storage.fs.list_multipart_uploads(bucket) == []
    mgr.close()
