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


# Ranks: each rank's share of an epoch, as DistributedSampler splits it; world-size changes.


def ranks(n: int, replicas: int, *, seed: int = 3, **options) -> list[ResumableSampler]:
    """One sampler per rank of a simulated world (no process group needed)."""
    return [
        ResumableSampler(n, seed=seed, num_replicas=replicas, rank=r, **options)
        for r in range(replicas)
    ]


def take(iterators: list, steps: int) -> list[list[int]]:
    """Every rank takes ``steps`` more indices, in step."""
    return [[next(it) for _ in range(steps)] for it in iterators]


def resumed(states: list[dict], n: int, replicas: int, *, seed: int = 3, **options) -> list:
    """A new world of ``replicas`` ranks, rank r loading the state of old rank r % len(states)."""
    samplers = ranks(n, replicas, seed=seed, **options)
    for r, sampler in enumerate(samplers):
        sampler.load_state_dict(states[r % len(states)])
    return samplers


def flat(per_rank: list[list[int]]) -> list[int]:
    return [i for indices in per_rank for i in indices]


def padding(remaining: int, replicas: int) -> int:
    return -(-remaining // replicas) * replicas - remaining


@pytest.mark.parametrize("drop_last", [False, True], ids=["pad", "drop"])
@pytest.mark.parametrize("size", [1, 2, 7, 10, 12])
@pytest.mark.parametrize("replicas", [1, 2, 3, 4, 5])
def test_each_rank_takes_what_distributed_sampler_gives_it(replicas, size, drop_last):
    from torch.utils.data import DistributedSampler

    samplers = ranks(size, replicas, shuffle=False, drop_last=drop_last)
    expected = [
        list(DistributedSampler(dataset(size), replicas, r, shuffle=False, drop_last=drop_last))
        for r in range(replicas)
    ]
    assert [list(s) for s in samplers] == expected
    assert [len(s) for s in samplers] == [len(e) for e in expected]
    assert [list(s) for s in samplers] == expected  # the next epoch, again


@pytest.mark.parametrize(("size", "replicas"), [(12, 3), (13, 3), (5, 8)])
def test_ranks_partition_the_same_shuffled_order(size, replicas):
    alone = list(ResumableSampler(size, seed=3))
    shares = [list(s) for s in ranks(size, replicas)]
    total = len(shares[0]) * replicas
    interleaved = [shares[i % replicas][i // replicas] for i in range(total)]
    assert interleaved == [alone[i % size] for i in range(total)]  # padded by wrapping around
    assert [list(s) for s in ranks(size, replicas, drop_last=True)] == [
        alone[r : size // replicas * replicas : replicas] for r in range(replicas)
    ]


def test_ranks_default_to_the_process_group_else_one(monkeypatch):
    assert (ResumableSampler(4).num_replicas, ResumableSampler(4).rank) == (1, 0)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda group=None: 4)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda group=None: 3)
    sampler = ResumableSampler(10)
    assert (sampler.num_replicas, sampler.rank, len(sampler), sampler.size) == (4, 3, 3, 10)
    assert ResumableSampler(10, rank=1).rank == 1
    loader = resumable_loader(dataset(10), sampler_drop_last=True, num_replicas=5)
    assert (loader.sampler.num_replicas, loader.sampler.rank, len(loader.sampler)) == (5, 3, 2)


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"num_replicas": 0}, "num_replicas"),
        ({"num_replicas": True}, "num_replicas"),
        ({"num_replicas": 2, "rank": 2}, "rank"),
        ({"num_replicas": 2, "rank": -1}, "rank"),
        ({"rank": 1}, "rank"),
        ({"num_replicas": 2, "rank": 1.0}, "rank"),
    ],
)
def test_constructor_checks_the_ranks(options, match):
    with pytest.raises(ValueError, match=match):
        ResumableSampler(5, **options)


def test_the_rank_seeds_its_loader_generator_and_rank_zero_seeds_it_as_one_process():
    seeds = [s.loader_generator.initial_seed() for s in ranks(8, 3)]
    assert len(set(seeds)) == 3
    assert seeds[0] == ResumableSampler(8, seed=3).loader_generator.initial_seed()


