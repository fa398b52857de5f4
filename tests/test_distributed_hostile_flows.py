"""Multi-rank flows tried as a new or hostile user writes them from the docs.

Each test is a failure found that way, fixed. Functions named ``on_ranks_*`` run
on the ranks (tests/rank_pool.py).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from conftest import assert_same_state
from dist_training import full_model_state, full_optimizer_state
from torch import nn

import ckpt

pytestmark = pytest.mark.distributed


def on_ranks_save_a_model_built_differently(rank: int, world: int, root: str) -> str:
    """Each rank builds its own plain model, rank 1's last layer wider: a save of it."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(7, 13), nn.ReLU(), nn.Linear(13, 5 + rank))
    with ckpt.CheckpointManager(root) as mgr:
        with pytest.raises(ckpt.CheckpointWriteError) as failed:
            mgr.save(1, model=model)
        assert mgr.all_steps() == []
    cause = failed.value.__cause__
    assert isinstance(cause, ckpt.RankMismatchError) and isinstance(cause, ValueError)
    assert cause.key == "model/2.weight"
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


class _Counted(nn.Module):
    """A plain module with a buffer each rank sets to its own rank (a per-rank buffer)."""

    def __init__(self, value: float) -> None:
        super().__init__()
        self.layer = nn.Linear(3, 2)
        self.register_buffer("seen", torch.full((2,), value))


def on_ranks_restore_with_a_manager_of_this_rank_only(rank: int, world: int, root: str) -> Any:
    """Every rank saves its own state; then each restores it through a manager of its own."""
    import torch.distributed as dist

    with ckpt.CheckpointManager(root) as mgr:
        mgr.save(0, model=_Counted(float(rank)), mine={"rank": rank})
    alone = dist.new_group([rank], use_local_synchronization=True)
    model, mine = _Counted(-1.0), {"rank": -1}
    with ckpt.CheckpointManager(root, process_group=alone) as mgr:
        mgr.restore(model=model, mine=mine)
    return mine["rank"], model.seen.tolist()


def test_a_subgroup_manager_restores_each_rank_its_own_state_by_global_rank(rank_pool, tmp_path):
    # The rank at position 0 of a group of some of the ranks took rank 0's own items and
    # buffers from a checkpoint every rank saved, instead of its own.
    outcomes = rank_pool.run(on_ranks_restore_with_a_manager_of_this_rank_only, str(tmp_path))
    assert outcomes == [(rank, [float(rank)] * 2) for rank in range(len(outcomes))]


def on_ranks_restore_into_a_state_dict(rank: int, world: int, root: str) -> str:
    """DCP's habit: restore into the dict get_model_state_dict returns, not the module."""
    from dist_training import make
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    model, _, _ = make("fsdp")
    with ckpt.CheckpointManager(root) as mgr:
        mgr.save(0, model=model)
        with pytest.raises(ckpt.IncompatibleCheckpointError) as failed:
            mgr.restore(model=get_model_state_dict(model))
    return str(failed.value)


def test_restoring_a_module_into_its_state_dict_says_to_pass_the_module(rank_pool, tmp_path):
    # It said "item 'model' was saved as a module, not a optimizer".
    for message in rank_pool.run(on_ranks_restore_into_a_state_dict, str(tmp_path)):
        assert "item 'model' was saved as a module" in message
        assert "(model=model), not into a dict" in message
        assert "manifest.json" in message


def on_ranks_save_steps(rank: int, world: int, root: str) -> None:
    from dist_training import make, train_step

    model, optimizer, scheduler = make("fsdp")
    with ckpt.CheckpointManager(root) as mgr:
        for step in (1, 2):
            train_step(model, optimizer, scheduler, step)
            mgr.save(step, model=model, optimizer=optimizer)


def on_ranks_restore_classes(rank: int, world: int, root: str) -> list[str]:
    """The error class restoring the latest raises, then the step fallback_to_intact picks."""
    from dist_training import make

    model, optimizer, _ = make("fsdp", seed=3)
    said = []
    for fallback in (False, True):
        with ckpt.CheckpointManager(root, fallback_to_intact=fallback) as mgr:
            try:
                said.append(str(mgr.restore(model=model, optimizer=optimizer).step))
            except ckpt.CheckpointError as e:
                said.append(f"{type(e).__name__}: {e}")
    return said


