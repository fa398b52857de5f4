"""Item kinds, names and capture."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import ckpt
from ckpt.format import TensorRecord
from ckpt.manager import RESERVED_NAMES
from ckpt.state.items import capture, check_item_name, item_kind, skeleton
from ckpt.state.optim import module_param_names
from ckpt.state.tree import flatten


def test_kinds():
    model = nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=1)
    assert item_kind("m", model) == "module"
    assert item_kind("o", opt) == "optimizer"
    assert item_kind("s", torch.optim.lr_scheduler.StepLR(opt, 1)) == "stateful"
    assert item_kind("d", {"a": 1}) == "dict"
    with pytest.raises(TypeError, match="'x' is a list"):
        item_kind("x", [1])


BAD_NAMES = ["a/b", "../x", "", "1a", "a b", "é", "step", "strict", "epoch", "overwrite"]
BAD_NAMES += ["verify", "rng", "metrics", "map_location", "assign", "optimizer_by_position"]


@pytest.mark.parametrize("name", BAD_NAMES)
def test_bad_item_names(name):
    with pytest.raises(ValueError):
        check_item_name(name, RESERVED_NAMES)


def test_reserved_names_are_the_options_of_save_and_restore():
    assert {
        "step",
        "epoch",
        "metrics",
        "rng",
        "overwrite",
        "map_location",
        "strict",
    } <= RESERVED_NAMES
    assert {"verify", "assign", "optimizer_class_change", "optimizer_by_position"} <= RESERVED_NAMES
    assert "items" not in RESERVED_NAMES and "self" not in RESERVED_NAMES


def test_optimizer_capture_records_names_and_shapes():
    model = nn.Sequential(nn.Linear(3, 2), nn.Linear(2, 1))
    extra_param = nn.Parameter(torch.zeros(4))
    opt = torch.optim.Adam([*model.parameters(), extra_param])
    cap = capture("opt", opt, module_param_names({"model": model}))
    assert cap.kind == "optimizer"
    assert cap.extra["params"] == [
        {"name": "model.0.weight", "shape": [2, 3]},
        {"name": "model.0.bias", "shape": [2]},
        {"name": "model.1.weight", "shape": [1, 2]},
        {"name": "model.1.bias", "shape": [1]},
        {"name": None, "shape": [4]},
    ]


def test_module_capture_keeps_version_metadata():
    cap = capture("m", nn.BatchNorm1d(3), {})
    assert cap.extra["module_metadata"] == {"": {"version": 2}}
    assert set(cap.tensors) == {
        "m/weight", "m/bias", "m/running_mean", "m/running_var", "m/num_batches_tracked",
    }  # fmt: skip


def test_state_dict_that_is_not_a_dict_is_refused():
    class Odd:
        def state_dict(self):
            return [1]

        def load_state_dict(self, state):
            pass

    with pytest.raises(TypeError, match="not a dict"):
        capture("odd", Odd(), {})


def test_every_live_object_has_one_kind_registered_in_one_place():
    from ckpt.state.kinds import KINDS, kind_of

    opt = torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=1)
    objects = {
        "ModuleKind": nn.Linear(2, 2),
        "OptimizerKind": opt,
        "SchedulerKind": torch.optim.lr_scheduler.StepLR(opt, 1),
        "ScalerKind": torch.amp.GradScaler("cpu"),
        "SamplerKind": ckpt.ResumableSampler(3),
        "StatefulKind": IntKeyed(),
        "DictKind": {"a": 1},
    }
    for expected, obj in objects.items():
        assert type(kind_of("x", obj)).__name__ == expected
    assert len({type(k) for k in KINDS}) == len(KINDS)


class IntKeyed:
    """A user object whose state has int keys: saved and restored as before."""

    def __init__(self):
        self.values = {0: torch.zeros(2), 1: "one"}

    def state_dict(self):
        return dict(self.values)

    def load_state_dict(self, state):
        self.values = dict(state)


def test_a_user_state_with_int_keys_round_trips(tmp_path):
    saved = IntKeyed()
    saved.values[0] += 1
    mgr = ckpt.CheckpointManager(tmp_path)
    mgr.save(0, obj=saved)
    mgr.verify(0)
    live = IntKeyed()
    mgr.restore(obj=live)
    assert torch.equal(live.values[0], torch.ones(2)) and live.values[1] == "one"


def test_skeleton_names_every_decoded_leaf_including_parameters_and_requires_grad():
    """Restore decides each tensor's device by the leaf it decodes to; a Parameter or
    requires_grad tag decodes to a new leaf over its placeholder, and must be named too."""
    state = {
        "w": torch.nn.Parameter(torch.ones(2)),
        "g": torch.zeros(3, requires_grad=True),
        "plain": torch.arange(4),
    }
    tree, tensors = flatten(state, "extra")
    records = {
        n: TensorRecord("extra.safetensors", t.dtype, tuple(t.shape), "cpu")
        for n, t in tensors.items()
    }
    decoded, names = skeleton(tree, records)
    assert isinstance(decoded["w"], torch.nn.Parameter)
    assert decoded["g"].requires_grad
    assert {names[id(decoded[k])] for k in state} == set(tensors)
