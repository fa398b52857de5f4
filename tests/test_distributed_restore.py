"""Restores in a process group (issue 18): any checkpoint into any layout, agreed outcomes.

A checkpoint saved by one process (format 1/2) restores into DDP, FSDP2 and
tensor-parallel models on several ranks, each rank's local shards equal to the
matching part of the one-process tensors; a restore that fails anywhere fails
everywhere with the same error class; ``fallback_to_intact`` picks the same step
on every rank. Functions named ``on_ranks_*`` run on the ranks.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import assert_same_state
from dist_training import full_model_state, full_optimizer_state, make, train_step

import ckpt

pytestmark = pytest.mark.distributed


def _exact(a: dict[str, Any], b: dict[str, Any]) -> None:
    assert set(a) == set(b)
    for key, value in a.items():
        assert_same_state(value, b[key], key)


def _one_process_checkpoint(root: Path, steps: int = 3) -> dict[str, Any]:
    """Train the plain model ``steps`` steps in this process (no group), save; its full state."""
    model, optimizer, scheduler = make("none")
    torch.manual_seed(11)
    for step in range(steps):
        train_step(model, optimizer, scheduler, step)
    with ckpt.CheckpointManager(root) as mgr:
        mgr.save(steps - 1, model=model, optimizer=optimizer, scheduler=scheduler, data={"k": 1})
    assert '"format_version":3' not in (root / f"step_{steps - 1:012d}" / "manifest.json").read_text()
    names = [n for n, _ in model.named_parameters()]
    packed = optimizer.state_dict()
    return {
        "model": {k: v.clone() for k, v in model.state_dict().items()},
        "optimizer": {names[i]: s for i, s in packed["state"].items()},
        "packed": packed,
        "scheduler": scheduler.state_dict(),
        "lr": optimizer.param_groups[0]["lr"],
    }


def _check_local_shards(state: dict[str, Any], full: dict[str, Any], where: str) -> int:
    """Each DTensor's local shard (each plain tensor) equals its part of the full tensor."""
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    checked = 0
    for key, value in state.items():
        if isinstance(value, dict):
            checked += _check_local_shards(value, full[key], f"{where}.{key}")
            continue
        if not isinstance(value, torch.Tensor):
            assert value == full[key], f"{where}.{key}"
            continue
        expected = full[key]
        local = value
        if isinstance(value, DTensor):
            shape, offset = compute_local_shape_and_global_offset(
                value.shape, value.device_mesh, value.placements
            )
            index = tuple(slice(o, o + s) for o, s in zip(offset, shape, strict=True))
            expected = expected[index] if expected.dim() else expected
            local = value.to_local()
        assert local.dtype == expected.dtype, f"{where}.{key}: dtype"
        assert local.device == expected.device, f"{where}.{key}: device"
        assert torch.equal(local, expected), f"{where}.{key}: values differ"
        checked += 1
    return checked


