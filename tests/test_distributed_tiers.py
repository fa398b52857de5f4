"""Tiers on several ranks: each rank copies the files it wrote, the copy commits once.

Two ranks train FSDP2 shards, save to a first tier every rank sees, and copy to a
second tier (local disk standing in for remote storage, or moto S3). Each check is
differential: the copies are byte for byte the first tier's files, and a restore
from the slower tier alone gives the full tensors gathered before the save.
"""

from __future__ import annotations

import os
import shutil
import signal
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import assert_same_state
from dist_training import full_model_state, full_optimizer_state, make, train_step

import ckpt
import ckpt.tiers.ranks
from ckpt.format import step_dir_name


def _full(model: Any, optimizer: Any) -> dict[str, Any]:
    return {"model": full_model_state(model), "optimizer": full_optimizer_state(model, optimizer)}


def _manager(first: str, second: str, options: dict[str, Any] | None, **kw: Any) -> Any:
    tier = ckpt.Tier(second, storage_options=options)
    return ckpt.CheckpointManager(first, tiers=[tier], collective_timeout=30, **kw)


def on_ranks_save(
    rank: int, world: int, first: str, second: str, steps: int, options: dict[str, Any] | None
) -> dict[str, Any]:
    """Train and save ``steps`` steps with a second tier; the full states before each save."""
    model, optimizer, scheduler = make("fsdp")
    torch.manual_seed(100 + rank)
    fulls = {}
    with _manager(first, second, options) as mgr:
        for step in range(steps):
            train_step(model, optimizer, scheduler, step)
            fulls[step] = _full(model, optimizer)
            mgr.save(step, model=model, optimizer=optimizer, scheduler=scheduler)
        mgr.wait()
        tiers = mgr._tiers
        part = tiers.copier.copied if rank == 0 else tiers.follower.copied
        return {
            "fulls": fulls,
            "latest": mgr.latest_steps(),
            "pending": mgr.pending_copies(),
            "copied": list(part),
        }


def on_ranks_restore(
    rank: int, world: int, first: str, second: str, step: int | None, options: dict[str, Any] | None
) -> dict[str, Any]:
    """Restore ``step`` (the newest) through a manager with the second tier; the full state."""
    model, optimizer, scheduler = make("fsdp", seed=9)
    with _manager(first, second, options) as mgr:
        info = mgr.restore(step, model=model, optimizer=optimizer, scheduler=scheduler)
    assert info is not None
    return {"step": info.step, "tier": info.tier, **_full(model, optimizer)}


