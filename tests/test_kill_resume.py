"""SIGKILL a training run at random points, resume it, and compare with a run never killed.

Every trial runs in its own process, forked from a long-lived fork server that
imported torch once. A trajectory is killed several times in a row: each
process resumes from the latest checkpoint and is killed again later, until one
finishes. Every step any process ran (steps after the last checkpoint run
twice) must log exactly what the uninterrupted run logged for that step: batch
indices, loss, lr, loss scale and random streams, bit for bit; and the final
model, optimizer and random streams must be identical.

The kill points are random on each run of the suite; set CKPT_KILL_SEED to
replay a run (the seed is in every failure message).
"""

from __future__ import annotations

import json
import os
import random
import signal
import time
from pathlib import Path

import kill_worker
import pytest
from kill_worker import PHASES, STEPS_PER_EPOCH, TOTAL_STEPS

CONFIGS = [
    "onecycle",
    "sequential",
    "plateau",
    "workers",
    "persistent-workers",
    "stateful-loader",
    "stateful-loader-workers",
]
KILLS_PER_TRAJECTORY = 8
TIMED_KILLS = 10
SEED = int(os.environ.get("CKPT_KILL_SEED", random.SystemRandom().randrange(2**32)))


def launch(context, *args, kill_after: float | None = None) -> int:
    """Run kill_worker.run(*args) in a forked child; SIGKILL it after ``kill_after`` seconds."""
    process = context.Process(target=kill_worker.run, args=args)
    process.start()
    if kill_after is not None:
        process.join(timeout=kill_after)
        if process.exitcode is None:
            _kill_group(process.pid)
    process.join(timeout=120)
    _kill_group(process.pid)  # DataLoader workers a killed run left behind
    if process.exitcode is None:
        process.kill()
        pytest.fail(f"worker hung (kill seed {SEED})")
    return process.exitcode


def _kill_group(pid: int) -> None:
    """SIGKILL a run's process group; just the run if it has not made its group yet."""
    for kill in (os.killpg, os.kill):
        try:
            kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            continue
        return


def kill_points(rng: random.Random, count: int) -> list[tuple[int, str]]:
    """``count`` kill points at increasing steps: at least one at an epoch's last step,
    one at an epoch's first step, and the rest anywhere, in any phase."""
    last = [s for s in range(TOTAL_STEPS - 1) if (s + 1) % STEPS_PER_EPOCH == 0]
    first = [s for s in range(1, TOTAL_STEPS - 1) if s % STEPS_PER_EPOCH == 0]
    steps = {rng.choice(last), rng.choice(first)}
    while len(steps) < count:
        steps.add(rng.randrange(TOTAL_STEPS - 1))
    points = []
    for step in sorted(steps):
        phases = PHASES if step in last else PHASES[:3]
        points.append((step, rng.choice(phases)))
    return points


def read_log(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def run_trajectory(context, directory: Path, config: str, kills, *, restore_rng=True):
    log = directory.with_suffix(".log")
    for point in kills:
        code = launch(context, str(directory), config, point, str(log), restore_rng)
        assert code == -signal.SIGKILL, f"not killed at {point} (kill seed {SEED}): exit {code}"
    assert launch(context, str(directory), config, None, str(log), restore_rng) == 0
    return read_log(log)


def compare(reference: list[dict], trajectory: list[dict], context: str) -> None:
    by_step = {r["step"]: r for r in reference if "step" in r}
    assert sorted(by_step) == list(range(TOTAL_STEPS))
    seen = set()
    for record in trajectory:
        if "step" in record:
            assert record == by_step[record["step"]], f"{context}: step {record['step']} differs"
            seen.add(record["step"])
    assert seen == set(by_step), f"{context}: steps never run: {set(by_step) - seen}"
    assert trajectory[-1] == reference[-1], f"{context}: final state differs"


@pytest.mark.parametrize("config", CONFIGS)
def test_killed_and_resumed_runs_match_an_uninterrupted_run(tmp_path, forkserver, config):
    check_killed_trajectory(tmp_path, forkserver, config, random.Random(f"{SEED}-{config}"))


@pytest.mark.slow
@pytest.mark.parametrize("trial", range(10))
@pytest.mark.parametrize("config", ["workers", "persistent-workers", "stateful-loader-workers"])
def test_many_killed_runs_with_dataloader_workers_match(tmp_path, forkserver, config, trial):
    check_killed_trajectory(tmp_path, forkserver, config, random.Random(f"{SEED}-{config}-{trial}"))


def check_killed_trajectory(tmp_path, forkserver, config: str, rng: random.Random) -> None:
    """Kill one trajectory at random points; it must match an uninterrupted run."""
    kills = kill_points(rng, KILLS_PER_TRAJECTORY)
    assert (
        launch(forkserver, str(tmp_path / "straight"), config, None, str(tmp_path / "ref.log")) == 0
    )
    reference = read_log(tmp_path / "ref.log")

    trajectory = run_trajectory(forkserver, tmp_path / "killed", config, kills)

    starts = [r["start"] for r in trajectory if "start" in r]
    assert (
        len(starts) == KILLS_PER_TRAJECTORY + 1
        and starts[0] == 0
        and starts[1:] != [0] * KILLS_PER_TRAJECTORY
    )
    compare(reference, trajectory, f"{config}, kills {kills}, kill seed {SEED}")


def test_the_comparison_detects_a_resume_without_random_streams(tmp_path, forkserver):
    kills = [(4, "after_step"), (11, "mid_step")]
    launch(forkserver, str(tmp_path / "straight"), "onecycle", None, str(tmp_path / "ref.log"))
    reference = read_log(tmp_path / "ref.log")
    trajectory = run_trajectory(
        forkserver, tmp_path / "killed", "onecycle", kills, restore_rng=False
    )
    with pytest.raises(AssertionError, match="differs"):
        compare(reference, trajectory, "rng off")


def test_runs_killed_at_random_moments_by_another_process_resume_exactly(tmp_path, forkserver):
    """The parent SIGKILLs a run after a random delay: anywhere, in the middle of saves too."""
    rng = random.Random(f"{SEED}-timed")
    began = time.monotonic()
    launch(forkserver, str(tmp_path / "straight"), "onecycle", None, str(tmp_path / "ref.log"))
    duration = time.monotonic() - began
    reference = read_log(tmp_path / "ref.log")
    kills = trajectories = 0
    while kills < TIMED_KILLS:
        trajectories += 1
        directory = tmp_path / f"killed{trajectories}"
        codes = []
        while not codes or codes[-1] != 0:
            delay = rng.uniform(0, duration)
            codes.append(
                launch(
                    forkserver,
                    str(directory),
                    "onecycle",
                    None,
                    str(directory) + ".log",
                    kill_after=delay,
                )
            )
            assert codes[-1] in (0, -signal.SIGKILL), codes
        kills += codes.count(-signal.SIGKILL)
        compare(
            reference,
            read_log(directory.with_suffix(".log")),
            f"timed kills {codes}, kill seed {SEED}",
        )
