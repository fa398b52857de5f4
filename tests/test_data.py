"""ResumableSampler: every epoch a permutation from its own generator; resumes at the next index."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_same_state

import ckpt
from ckpt.data import ResumableSampler, resumable_loader

EPOCHS = 3


def dataset(n: int) -> torch.utils.data.TensorDataset:
    return torch.utils.data.TensorDataset(torch.arange(n))


def uninterrupted(make, epochs: int = EPOCHS) -> list:
    """Every event of a run: the worker seed drawn at each iter(loader), then each batch."""
    loader, events = make(), []
    for _ in range(epochs):
        iterator = iter(loader)
        events.append(("seed", iterator._base_seed))
        events.extend((loader.sampler.epoch, b.tolist()) for (b,) in iterator)
    return events


def interrupted(make, stop: int, epochs: int = EPOCHS) -> list:
    """Run until ``stop`` events, save the sampler, go on in a fresh loader from the state."""
    loader, events, state = make(), [], None
    while state is None:
        iterator = iter(loader)
        events.append(("seed", iterator._base_seed))
        for (b,) in iterator:
            events.append((loader.sampler.epoch, b.tolist()))
            if len(events) == stop:
                state = loader.sampler.state_dict()
                break
        else:
            if len(events) >= stop:
                state = loader.sampler.state_dict()
    fresh = make()
    fresh.sampler.load_state_dict(state)
    target = len(uninterrupted(make, epochs))
    first = True
    while len(events) < target:
        iterator = iter(fresh)
        if not first:  # the resumed epoch's seed was drawn before the save
            events.append(("seed", iterator._base_seed))
        first = False
        events.extend((fresh.sampler.epoch, b.tolist()) for (b,) in iterator)
    return events


@pytest.mark.parametrize(
    ("size", "batch", "drop_last"), [(10, 3, False), (9, 3, False), (10, 3, True), (1, 1, False)]
)
def test_resuming_after_any_batch_continues_exactly(size, batch, drop_last):
    def make():
        return resumable_loader(dataset(size), batch_size=batch, seed=5, drop_last=drop_last)

    reference = uninterrupted(make)
    for stop in range(1, len(reference)):
        if reference[stop - 1][0] != "seed":
            assert interrupted(make, stop) == reference, f"resumed after event {stop}"


def test_every_epoch_is_a_permutation_and_epochs_differ():
    sampler = ResumableSampler(50, seed=1)
    orders = [list(sampler) for _ in range(3)]
    assert all(sorted(o) == list(range(50)) for o in orders)
    assert orders[0] != orders[1] != orders[2]
    assert sampler.epoch == 2 and sampler.position == 50


def test_unshuffled_yields_in_order_and_counts_epochs():
    sampler = ResumableSampler(4, shuffle=False)
    assert [list(sampler) for _ in range(2)] == [[0, 1, 2, 3]] * 2
    assert sampler.epoch == 1


def test_the_order_ignores_and_leaves_the_global_torch_stream():
    torch.manual_seed(0)
    first = uninterrupted(lambda: resumable_loader(dataset(12), batch_size=4, seed=3))
    torch.manual_seed(1)
    before = torch.get_rng_state()
    second = uninterrupted(lambda: resumable_loader(dataset(12), batch_size=4, seed=3))
    assert first == second
    assert torch.equal(torch.get_rng_state(), before)


def test_seeds_give_different_orders():
    assert list(ResumableSampler(20, seed=1)) != list(ResumableSampler(20, seed=2))


def test_state_round_trips_through_the_manager(tmp_path):
    sampler = ResumableSampler(30, seed=4)
    iterator = iter(sampler)
    taken = [next(iterator) for _ in range(7)]
    mgr = ckpt.CheckpointManager(tmp_path)
    mgr.save(0, sampler=sampler)
    rest = list(iterator)

    fresh = ResumableSampler(30, seed=4)
    mgr.restore(sampler=fresh)
    assert (fresh.epoch, fresh.position) == (0, 7)
    assert list(fresh) == rest
    assert sorted(taken + rest) == list(range(30))
    assert_same_state(fresh.state_dict(), sampler.state_dict())


def test_a_new_iter_without_a_load_starts_the_next_epoch():
    sampler = ResumableSampler(10, seed=0)
    iterator = iter(sampler)
    next(iterator)
    second = iter(sampler)
    assert sampler.epoch == 1 and len(list(second)) == 10
    with pytest.raises(RuntimeError, match="superseded"):
        next(iterator)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"size": 11}, "for 11 indices"),
        ({"shuffle": False}, "shuffle=False"),
        ({"position": 11}, "position 11"),
        ({"epoch": -1}, "epoch -1"),
        ({"epoch": 1.5}, "must be ints"),
        ({"seed": 2**64}, "out of range"),
        ({"generator": torch.zeros(3)}, "uint8"),
        ({"extra": 1}, "exactly the keys"),
    ],
)
def test_bad_states_raise_and_leave_the_sampler_unchanged(change, match):
    sampler = ResumableSampler(10, seed=0)
    iterator = iter(sampler)
    next(iterator)
    before = sampler.state_dict()
    with pytest.raises(ValueError, match=match):
        sampler.load_state_dict({**before, **change})
    assert_same_state(sampler.state_dict(), before)
    assert len(list(iterator)) == 9


def test_a_malformed_generator_state_is_refused():
    sampler = ResumableSampler(10)
    state = sampler.state_dict()
    state["generator"] = torch.zeros(7, dtype=torch.uint8)
    with pytest.raises(RuntimeError):
        sampler.load_state_dict(state)
    assert sampler.position == 0


def test_constructor_checks_its_arguments():
    with pytest.raises(ValueError, match="seed"):
        ResumableSampler(3, seed=-1)
    with pytest.raises(TypeError, match="sets"):
        resumable_loader(dataset(3), sampler=None)
    assert len(ResumableSampler(dataset(6))) == 6


def test_any_object_with_state_dict_is_accepted_as_a_loader(tmp_path):
    """torchdata's StatefulDataLoader is saved and restored like any Stateful item."""
    from torchdata.stateful_dataloader import StatefulDataLoader

    def make():
        sampler = ResumableSampler(17, seed=2)
        with pytest.warns(UserWarning, match="set_vital"):
            return StatefulDataLoader(
                dataset(17), batch_size=4, sampler=sampler, generator=sampler.loader_generator
            )

    loader = make()
    iterator = iter(loader)
    [next(iterator) for _ in range(2)]
    mgr = ckpt.CheckpointManager(tmp_path)
    mgr.save(0, loader=loader)
    rest = [b.tolist() for (b,) in iterator]

    fresh = make()
    mgr.restore(loader=fresh)
    assert [b.tolist() for (b,) in fresh] == rest
