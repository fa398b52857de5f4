"""Tiered checkpoints: copies to slower roots, each tier's cadence and retention, restore across."""

from __future__ import annotations

import logging
import os
import shutil

import pytest
import torch
from conftest import assert_same_state
from helpers import small_model, train_steps

import ckpt
import ckpt.saving.writer
from ckpt.errors import CheckpointWriteError
from ckpt.tiers.tierset import open_tiers


def state(step: int) -> dict[str, object]:
    """What step ``step`` holds."""
    return {"w": torch.full((64, 32), float(step)), "v": torch.arange(100) * step, "step": step}


def step_dir(root, step: int) -> str:
    return os.path.join(root, f"step_{step:012d}")


def tensor_file(root, step: int) -> str:
    directory = step_dir(root, step)
    return os.path.join(directory, next(n for n in os.listdir(directory) if "safetensors" in n))


def listed(url, options=None) -> list[int]:
    return ckpt.CheckpointReader(url, storage_options=options).all_steps()


class FailingCopies:
    """Makes every copy raise an OSError while ``failing`` (a remote that is down)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.failing = True
        self.failed = 0
        original = ckpt.saving.writer.copy_step

        def copy_step(*args, **kwargs):
            if self.failing:
                self.failed += 1
                raise OSError(5, "injected: remote unreachable")
            return original(*args, **kwargs)

        monkeypatch.setattr(ckpt.saving.writer, "copy_step", copy_step)


def test_three_tiers_each_hold_what_their_rules_keep_and_each_restores_alone(tmp_path, s3_bucket):
    bucket, options = s3_bucket
    first, second, remote = tmp_path / "t0", tmp_path / "t1", f"s3://{bucket}/run"
    tiers = [
        ckpt.Tier(second, every_steps=2, keep_last=3),
        ckpt.Tier(remote, every_steps=4, keep_last=2, storage_options=options),
    ]
    with ckpt.CheckpointManager(first, keep_last=2, tiers=tiers) as mgr:
        for step in range(12):
            mgr.save(step, data=state(step))
        mgr.wait()
        assert mgr.latest_steps() == [11, 11, 11]
        assert listed(first) == [10, 11]
        assert listed(second) == [7, 9, 11]
        assert listed(remote, options) == [7, 11]
    for url, opts, steps in ((second, None, [7, 9, 11]), (remote, options, [7, 11])):
        reader = ckpt.CheckpointReader(url, storage_options=opts)
        for step in steps:
            reader.verify(step)
            assert_same_state(reader.read(step)["data"], state(step))
    # Each tier alone, behind an empty first tier (a new machine): the newest step it holds.
    for index, (url, opts) in enumerate(((second, None), (remote, options))):
        tier = ckpt.Tier(url, storage_options=opts)
        target = {"data": {}}
        with ckpt.CheckpointManager(tmp_path / f"new{index}", tiers=[tier]) as new:
            info = new.restore(data=target["data"])
            assert info is not None and info.step == 11 and info.tier == 1
            assert_same_state(target["data"], state(11))
            assert new.all_steps() == []  # a restore copies nothing back


def test_full_training_state_restores_bitwise_from_the_remote_tier(tmp_path, s3_bucket):
    bucket, options = s3_bucket
    model = small_model(0)
    opt = torch.optim.AdamW(model.parameters())
    train_steps(model, opt, 3)
    remote = ckpt.Tier(f"s3://{bucket}/run", storage_options=options)
    with ckpt.CheckpointManager(tmp_path / "a", tiers=[remote]) as mgr:
        mgr.save(2, model=model, optimizer=opt)
        expected = torch.rand(5)  # the random stream after the save
    live, live_opt = small_model(9), torch.optim.AdamW(small_model(9).parameters())
    live_opt = torch.optim.AdamW(live.parameters())
    train_steps(live, live_opt, 1)
    with ckpt.CheckpointManager(tmp_path / "b", tiers=[remote]) as new:
        info = new.restore(model=live, optimizer=live_opt)
    assert info is not None and info.tier == 1
    assert_same_state(live.state_dict(), model.state_dict())
    assert_same_state(live_opt.state_dict(), opt.state_dict())
    assert torch.equal(torch.rand(5), expected)


@pytest.mark.parametrize("damage", ["corrupt", "truncate", "delete_file", "delete_step"])
def test_a_damaged_newest_copy_in_the_first_tier_restores_from_the_next(tmp_path, caplog, damage):
    first, second = tmp_path / "t0", tmp_path / "t1"
    with ckpt.CheckpointManager(first, tiers=[ckpt.Tier(second)]) as mgr:
        for step in range(3):
            mgr.save(step, data=state(step))
    path = tensor_file(first, 2)
    if damage == "corrupt":
        with open(path, "r+b") as f:
            f.seek(-5, os.SEEK_END)
            f.write(b"XXXXX")
    elif damage == "truncate":
        os.truncate(path, os.path.getsize(path) - 7)
    elif damage == "delete_file":
        os.remove(path)
    else:
        shutil.rmtree(step_dir(first, 2))
    target: dict[str, object] = {}
    with (
        caplog.at_level(logging.WARNING),
        ckpt.CheckpointManager(first, tiers=[ckpt.Tier(second)]) as mgr,
    ):
        info = mgr.restore(data=target)
        assert_same_state(mgr.read()["data"], state(2))
    assert info is not None and (info.step, info.tier) == (2, 1)
    assert_same_state(target, state(2))
    if damage != "delete_step":
        assert any("tier 0" in r.message and "step 2" in r.message for r in caplog.records)


def test_a_damaged_step_in_every_tier_falls_back_to_an_older_one(tmp_path, caplog):
    first, second = tmp_path / "t0", tmp_path / "t1"
    with ckpt.CheckpointManager(first, tiers=[ckpt.Tier(second)]) as mgr:
        for step in range(3):
            mgr.save(step, data=state(step))
    for root in (first, second):
        os.remove(tensor_file(root, 2))
    with (
        ckpt.CheckpointManager(first, tiers=[ckpt.Tier(second)]) as mgr,
        pytest.raises(ckpt.CorruptCheckpointError, match="missing"),
    ):
        mgr.restore(data={})
    target: dict[str, object] = {}
    with (
        ckpt.CheckpointManager(first, tiers=[ckpt.Tier(second)], fallback_to_intact=True) as mgr,
        caplog.at_level(logging.WARNING),
    ):
        info = mgr.restore(data=target)
    assert info is not None and (info.step, info.tier) == (1, 0)
    assert_same_state(target, state(1))
    assert any("trying older steps" in r.message for r in caplog.records)


def test_a_remote_step_newer_than_the_local_ones_wins(tmp_path, s3_bucket):
    bucket, options = s3_bucket
    remote = f"s3://{bucket}/run"
    with ckpt.CheckpointManager(tmp_path / "t0") as local:
        for step in range(3):
            local.save(step, data=state(step))
    with ckpt.CheckpointManager(remote, storage_options=options) as other_machine:
        other_machine.save(7, data=state(7))
    tier = ckpt.Tier(remote, storage_options=options)
    target: dict[str, object] = {}
    with ckpt.CheckpointManager(tmp_path / "t0", tiers=[tier]) as mgr:
        info = mgr.restore(data=target)
        assert mgr.latest_steps() == [2, 7]
        assert info is not None and (info.step, info.tier) == (7, 1)
        assert_same_state(target, state(7))
        assert mgr.restore(1, data=target).tier == 0
        assert_same_state(target, state(1))
        with pytest.raises(ckpt.CheckpointNotFoundError):
            mgr.restore(5, data=target)


def test_a_failing_remote_never_stops_training_and_catches_up(tmp_path, monkeypatch, caplog):
    first, second = tmp_path / "t0", tmp_path / "t1"
    failing = FailingCopies(monkeypatch)
    with caplog.at_level(logging.WARNING):
        mgr = ckpt.CheckpointManager(first, keep_last=1, tiers=[ckpt.Tier(second)])
        for step in range(4):
            mgr.save(step, data=state(step))
        mgr.wait()  # returns: every pending copy failed once
        assert failing.failed >= 1
        assert listed(second) == []
        assert listed(first) == [0, 1, 2, 3]  # kept until copied
        assert any("training goes on" in r.message for r in caplog.records)
        assert any("still 4 step(s) behind" in r.message for r in caplog.records)
        failing.failing = False
        mgr.save(4, data=state(4))
        mgr.wait()
    assert listed(second) == [0, 1, 2, 3, 4]
    assert listed(first) == [4]
    mgr.close()


def test_the_backlog_is_bounded_dropping_the_oldest(tmp_path, monkeypatch, caplog):
    first, second = tmp_path / "t0", tmp_path / "t1"
    failing = FailingCopies(monkeypatch)
    tier = ckpt.Tier(second, max_backlog=2)
    with (
        caplog.at_level(logging.WARNING),
        ckpt.CheckpointManager(first, keep_last=1, tiers=[tier]) as mgr,
    ):
        for step in range(5):
            mgr.save(step, data=state(step))
        assert mgr.pending_copies() == [[3, 4]]
        failing.failing = False
        mgr.wait()
    assert listed(second) == [3, 4]
    assert listed(first) == [4]
    assert any("max_backlog=2" in r.message for r in caplog.records)


def test_preempted_before_the_copies_the_next_manager_finishes_them_once(tmp_path, monkeypatch):
    first, second = tmp_path / "t0", tmp_path / "t1"
    failing = FailingCopies(monkeypatch)
    tiers = [ckpt.Tier(second, every_steps=2)]
    mgr = ckpt.CheckpointManager(first, tiers=tiers)
    for step in range(2):
        mgr.save(step, data=state(step))
    failing.failing = False
    mgr.wait()
    copied_before = list(mgr._tiers.copier.copied)  # type: ignore[union-attr]
    assert copied_before == [(0, 1)]
    failing.failing = True
    for step in range(2, 8):
        mgr.save(step, data=state(step))
    assert mgr.pending_copies() == [[3, 5, 7]]
    mgr.close(timeout=0)  # preempted: the copies of 3, 5 and 7 are left
    assert listed(second) == [1]
    failing.failing = False
    with ckpt.CheckpointManager(first, tiers=tiers) as resumed:
        resumed.wait()
        copied_after = list(resumed._tiers.copier.copied)  # type: ignore[union-attr]
    assert copied_after == [(0, 3), (0, 5), (0, 7)]
    assert listed(second) == [1, 3, 5, 7]
    with ckpt.CheckpointManager(first, tiers=tiers) as again:
        again.wait()
        assert again._tiers.copier.copied == []  # type: ignore[union-attr]


def test_a_corrupt_first_tier_step_is_never_copied(tmp_path, caplog):
    first, second = tmp_path / "t0", tmp_path / "t1"
    with ckpt.CheckpointManager(first) as mgr:
        for step in range(3):
            mgr.save(step, data=state(step))
    with open(tensor_file(first, 1), "r+b") as f:
        f.seek(-3, os.SEEK_END)
        f.write(b"ZZZ")
    with (
        caplog.at_level(logging.WARNING),
        ckpt.CheckpointManager(first, tiers=[ckpt.Tier(second)]) as mgr,
    ):
        mgr.save(3, data=state(3))  # lists the empty tier: 0..3 are pending
        mgr.wait()
    assert listed(second) == [0, 2, 3]
    assert [n for n in os.listdir(second) if n.startswith(".ckpt-tmp")] == []
    assert any("checksum" in r.message and "step 1" in r.message for r in caplog.records)


def test_async_saves_with_tiers(tmp_path):
    first, second = tmp_path / "t0", tmp_path / "t1"
    with ckpt.CheckpointManager(
        first, async_save=True, keep_last=2, tiers=[ckpt.Tier(second, keep_last=2)]
    ) as mgr:
        for step in range(5):
            mgr.save(step, data=state(step))
    assert listed(first) == [3, 4]
    assert listed(second) == [3, 4]
    assert_same_state(ckpt.CheckpointReader(second).read(4)["data"], state(4))


def test_tier_arguments_are_checked(tmp_path):
    with pytest.raises(ValueError, match="every_steps"):
        ckpt.Tier(tmp_path, every_steps=0)
    with pytest.raises(ValueError, match="max_backlog"):
        ckpt.Tier(tmp_path, max_backlog=0)
    with pytest.raises(ValueError, match="keep_last"):
        ckpt.Tier(tmp_path, keep_last=0)
    with pytest.raises(TypeError):
        ckpt.CheckpointManager(tmp_path / "a", tiers=[str(tmp_path / "b")])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="repeats"):
        ckpt.CheckpointManager(tmp_path / "a", tiers=[ckpt.Tier(tmp_path / "a")])
    with pytest.raises(ValueError, match="process group"):  # a node-local first tier
        ckpt.CheckpointManager(tmp_path / "{rank}", tiers=[ckpt.Tier(tmp_path / "b")])
    reader = ckpt.CheckpointReader(tmp_path / "a")
    with pytest.raises(ValueError, match="node-local"):
        open_tiers(reader, [ckpt.Tier(tmp_path / "{rank}")], None, None)


def test_without_tiers_nothing_changes(tmp_path):
    with ckpt.CheckpointManager(tmp_path, keep_last=1) as mgr:
        mgr.save(0, data=state(0))
        mgr.save(1, data=state(1))
        assert mgr.latest_steps() == [1]
        assert mgr.pending_copies() == []
        assert mgr.restore(data={}).tier == 0
    assert listed(tmp_path) == [1]


def test_a_copy_that_fails_midway_lists_nothing_and_retries(tmp_path, monkeypatch, s3_bucket):
    bucket, options = s3_bucket
    remote = f"s3://{bucket}/run"
    original = ckpt.saving.copying._copy_file  # type: ignore[attr-defined]
    calls = [0]

    def flaky(*args, **kwargs):
        calls[0] += 1
        if calls[0] == 2:
            raise CheckpointWriteError("injected: upload failed", path=remote)
        return original(*args, **kwargs)

    monkeypatch.setattr(ckpt.saving.copying, "_copy_file", flaky)
    model = small_model(0)
    opt = torch.optim.AdamW(model.parameters())
    train_steps(model, opt, 1)
    with ckpt.CheckpointManager(
        tmp_path, tiers=[ckpt.Tier(remote, storage_options=options)]
    ) as mgr:
        mgr.save(0, model=model, optimizer=opt)
        mgr.wait()
        mgr.wait()
    assert calls[0] > 2  # the failed attempt, then a complete copy
    reader = ckpt.CheckpointReader(remote, storage_options=options)
    assert reader.all_steps() == [0]
    reader.verify(0)


def test_a_tier_is_locked_only_while_copies_are_pending(tmp_path):
    first, second = tmp_path / "t0", tmp_path / "t1"
    with ckpt.CheckpointManager(first, tiers=[ckpt.Tier(second)]) as mgr:
        mgr.save(0, data=state(0))
        mgr.wait()
        with ckpt.CheckpointWriter(second) as writer:  # e.g. `ckpt prune` on the tier
            writer.lock()
        mgr.save(1, data=state(1))
        mgr.wait()
    assert listed(second) == [0, 1]


def test_a_manager_dropped_without_close_stops_its_copier(tmp_path):
    import gc

    mgr = ckpt.CheckpointManager(tmp_path / "t0", tiers=[ckpt.Tier(tmp_path / "t1")])
    mgr.save(0, data=state(0))
    mgr.wait()
    thread = mgr._tiers.copier._thread  # type: ignore[union-attr]
    del mgr
    gc.collect()
    thread.join(60)
    assert not thread.is_alive()
    with ckpt.CheckpointManager(tmp_path / "t0", tiers=[ckpt.Tier(tmp_path / "t1")]) as again:
        again.save(1, data=state(1))
        again.wait()
    assert listed(tmp_path / "t1") == [0, 1]


def test_tier_keep_best_ranks_the_copied_metrics(tmp_path):
    first, second = tmp_path / "t0", tmp_path / "t1"
    tier = ckpt.Tier(second, keep_last=1, keep_best=1, best_metric="loss")
    losses = [3.0, 1.0, 2.0, 4.0]
    with ckpt.CheckpointManager(first, keep_last=1, tiers=[tier]) as mgr:
        for step, loss in enumerate(losses):
            mgr.save(step, data=state(step), metrics={"loss": loss})
            mgr.wait()
    assert listed(second) == [1, 3]
    assert ckpt.CheckpointReader(second).checkpoint(1).metrics == {"loss": 1.0}


def test_an_unlistable_tier_is_skipped_on_restore_with_a_warning(tmp_path, caplog):
    first, second = tmp_path / "t0", tmp_path / "t1"
    with ckpt.CheckpointManager(first, tiers=[ckpt.Tier(second)]) as mgr:
        for step in range(2):
            mgr.save(step, data=state(step))

    def unreachable() -> list[int]:
        raise OSError(113, "injected: no route to host")

    target: dict[str, object] = {}
    with ckpt.CheckpointManager(first, tiers=[ckpt.Tier(second)]) as mgr:
        mgr._tiers.readers[0].steps.all_steps = unreachable  # type: ignore[union-attr,method-assign]
        with caplog.at_level(logging.WARNING):
            info = mgr.restore(data=target)
    assert info is not None and (info.step, info.tier) == (1, 0)
    assert_same_state(target, state(1))
    assert any("cannot be listed" in r.message for r in caplog.records)
