"""Hostile use of managers in a process group: misuse is refused with errors that say what to do.

Functions named ``on_ranks_*`` run on the ranks (tests/rank_pool.py).
"""

from __future__ import annotations

import pytest
from dist_training import make

import ckpt
from ckpt.cli import main

pytestmark = pytest.mark.distributed


def on_ranks_closed_on_rank_0_only(rank: int, world: int, root: str) -> str:
    """Rank 0 closes its manager, then both ranks save: the error each rank raises."""
    model, _, _ = make("ddp")
    mgr = ckpt.CheckpointManager(root, handshake_timeout=3, collective_timeout=30)
    if rank == 0:
        mgr.close()
    try:
        mgr.save(0, model=model)
    except ckpt.CollectiveError as e:
        return str(e)
    finally:
        mgr.close()
    raise AssertionError("save() of a manager closed on rank 0 succeeded")


def test_a_manager_closed_on_one_rank_only_is_refused_and_named(rank_pool, tmp_path):
    closed, waiting = rank_pool.run(on_ranks_closed_on_rank_0_only, str(tmp_path), timeout=60)
    assert "CheckpointManager was closed" in closed
    assert "creates a new CheckpointManager" in closed
    assert "rank(s) [0]" in waiting and "handshake_timeout" in waiting
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(("step_", ".ckpt-tmp"))]


def on_ranks_should_save_different_steps(rank: int, world: int, root: str) -> tuple[str, bool]:
    """Rank r asks about step 5 + r with a clock to agree on, then both about step 7."""
    with ckpt.CheckpointManager(root, every_seconds=1000.0, handshake_timeout=30) as mgr:
        with pytest.raises(ValueError) as raised:
            mgr.should_save(5 + rank)
        return str(raised.value), mgr.should_save(7)


def test_should_save_with_different_steps_is_refused_on_every_rank(rank_pool, tmp_path):
    results = rank_pool.run(on_ranks_should_save_different_steps, str(tmp_path), timeout=60)
    for rank, (message, answer) in enumerate(results):
        assert "different steps (from 5 to 6" in message
        assert f"rank {rank} passed {5 + rank}" in message
        assert "same step" in message
        assert answer is False  # the agreement still works afterwards


@pytest.mark.parametrize("command", ["info", "verify", "diff", "ls"])
def test_the_cli_pointed_at_a_step_directory_names_the_root_to_pass(tmp_path, capsys, command):
    model, _, _ = make("none")
    with ckpt.CheckpointManager(tmp_path) as mgr:
        mgr.save(7, model=model)
    step_dir = str(tmp_path / "step_000000000007")
    argv = [command, step_dir] + ([step_dir] if command == "diff" else [])
    main(argv)
    captured = capsys.readouterr()
    assert f"pass the checkpoint root, with the step if you want that one: {tmp_path}:7" in (
        captured.err
    )


def test_a_second_writer_in_the_same_process_is_told_it_holds_the_lock(tmp_path):
    from ckpt.retention import RetentionPolicy

    model, _, _ = make("none")
    with ckpt.CheckpointManager(tmp_path) as mgr:
        mgr.save(0, model=model)
        writer = ckpt.CheckpointWriter(tmp_path)
        with writer, pytest.raises(ckpt.CheckpointLockedError) as raised:
            writer.prune(RetentionPolicy(keep_last=1))
    assert "it is this process, through another CheckpointManager" in str(raised.value)
    assert "close() it first" in str(raised.value)
