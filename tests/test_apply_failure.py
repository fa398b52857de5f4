"""Failures in user code while items are loaded: what was loaded is said, the rest is untouched.

Everything ckpt can check runs before any item changes; small stateful objects
are even loaded into a copy first. What is left is code ckpt cannot try out on
a copy: a module's load hooks, an optimizer's ``load_state_dict`` override or
hooks. When that raises, the ``PartialRestoreError`` names the item, the items
already restored, and the items not yet restored, which are bit-identical to before.
"""

from __future__ import annotations

import copy
import random

import pytest
import torch
from conftest import assert_same_state, states_differ
from helpers import small_model, train_steps

import ckpt


class Counter:
    """A user Stateful object."""

    def __init__(self, value: int = 0, fail: bool = False):
        self.value = value
        self.fail = fail

    def state_dict(self):
        return {"value": self.value}

    def load_state_dict(self, state):
        if self.fail:
            raise ValueError("counter refuses")
        if not isinstance(state["value"], int):
            raise TypeError("value must be an int")
        self.value = state["value"]


def live(seed: int):
    model = small_model(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, 1)
    train_steps(model, optimizer, 2, seed=seed)
    scheduler.step()
    return {
        "model": model,
        "optimizer": optimizer,
        "scheduler": scheduler,
        "counter": Counter(seed),
        "extra": {"seen": seed},
    }


def snapshot(items):
    out = {n: copy.deepcopy(o if isinstance(o, dict) else o.state_dict()) for n, o in items.items()}
    out["rng"] = (torch.get_rng_state(), random.getstate())
    return out


@pytest.fixture
def mgr(tmp_path):
    manager = ckpt.CheckpointManager(tmp_path)
    manager.save(1, **live(1))
    random.random()  # the streams move on after the save
    return manager


def boom(*args, **kwargs):
    raise RuntimeError("hook failed")


def test_a_failing_module_hook_leaves_every_later_item_untouched(mgr):
    items = live(2)
    items["model"].register_load_state_dict_post_hook(boom)
    before = snapshot(items)
    with pytest.raises(ckpt.PartialRestoreError, match="hook failed") as e:
        mgr.restore(**items)
    assert isinstance(e.value, ckpt.CheckpointError) and e.value.item == "model"
    assert e.value.applied == ()
    assert e.value.not_applied == ("optimizer", "counter", "scheduler", "extra", "rng")
    assert e.value.path is not None and "'model'" in str(e.value)
    after = snapshot(items)
    for name in ("optimizer", "scheduler", "counter", "extra", "rng"):
        assert_same_state(after[name], before[name])


class Unprintable(RuntimeError):
    """An error whose message cannot be printed (its ``__str__`` raises)."""

    def __str__(self) -> str:
        raise ValueError("no message")


def unprintable_boom(*args, **kwargs):
    raise Unprintable()


def test_an_item_error_that_cannot_be_printed_is_still_a_partial_restore(mgr):
    items = live(2)
    items["model"].register_load_state_dict_post_hook(unprintable_boom)
    with pytest.raises(ckpt.PartialRestoreError, match="<unprintable message>") as e:
        mgr.restore(**items)
    assert (e.value.item, e.value.applied) == ("model", ())
    assert isinstance(e.value.__cause__, Unprintable)


def test_a_failing_optimizer_hook_lists_the_model_as_restored(mgr):
    items = live(2)
    items["optimizer"].register_load_state_dict_pre_hook(boom)
    expected = live(1)["model"].state_dict()
    before = snapshot(items)
    with pytest.raises(ckpt.PartialRestoreError) as e:
        mgr.restore(**items)
    assert (e.value.item, e.value.applied) == ("optimizer", ("model",))
    after = snapshot(items)
    assert_same_state(items["model"].state_dict(), expected)
    for name in ("optimizer", "scheduler", "counter", "extra", "rng"):
        assert_same_state(after[name], before[name])


def test_in_place_reads_wait_for_code_that_may_fail_first(mgr):
    """The optimizer is read straight into live memory only when nothing before it can fail."""
    items = live(2)
    items["model"].register_load_state_dict_pre_hook(boom)
    exp_avg = items["optimizer"].state_dict()["state"][0]["exp_avg"].clone()
    with pytest.raises(ckpt.PartialRestoreError):
        mgr.restore(**items)
    assert torch.equal(items["optimizer"].state_dict()["state"][0]["exp_avg"], exp_avg)


def test_a_stateful_object_that_refuses_its_state_fails_on_a_copy_first(mgr):
    items = live(2)
    items["counter"].fail = True
    before = snapshot(items)
    with pytest.raises(ckpt.IncompatibleCheckpointError, match="counter refuses") as e:
        mgr.restore(**items)
    assert e.value.key == "counter" and "nothing changed" in str(e.value)
    assert_same_state(snapshot(items), before)


def test_an_object_that_fails_only_for_real_is_reported_after_the_items_before_it(mgr):
    class Uncopyable(Counter):
        def __deepcopy__(self, memo):
            raise TypeError("no copies")

    items = live(2)
    items["counter"] = Uncopyable(2, fail=True)
    before = snapshot(items)
    with pytest.raises(ckpt.PartialRestoreError) as e:
        mgr.restore(**items)
    assert e.value.item == "counter"
    assert e.value.applied == ("model", "optimizer")
    assert e.value.not_applied == ("scheduler", "extra", "rng")
    after = snapshot(items)
    assert states_differ(after["model"], before["model"])
    for name in ("scheduler", "extra", "rng"):
        assert_same_state(after[name], before[name])


def test_keyword_order_never_changes_the_outcome(mgr):
    first, second = live(2), live(2)
    mgr.restore(**first)
    mgr.restore(**dict(reversed(list(second.items()))))
    assert_same_state(snapshot(first), snapshot(second))
