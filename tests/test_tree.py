"""Round-trip and refusal tests for the typed-JSON flattening."""

from __future__ import annotations

import io
import json
import math
from collections import OrderedDict, defaultdict, namedtuple

import pytest
import torch
from conftest import assert_same_state
from helpers import keys, tensors, trees
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import ckpt
from ckpt.state.tree import flatten, tensor_refs, unflatten


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
        {"$param": "t"},
        {"$param": {"tensor": "t"}},
        {"$param": {"tensor": "t", "requires_grad": 1}},
        {"$param": {"tensor": "t", "requires_grad": True, "x": 1}},
        {"$param": {"tensor": "missing", "requires_grad": True}},
        {"$requires_grad": 3},
        {"$requires_grad": "i"},
        {"$param": {"tensor": "i", "requires_grad": True}},
    ],
)
def test_malformed_trees_raise_checkpoint_errors(bad):
    with pytest.raises(ckpt.CorruptCheckpointError):
        unflatten({"x": [bad]}, {"t": torch.ones(2), "i": torch.ones(2, dtype=torch.int64)})


def test_deep_nesting_is_a_checkpoint_error():
    tree: object = 1
    for _ in range(100_000):
        tree = [tree]
    with pytest.raises(ckpt.CorruptCheckpointError):
        unflatten(tree, {})


