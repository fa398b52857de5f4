"""Real models restore as torch restores them: lazy, quantization-aware, wrapped, parametrized.

Every model is built here from a small config (nothing is downloaded), trained
a step so its state differs from a fresh one, saved through ckpt, and restored
into a fresh model. The result must equal torch's own ``load_state_dict`` of the
same state into another fresh model: ``torch.equal``, dtype and device.
"""

from __future__ import annotations

import pytest
import torch
from conftest import assert_same_state, states_differ
from torch import nn
from torch.nn.utils import parametrizations

import ckpt

# Importing torch.compile's machinery the first time warns about torch.jit.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated")


def step(
    model: nn.Module, shape: tuple[int, ...], opt: torch.optim.Optimizer | None = None
) -> None:
    """One deterministic training step (a forward pass at least, for lazy modules and observers)."""
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(5))
    loss = model(x).square().mean()
    if opt is not None:
        opt.zero_grad()
        loss.backward()
        opt.step()


def restores_like_torch(tmp_path, build, shape, **restore_options) -> nn.Module:
    """Save a trained ``build()``, restore it into a fresh one; compare with torch's load."""
    trained = build(0)
    step(trained, shape)
    mgr = ckpt.CheckpointManager(tmp_path)
    mgr.save(0, model=trained)
    ours, ref = build(1), build(1)
    ref.load_state_dict(trained.state_dict(), **restore_options)
    mgr.restore(model=ours, **restore_options)
    assert_same_state(ours.state_dict(), ref.state_dict())
    assert_same_state(ours.state_dict(), trained.state_dict())
    return ours


def test_lazy_modules_are_materialized_as_torch_does(tmp_path):
    def build(seed):
        torch.manual_seed(seed)
        return nn.Sequential(nn.LazyLinear(5), nn.ReLU(), nn.LazyConv1d(3, 1), nn.LazyBatchNorm1d())

    ours = restores_like_torch(tmp_path, build, (4, 5, 7))
    assert type(ours[0].weight) is nn.Parameter and ours[0].weight.shape == (5, 7)


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning")
def test_a_quantization_aware_model_loads_its_per_channel_observers(tmp_path):
    from torch.ao import quantization

    def build(seed):
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Conv2d(2, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(36, 3))
        model.train()
        model.qconfig = quantization.get_default_qat_qconfig("fbgemm")
        return quantization.prepare_qat(model)

    fresh = build(1)
    assert fresh.state_dict()["0.weight_fake_quant.activation_post_process.min_val"].shape == (0,)
    ours = restores_like_torch(tmp_path, build, (2, 2, 5, 5))
    assert ours.state_dict()["0.weight_fake_quant.activation_post_process.min_val"].shape == (4,)


def test_parametrized_spectral_and_weight_norm(tmp_path):
    def build(seed):
        torch.manual_seed(seed)
        return nn.Sequential(
            parametrizations.spectral_norm(nn.Linear(4, 5)),
            nn.Tanh(),
            parametrizations.weight_norm(nn.Linear(5, 3)),
        )

    ours = restores_like_torch(tmp_path, build, (3, 4))
    assert "0.parametrizations.weight.0._u" in ours.state_dict()


def test_hook_based_spectral_norm(tmp_path):
    def build(seed):
        torch.manual_seed(seed)
        return nn.Sequential(nn.utils.spectral_norm(nn.Linear(4, 5)), nn.Tanh(), nn.Linear(5, 2))

    restores_like_torch(tmp_path, build, (3, 4))


def test_a_meta_device_model_takes_the_tensors_with_assign(tmp_path):
    trained = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    step(trained, (5, 3))
    mgr = ckpt.CheckpointManager(tmp_path)
    mgr.save(0, model=trained)
    with torch.device("meta"):
        ours = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
        ref = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    ref.load_state_dict(trained.state_dict(), assign=True)
    mgr.restore(model=ours, assign=True)
    assert_same_state(ours.state_dict(), ref.state_dict())
    assert ours[0].weight.device.type == "cpu" and ours[0].weight.requires_grad
    with pytest.raises(TypeError, match="assign must be True or False"):
        mgr.restore(model=ours, assign="yes")


def _pair(seed):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    return model, torch.optim.AdamW(model.parameters(), lr=0.01)


WRAPPERS = {
    "compiled": torch.compile,
    "data-parallel": nn.DataParallel,
    "compiled-data-parallel": lambda m: torch.compile(nn.DataParallel(m)),
}


def _inner(model: nn.Module) -> nn.Module:
    while hasattr(model, "_orig_mod") or isinstance(model, nn.DataParallel):
        model = model._orig_mod if hasattr(model, "_orig_mod") else model.module
    return model


@pytest.mark.parametrize("wrap", list(WRAPPERS), ids=list(WRAPPERS))
@pytest.mark.parametrize("direction", ["wrapped-to-bare", "bare-to-wrapped"])
@pytest.mark.parametrize("model_first", [True, False], ids=["model-first", "optimizer-first"])
def test_wrapped_and_bare_models_restore_into_each_other(tmp_path, wrap, direction, model_first):
    trained, trained_opt = _pair(0)
    step(trained, (5, 3), trained_opt)
    saved = WRAPPERS[wrap](trained) if direction == "wrapped-to-bare" else trained
    mgr = ckpt.CheckpointManager(tmp_path)
    mgr.save(0, model=saved, optimizer=trained_opt)

    bare, opt = _pair(1)
    target = bare if direction == "wrapped-to-bare" else WRAPPERS[wrap](bare)
    ref, ref_opt = _pair(1)
    ref.load_state_dict(trained.state_dict())
    ref_opt.load_state_dict(trained_opt.state_dict())
    assert states_differ(bare.state_dict(), ref.state_dict())
    if model_first:
        mgr.restore(model=target, optimizer=opt)
    else:
        mgr.restore(optimizer=opt, model=target)
    assert_same_state(_inner(target).state_dict(), ref.state_dict())
    assert_same_state(opt.state_dict(), ref_opt.state_dict())


def test_keys_that_differ_beyond_a_wrapper_prefix_name_it(tmp_path):
    mgr = ckpt.CheckpointManager(tmp_path)
    mgr.save(0, model=nn.DataParallel(nn.Linear(3, 4)))
    other = nn.Sequential(nn.Linear(3, 4))
    before = other.state_dict()
    with pytest.raises(ckpt.IncompatibleCheckpointError, match=r"'module\.'") as e:
        mgr.restore(model=other)
    assert "Unexpected key(s)" in str(e.value)
    assert_same_state(other.state_dict(), before)


def test_a_non_strict_restore_matches_prefixed_keys_it_can(tmp_path):
    trained = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    mgr = ckpt.CheckpointManager(tmp_path)
    mgr.save(0, model=torch.compile(trained))
    bigger = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2), nn.Linear(2, 2))
    info = mgr.restore(model=bigger, strict=False)
    assert info.missing_keys == {"model": ["2.weight", "2.bias"]}
    assert torch.equal(bigger[0].weight, trained[0].weight)
