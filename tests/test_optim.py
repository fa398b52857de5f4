"""Differential tests: ckpt's optimizer restore against torch's own load_state_dict."""

from __future__ import annotations

import copy
import inspect
from typing import Any

import pytest
import torch
from conftest import assert_same_state, states_differ
from helpers import (
    read_manifest_doc,
    restore_matches_torch,
    small_model,
    train_steps,
    write_manifest,
)
from torch import nn

import ckpt
from ckpt.state.items import capture
from ckpt.state.optim import cast_policy

# Constructor arguments that exercise each optimizer's interesting state.
OPTIMIZER_KWARGS: dict[str, dict[str, Any]] = {
    "SGD": {"lr": 0.05, "momentum": 0.9},
    "SGD-nesterov": {"lr": 0.05, "momentum": 0.9, "nesterov": True},
    "Adam": {"lr": 0.01, "amsgrad": True},
    "AdamW": {"lr": 0.01},
    "Adamax": {"lr": 0.01},
    "NAdam": {"lr": 0.01},
    "NAdam-decoupled": {"lr": 0.01, "decoupled_weight_decay": True, "weight_decay": 0.1},
    "RAdam": {"lr": 0.01},
    "RMSprop": {"lr": 0.01, "centered": True, "momentum": 0.5},
    "Adagrad": {"lr": 0.05},
    "Adadelta": {"lr": 1.0},
    "ASGD": {"lr": 0.05, "t0": 1},
    "Rprop": {"lr": 0.01},
    "LBFGS": {"lr": 0.5, "history_size": 3, "max_iter": 4},
    "Adafactor": {"lr": 0.01},
    "Muon": {"lr": 0.02},
}
NOT_DENSE = {"SparseAdam"}  # needs sparse gradients
NEEDS_2D = {"Muon"}  # only 2-d parameters


def installed_optimizers() -> list[str]:
    return sorted(
        name
        for name, obj in vars(torch.optim).items()
        if inspect.isclass(obj)
        and issubclass(obj, torch.optim.Optimizer)
        and obj is not torch.optim.Optimizer
        and name not in NOT_DENSE
    )


def cases() -> list[tuple[str, str, dict[str, Any]]]:
    out = []
    for key in sorted({*OPTIMIZER_KWARGS, *installed_optimizers()}):
        cls_name = key.split("-")[0]
        if not hasattr(torch.optim, cls_name):
            continue
        kwargs = OPTIMIZER_KWARGS.get(key, {})
        params = inspect.signature(getattr(torch.optim, cls_name)).parameters
        variants = [("default", {})]
        if "foreach" in params:
            variants += [("foreach", {"foreach": True}), ("for-loop", {"foreach": False})]
        if "fused" in params:
            variants.append(("fused", {"fused": True}))
        for label, extra in variants:
            out.append((key, label, {**kwargs, **extra}))
    return out


def build(key: str, kwargs: dict[str, Any], dtype: torch.dtype = torch.float32, seed: int = 0):
    cls_name = key.split("-", maxsplit=1)[0]
    model = small_model(seed, dtype, bias=cls_name not in NEEDS_2D)
    params = (
        [p for p in model.parameters() if p.dim() == 2]
        if cls_name in NEEDS_2D
        else model.parameters()
    )
    try:
        opt = getattr(torch.optim, cls_name)(params, **kwargs)
    except (RuntimeError, ValueError) as e:  # e.g. a fused kernel this build lacks
        pytest.skip(f"{cls_name}({kwargs}) unsupported here: {e}")
    return model, opt


def watch_incoming_state(opt: torch.optim.Optimizer) -> dict[tuple[int, str], int]:
    """Record the data pointers of the state tensors handed to ``opt.load_state_dict``."""
    seen: dict[tuple[int, str], int] = {}

    def hook(optimizer, state_dict):
        for index, state in state_dict["state"].items():
            for k, v in state.items():
                if isinstance(v, torch.Tensor):
                    seen[(index, k)] = v.data_ptr()

    opt.register_load_state_dict_pre_hook(hook)
    return seen


def assert_loaded_without_copies(opt: torch.optim.Optimizer, seen: dict[tuple[int, str], int]):
    """ckpt built every tensor where torch's cast puts it, so torch copied nothing."""
    assert seen
    state = opt.state_dict()["state"]
    for (index, k), ptr in seen.items():
        assert state[index][k].data_ptr() == ptr, f"state[{index}][{k!r}] was copied again"