def test_a_missing_shard_file_is_corruption_that_fallback_skips(rank_pool, tmp_path):
    # It was a CheckpointNotFoundError, which fallback_to_intact does not skip (in a
    # group and in one process), where a missing file of a one-process step is corrupt.
    from dist_training import build_model

    rank_pool.run(on_ranks_save_steps, str(tmp_path))
    (tmp_path / "step_000000000002" / "rank1_shards.safetensors").unlink()
    for said in rank_pool.run(on_ranks_restore_classes, str(tmp_path)):
        assert said[0].startswith("CorruptCheckpointError: ")
        assert "rank1_shards.safetensors" in said[0] and "missing" in said[0]
        assert said[1] == "1"
    model = build_model(3)
    alone = ckpt.CheckpointManager(tmp_path, fallback_to_intact=True)
    assert alone.restore(model=model).step == 1
    with pytest.raises(ckpt.CorruptCheckpointError, match="listed in the manifest is missing"):
        alone.read(2)
    alone.close()


def on_ranks_construct_on_rank_0_only(rank: int, world: int, root: str) -> str | None:
    """`if rank == 0: CheckpointManager(...)`: the error rank 0 gets (rank 1 waits it out)."""
    import time

    if rank != 0:
        time.sleep(5)
        return None
    with pytest.raises(ckpt.CollectiveError) as failed:
        ckpt.CheckpointManager(root, collective_timeout=2, handshake_timeout=2)
    return str(failed.value)


def test_a_manager_constructed_on_rank_0_only_says_every_rank_must_construct_it(
    fresh_ranks, tmp_path
):
    # It said only "creating the gloo group failed ...; a rank did not join within the
    # timeout". Fresh ranks: torch's count of groups created now differs between them.
    outcomes = fresh_ranks(on_ranks_construct_on_rank_0_only, 2, 60, args=(str(tmp_path),))
    assert all(o.returned for o in outcomes), [o.error for o in outcomes]
    message = outcomes[0].result
    assert "a rank of [0, 1] did not join within the timeout" in message
    assert "`if rank == 0: CheckpointManager(...)` cannot work" in message


def test_assign_into_a_meta_module_from_a_sharded_checkpoint_is_refused_not_ignored(
    rank_pool, tmp_path
):
    # restore(assign=True) of a checkpoint saved by several ranks returned success and
    # left a model built on the meta device there (assign was not passed on).
    from dist_training import build_model

    rank_pool.run(on_ranks_save_steps, str(tmp_path))
    with torch.device("meta"):
        model = build_model(3)
    with ckpt.CheckpointManager(tmp_path) as mgr:
        with pytest.raises(ckpt.IncompatibleCheckpointError, match="to_empty") as failed:
            mgr.restore(model=model, assign=True)
        assert "item 'model' is on the meta device" in str(failed.value)
        assert all(p.is_meta for p in model.parameters())
        model.to_empty(device="cpu")
        mgr.restore(model=model)
    expected = ckpt.CheckpointReader(tmp_path).read()["model"]
    for key, value in model.state_dict().items():
        assert torch.equal(value, expected[key]) and value.dtype == expected[key].dtype, key


def on_ranks_hsdp_restores(rank: int, world: int, root: str) -> dict[str, Any]:
    """HSDP on 2x2: managers on each replica's shard group restore three checkpoints."""
    from dist_training import build_model, full_model_state, make, train_step
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("replicate", "shard"))
    model, optimizer, scheduler = make("none")
    fully_shard(model, mesh=mesh)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.05)
    train_step(model, optimizer, scheduler, 0)  # BatchNorm statistics differ per rank
    expected = full_model_state(model)
    replica, shard = mesh.get_local_rank("replicate"), mesh.get_group("shard")
    with ckpt.CheckpointManager(f"{root}/replica{replica}", process_group=shard) as mgr:
        mgr.save(0, model=model)
    with ckpt.CheckpointManager(f"{root}/all") as mgr:
        mgr.save(0, model=model)

    def restore(directory: str, **options: Any) -> str:
        fresh = build_model(9)
        fully_shard(fresh, mesh=mesh)
        before = full_model_state(fresh)
        with ckpt.CheckpointManager(directory, process_group=shard) as mgr:
            try:
                mgr.restore(model=fresh, **options)
            except ckpt.CheckpointError as e:
                unchanged = all(
                    torch.equal(v, before[k]) for k, v in full_model_state(fresh).items()
                )
                return f"{type(e).__name__} unchanged={unchanged}: {e}"
        got = full_model_state(fresh)
        return ",".join(sorted(k for k in expected if not torch.equal(got[k], expected[k])))

    return {
        "own": restore(f"{root}/replica{replica}"),
        "all": restore(f"{root}/all"),
        "replica0": restore(f"{root}/replica0"),
        "replica0 without rng": restore(f"{root}/replica0", rng=False),
    }


