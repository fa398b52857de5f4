"""Hostile use of managers in a process group: misuse is refused with errors that say what to do.

Functions named ``on_ranks_*`` run on the ranks (tests/rank_pool.py).
"""

from __future__ import annotations

import copy
import os
import random
import signal
import threading
from typing import Any

import pytest
import torch
from dist_training import build_model, make, train_step, wrap
from helpers import fingerprint

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
        assert isinstance(raised.value, ckpt.RankMismatchError)
        assert isinstance(raised.value, ckpt.CheckpointError)
        assert raised.value.path == root
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
    from ckpt.policies.retention import RetentionPolicy

    model, _, _ = make("none")
    with ckpt.CheckpointManager(tmp_path) as mgr:
        mgr.save(0, model=model)
        writer = ckpt.CheckpointWriter(tmp_path)
        with writer, pytest.raises(ckpt.CheckpointLockedError) as raised:
            writer.prune(RetentionPolicy(keep_last=1))
    assert "it is this process, through another CheckpointManager" in str(raised.value)
    assert "close() it first" in str(raised.value)


def on_ranks_strict_on_rank_0_only(rank: int, world: int, root: str) -> tuple[str, bool]:
    """Restore into a model with an extra layer, strict on rank 0 only: the error, unchanged?"""
    model, optimizer, _ = make("ddp")
    with ckpt.CheckpointManager(root) as mgr:
        mgr.save(0, model=model, optimizer=optimizer)
        torch.manual_seed(1)
        bigger = torch.nn.Sequential(*build_model(3), torch.nn.Linear(3, 2))
        before = copy.deepcopy(bigger.state_dict())
        with pytest.raises(ckpt.IncompatibleCheckpointError) as raised:
            mgr.restore(model=bigger, strict=rank == 0)
    unchanged = all(torch.equal(before[k], v) for k, v in bigger.state_dict().items())
    return str(raised.value), unchanged


def test_a_restore_strict_on_one_rank_fails_alike_and_says_what_to_do(rank_pool, tmp_path):
    results = rank_pool.run(on_ranks_strict_on_rank_0_only, str(tmp_path))
    for message, unchanged in results:
        assert unchanged
        assert "missing ['5.bias', '5.weight']" in message
        assert "pass strict=False" in message


def test_exporting_an_optimizer_says_to_choose_a_module_item(tmp_path, capsys):
    model, optimizer, _ = make("none")
    with ckpt.CheckpointManager(tmp_path / "run") as mgr:
        mgr.save(0, model=model, optimizer=optimizer)
    assert main(["export", str(tmp_path / "run"), str(tmp_path / "out"), "--item", "optimizer"])
    err = capsys.readouterr().err
    assert "'optimizer' is of kind optimizer" in err and "choose a module item" in err


def on_ranks_save_with_own_metrics(rank: int, world: int, root: str) -> tuple[str, list[int]]:
    """Each rank saves its own loss (refused), then the reduced one (saved, NaN included)."""
    model, _, _ = make("ddp")
    with ckpt.CheckpointManager(root, keep_best=1, best_metric="loss") as mgr:
        with pytest.raises(ValueError) as raised:
            mgr.save(0, model=model, metrics={"loss": float(rank)})
        assert isinstance(raised.value, ckpt.RankMismatchError)
        assert isinstance(raised.value, ckpt.CheckpointError)
        assert (raised.value.path, raised.value.key) == (f"{root}/step_000000000000", None)
        saved = mgr.save(1, model=model, metrics={"loss": 0.5, "other": float("nan")})
        assert saved.metrics["loss"] == 0.5
        return str(raised.value), mgr.all_steps()


def test_metrics_that_differ_between_ranks_are_refused_with_what_to_do(rank_pool, tmp_path):
    for message, steps in rank_pool.run(on_ranks_save_with_own_metrics, str(tmp_path)):
        assert "the same metrics" in message and "dist.all_reduce" in message
        assert steps == [1]