def test_every_installed_optimizer_is_covered():
    covered = {key.split("-")[0] for key in OPTIMIZER_KWARGS}
    assert set(installed_optimizers()) <= covered | set(installed_optimizers())
    missing = set(installed_optimizers()) - covered
    assert not missing, f"add constructor arguments for {missing}"


@pytest.mark.parametrize("live_state", ["fresh", "trained"])
@pytest.mark.parametrize(("key", "variant", "kwargs"), cases(), ids=str)
def test_restore_matches_torch_load_state_dict(tmp_path, key, variant, kwargs, live_state):
    """Into a fresh optimizer, and into one with state (read in place: ckpt.restoring.inplace)."""
    model, opt = build(key, kwargs)
    try:
        train_steps(model, opt, 3)
    except RuntimeError as e:
        if variant == "fused":
            pytest.skip(f"fused {key} unsupported on this device: {e}")
        raise
    mgr = ckpt.CheckpointManager(tmp_path)
    mgr.save(3, model=model, optimizer=opt)

    ours_model, ours_opt = build(key, kwargs, seed=1)
    ref_model, ref_opt = build(key, kwargs, seed=1)
    if live_state == "trained":
        train_steps(ours_model, ours_opt, 2, seed=5)
        train_steps(ref_model, ref_opt, 2, seed=5)
    assert states_differ(ours_opt.state_dict(), opt.state_dict())
    seen = watch_incoming_state(ours_opt)
    restore_matches_torch(
        mgr,
        (model, opt),
        (ours_model, ours_opt),
        (ref_model, ref_opt),
        after_restore=lambda: assert_loaded_without_copies(ours_opt, seen),
    )


def test_param_groups_with_different_hyperparameters(tmp_path):
    def make(seed):
        model = small_model(seed)
        opt = torch.optim.Adam(
            [
                {"params": model[0].parameters(), "lr": 0.02, "betas": (0.8, 0.95)},
                {"params": model[1].parameters(), "lr": 0.001, "weight_decay": 0.1},
                {"params": model[3].parameters()},
            ],
            lr=0.005,
        )
        return model, opt

    model, opt = make(0)
    train_steps(model, opt, 3)
    ckpt.CheckpointManager(tmp_path).save(1, model=model, optimizer=opt)
    ours_model, ours_opt = make(1)
    ref_model, ref_opt = make(1)
    ckpt.CheckpointManager(tmp_path).restore(model=ours_model, optimizer=ours_opt)
    ref_model.load_state_dict(model.state_dict())
    ref_opt.load_state_dict(opt.state_dict())
    assert_same_state(ours_opt.state_dict(), ref_opt.state_dict())
    assert ours_opt.param_groups[0]["betas"] == (0.8, 0.95)
    assert isinstance(ours_opt.param_groups[0]["betas"], tuple)


@pytest.mark.parametrize(
    ("saved", "live"), [(torch.float32, torch.bfloat16), (torch.bfloat16, torch.float32)]
)
@pytest.mark.parametrize("fused", [False, True])
def test_dtype_change_follows_torch_cast_rules(tmp_path, saved, live, fused):
    def make(dtype, seed):
        model = small_model(seed, dtype)
        return model, torch.optim.AdamW(model.parameters(), lr=0.01, fused=fused or None)

    model, opt = make(saved, 0)
    train_steps(model, opt, 3)
    ckpt.CheckpointManager(tmp_path).save(3, model=model, optimizer=opt)
    ours_model, ours_opt = make(live, 1)
    ref_model, ref_opt = make(live, 1)
    seen = watch_incoming_state(ours_opt)
    ckpt.CheckpointManager(tmp_path).restore(model=ours_model, optimizer=ours_opt)
    assert_loaded_without_copies(ours_opt, seen)
    ref_model.load_state_dict(model.state_dict())
    ref_opt.load_state_dict(opt.state_dict())
    assert_same_state(ours_opt.state_dict(), ref_opt.state_dict())
    assert_same_state(ours_model.state_dict(), ref_model.state_dict())
    state = ours_opt.state_dict()["state"][0]
    assert state["exp_avg"].dtype == live
    # step is cast only for fused/capturable groups
    assert state["step"].dtype == torch.float32


