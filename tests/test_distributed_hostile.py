"""Hostile use of managers in a process group: misuse is refused with errors that say what to do.

Functions named ``on_ranks_*`` run on the ranks (tests/rank_pool.py).
"""

from __future__ import annotations

import pytest
from dist_training import make

import ckpt

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
