"""SIGKILL a process while it copies steps to a second tier: every tier lists complete steps only.

Each trial forks a worker (tests/tier_worker.py) from the fork server and kills
it after a random delay, most often while a copy streams into the second tier.
After every kill each step listed in either tier verifies and reads back exactly
what was saved; at the end a manager that runs to completion finishes the
pending copies, and the second tier holds no leftover of a killed copy.
"""

from __future__ import annotations

import os
import random
import signal

import pytest
import tier_worker
from conftest import assert_same_state

import ckpt

SEED = int(os.environ.get("CKPT_KILL_SEED", random.SystemRandom().randrange(2**32)))
TRIALS = 50
SLOW_TRIALS = 500
S3_TRIALS = 20


def launch(
    context, first, second, kill_after: float | None, more: int = 10**6, options=None
) -> int | None:
    """Run the worker; SIGKILL it ``kill_after`` seconds after its first save committed."""
    started = context.Event()
    process = context.Process(
        target=tier_worker.run, args=(str(first), str(second), more, started, options)
    )
    process.start()
    if kill_after is not None:
        assert started.wait(timeout=120), "worker never saved"
    process.join(timeout=kill_after)
    if process.exitcode is None and kill_after is not None:
        process.kill()
    process.join(timeout=120)
    assert process.exitcode is not None, "worker hung"
    return process.exitcode


def check_tiers(first, second, context: str, options=None) -> None:
    for root, opts in ((first, None), (second, options)):
        reader = ckpt.CheckpointReader(root, storage_options=opts)
        for step in reader.all_steps():  # read checks every checksum
            assert_same_state(reader.read(step)["data"], tier_worker.state(step)), context


def run_trials(context, tmp_path, trials: int, second=None, options=None) -> None:
    rng = random.Random(SEED)
    first = tmp_path / "t0"
    second = tmp_path / "t1" if second is None else second
    mid_copy = 0
    for trial in range(trials):
        code = launch(context, first, second, rng.uniform(0.0, 0.15), options=options)
        assert code == -signal.SIGKILL, f"seed {SEED} trial {trial}: exit code {code}"
        check_tiers(first, second, f"seed {SEED} trial {trial}", options)
        if options is None:  # a temporary directory left in the tier: killed mid-copy
            mid_copy += any(n.startswith(".ckpt-tmp") for n in os.listdir(second))
    print(f"seed {SEED}: {mid_copy} of {trials} kills left a partial copy")
    assert options is not None or mid_copy > 0, f"seed {SEED}: no kill landed mid-copy"
    # A run to the end finishes the pending copies and cleans up what the kills left.
    assert launch(context, first, second, None, more=2, options=options) == 0
    check_tiers(first, second, f"seed {SEED} final", options)
    newest = ckpt.CheckpointReader(first).latest_step()
    assert newest is not None
    steps = ckpt.CheckpointReader(second, storage_options=options).all_steps()
    assert steps == list(range(newest - tier_worker.KEEP_SECOND + 1, newest + 1))
    if options is None:
        assert [n for n in os.listdir(second) if n.startswith(".ckpt-tmp")] == []


def test_kills_during_copies_leave_complete_steps_in_every_tier(tmp_path, forkserver):
    run_trials(forkserver, tmp_path, TRIALS)


@pytest.mark.slow
def test_kills_during_copies_many_trials(tmp_path, forkserver):
    run_trials(forkserver, tmp_path, SLOW_TRIALS)


@pytest.mark.slow
def test_kills_during_copies_to_s3(tmp_path, forkserver, s3_bucket):
    bucket, options = s3_bucket
    run_trials(forkserver, tmp_path, S3_TRIALS, f"s3://{bucket}/run", options)