def test_load_state_dict_hooks_still_run(tmp_path):
    model, opt = build("Adam", {"lr": 0.01})
    train_steps(model, opt, 2)
    ckpt.CheckpointManager(tmp_path).save(0, model=model, optimizer=opt)

    def pre_hook(optimizer, state_dict):
        state_dict["param_groups"][0]["lr"] = 0.123
        return state_dict

    calls = []

    def hooked():
        m, o = build("Adam", {"lr": 0.01}, seed=2)
        o.register_load_state_dict_pre_hook(pre_hook)
        o.register_load_state_dict_post_hook(calls.append)
        return m, o

    ours_model, ours_opt = hooked()
    _ref_model, ref_opt = hooked()
    ckpt.CheckpointManager(tmp_path).restore(model=ours_model, optimizer=ours_opt)
    ref_opt.load_state_dict(opt.state_dict())
    assert ours_opt.param_groups[0]["lr"] == 0.123
    assert calls == [ours_opt, ref_opt]
    assert_same_state(ours_opt.state_dict(), ref_opt.state_dict())


def test_optimizer_state_goes_to_meta_params_like_torch(tmp_path):
    """Device and dtype routing, checked on the meta device (no data needed)."""
    model, opt = build("AdamW", {"lr": 0.01})
    train_steps(model, opt, 2)
    ckpt.CheckpointManager(tmp_path).save(0, optimizer=opt)

    def meta_opt():
        with torch.device("meta"):
            m = small_model(0, torch.bfloat16)
        return torch.optim.AdamW(m.parameters(), lr=0.01)

    ours, ref = meta_opt(), meta_opt()
    ckpt.CheckpointManager(tmp_path).restore(optimizer=ours)
    ref.load_state_dict(opt.state_dict())
    assert_same_state(ours.state_dict(), ref.state_dict())
    assert ours.state_dict()["state"][0]["exp_avg"].device.type == "meta"
    assert ours.state_dict()["state"][0]["step"].device.type == "cpu"


@pytest.mark.parametrize("key", ["step", "exp_avg", None])
@pytest.mark.parametrize("special", [False, True])
@pytest.mark.parametrize("param_dtype", [torch.float16, torch.float64, torch.int64])
def test_cast_policy_matches_torch_private_rule(key, special, param_dtype):
    rule = getattr(torch.optim.Optimizer, "_process_value_according_to_param_policy", None)
    if rule is None:
        pytest.skip("this torch has no _process_value_according_to_param_policy")
    param = torch.zeros(2, dtype=param_dtype, device="meta")
    value = torch.zeros(2, dtype=torch.float32)
    groups = [{"params": [0], "fused": special, "capturable": False}]
    expected = rule(param, value, 0, groups, key)
    device, dtype = cast_policy(param, key, special)
    got = value.to(device=device, dtype=dtype)
    assert (got.device, got.dtype) == (expected.device, expected.dtype)


def test_wrong_param_shape_is_refused_and_nothing_changes(tmp_path):
    model, opt = build("Adam", {"lr": 0.01})
    train_steps(model, opt, 2)
    ckpt.CheckpointManager(tmp_path).save(0, optimizer=opt)
    other = nn.Linear(5, 6)
    other_opt = torch.optim.Adam([*other.parameters(), *small_model().parameters()][:6], lr=0.1)
    before = other_opt.state_dict()
    with pytest.raises(ckpt.IncompatibleCheckpointError, match="shape"):
        ckpt.CheckpointManager(tmp_path).restore(optimizer=other_opt)
    assert_same_state(other_opt.state_dict(), before)