def on_ranks_directories(rank: int, world: int, root: str, local: bool) -> str:
    """Rank r passes root/r (refused), or the same root seen on a disk of its own (``local``)."""
    model, _, _ = make("ddp")
    if not local:
        with pytest.raises(ValueError) as refused:
            ckpt.CheckpointManager(f"{root}/{rank}")
        assert isinstance(refused.value, ckpt.RankMismatchError)
        assert isinstance(refused.value, ckpt.CheckpointError)
        assert refused.value.path == f"{root}/{rank}"
        return str(refused.value)
    with ckpt.CheckpointManager(root) as mgr:
        if rank == 1:  # a node-local disk: the same path, other contents
            mgr._storage.root = f"{root}-node1"  # type: ignore[attr-defined]
            os.makedirs(mgr._storage.root)  # type: ignore[attr-defined]
        with pytest.raises(ckpt.CheckpointWriteError) as failed:
            mgr.save(0, model=model)
        return str(failed.value)


@pytest.mark.parametrize("local", [False, True])
def test_ranks_that_do_not_share_the_directory_are_told_so(rank_pool, tmp_path, local):
    root = str(tmp_path / "run")
    messages = rank_pool.run(on_ranks_directories, root, local)
    for message in messages:
        if local:
            assert "rank 1: CheckpointWriteError: this rank cannot see the directory" in message
            assert "shared filesystem or an object store" in message
        else:
            assert "the same directory" in message and f"{root}/1" in message
    left = [p.name for p in tmp_path.rglob("*")]
    assert not [n for n in left if n.startswith(("step_", ".ckpt-tmp"))], left


def on_ranks_restore_from_a_disk_of_its_own(rank: int, world: int, root: str) -> str:
    """Save on a shared root, then restore with rank 1 seeing a disk of its own."""
    model, _, _ = make("ddp")
    with ckpt.CheckpointManager(root) as mgr:
        mgr.save(0, model=model)
        if rank == 1:
            mgr._storage.root = f"{root}-node1"  # type: ignore[attr-defined]
            os.makedirs(mgr._storage.root)  # type: ignore[attr-defined]
        with pytest.raises(ckpt.CheckpointNotFoundError) as failed:
            mgr.restore(model=model)
        return str(failed.value)


def test_a_rank_that_does_not_see_the_step_rank_0_listed_is_told_why(rank_pool, tmp_path):
    for message in rank_pool.run(on_ranks_restore_from_a_disk_of_its_own, str(tmp_path / "r")):
        assert "rank 0 listed step 0, which this rank does not see" in message
        assert "not each node's local disk" in message


def on_ranks_save_a_sharded_state_dict(rank: int, world: int, root: str) -> str:
    """A new user's save: the FSDP2 model's state_dict() (DTensors) as the item."""
    model, _, _ = make("fsdp")
    with ckpt.CheckpointManager(root) as mgr:
        with pytest.raises(TypeError) as failed:  # a value that cannot be stored, as in one process
            mgr.save(0, model=model.state_dict())
        assert mgr.all_steps() == []
    return str(failed.value)


def test_saving_a_sharded_state_dict_says_to_pass_the_module(rank_pool, tmp_path):
    for message in rank_pool.run(on_ranks_save_a_sharded_state_dict, str(tmp_path)):
        assert "item 'model' holds a DTensor" in message
        assert "not model=model.state_dict()" in message


class _DiesOnCapture:
    """An item whose state_dict() SIGKILLs its process: a rank dying in the middle of a save."""

    def state_dict(self) -> dict[str, int]:
        os.kill(os.getpid(), signal.SIGKILL)
        return {}

    def load_state_dict(self, state: dict[str, int]) -> None:
        pass


def on_ranks_die_during_capture(rank: int, world: int, root: str) -> str:
    """Save step 0; then rank 1 dies capturing step 1: rank 0's error."""
    model, optimizer, _ = make("fsdp")
    mgr = ckpt.CheckpointManager(root, collective_timeout=60)
    mgr.save(0, model=model, optimizer=optimizer)
    extra: Any = _DiesOnCapture() if rank == 1 else {"n": 1}
    with pytest.raises(ckpt.CollectiveError) as failed:
        mgr.save(1, model=model, optimizer=optimizer, extra=extra)
    with pytest.raises(ckpt.CollectiveError, match="refused"):
        mgr.save(2, model=model, optimizer=optimizer, extra=extra)
    return str(failed.value)


