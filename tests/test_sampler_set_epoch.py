"""ResumableSampler.set_epoch: DistributedSampler's call, without losing a restored place."""

from __future__ import annotations

import pytest
import torch

import ckpt


def _epochs(sampler: ckpt.ResumableSampler, count: int) -> list[list[int]]:
    return [list(sampler) for _ in range(count)]


@pytest.mark.parametrize("shuffle", [True, False])
def test_set_epoch_gives_the_order_iterating_would(shuffle):
    natural = _epochs(ckpt.ResumableSampler(23, seed=5, shuffle=shuffle), 6)
    for epoch in range(6):
        sampler = ckpt.ResumableSampler(23, seed=5, shuffle=shuffle)
        sampler.set_epoch(epoch)
        assert sampler.epoch == epoch
        assert list(sampler) == natural[epoch]
        if epoch < 5:
            assert list(sampler) == natural[epoch + 1]  # and goes on from there


def test_a_loop_calling_set_epoch_sees_what_a_loop_without_it_sees():
    natural = _epochs(ckpt.ResumableSampler(17, seed=1), 5)
    sampler, seen = ckpt.ResumableSampler(17, seed=1), []
    for epoch in range(5):
        sampler.set_epoch(epoch)
        seen.append(list(sampler))
    assert seen == natural


def test_jumping_back_and_forth_is_deterministic():
    natural = _epochs(ckpt.ResumableSampler(11, seed=3), 5)
    sampler = ckpt.ResumableSampler(11, seed=3)
    for epoch in (4, 1, 1, 3, 0):
        sampler.set_epoch(epoch)
        assert list(sampler) == natural[epoch]


def test_set_epoch_of_a_restored_epoch_keeps_its_place_and_another_starts_afresh():
    natural = _epochs(ckpt.ResumableSampler(20, seed=2), 4)
    sampler = ckpt.ResumableSampler(20, seed=2)
    list(sampler)
    iterator = iter(sampler)
    head = [next(iterator) for _ in range(7)]  # 7 indices into epoch 1
    state = sampler.state_dict()
    resumed = ckpt.ResumableSampler(20, seed=2)
    resumed.load_state_dict(state)
    resumed.set_epoch(1)  # the loop's `sampler.set_epoch(epoch)` after a restore
    assert head + list(resumed) == natural[1]
    resumed.set_epoch(2)
    assert list(resumed) == natural[2]
    moved = ckpt.ResumableSampler(20, seed=2)
    moved.load_state_dict(state)
    moved.set_epoch(3)  # another epoch: the restored position is dropped
    assert moved.position == 0 and list(moved) == natural[3]


def test_set_epoch_mid_epoch_stops_the_old_iterator():
    sampler = ckpt.ResumableSampler(10, seed=0)
    iterator = iter(sampler)
    next(iterator)
    sampler.set_epoch(4)
    with pytest.raises(RuntimeError, match="superseded"):
        next(iterator)


def test_set_epoch_splits_over_ranks_as_iterating_does():
    natural = [_epochs(ckpt.ResumableSampler(9, num_replicas=2, rank=r), 4) for r in range(2)]
    for rank in range(2):
        sampler = ckpt.ResumableSampler(9, num_replicas=2, rank=rank)
        sampler.set_epoch(3)
        assert list(sampler) == natural[rank][3]
    both = natural[0][3] + natural[1][3]
    assert len(both) == 10 and set(both) == set(range(9))  # one index padded


def test_set_epoch_seeds_the_loaders_generator_for_that_epoch():
    natural = ckpt.ResumableSampler(8, seed=4)
    draws = []
    for _ in range(3):
        draws.append(natural.loader_generator.initial_seed())
        list(natural)
    jumped = ckpt.ResumableSampler(8, seed=4)
    jumped.set_epoch(2)
    assert jumped.loader_generator.initial_seed() == draws[2]


def test_set_epoch_under_a_loader_and_a_save(tmp_path):
    data = torch.arange(12.0)
    loader = ckpt.resumable_loader(data, batch_size=4, seed=0)
    loader.sampler.set_epoch(2)
    batches = [b.tolist() for b in loader]
    assert sorted(i for b in batches for i in b) == list(range(12))
    with ckpt.CheckpointManager(tmp_path) as mgr:
        mgr.save(0, sampler=loader.sampler)
        fresh = ckpt.resumable_loader(data, batch_size=4, seed=0)
        mgr.restore(sampler=fresh.sampler)
    assert fresh.sampler.epoch == 2
    fresh.sampler.set_epoch(3)
    loader.sampler.set_epoch(3)
    assert [b.tolist() for b in fresh] == [b.tolist() for b in loader]


@pytest.mark.parametrize("bad", [-1, 1.0, True, "1", None])
def test_set_epoch_refuses_what_is_not_an_epoch(bad):
    with pytest.raises(ValueError, match="non-negative int"):
        ckpt.ResumableSampler(5).set_epoch(bad)