@pytest.mark.slow
def test_hsdp_replica_managers_restore_their_own_state_or_refuse_another_replicas(
    fresh_ranks, tmp_path
):
    outcomes = fresh_ranks(on_ranks_hsdp_restores, 4, 300, args=(str(tmp_path),))
    assert all(o.returned for o in outcomes), [o.error for o in outcomes]
    for rank, outcome in enumerate(outcomes):
        said = outcome.result
        assert said["own"] == "" and said["all"] == "", (rank, said)  # every tensor exact
        if rank < 2:  # replica 0 restoring its own checkpoint
            assert said["replica0"] == said["replica0 without rng"] == ""
        else:  # another replica's streams: refused alike, nothing changed
            assert said["replica0"].startswith("IncompatibleCheckpointError unchanged=True")
            assert f"saved by rank {rank - 2} but this is rank {rank}" in said["replica0"]
            # Without them, replica 0's state, whose BatchNorm statistics are its own.
            assert said["replica0 without rng"] == "1.running_mean,1.running_var"


def on_ranks_fork_with_a_closed_manager_uncollected(rank: int, world: int, root: str) -> int:
    """A closed manager left to the cycle collector, collected in a forked child (a worker)."""
    import gc
    import os

    gc.disable()
    try:
        mgr = ckpt.CheckpointManager(root)
        mgr.close()
        del mgr  # garbage in a reference cycle: collected at some later allocation
        pid = os.fork()
        if pid == 0:  # a DataLoader worker is forked like this
            gc.collect()
            os._exit(0)
        status = _wait_or_kill(pid, 60)
    finally:
        gc.enable()
        gc.collect()
    return status


def _wait_or_kill(pid: int, seconds: float) -> int:
    """The child's exit code, or -1000 once it was killed, still running after ``seconds``."""
    import os
    import signal
    import time

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    return -1000


def test_a_closed_manager_collected_in_a_forked_worker_does_not_crash_it(rank_pool, tmp_path):
    # DataLoader workers (num_workers > 0) forked after a manager was closed crashed with
    # "Unexpected segmentation fault encountered in worker" (or hung): the closed
    # manager's gloo group, destroyed only when collected, was destroyed in the worker.
    assert rank_pool.run(on_ranks_fork_with_a_closed_manager_uncollected, str(tmp_path)) == [0, 0]


def on_ranks_save_an_item_of_another_kind(rank: int, world: int, root: str) -> tuple[str, str]:
    """Rank 0 passes ``x`` as a dict, rank 1 as a module: the error, and what the root holds."""
    import os

    torch.manual_seed(0)
    with ckpt.CheckpointManager(root) as mgr:
        mgr.save(0, model=nn.Linear(3, 2))
        x: Any = {"a": 1} if rank == 0 else nn.Linear(2, 2)
        with pytest.raises(ValueError) as failed:
            mgr.save(1, model=nn.Linear(3, 2), x=x)
        assert isinstance(failed.value, ckpt.CheckpointError)
        assert (failed.value.path, failed.value.key) == (f"{root}/step_000000000001", "x")
        assert mgr.all_steps() == [0]
        mgr.restore(model=nn.Linear(3, 2))  # the earlier step is intact
    return type(failed.value).__name__, str(failed.value) + str(sorted(os.listdir(root)))


def test_an_item_of_another_kind_on_one_rank_is_refused_before_anything_is_written(
    rank_pool, tmp_path
):
    # It was written on every rank, then refused at the commit as a CheckpointWriteError:
    # "could not commit step 1: CorruptCheckpointError: invalid manifest: item names or
    # kinds differ from rank 0's (first: 'x')", as if the checkpoint were corrupt.
    for name, message in rank_pool.run(on_ranks_save_an_item_of_another_kind, str(tmp_path)):
        assert name == "RankMismatchError"  # a ValueError (pytest.raises above)
        assert "each item of the same kind on every rank" in message
        assert "'x': 'dict'" in message and "'x': 'module'" in message
        assert "nothing of step 1 was written" in message
        assert "Corrupt" not in message and ".ckpt-tmp" not in message


def on_ranks_save_a_step_twice(rank: int, world: int, root: str) -> tuple[str, str | None]:
    """The error every rank raises saving a committed step again without overwrite."""
    with ckpt.CheckpointManager(root) as mgr:
        mgr.save(0, data={"rank": rank})
        with pytest.raises(ckpt.CheckpointExistsError) as failed:
            mgr.save(0, data={"rank": rank})
    return str(failed.value), failed.value.path