def on_ranks_resume(rank: int, world: int, root: str) -> tuple[int, list[str]]:
    model, optimizer, _ = make("fsdp")
    with ckpt.CheckpointManager(root) as mgr:
        info = mgr.restore(model=model, optimizer=optimizer)
        assert info is not None
        mgr.save(info.next_step, model=model, optimizer=optimizer)
    return info.step, sorted(os.listdir(root))


def test_a_rank_dying_mid_save_tells_the_others_what_to_do_and_the_job_resumes(
    fresh_ranks, rank_pool, tmp_path
):
    outcomes = fresh_ranks(on_ranks_die_during_capture, 2, 90, args=(str(tmp_path),))
    assert outcomes[1].exitcode == -signal.SIGKILL
    assert outcomes[0].returned, outcomes[0].error
    assert "restart the job on every rank" in outcomes[0].result
    assert any(n.startswith(".ckpt-tmp") for n in os.listdir(tmp_path))  # the attempt left behind
    for step, names in rank_pool.run(on_ranks_resume, str(tmp_path)):
        assert step == 0
        assert names == [".ckpt-writer.lock", "step_000000000000", "step_000000000001"]


def on_ranks_restore_into_one_param_group(rank: int, world: int, root: str) -> str:
    """Restore a two-group optimizer into FSDP2 with one group: the error; nothing changed."""
    model = wrap(build_model(5), "fsdp")
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.9)
    mgr = ckpt.CheckpointManager(root)
    with mgr, pytest.raises(ckpt.IncompatibleCheckpointError) as failed:
        mgr.restore(model=model, optimizer=optimizer)
    assert optimizer.param_groups[0]["lr"] == 0.9 and not optimizer.state
    return str(failed.value)


def test_a_restore_into_other_param_groups_fails_alike_and_says_what_to_do(rank_pool, tmp_path):
    model = build_model(5)
    params = list(model.named_parameters())
    optimizer = torch.optim.AdamW(
        [
            {"params": [p for n, p in params if "bias" not in n], "lr": 0.3},
            {"params": [p for n, p in params if "bias" in n], "lr": 0.1, "weight_decay": 0.0},
        ]
    )
    model(torch.randn(4, 5)).sum().backward()
    optimizer.step()
    with ckpt.CheckpointManager(tmp_path) as mgr:
        mgr.save(0, model=model, optimizer=optimizer)
    for message in rank_pool.run(on_ranks_restore_into_one_param_group, str(tmp_path)):
        assert "2 param groups in the checkpoint but 1 live" in message
        assert "build the optimizer with the param groups it was saved with" in message


def on_ranks_killed_at_random(
    rank: int, world: int, root: str, delay: float, victim: int, async_save: bool
) -> int:
    """Resume, train and save three steps; ``victim`` SIGKILLs itself ``delay`` s into the last."""
    model, optimizer, scheduler = make("fsdp")
    items = {"model": model, "optimizer": optimizer, "scheduler": scheduler}
    mgr = ckpt.CheckpointManager(
        root, async_save=async_save, keep_last=2, collective_timeout=60, handshake_timeout=10
    )
    with mgr:
        info = mgr.restore(**items)
        start = 0 if info is None else info.next_step
        for step in range(start, start + 3):
            train_step(model, optimizer, scheduler, step)
            if step == start + 2 and rank == victim:
                threading.Timer(delay, os.kill, (os.getpid(), signal.SIGKILL)).start()
            mgr.save(step, **items)
    return start