SPLITS = {
    "even": (24, 2, False, 3),
    "padded": (25, 2, False, 3),
    "dropped": (25, 2, True, 3),
    "last-step": (25, 2, False, 12),
    "first-step": (10, 2, False, 0),
}


@pytest.mark.parametrize(("size", "old", "drop_last", "steps"), SPLITS.values(), ids=SPLITS.keys())
@pytest.mark.parametrize("new", [1, 2, 3, 4])
def test_mid_epoch_on_two_ranks_the_rest_is_split_over_any_number(size, old, drop_last, steps, new):
    before = ranks(size, old, drop_last=drop_last)
    iterators = [iter(s) for s in before]
    consumed = flat(take(iterators, steps))
    states = [s.state_dict() for s in before]
    assert len({s["position"] for s in states}) == 1  # every rank saves the same position
    after = resumed(states[::-1], size, new, drop_last=drop_last)  # from the other rank's state
    remaining = flat([list(s) for s in after])
    order = list(ResumableSampler(size, seed=3))
    seen = consumed + remaining
    position = states[0]["position"]
    assert sorted(consumed) == sorted(order[i % size] for i in range(steps * old))
    if drop_last:  # each rank's tail dropped: nothing twice
        assert len(seen) == len(set(seen))
        rest = size - min(position, size)
        assert sorted(remaining) == sorted(order[position : position + rest // new * new])
    else:  # everything once; more only where a split was padded
        assert set(seen) == set(range(size))
        assert set(order[position:]) <= set(remaining)
        assert len(seen) - size == padding(size - position, new) + (
            padding(size, old) if position == size else 0
        )
        if size % old == 0 and (size - position) % new == 0:
            assert sorted(seen) == list(range(size))
    assert all(s.epoch == 0 for s in after)


@pytest.mark.parametrize(("size", "drop_last"), [(25, False), (24, False), (25, True)])
@pytest.mark.parametrize("steps", [0, 2, 5])
def test_the_same_world_continues_exactly_from_any_rank_state(size, drop_last, steps):
    reference = [list(s) for s in ranks(size, 3, drop_last=drop_last)]
    before = ranks(size, 3, drop_last=drop_last)
    iterators = [iter(s) for s in before]
    first = take(iterators, steps)
    states = [s.state_dict() for s in before]
    for shift in range(3):  # rank r loads the state old rank r + shift saved
        after = resumed(states[shift:] + states[:shift], size, 3, drop_last=drop_last)
        assert_same_state(after[0].state_dict(), states[0])
        assert [f + list(s) for f, s in zip(first, after, strict=True)] == reference


def test_repeated_world_changes_in_one_epoch_see_each_index_once():
    size, replicas = 37, [2, 3, 1, 4, 5]
    samplers, seen, states = ranks(size, 2), [], None
    for world in replicas:
        if states is not None:
            samplers = resumed(states, size, world)
        iterators = [iter(s) for s in samplers]
        seen += flat(take(iterators, 2))
        states = [s.state_dict() for s in samplers]
        assert states[0]["position"] == len(seen)
    final = resumed(states, size, 3)
    seen += flat([list(s) for s in final])
    assert set(seen) == set(range(size))
    assert len(seen) == size + padding(size - states[0]["position"], 3)
    alone = list(ResumableSampler(size, seed=3))
    assert seen[: states[0]["position"]] != alone[: states[0]["position"]]  # ranks interleave
    assert sorted(seen[: states[0]["position"]]) == sorted(alone[: states[0]["position"]])


def test_a_state_saved_after_a_change_resumes_exactly_and_changes_again():
    size = 29
    old = ranks(size, 2)
    take([iter(s) for s in old], 3)
    changed = resumed([s.state_dict() for s in old], size, 3)
    iterators = [iter(s) for s in changed]
    take(iterators, 2)
    states = [s.state_dict() for s in changed]
    assert (states[0]["split_start"], states[0]["position"]) == (6, 12)
    rest = [list(it) for it in iterators]
    again = resumed(states, size, 3)
    assert [list(s) for s in again] == rest  # exact, padding included
    assert [s.state_dict()["position"] for s in again] == [size] * 3
    four = flat([list(s) for s in resumed(states, size, 4)])
    order = list(ResumableSampler(size, seed=3))
    assert sorted(set(four)) == sorted(order[12:]) and len(four) == 20  # 17 left, padded


def test_after_a_change_the_next_epochs_use_the_new_world():
    size = 17
    old = ranks(size, 2)
    take([iter(s) for s in old], 4)
    changed = resumed([s.state_dict() for s in old], size, 3)
    [list(s) for s in changed]  # the rest of epoch 0
    later = [[list(s) for s in changed] for _ in range(2)]
    fresh = ranks(size, 3)
    [list(s) for s in fresh]
    assert later == [[list(s) for s in fresh] for _ in range(2)]
    assert [s.epoch for s in changed] == [2, 2, 2]


def test_a_state_saved_at_the_end_of_a_split_resumes_into_the_next_epoch():
    for drop_last in (False, True):
        old = ranks(11, 2, drop_last=drop_last)
        [list(s) for s in old]
        states = [s.state_dict() for s in old]
        assert states[0]["position"] == 11
        for world in (1, 2, 3):
            after = resumed(states, 11, world, drop_last=drop_last)
            assert [list(s) for s in after] == [[]] * world
            assert [len(list(s)) for s in after] == [len(s) for s in after]
            assert [s.epoch for s in after] == [1] * world


def test_a_single_rank_state_has_the_old_fields_and_loads_into_ranks():
    sampler = ResumableSampler(10, seed=3)
    iterator = iter(sampler)
    first = [next(iterator) for _ in range(4)]
    state = sampler.state_dict()
    assert set(state) == {
        "size", "shuffle", "seed", "epoch", "position", "generator", "batch_size", "drop_last"
    }  # fmt: skip
    after = resumed([state], 10, 2)
    assert sorted(first + flat([list(s) for s in after])) == list(range(10))
    assert {"num_replicas", "split_start"} <= set(after[0].state_dict())


def test_rank_states_round_trip_through_the_manager(tmp_path):
    samplers = ranks(11, 2, seed=4)
    iterators = [iter(s) for s in samplers]
    take(iterators, 2)
    state = samplers[1].state_dict()
    mgr = ckpt.CheckpointManager(tmp_path)
    mgr.save(0, sampler=samplers[1])
    rest = [list(it) for it in iterators]

    same = ResumableSampler(11, seed=4, num_replicas=2, rank=0)
    mgr.restore(sampler=same)
    assert_same_state(same.state_dict(), {**state, "rank": 0})
    assert list(same) == rest[0]
    others = ranks(11, 3, seed=4)
    for sampler in others:
        mgr.restore(sampler=sampler)
    remaining = flat([list(s) for s in others])
    order = list(ResumableSampler(11, seed=4))
    assert sorted(set(remaining)) == sorted(order[4:]) and len(remaining) == 9  # 7, padded
    mgr.verify(0)


HOSTILE_SPLITS = [
    ({"num_replicas": 0}, "'num_replicas'"),
    ({"num_replicas": True}, "'num_replicas'"),
    ({"num_replicas": 2**63}, "'num_replicas'"),
    ({"num_replicas": "2"}, "'num_replicas'"),
    ({"rank": 2}, "'rank'"),
    ({"rank": -1}, "'rank'"),
    ({"rank": False}, "'rank'"),
    ({"position": -1}, "'position'"),
    ({"position": 11}, "'position'"),
    ({"position": True}, "'position'"),
    ({"position": 5}, "'position'"),  # not where two ranks in step can be
    ({"num_replicas": 3, "rank": 0}, "'position'"),
    ({"sampler_drop_last": True, "position": 9, "split_start": 1}, "'position'"),
    ({"split_start": 5}, "'split_start'"),
    ({"split_start": -2}, "'split_start'"),
    ({"split_start": True}, "'split_start'"),
    ({"sampler_drop_last": 1}, "'sampler_drop_last'"),
    ({"sampler_drop_last": None}, "'sampler_drop_last'"),
]


def _two_rank_state() -> dict:
    samplers = ranks(10, 2)
    take([iter(s) for s in samplers], 2)
    return samplers[1].state_dict()


@pytest.mark.parametrize(("change", "field"), HOSTILE_SPLITS)
def test_a_hostile_split_is_refused_and_the_sampler_is_untouched(change, field):
    sampler = ResumableSampler(10, seed=3, num_replicas=2, rank=0)
    iterator = iter(sampler)
    next(iterator)
    before = sampler.state_dict()
    with pytest.raises(ValueError, match=re.escape(field)):
        sampler.load_state_dict({**_two_rank_state(), **change})
    assert_same_state(sampler.state_dict(), before)
    assert len(list(iterator)) == 4


@pytest.mark.parametrize("missing", ["num_replicas", "rank", "split_start", "sampler_drop_last"])
def test_a_split_with_a_field_missing_is_refused(missing):
    sampler = ResumableSampler(10, seed=3, num_replicas=2, rank=0)
    state = {k: v for k, v in _two_rank_state().items() if k != missing}
    with pytest.raises(ValueError, match="exactly the keys"):
        sampler.load_state_dict(state)
    assert sampler.position == 0


@pytest.mark.parametrize(
    ("change", "field"), HOSTILE_SPLITS[::3], ids=[f for _, f in HOSTILE_SPLITS[::3]]
)
def test_a_hostile_split_in_a_checkpoint_is_refused(tmp_path, monkeypatch, change, field):
    saved = ResumableSampler(10, seed=3, num_replicas=2, rank=1)
    monkeypatch.setattr(saved, "state_dict", lambda: {**_two_rank_state(), **change})
    mgr = ckpt.CheckpointManager(tmp_path)
    mgr.save(0, sampler=saved)
    live = ResumableSampler(10, seed=3, num_replicas=2, rank=0)
    iterator = iter(live)
    next(iterator)
    before = live.state_dict()
    with pytest.raises(ckpt.CheckpointError, match=re.escape(field.strip("'"))):
        mgr.restore(sampler=live)
    assert_same_state(live.state_dict(), before)
    with pytest.raises(ckpt.CorruptCheckpointError, match=re.escape(field.strip("'"))):
        mgr.verify(0)
    assert len(list(iterator)) == 4


def test_a_rank_loader_with_workers_counts_the_batches_received():
    def make(rank: int = 0, **options):
        return resumable_loader(
            dataset(21), batch_size=3, seed=1, num_replicas=2, rank=rank, **options
        )

    reference = [b.tolist() for (b,) in make()]
    loader = make(num_workers=2, prefetch_factor=4)
    iterator = iter(loader)
    first = [next(iterator)[0].tolist() for _ in range(2)]
    assert loader.sampler.position == 12  # 2 batches of 3 on each of 2 ranks, not the prefetched
    state = loader.sampler.state_dict()
    rest = [b.tolist() for (b,) in iterator]
    assert first + rest == reference
    assert loader.sampler.position == 21

    fresh = make(num_workers=2)
    fresh.sampler.load_state_dict(state)
    assert [b.tolist() for (b,) in fresh] == rest
    other = make(rank=1)
    other.sampler.load_state_dict(state)
    assert [b.tolist() for (b,) in other] == [b.tolist() for (b,) in make(rank=1)][2:]


def test_a_change_of_drop_last_re_splits_the_rest_like_a_change_of_world():
    padded = ranks(13, 2)
    first = flat(take([iter(s) for s in padded], 2))
    dropped = resumed([s.state_dict() for s in padded], 13, 2, drop_last=True)
    rest = flat([list(s) for s in dropped])
    order = list(ResumableSampler(13, seed=3))
    assert sorted(first + rest) == sorted(order[:12])  # 9 left: 8 taken, the last dropped
