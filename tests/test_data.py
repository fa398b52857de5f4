"""ResumableSampler: every epoch a permutation from its own generator; resumes at the next index."""

from __future__ import annotations

import copy
import re

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
    with pytest.raises(ValueError, match="'generator'"):
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


WORKER_LAYOUTS = {
    "1-worker": {"num_workers": 1},
    "2-workers-prefetch-3": {"num_workers": 2, "prefetch_factor": 3},
    "2-persistent": {"num_workers": 2, "persistent_workers": True},
    "2-drop-last-prefetch-1": {"num_workers": 2, "drop_last": True, "prefetch_factor": 1},
    "2-persistent-drop-last": {"num_workers": 2, "persistent_workers": True, "drop_last": True},
    "2-unbatched": {"num_workers": 2, "batch_size": None},
}


@pytest.mark.parametrize("layout", WORKER_LAYOUTS.values(), ids=WORKER_LAYOUTS.keys())
def test_with_workers_a_resume_continues_at_the_next_batch_training_received(layout):
    """Workers prefetch up to num_workers * prefetch_factor batches; the position ignores them."""
    options = {"batch_size": 3, **layout}

    def make(**overrides):
        return resumable_loader(dataset(11), seed=5, **{**options, **overrides})

    reference = uninterrupted(make)
    batches = [e for e in reference if e[0] != "seed"]
    in_process = uninterrupted(
        lambda: make(num_workers=0, persistent_workers=False, prefetch_factor=None)
    )
    assert batches == [e for e in in_process if e[0] != "seed"]
    mid_epoch = reference.index(batches[1]) + 1
    epoch_end = [i for i, e in enumerate(reference) if e[0] == "seed"][1]  # its last batch
    for stop in (mid_epoch, epoch_end):
        assert interrupted(make, stop) == reference, f"resumed after event {stop}"


def test_the_position_counts_batches_handed_out_while_workers_run_ahead():
    loader = resumable_loader(dataset(40), batch_size=4, seed=1, num_workers=2, prefetch_factor=4)
    iterator = iter(loader)
    first = [next(iterator)[0].tolist() for _ in range(3)]
    assert loader.sampler.position == 12  # the workers have been handed far more indices
    copied = copy.deepcopy(loader.sampler)  # while the workers run: i11core dry-runs a copy
    assert_same_state(copied.state_dict(), loader.sampler.state_dict())
    state = loader.sampler.state_dict()
    rest = [b.tolist() for (b,) in iterator]

    fresh = resumable_loader(dataset(40), batch_size=4, seed=1, num_workers=2)
    fresh.sampler.load_state_dict(state)
    assert [b.tolist() for (b,) in fresh] == rest
    assert sorted(i for b in first + rest for i in b) == list(range(40))


def test_an_iterator_never_advanced_is_replaced_not_counted_as_an_epoch():
    sampler = ResumableSampler(6, seed=0)
    iter(sampler)
    iter(sampler)
    assert sampler.epoch == 0 and len(list(sampler)) == 6
    assert sampler.epoch == 0  # the iterator that ran was the epoch's
    list(sampler)
    assert sampler.epoch == 1


def test_a_state_saved_before_the_batch_layout_existed_still_loads():
    loader = resumable_loader(dataset(10), batch_size=2, seed=3)
    iterator = iter(loader)
    next(iterator)
    legacy = {
        k: v for k, v in loader.sampler.state_dict().items() if k not in ("batch_size", "drop_last")
    }
    fresh = resumable_loader(dataset(10), batch_size=2, seed=3)
    fresh.sampler.load_state_dict(legacy)
    assert [b.tolist() for (b,) in fresh] == [b.tolist() for (b,) in iterator]


def _saved_state():
    loader = resumable_loader(dataset(10), batch_size=2, seed=3)
    iterator = iter(loader)
    next(iterator)
    return loader.sampler.state_dict()


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"size": True}, "'size'"),
        ({"size": "10"}, "'size'"),
        ({"shuffle": 1}, "'shuffle'"),
        ({"seed": None}, "'seed'"),
        ({"seed": -1}, "'seed'"),
        ({"epoch": 2**63}, "'epoch'"),
        ({"epoch": True}, "'epoch'"),
        ({"position": -1}, "'position'"),
        ({"position": 2.0}, "'position'"),
        ({"batch_size": 0}, "'batch_size'"),
        ({"batch_size": 2.0}, "'batch_size'"),
        ({"batch_size": 3}, "batches of 3"),
        ({"drop_last": True}, "drop_last=True"),
        ({"drop_last": "no"}, "'drop_last'"),
        ({"drop_last": 0}, "'drop_last'"),
        ({"generator": torch.zeros(5056, dtype=torch.int16)}, "'generator'"),
        ({"generator": torch.zeros(2, 2528, dtype=torch.uint8)}, "'generator'"),
        ({"generator": [0] * 5056}, "'generator'"),
    ],
)
def test_every_field_is_checked_before_the_sampler_changes(change, field):
    loader = resumable_loader(dataset(10), batch_size=2, seed=3)
    iterator = iter(loader)
    next(iterator)
    before = loader.sampler.state_dict()
    with pytest.raises(ValueError, match=re.escape(field)):
        loader.sampler.load_state_dict({**_saved_state(), **change})
    assert_same_state(loader.sampler.state_dict(), before)
    assert len(list(iterator)) == 4


def test_a_state_that_is_not_a_dict_is_refused():
    with pytest.raises(ValueError, match="exactly the keys"):
        ResumableSampler(3).load_state_dict([1, 2])  # type: ignore[arg-type]


def test_a_sampler_copy_is_independent():
    sampler = ResumableSampler(8, seed=2)
    iterator = iter(sampler)
    next(iterator)
    twin = copy.deepcopy(sampler)
    rest = list(iterator)
    assert (twin.position, sampler.position) == (1, 8)
    fresh = ResumableSampler(8, seed=2)
    fresh.load_state_dict(twin.state_dict())
    assert list(fresh) == rest


def test_out_of_order_batches_are_refused():
    with pytest.raises(ValueError, match="in_order"):
        resumable_loader(dataset(4), num_workers=1, in_order=False)