def _local_states(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    local = StateDictOptions(full_state_dict=False)
    return {
        "model": get_model_state_dict(model, options=local),
        "optimizer": get_optimizer_state_dict(model, optimizer, options=local)["state"],
    }


# ------------------------------------------------------------------ on the ranks


def make_tp(world: int, seed: int = 0) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """An MLP split column- then row-wise (DTensors sharded on dim 0 and dim 1), with Adam."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        parallelize_module,
    )

    model = _tp_model(seed)
    mesh = init_device_mesh("cpu", (world,))
    parallelize_module(model, mesh, {"0": ColwiseParallel(), "2": RowwiseParallel()})
    return model, torch.optim.Adam(model.parameters(), lr=0.5)


def _tp_model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))


def on_ranks_restore_one_process(
    rank: int, world: int, root: str, how: str, full: dict[str, Any]
) -> dict[str, Any]:
    """Restore a one-process checkpoint into ``how``; check local shards; the full state."""
    if how == "tp":
        model, optimizer = make_tp(world, seed=7)
        items: dict[str, Any] = {"model": model, "optimizer": optimizer}
    else:
        model, optimizer, scheduler = make(how, seed=7, lr=0.5)
        items = {"model": model, "optimizer": optimizer, "scheduler": scheduler, "data": {}}
    with ckpt.CheckpointManager(root) as mgr:
        info = mgr.restore(**items)
    assert info is not None
    checked = _check_local_shards(_local_states(model, optimizer), full, f"rank {rank}")
    return {
        "model": full_model_state(model),
        "optimizer": full_optimizer_state(model, optimizer),
        "lr": optimizer.param_groups[0]["lr"],
        "data": items.get("data"),
        "checked": checked,
        "scheduler": items["scheduler"].state_dict() if "scheduler" in items else None,
    }


def on_ranks_continue_after(
    rank: int, world: int, root: str | None, how: str, full: dict[str, Any], more: int
) -> dict[str, Any]:
    """Restore (``root``) or load the same state with DCP (``None``), then train ``more`` steps."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    model, optimizer, scheduler = make(how, seed=7, lr=0.5)
    if root is not None:
        with ckpt.CheckpointManager(root) as mgr:
            info = mgr.restore(model=model, optimizer=optimizer, scheduler=scheduler, rng=False)
        assert info is not None
    else:
        options = StateDictOptions(full_state_dict=True)
        set_model_state_dict(model, full["model"], options=options)
        names = list(full["optimizer"])
        packed = full["packed"]
        by_name = {
            "state": {names[i]: s for i, s in packed["state"].items()},
            "param_groups": [
                {**g, "params": [names[i] for i in g["params"]]} for g in packed["param_groups"]
            ],
        }
        set_optimizer_state_dict(model, optimizer, copy.deepcopy(by_name), options=options)
        scheduler.load_state_dict(full["scheduler"])
    torch.manual_seed(500 + rank)
    losses = [train_step(model, optimizer, scheduler, 3 + i) for i in range(more)]
    return {
        "losses": losses,
        "model": full_model_state(model),
        "optimizer": full_optimizer_state(model, optimizer),
    }


# -------------------------------------------------------------------------- tests


@pytest.mark.parametrize("how", ["fsdp", "ddp"])
def test_a_one_process_checkpoint_restores_into_a_group_exactly_and_trains_on_identically(
    rank_pool, tmp_path, how, caplog
):
    full = _one_process_checkpoint(tmp_path)
    restored = rank_pool.run(on_ranks_restore_one_process, str(tmp_path), how, full)
    for rank in range(2):
        assert restored[rank]["checked"] > 10
        _exact(full["model"], restored[rank]["model"])
        _exact(full["optimizer"], restored[rank]["optimizer"])
        assert restored[rank]["lr"] == full["lr"]
        assert restored[rank]["scheduler"] == full["scheduler"]
        assert restored[rank]["data"] == {"k": 1}  # rank 0's own items, on every rank
    after = rank_pool.run(on_ranks_continue_after, str(tmp_path), how, full, 2)
    reference = rank_pool.run(on_ranks_continue_after, None, how, full, 2)
    for rank in range(2):
        assert after[rank]["losses"] == reference[rank]["losses"]
        _exact(reference[rank]["model"], after[rank]["model"])
        _exact(reference[rank]["optimizer"], after[rank]["optimizer"])


def test_a_one_process_checkpoint_restores_into_tensor_parallel_dtensors(rank_pool, tmp_path):
    model = _tp_model(0)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
    x = torch.randn(3, 5, generator=torch.Generator().manual_seed(1))
    model(x).sum().backward()
    optimizer.step()
    ckpt.CheckpointManager(tmp_path).save(0, model=model, optimizer=optimizer)
    names = [n for n, _ in model.named_parameters()]
    full = {
        "model": dict(model.state_dict()),
        "optimizer": {names[i]: s for i, s in optimizer.state_dict()["state"].items()},
    }
    restored = rank_pool.run(on_ranks_restore_one_process, str(tmp_path), "tp", full)
    for rank in range(2):
        assert restored[rank]["checked"] == 4 + 4 * 3  # every tensor of both items
        _exact(full["model"], restored[rank]["model"])
        _exact(full["optimizer"], restored[rank]["optimizer"])