def torch_round_trip(value):
    """What torch.save/torch.load give back for ``value``: the reference."""
    buffer = io.BytesIO()
    torch.save(value, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def one_by_one(value):
    """torch.save refuses dtype views of one memory side by side: round-trip each alone."""
    return {k: torch_round_trip(v) for k, v in value.items()}


def views_over_one_memory():
    z = torch.randn(4, 3, generator=torch.Generator().manual_seed(0), dtype=torch.complex64)
    x = torch.randn(6, generator=torch.Generator().manual_seed(1))
    return {
        "z": z,
        "conj": z.conj(),
        "imag": z.imag,
        "real": z.real,
        "conj_imag": z.conj().imag,
        "neg_view": torch._neg_view(z),
        "conj_t": z.t().conj(),
        "as_real": torch.view_as_real(z),
        "x": x,
        "x_neg": torch._neg_view(x),
        "x_int": x.view(torch.int32),
        "x_tail": x[2:],
        "x_strided": x[::2],
        "x_again": x.view(6),
    }


def assert_same_values(ours, reference):
    assert list(ours) == list(reference)
    for key, ref in reference.items():
        got = ours[key]
        assert got.dtype == ref.dtype and got.shape == ref.shape, key
        assert torch.equal(got.resolve_conj().resolve_neg(), ref.resolve_conj().resolve_neg()), key


def test_conjugate_negative_and_dtype_views_are_never_tied_to_their_base():
    value = views_over_one_memory()
    tree, named = flatten(value, "m")
    assert_same_values(unflatten(through_json(tree), named), one_by_one(value))
    assert "m/x_again" not in named  # the same values over the same memory: tied


@pytest.mark.parametrize("async_save", [False, True])
def test_views_come_back_as_torch_gives_them_back_through_a_checkpoint(tmp_path, async_save):
    value = views_over_one_memory()
    with ckpt.CheckpointManager(tmp_path, async_save=async_save) as mgr:
        mgr.save(0, views=value)
        mgr.wait()
        live = {k: torch.zeros_like(v.resolve_conj().resolve_neg()) for k, v in value.items()}
        mgr.restore(views=live)
        read = mgr.read(0)["views"]
    reference = one_by_one(value)
    assert_same_values(live, reference)
    assert_same_values(read, reference)


def parameters_and_grads():
    w = nn.Parameter(torch.randn(3, 2))
    return {
        "w": w,
        "frozen": nn.Parameter(torch.randn(2), requires_grad=False),
        "leaf": torch.randn(2).requires_grad_(),
        "plain": torch.randn(2),
        "w_again": w,
        "w_data": w.detach(),
        "nested": [{"p": nn.Parameter(torch.ones(1))}],
    }


def assert_same_kinds(ours, reference):
    for key, ref in reference.items():
        got = ours[key]
        if isinstance(ref, list):
            assert_same_kinds(got[0], ref[0])
            continue
        assert type(got) is type(ref), key
        assert got.requires_grad == ref.requires_grad and got.is_leaf, key
        assert got.dtype == ref.dtype and torch.equal(got.detach(), ref.detach()), key


def test_parameters_and_requires_grad_come_back_as_torch_gives_them_back():
    value = parameters_and_grads()
    tree, named = flatten(value, "d")
    back = unflatten(through_json(tree), named)
    assert_same_kinds(back, torch_round_trip(value))
    assert back["w_again"] is back["w"]  # one parameter, twice
    assert back["w_data"].data_ptr() == back["w"].data_ptr()  # a tie: one stored tensor
    assert len(named) == 5


def test_parameters_in_a_dict_item_survive_save_restore_and_read(tmp_path):
    value = parameters_and_grads()
    mgr = ckpt.CheckpointManager(tmp_path)
    mgr.save(0, data=value, rng=False)
    live: dict = {}
    mgr.restore(data=live)
    reference = torch_round_trip(value)
    assert_same_kinds(live, reference)
    assert_same_kinds(mgr.read(0)["data"], reference)


def test_a_non_leaf_tensor_that_requires_grad_comes_back_as_a_leaf_that_does():
    x = torch.ones(2, requires_grad=True) * 2
    back = unflatten(through_json(flatten({"x": x}, "d")[0]), flatten({"x": x}, "d")[1])
    assert back["x"].requires_grad and back["x"].is_leaf and torch.equal(back["x"], x.detach())


def test_states_without_parameters_keep_their_tags():
    tree, _ = flatten({"t": torch.ones(1), "p": nn.Parameter(torch.ones(1))}, "d")
    assert tree == {
        "t": {"$tensor": "d/t"},
        "p": {"$param": {"tensor": "d/p", "requires_grad": True}},
    }


def as_leaf(t: torch.Tensor, kind: str) -> torch.Tensor:
    floating = t.is_floating_point()
    if kind == "param":
        return nn.Parameter(t, requires_grad=floating)
    if kind == "frozen":
        return nn.Parameter(t, requires_grad=False)
    return t.requires_grad_() if kind == "grad" and floating else t


@settings(max_examples=100, deadline=None)
@given(
    st.dictionaries(
        keys,
        st.builds(as_leaf, tensors, st.sampled_from(["param", "frozen", "grad", "plain"])),
        max_size=5,
    )
)
def test_parameters_and_grads_round_trip_exactly(value):
    tree, named = flatten(value, "item")
    back = unflatten(through_json(tree), named)
    assert_same_state(back, value)
    for key, t in value.items():
        assert type(back[key]) is type(t) and back[key].requires_grad == t.requires_grad, key


@pytest.mark.parametrize(
    ("state", "where"),
    [
        ({"a": "\ud800"}, r"string at data\['a'\]"),
        ({"a": ["ok", "x\udfffy"]}, r"string at data\['a'\]\[1\]"),
        ({"a": {"k\ud800": 1}}, r"dict key 'k\\ud800' at data\['a'\]"),
        ({"a": {0: 1, "\ud83d": 2}}, r"dict key '\\ud83d' at data\['a'\]"),
        ({"a": ("é", "\udc80")}, r"string at data\['a'\]\[1\]"),
    ],
)
def test_a_string_that_is_not_valid_unicode_is_refused_when_flattened(state, where):
    with pytest.raises(TypeError, match=where + r".*not valid Unicode text.*UTF-8"):
        flatten(state, "data")


@pytest.mark.parametrize("async_save", [False, True])
def test_a_lone_surrogate_is_refused_at_save_before_anything_is_written(tmp_path, async_save):
    mgr = ckpt.CheckpointManager(tmp_path, async_save=async_save)
    with pytest.raises(TypeError, match=r"data\['k'\].*not valid Unicode"):
        mgr.save(1, data={"k": "\ud800"}, rng=False)
    mgr.save(2, data={"k": "fine: ünïcode ✓ \U0001f600"}, rng=False)
    mgr.wait()
    assert mgr.all_steps() == [2]
    assert mgr.read(2)["data"]["k"] == "fine: ünïcode ✓ \U0001f600"
    mgr.close()