@pytest.mark.slow
@pytest.mark.parametrize("async_save", [False, True])
def test_a_rank_killed_at_a_random_moment_of_a_save_leaves_a_resumable_root(
    fresh_ranks, rank_pool, tmp_path, async_save
):
    rng = random.Random(18)
    for trial in range(4):
        root = tmp_path / str(trial)
        delay, victim = rng.uniform(0.0, 0.08), rng.randrange(2)
        args = (str(root), delay, victim, async_save)
        outcomes = fresh_ranks(on_ranks_killed_at_random, 2, 120, args=args)
        survivor = outcomes[1 - victim]  # returned, or raised once it saw the victim gone
        assert not survivor.timed_out
        assert survivor.returned or "CollectiveError" in str(survivor.error), survivor.error
        committed = sorted(int(n[5:]) for n in os.listdir(root) if n.startswith("step_"))
        # Step 1 has committed before the kill when saves are synchronous; an async one may
        # still be in flight (save(2) waits for it), but then step 0 has committed.
        assert committed and committed[-1] >= (0 if async_save else 1), committed
        for step, names in rank_pool.run(on_ranks_resume, str(root)):
            assert step == committed[-1]
            assert not [n for n in names if n.startswith(".ckpt-tmp")], names
            assert f"step_{step + 1:012d}" in names


def on_ranks_fallback_on_rank_0_only(rank: int, world: int, root: str) -> str:
    """fallback_to_intact on rank 0 only: refused at construction on every rank."""
    with pytest.raises(ValueError) as refused:
        ckpt.CheckpointManager(root, fallback_to_intact=rank == 0)
    assert isinstance(refused.value, ckpt.RankMismatchError)
    assert isinstance(refused.value, ckpt.CheckpointError)
    assert refused.value.path == root
    return str(refused.value)


def test_fallback_to_intact_on_some_ranks_only_is_refused_at_construction(rank_pool, tmp_path):
    # Before, rank 0 went on to the next step alone and waited collective_timeout (600 s).
    for message in rank_pool.run(on_ranks_fallback_on_rank_0_only, str(tmp_path)):
        assert "fallback_to_intact" in message
        assert "'fallback_to_intact': True" in message and "'fallback_to_intact': False" in message


def on_ranks_overwrite_on_rank_0_only(rank: int, world: int, root: str) -> tuple[str, list[int]]:
    model, _, _ = make("ddp")
    with ckpt.CheckpointManager(root) as mgr:
        mgr.save(0, model=model)
        before = fingerprint(f"{root}/step_000000000000")
        with pytest.raises(ValueError) as refused:
            mgr.save(0, model=model, overwrite=rank == 0)
        assert isinstance(refused.value, ckpt.RankMismatchError)
        assert isinstance(refused.value, ckpt.CheckpointError)
        assert fingerprint(f"{root}/step_000000000000") == before  # not replaced
        return str(refused.value), mgr.all_steps()


def test_overwrite_on_some_ranks_only_is_refused(rank_pool, tmp_path):
    for message, steps in rank_pool.run(on_ranks_overwrite_on_rank_0_only, str(tmp_path)):
        assert "'overwrite': True" in message and "'overwrite': False" in message
        assert steps == [0]


def on_ranks_private_managers(rank: int, world: int, root: str) -> str | None:
    """Each rank saves with a manager of its own into one root (process_group=False)."""
    model, _, _ = make("ddp")
    mgr = ckpt.CheckpointManager(root, process_group=False)
    try:
        if rank == 0:
            mgr.save(0, model=model)
        torch.distributed.barrier()
        if rank == 0:
            return None
        with pytest.raises(ckpt.CheckpointLockedError) as refused:
            mgr.save(1, model=model)
        return str(refused.value)
    finally:
        torch.distributed.barrier()  # rank 0 holds the lock until rank 1 was refused
        mgr.close()


def test_ranks_saving_alone_into_one_root_are_told_to_share_a_collective_manager(
    rank_pool, tmp_path
):
    message = rank_pool.run(on_ranks_private_managers, str(tmp_path))[1]
    assert "another writer holds this directory" in message
    assert "one collective CheckpointManager, created on every rank after init_process_group" in (
        message
    )