def test_renamed_parameters_are_refused_unless_loaded_by_position(tmp_path):
    model = small_model(0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    train_steps(model, opt, 1)
    mgr = ckpt.CheckpointManager(tmp_path)
    mgr.save(0, model=model, optimizer=opt)
    # Same shapes, but the optimizer now lists the two BatchNorm params in swapped order.
    fresh = small_model(1)
    params = list(fresh.parameters())
    params[2], params[3] = params[3], params[2]
    fresh_opt = torch.optim.SGD(params, lr=0.1, momentum=0.9)
    with pytest.raises(ckpt.IncompatibleCheckpointError, match="parameter order changed"):
        mgr.restore(model=fresh, optimizer=fresh_opt)
    # strict=False is about module keys: it never loads an optimizer by position.
    with pytest.raises(ckpt.IncompatibleCheckpointError, match=r"'model\.1\.weight' saved"):
        mgr.restore(optimizer=fresh_opt, model=fresh, strict=False)
    mgr.restore(model=fresh, optimizer=fresh_opt, optimizer_by_position=True)


def test_group_count_mismatch_uses_torch_wording(tmp_path):
    _model, opt = build("SGD", {"lr": 0.1})
    ckpt.CheckpointManager(tmp_path).save(0, optimizer=opt)
    m = small_model(0)
    two = torch.optim.SGD(
        [{"params": m[0].parameters()}, {"params": [*m[1].parameters(), *m[3].parameters()]}],
        lr=0.1,
    )
    with pytest.raises(
        ckpt.IncompatibleCheckpointError, match="different number of parameter groups"
    ):
        ckpt.CheckpointManager(tmp_path).restore(optimizer=two)


# ------------------------------------------------------------ optimizer class swaps

SWAPS = [("SGD", "AdamW"), ("AdamW", "SGD"), ("Adam", "Adagrad"), ("Adagrad", "Adam")]
SWAPS += [("LBFGS", "SGD"), ("SGD", "LBFGS"), ("RMSprop", "Adadelta"), ("NAdam", "Adam")]


def _trained(key: str, seed: int):
    model, opt = build(key, OPTIMIZER_KWARGS[key], seed=seed)
    train_steps(model, opt, 2, seed=seed)
    return model, opt


@pytest.mark.parametrize(("saved", "live"), SWAPS, ids=[f"{a}-to-{b}" for a, b in SWAPS])
@pytest.mark.parametrize("recorded", [True, False], ids=["class-recorded", "older-checkpoint"])
def test_an_optimizer_of_another_class_is_refused_and_nothing_changes(
    tmp_path, saved, live, recorded
):
    model, opt = _trained(saved, 0)
    mgr = ckpt.CheckpointManager(tmp_path)
    mgr.save(0, model=model, optimizer=opt)
    if not recorded:  # as written before the class was recorded
        path = tmp_path / "step_000000000000" / "manifest.json"
        doc = read_manifest_doc(path)
        del doc["items"]["optimizer"]["class"]
        write_manifest(path, doc)
    live_model, live_opt = _trained(live, 1)
    before = copy.deepcopy((live_model.state_dict(), live_opt.state_dict()))
    with pytest.raises(ckpt.IncompatibleCheckpointError) as e:
        mgr.restore(model=live_model, optimizer=live_opt)
    assert e.value.key is not None and e.value.key.startswith("optimizer")
    if recorded:
        assert f".{getattr(torch.optim, saved).__name__} " in str(e.value)
        assert f".{getattr(torch.optim, live).__name__};" in str(e.value)
        assert "optimizer_class_change=True" in str(e.value)
    assert_same_state(live_model.state_dict(), before[0])
    assert_same_state(live_opt.state_dict(), before[1])


def test_a_class_change_is_loaded_only_when_asked_and_when_the_state_fits(tmp_path):
    model, opt = _trained("Adam", 0)
    mgr = ckpt.CheckpointManager(tmp_path)
    mgr.save(0, model=model, optimizer=opt)
    ours, ours_opt = build("AdamW", {"lr": 0.01, "amsgrad": True}, seed=1)
    with pytest.raises(
        ckpt.IncompatibleCheckpointError, match=r"saved from torch\.optim\.adam\.Adam "
    ):
        mgr.restore(model=ours, optimizer=ours_opt)
    mgr.restore(model=ours, optimizer=ours_opt, optimizer_class_change=True)
    ref, ref_opt = build("AdamW", {"lr": 0.01, "amsgrad": True}, seed=1)
    ref.load_state_dict(model.state_dict())
    ref_opt.load_state_dict(opt.state_dict())
    assert_same_state(ours_opt.state_dict(), ref_opt.state_dict())
    # SGD's momentum never fits AdamW, opt-in or not.
    sgd_model, sgd = _trained("SGD", 0)
    mgr.save(1, model=sgd_model, optimizer=sgd)
    before = copy.deepcopy(ours_opt.state_dict())
    with pytest.raises(ckpt.IncompatibleCheckpointError, match="momentum_buffer"):
        mgr.restore(1, model=ours, optimizer=ours_opt, optimizer_class_change=True)
    assert_same_state(ours_opt.state_dict(), before)


def test_the_optimizer_class_is_recorded():
    cap = capture("opt", torch.optim.AdamW(nn.Linear(2, 2).parameters()), {})
    assert cap.extra["class"] == "torch.optim.adamw.AdamW"
