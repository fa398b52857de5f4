"""Round-trip and refusal tests for the typed-JSON flattening."""

from __future__ import annotations

import json
import math
from collections import OrderedDict, defaultdict, namedtuple

import pytest
import torch
from conftest import assert_same_state
from helpers import keys, tensors, trees
from hypothesis import given, settings
from hypothesis import strategies as st

import ckpt
from ckpt.tree import flatten, tensor_refs, unflatten


def through_json(tree):
    return json.loads(json.dumps(tree, allow_nan=False))


@settings(max_examples=300, deadline=None)
@given(trees)
def test_round_trip_is_exact(value):
    tree, named = flatten(value, "item")
    back = unflatten(through_json(tree), named)
    assert_same_state(back, value)


@settings(max_examples=100, deadline=None)
@given(st.dictionaries(keys, tensors, min_size=1, max_size=6))
def test_tensor_names_are_unique_and_paths_match(value):
    tree, named = flatten(value, "item")
    assert len(named) == len(value)
    refs = tensor_refs(through_json(tree))
    assert [path for path, _ in refs] == [(k,) for k in value]
    for path, name in refs:
        assert named[name] is not None
        assert torch.equal(named[name], value[path[0]])


def test_int_and_str_keys_side_by_side_keep_their_types():
    value = {0: torch.ones(1), "0": torch.zeros(1), "a/b": 1, "../x": 2}
    tree, named = flatten(value, "opt")
    assert len(named) == 2
    back = unflatten(through_json(tree), named)
    assert list(back) == [0, "0", "a/b", "../x"]
    assert torch.equal(back[0], torch.ones(1)) and torch.equal(back["0"], torch.zeros(1))


def test_tuple_list_and_special_floats_survive():
    value = {"betas": (0.9, 0.999), "l": [1, 1.0, math.inf, -math.inf], "n": math.nan, "big": 2**80}
    back = unflatten(through_json(flatten(value, "x")[0]), {})
    assert isinstance(back["betas"], tuple) and isinstance(back["l"], list)
    assert type(back["l"][0]) is int and type(back["l"][1]) is float
    assert back["l"][2:] == [math.inf, -math.inf] and math.isnan(back["n"])
    assert back["big"] == 2**80


def test_tied_tensors_are_stored_once_and_tied_again():
    w = torch.randn(3, 3)
    tree, named = flatten({"enc": w, "dec": w, "other": w.clone()}, "m")
    assert len(named) == 2
    back = unflatten(through_json(tree), named)
    assert back["enc"] is back["dec"] and back["other"] is not back["enc"]


def test_views_of_one_storage_are_not_confused():
    base = torch.arange(6.0)
    tree, named = flatten({"a": base[:3], "b": base[3:]}, "m")
    back = unflatten(tree, named)
    assert torch.equal(back["a"], base[:3]) and torch.equal(back["b"], base[3:])


@pytest.mark.parametrize(
    ("value", "where"),
    [
        ({"a": {"b": object()}}, "x['a']['b']"),
        ({"s": {1, 2}}, "x['s']"),
        ({"p": namedtuple("P", "a")(1)}, "x['p']"),
        ({"f": (1.5).__class__.fromhex}, "x['f']"),
        ({"k": {(1, 2): 3}}, "x['k']"),
        ({"sparse": torch.eye(2).to_sparse()}, "x['sparse']"),
        ({"meta": torch.empty(2, device="meta")}, "x['meta']"),
    ],
)
def test_unstorable_values_name_their_key_path(value, where):
    with pytest.raises(TypeError) as info:
        flatten(value, "x")
    assert where in str(info.value)


def test_dict_subclasses_flatten_like_dict():
    back = unflatten(flatten(OrderedDict(b=1, a=2), "x")[0], {})
    assert list(back) == ["b", "a"] and type(back) is dict
    counts = defaultdict(int, {3: 1})
    assert unflatten(flatten(counts, "x")[0], {}) == {3: 1}


@pytest.mark.parametrize(
    "bad",
    [
        {"$tensor": 3},
        {"$tensor": "missing"},
        {"$dict": [[1, 2, 3]]},
        {"$dict": [[1, 2], [1, 3]]},
        {"$float": "zero"},
        {"$unknown": 1},
        {"$tuple": 1},
        {"$bytes": "!!"},
        {"$dtype": "notatype"},
        {"$device": "toaster:9"},
        {"a": 1, "$tensor": "x"},
    ],
)
def test_malformed_trees_raise_checkpoint_errors(bad):
    with pytest.raises(ckpt.CorruptCheckpointError):
        unflatten({"x": [bad]}, {})


def test_deep_nesting_is_a_checkpoint_error():
    tree: object = 1
    for _ in range(100_000):
        tree = [tree]
    with pytest.raises(ckpt.CorruptCheckpointError):
        unflatten(tree, {})