def test_a_step_saved_twice_is_refused_naming_its_directory_once(rank_pool, tmp_path):
    # Rank 0's error travelled as its full text and was located again: "... pass
    # overwrite=True (file '.../step_000000000000') (file '.../step_000000000000')".
    step_dir = str(tmp_path / "step_000000000000")
    for message, path in rank_pool.run(on_ranks_save_a_step_twice, str(tmp_path)):
        assert message == (
            f"step 0 is already saved; choose a new step or pass overwrite=True (file {step_dir!r})"
        )
        assert path == step_dir


def on_ranks_replica_managers_in_one_root(rank: int, world: int, root: str) -> str | None:
    """A manager per one-rank group ("replica"), both on one root: what the second is told."""
    import torch.distributed as dist

    replica = dist.new_group([rank], use_local_synchronization=True)
    mgr = ckpt.CheckpointManager(root, process_group=replica)
    try:
        if rank == 0:
            mgr.save(0, model=nn.Linear(2, 2))
        dist.barrier()
        if rank == 0:
            return None
        with pytest.raises(ckpt.CheckpointLockedError) as refused:
            mgr.save(1, model=nn.Linear(2, 2))
        return str(refused.value)
    finally:
        dist.barrier()  # rank 0 holds the lock until rank 1 was refused
        mgr.close()


def test_replica_managers_sharing_a_root_are_told_to_take_one_each(rank_pool, tmp_path):
    # It said only that the ranks of a job share one collective manager, which they do
    # not when each replica (HSDP) has its own.
    message = rank_pool.run(on_ranks_replica_managers_in_one_root, str(tmp_path))[1]
    assert "another writer holds this directory" in message
    assert "managers on groups of some of the ranks (one per HSDP replica) each write" in message


def _fsdp_over_tensor_parallel(seed: int, mesh: Any) -> nn.Module:
    """As torchtitan builds it: tensor parallel on the "tp" dimension, then FSDP2 on "dp"."""
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        parallelize_module,
    )

    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 4))
    parallelize_module(model, mesh["tp"], {"0": ColwiseParallel(), "2": RowwiseParallel()})
    fully_shard(model, mesh=mesh["dp"])
    return model


def on_ranks_fsdp_over_tensor_parallel(rank: int, world: int, root: str) -> dict[str, Any]:
    """FSDP2 x tensor parallel on a 2x2 mesh: saved and restored by a manager on every rank;
    a manager on either dimension's groups is refused before anything is written."""
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    model = _fsdp_over_tensor_parallel(0, mesh)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    for step in range(2):
        x = torch.randn(4, 6, generator=torch.Generator().manual_seed(10 * step + rank // 2))
        optimizer.zero_grad()
        model(x).sum().backward()
        optimizer.step()
    expected = full_model_state(model), full_optimizer_state(model, optimizer)
    refused = {}
    for dim, other in (("dp", "tp"), ("tp", "dp")):  # one root per group of the dimension
        where = f"{root}/{dim}-group{mesh.get_local_rank(other)}"
        with ckpt.CheckpointManager(where, process_group=mesh.get_group(dim)) as mgr:
            with pytest.raises(ckpt.CheckpointWriteError) as info:
                mgr.save(0, model=model, optimizer=optimizer)
            assert mgr.all_steps() == []
        refused[dim] = str(info.value)
    with ckpt.CheckpointManager(f"{root}/all") as mgr:
        mgr.save(0, model=model, optimizer=optimizer)
        fresh = _fsdp_over_tensor_parallel(7, mesh)
        fresh_optimizer = torch.optim.AdamW(fresh.parameters(), lr=0.1)
        mgr.restore(model=fresh, optimizer=fresh_optimizer)
    assert_same_state(expected[0], full_model_state(fresh))
    assert_same_state(expected[1], full_optimizer_state(fresh, fresh_optimizer))
    return {"refused": refused, "model": expected[0]}


@pytest.mark.slow
def test_fsdp2_over_tensor_parallel_on_a_2d_mesh_saves_restores_and_consolidates(
    fresh_ranks, tmp_path
):
    outcomes = fresh_ranks(on_ranks_fsdp_over_tensor_parallel, 4, 240, args=(str(tmp_path),))
    assert all(o.returned for o in outcomes), [o.error for o in outcomes]
    for outcome in outcomes:
        for message in outcome.result["refused"].values():
            assert "hold only" in message and "with FSDP2 x tensor parallel, every rank" in message
    torch.manual_seed(3)
    one = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 4))
    ckpt.CheckpointManager(tmp_path / "all").restore(model=one)
    expected = outcomes[0].result["model"]
    for key, value in one.state_dict().items():
        assert torch.equal(value, expected[key]) and value.dtype == expected[key].dtype, key