def _params(model: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The parameters (BatchNorm's statistics differ per rank under FSDP: one copy is saved)."""
    return {k: v for k, v in model.items() if "running_" not in k and "num_batches" not in k}


def _files(root: Path, step: int) -> dict[str, bytes]:
    directory = root / step_dir_name(step)
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def _no_leftovers(root: Path) -> None:
    assert not [n for n in os.listdir(root) if n.startswith((".ckpt-copy.", ".ckpt-tmp"))]


def test_every_rank_copies_its_files_and_each_tier_restores_exactly(rank_pool, tmp_path):
    first, second = tmp_path / "t0", tmp_path / "t1"
    saved = rank_pool.run(on_ranks_save, str(first), str(second), 3, None, timeout=120)
    assert saved[0]["latest"] == saved[1]["latest"] == [2, 2]
    assert saved[0]["pending"] == [[]]
    assert [s for _, s in saved[0]["copied"]] == [0, 1, 2]  # rank 0 committed each copy once
    assert [s for _, s in saved[1]["copied"]] == [0, 1, 2]  # rank 1 copied its part of each
    _no_leftovers(second)
    for step in range(3):
        files = _files(first, step)
        assert any("rank1" in n or "_r1" in n for n in files)  # rank 1's own files
        assert _files(second, step) == files  # bitwise the first tier's
    # Each tier alone: the first tier, then the second after deleting the first.
    restored: dict[tuple[int, int | None], list[dict[str, Any]]] = {}
    for tier in (0, 1):
        for step in (None, 1):
            got = restored[tier, step] = rank_pool.run(
                on_ranks_restore, str(first), str(second), step, None
            )
            want = saved[0]["fulls"][2 if step is None else step]
            for rank in range(2):
                assert got[rank]["tier"] == tier
                assert_same_state(_params(got[rank]["model"]), _params(want["model"]))
                assert_same_state(got[rank]["optimizer"], want["optimizer"])
                assert_same_state(got[rank], {**restored[0, step][rank], "tier": tier})
        shutil.rmtree(first)


def test_a_corrupt_copy_on_the_first_tier_is_read_from_the_next_on_every_rank(rank_pool, tmp_path):
    first, second = tmp_path / "t0", tmp_path / "t1"
    saved = rank_pool.run(on_ranks_save, str(first), str(second), 2, None, timeout=120)
    shard = next(p for p in (first / step_dir_name(1)).iterdir() if "rank1" in p.name)
    shard.write_bytes(shard.read_bytes()[:-8])  # rank 1's shard file truncated in tier 0
    got = rank_pool.run(on_ranks_restore, str(first), str(second), None, None)
    for rank in range(2):
        assert (got[rank]["step"], got[rank]["tier"]) == (1, 1)  # the same copy on both ranks
        assert_same_state(_params(got[rank]["model"]), _params(saved[0]["fulls"][1]["model"]))
        assert_same_state(got[rank]["optimizer"], saved[0]["fulls"][1]["optimizer"])


def test_copies_to_an_object_store_commit_once_and_restore_exactly(rank_pool, tmp_path, s3_bucket):
    bucket, options = s3_bucket
    first, remote = tmp_path / "t0", f"s3://{bucket}/run"
    saved = rank_pool.run(on_ranks_save, str(first), remote, 2, options, timeout=120)
    assert saved[0]["latest"] == [1, 1]
    assert [s for _, s in saved[1]["copied"]] == [0, 1]
    reader = ckpt.CheckpointReader(remote, storage_options=options)
    assert reader.all_steps() == [0, 1]
    reader.verify(1)
    shutil.rmtree(first)
    got = rank_pool.run(on_ranks_restore, str(first), remote, None, options)
    for rank in range(2):
        assert got[rank]["tier"] == 1
        assert_same_state(_params(got[rank]["model"]), _params(saved[0]["fulls"][1]["model"]))
        assert_same_state(got[rank]["optimizer"], saved[0]["fulls"][1]["optimizer"])


def on_ranks_node_local_refusals(rank: int, world: int, root: str) -> list[str]:
    said = []
    for directory, tier in [(root + "/a", root + "/{rank}"), (root + "/{rank}", None)]:
        try:
            ckpt.CheckpointManager(directory, tiers=[ckpt.Tier(tier)] if tier else [])
        except ValueError as e:
            said.append(str(e))
    return said


def test_node_local_tiers_other_than_the_first_are_refused_clearly(rank_pool, tmp_path):
    for said in rank_pool.run(on_ranks_node_local_refusals, str(tmp_path)):
        assert "not supported" in said[0]
        assert "needs tiers" in said[1]


def on_ranks_node_local_save(
    rank: int, world: int, root: str, shared: str, options: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Each rank's own first tier (``{rank}``), one shared tier; the full states."""
    model, optimizer, scheduler = make("fsdp")
    torch.manual_seed(100 + rank)
    fulls = {}
    with _manager(os.path.join(root, "{rank}"), shared, options, keep_last=2) as mgr:
        for step in range(3):
            train_step(model, optimizer, scheduler, step)
            fulls[step] = _full(model, optimizer)
            mgr.save(step, model=model, optimizer=optimizer, scheduler=scheduler)
        mgr.wait()
        return {"fulls": fulls, "latest": mgr.latest_steps()}


def on_ranks_node_local_resume(
    rank: int, world: int, root: str, shared: str, options: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Resume from the shared tier, then save one more step into both tiers."""
    model, optimizer, scheduler = make("fsdp", seed=9)
    with _manager(os.path.join(root, "{rank}"), shared, options, keep_last=2) as mgr:
        info = mgr.restore(model=model, optimizer=optimizer, scheduler=scheduler)
        assert info is not None
        got = {"step": info.step, "tier": info.tier, **_full(model, optimizer)}
        train_step(model, optimizer, scheduler, 3)
        mgr.save(3, model=model, optimizer=optimizer, scheduler=scheduler)
        mgr.wait()
        got["latest"] = mgr.latest_steps()
    return got


def test_per_rank_first_tiers_resume_exactly_after_one_is_deleted(rank_pool, tmp_path):
    root, shared = tmp_path / "local", tmp_path / "shared"
    saved = rank_pool.run(on_ranks_node_local_save, str(root), str(shared), timeout=120)
    assert saved[0]["latest"] == saved[1]["latest"] == [2, 2]
    for step in (1, 2):  # each rank's first tier: its own files (and the manifest)
        own = [_files(root / str(rank), step) for rank in range(2)]
        assert not set(own[0]) - {"manifest.json"} & set(own[1])
        assert any("rank1" in n for n in own[1]) and not any("rank1" in n for n in own[0])
        assert _files(shared, step) == {**own[0], **own[1]}  # bitwise, every rank's files
    assert ckpt.CheckpointReader(root / "1").all_steps() == [1, 2]  # retention on every rank
    ckpt.CheckpointReader(shared).verify(2)
    shutil.rmtree(root / "1")  # rank 1's machine is lost
    got = rank_pool.run(on_ranks_node_local_resume, str(root), str(shared), timeout=120)
    for rank in range(2):
        assert (got[rank]["step"], got[rank]["tier"]) == (2, 1)
        assert_same_state(_params(got[rank]["model"]), _params(saved[0]["fulls"][2]["model"]))
        assert_same_state(got[rank]["optimizer"], saved[0]["fulls"][2]["optimizer"])
        assert got[rank]["latest"] == [3, 3]
    assert ckpt.CheckpointReader(root / "1").all_steps() == [3]
    ckpt.CheckpointReader(shared).verify(3)
    _no_leftovers(shared)


def on_ranks_killed_mid_copy(rank: int, world: int, first: str, second: str) -> dict[str, Any]:
    """Rank 1 is SIGKILLed after copying its part of step 1, before saying so."""
    if rank == 1:
        original = ckpt.tiers.ranks.copy_files

        def dying(*args: Any) -> None:
            original(*args)
            if args[2] == step_dir_name(1):
                os.kill(os.getpid(), signal.SIGKILL)

        ckpt.tiers.ranks.copy_files = dying  # type: ignore[assignment]
    model, optimizer, scheduler = make("fsdp")
    saved = []
    tier = ckpt.Tier(second)
    mgr = ckpt.CheckpointManager(first, tiers=[tier], collective_timeout=6)
    try:
        for step in range(2):
            train_step(model, optimizer, scheduler, step)
            mgr.save(step, model=model, optimizer=optimizer, scheduler=scheduler)
            saved.append(step)
        mgr.wait()
    except ckpt.CheckpointError as e:  # rank 1 died: the collective says so
        return {"saved": saved, "error": type(e).__name__}
    finally:
        mgr.close(timeout=10)
    return {"saved": saved, "error": None}


def test_a_rank_killed_mid_copy_leaves_complete_steps_only(rank_pool, fresh_ranks, tmp_path):
    first, second = tmp_path / "t0", tmp_path / "t1"
    outcomes = fresh_ranks(on_ranks_killed_mid_copy, args=(str(first), str(second)), timeout=90)
    assert outcomes[1].exitcode == -signal.SIGKILL
    assert outcomes[0].returned, outcomes[0].error
    listed = ckpt.CheckpointReader(second).all_steps()
    assert 1 not in listed  # never committed without rank 1's marker
    for step in listed:
        ckpt.CheckpointReader(second).verify(step)
    # The next managers copy what is pending and clean up what the dead copy left.
    saved = rank_pool.run(on_ranks_save_more, str(first), str(second), timeout=120)
    assert saved[0] == [1, 1]
    assert ckpt.CheckpointReader(second).all_steps() == ckpt.CheckpointReader(first).all_steps()
    ckpt.CheckpointReader(second).verify(1)
    _no_leftovers(second)


def on_ranks_save_more(rank: int, world: int, first: str, second: str) -> list[int | None]:
    """A new pair of managers on the same tiers: the pending copies complete."""
    with _manager(first, second, None) as mgr:
        mgr.wait()
        return mgr.latest_steps()


def on_ranks_killed_at_random(
    rank: int, world: int, first: str, second: str, seed: int
) -> dict[str, Any]:
    """One rank (chosen by ``seed``) is SIGKILLed at a random moment of its part of a copy."""
    import random
    import threading

    pick = random.Random(seed)
    victim, step_killed, delay = pick.randrange(2), pick.randrange(3), pick.uniform(0, 0.03)
    if rank == victim:
        original = ckpt.tiers.ranks.copy_files if rank else ckpt.saving.copying.copy_files

        def dying(*args: Any) -> None:
            if args[2] == step_dir_name(step_killed):
                timer = threading.Timer(delay, os.kill, (os.getpid(), signal.SIGKILL))
                timer.start()
            original(*args)

        if rank:
            ckpt.tiers.ranks.copy_files = dying  # type: ignore[assignment]
        else:
            ckpt.saving.copying.copy_files = dying  # type: ignore[assignment]
    model, optimizer, scheduler = make("fsdp")
    mgr = ckpt.CheckpointManager(first, tiers=[ckpt.Tier(second)], collective_timeout=6)
    try:
        for step in range(3):
            train_step(model, optimizer, scheduler, step)
            mgr.save(step, model=model, optimizer=optimizer, scheduler=scheduler)
        mgr.wait()
    except ckpt.CheckpointError:
        pass  # the other rank died
    finally:
        mgr.close(timeout=10)
    return {"victim": victim}


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["shared", "node-local"])
def test_ranks_killed_at_random_moments_of_copies_leave_complete_steps(
    rank_pool, fresh_ranks, tmp_path, layout
):
    killed = 0
    for seed in range(12):
        first, second = tmp_path / f"t0_{seed}", tmp_path / f"t1_{seed}"
        if layout == "node-local":
            first = first / "{rank}"
        ranks = fresh_ranks(
            on_ranks_killed_at_random, args=(str(first), str(second), seed), timeout=90
        )
        killed += any(r.exitcode == -signal.SIGKILL for r in ranks)
        for step in ckpt.CheckpointReader(second).all_steps():
            ckpt.CheckpointReader(second).verify(step)  # listed: complete
        rank_pool.run(on_ranks_save_more, str(first), str(second), timeout=120)
        copied = set(ckpt.CheckpointReader(second).all_steps())
        held = [set(ckpt.CheckpointReader(str(first).format(rank=r)).all_steps()) for r in (0, 1)]
        if layout == "shared":
            assert copied == held[0], seed
        else:  # a step the killed rank never committed in its own tier cannot be copied
            assert held[0] & held[1] <= copied <= held[0], (seed, copied, held)
        _no_leftovers(second)
    print(f"{killed} of 12 trials killed a rank mid-copy")
    assert killed


def on_ranks_cadence(rank: int, world: int, first: str, second: str) -> dict[str, Any]:
    """Async saves, the second tier copying every 2nd step and keeping 2; the full states."""
    model, optimizer, scheduler = make("fsdp")
    torch.manual_seed(100 + rank)
    fulls = {}
    tier = ckpt.Tier(second, every_steps=2, keep_last=2)
    with ckpt.CheckpointManager(
        first, keep_last=1, async_save=True, tiers=[tier], collective_timeout=30
    ) as mgr:
        for step in range(6):
            train_step(model, optimizer, scheduler, step)
            fulls[step] = _full(model, optimizer)
            mgr.save(step, model=model, optimizer=optimizer, scheduler=scheduler)
    return fulls


def test_async_saves_copy_what_each_tier_selects_and_keep_what_its_rules_keep(rank_pool, tmp_path):
    first, second = tmp_path / "t0", tmp_path / "t1"
    fulls = rank_pool.run(on_ranks_cadence, str(first), str(second), timeout=120)
    assert ckpt.CheckpointReader(first).all_steps() == [5]
    assert ckpt.CheckpointReader(second).all_steps() == [3, 5]
    _no_leftovers(second)
    shutil.rmtree(first)
    got = rank_pool.run(on_ranks_restore, str(first), str(second), 3, None)
    for rank in range(2):
        assert (got[rank]["step"], got[rank]["tier"]) == (3, 1)
        assert_same_state(_params(got[rank]["model"]), _params(fulls[0][3]["model"]))
        assert_same_state(got[rank]["optimizer"], fulls[0][3]["optimizer"])


def on_ranks_restore_nothing(rank: int, world: int, first: str, second: str) -> list[str]:
    model = make("fsdp")[0]
    with _manager(first, second, None) as mgr:
        said = [repr(mgr.restore(model=model))]
        try:
            mgr.restore(7, model=model)
        except ckpt.CheckpointNotFoundError as e:
            said.append(str(e))
    return said


def test_ranks_agree_when_no_tier_holds_a_step(rank_pool, tmp_path):
    for said in rank_pool.run(on_ranks_restore_nothing, str(tmp_path / "a"), str(tmp_path / "b")):
        assert said[0] == "None"
        assert "step 7" in said[1]


def test_per_rank_first_tiers_resume_exactly_from_an_object_store(rank_pool, tmp_path, s3_bucket):
    bucket, options = s3_bucket
    root, remote = tmp_path / "local", f"s3://{bucket}/run"
    saved = rank_pool.run(on_ranks_node_local_save, str(root), remote, options, timeout=120)
    assert saved[0]["latest"] == [2, 2]
    shutil.rmtree(root / "0")  # rank 0's machine is lost
    got = rank_pool.run(on_ranks_node_local_resume, str(root), remote, options, timeout=120)
    for rank in range(2):
        assert (got[rank]["step"], got[rank]["tier"]) == (2, 1)
        assert_same_state(_params(got[rank]["model"]), _params(saved[0]["fulls"][2]["model"]))
        assert_same_state(got[rank]["optimizer"], saved[0]["fulls"][2]["optimizer"])
        assert got[rank]["latest"] == [3, 3]
    reader = ckpt.CheckpointReader(remote, storage_options=options)
    assert reader.all_steps() == [0, 1, 2, 3]
    reader.verify(3)


def on_ranks_close_twice(rank: int, world: int, first: str, second: str) -> list[str]:
    """Save one step with a second tier, close inside the ``with`` (closed again on exit)."""
    import logging

    model, optimizer, scheduler = make("fsdp")
    messages: list[str] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: messages.append(record.getMessage())  # type: ignore[method-assign]
    logging.getLogger("ckpt").addHandler(handler)
    try:
        with _manager(first, second, None) as mgr:
            mgr.save(0, model=model, optimizer=optimizer, scheduler=scheduler)
            mgr.close(timeout=60)
    finally:
        logging.getLogger("ckpt").removeHandler(handler)
    return messages


def test_closing_twice_with_tiers_is_quiet_on_every_rank(rank_pool, tmp_path):
    """close() is idempotent: the second (the ``with``'s) runs no collective, logs nothing."""
    first, second = tmp_path / "fast", tmp_path / "slow"
    assert rank_pool.run(on_ranks_close_twice, str(first), str(second)) == [[], []]
    assert (second / step_dir_name(0) / "manifest.json").exists()
