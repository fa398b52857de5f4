"""Multi-rank flows tried as a new or hostile user writes them from the docs.

Each test is a failure found that way, fixed. Functions named ``on_ranks_*`` run
on the ranks (tests/rank_pool.py).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import ckpt

pytestmark = pytest.mark.distributed


def on_ranks_save_a_model_built_differently(rank: int, world: int, root: str) -> str:
    """Each rank builds its own plain model, rank 1's last layer wider: a save of it."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(7, 13), nn.ReLU(), nn.Linear(13, 5 + rank))
    with ckpt.CheckpointManager(root) as mgr:
        with pytest.raises(ckpt.CheckpointError) as failed:
            mgr.save(1, model=model)
        assert mgr.all_steps() == []
    return str(failed.value)


def test_a_model_whose_shapes_differ_between_ranks_is_refused_not_mixed(rank_pool, tmp_path):
    # DCP's planner kept one rank's shape for each replicated tensor and wrote it from
    # either rank: the checkpoint mixed rank 1's '2.weight' (6, 13) with rank 0's
    # '2.bias' (5,), and loaded into neither rank's model.
    for message in rank_pool.run(on_ranks_save_a_model_built_differently, str(tmp_path)):
        assert "'model/2.weight' is float32 of shape (5, 13) on rank 0" in message
        assert "(6, 13) on rank 1" in message
        assert "every rank must hold the same model" in message
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(("step_", ".ckpt-tmp"))]
