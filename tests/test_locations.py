"""map_location in every form torch.load accepts, for read() and restore()."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_same_state
from helpers import small_model, train_steps

import ckpt
from ckpt.restoring.locations import check_map_location, mapped_device


@pytest.fixture
def saved(tmp_path):
    model = small_model()
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    train_steps(model, opt, 2)
    mgr = ckpt.CheckpointManager(tmp_path)
    mgr.save(0, model=model, optimizer=opt)
    return mgr, model, opt


@pytest.mark.parametrize(
    "location", ["cpu", torch.device("cpu"), {"cpu": "cpu"}, {"cuda:3": "cpu"}, None]
)
def test_read_with_cpu_locations(saved, location):
    mgr, model, opt = saved
    states = mgr.read(map_location=location)
    assert_same_state(states["model"], model.state_dict())
    assert_same_state(states["optimizer"], opt.state_dict())


@pytest.mark.parametrize("location", ["meta", {"cpu": "meta"}, torch.device("meta")])
def test_read_onto_meta_keeps_dtypes_and_shapes(saved, location):
    mgr, model, _ = saved
    states = mgr.read(map_location=location)
    for key, t in model.state_dict().items():
        got = states["model"][key]
        assert (got.device.type, got.dtype, got.shape) == ("meta", t.dtype, t.shape)


def test_callable_map_location_gets_storage_and_saved_location(saved):
    mgr, model, _ = saved
    calls = []

    def keep(storage, location):
        calls.append(location)
        return storage

    states = mgr.read(map_location=keep)
    assert calls and set(calls) == {"cpu"}
    assert_same_state(states["model"], model.state_dict())
    assert mgr.read(map_location=lambda s, loc: None)["model"].keys() == model.state_dict().keys()


def test_restore_with_map_location_matches_torch_load_path(saved):
    mgr, model, opt = saved
    fresh = small_model(5)
    fresh_opt = torch.optim.Adam(fresh.parameters(), lr=0.01)
    ref = small_model(5)
    ref_opt = torch.optim.Adam(ref.parameters(), lr=0.01)
    mgr.restore(model=fresh, optimizer=fresh_opt, map_location="cpu")
    ref.load_state_dict(model.state_dict())
    ref_opt.load_state_dict(opt.state_dict())
    assert_same_state(fresh_opt.state_dict(), ref_opt.state_dict())
    assert_same_state(fresh.state_dict(), ref.state_dict())


@pytest.mark.parametrize(
    ("value", "error"),
    [(3, TypeError), ("toaster", ValueError), ({"cpu": 3}, TypeError), ({1: "cpu"}, TypeError)],
)
def test_bad_map_location_is_refused_up_front(saved, value, error):
    mgr, model, _ = saved
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(error):
        check_map_location(value)
    with pytest.raises(error):
        mgr.restore(model=model, map_location=value)
    assert_same_state(model.state_dict(), before)


def test_mapped_device_follows_torch_load_rules():
    assert mapped_device(None, "cuda:1") == torch.device("cuda:1")
    assert mapped_device("cpu", "cuda:1") == torch.device("cpu")
    assert mapped_device({"cuda:1": "cuda:0"}, "cuda:1") == torch.device("cuda:0")
    assert mapped_device({"cuda:1": "cuda:0"}, "cpu") == torch.device("cpu")
    assert mapped_device(lambda s, loc: s, "cpu") is None


def test_missing_device_is_incompatible_with_a_remedy(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    mgr = ckpt.CheckpointManager(tmp_path)
    mgr.save(0, data={"t": torch.ones(2)})
    with pytest.raises(ckpt.IncompatibleCheckpointError, match="map_location"):
        mgr.read(map_location="cuda:0")


@pytest.mark.cuda
def test_cpu_checkpoint_restores_onto_cuda_like_torch(saved):
    mgr, model, opt = saved

    def make():
        m = small_model(5).cuda()
        return m, torch.optim.Adam(m.parameters(), lr=0.01)

    ours, ours_opt = make()
    ref, ref_opt = make()
    mgr.restore(model=ours, optimizer=ours_opt)
    ref.load_state_dict(model.state_dict())
    ref_opt.load_state_dict(opt.state_dict())
    assert_same_state(ours_opt.state_dict(), ref_opt.state_dict())
    assert ours_opt.state_dict()["state"][0]["exp_avg"].device.type == "cuda"
    assert ours_opt.state_dict()["state"][0]["step"].device.type == "cpu"


@pytest.mark.cuda
def test_cuda_checkpoint_reads_on_cpu_and_fused_step_moves(tmp_path):
    model = small_model().cuda()
    opt = torch.optim.Adam(model.parameters(), lr=0.01, fused=True)
    train_steps(model, opt, 2)
    mgr = ckpt.CheckpointManager(tmp_path)
    mgr.save(0, model=model, optimizer=opt)
    cpu_states = mgr.read()
    assert cpu_states["optimizer"]["state"][0]["exp_avg"].device.type == "cpu"
    fresh = small_model(3).cuda()
    fresh_opt = torch.optim.Adam(fresh.parameters(), lr=0.01, fused=True)
    ref = small_model(3).cuda()
    ref_opt = torch.optim.Adam(ref.parameters(), lr=0.01, fused=True)
    mgr.restore(model=fresh, optimizer=fresh_opt)
    ref.load_state_dict(model.state_dict())
    ref_opt.load_state_dict(opt.state_dict())
    assert_same_state(fresh_opt.state_dict(), ref_opt.state_dict())
    assert fresh_opt.state_dict()["state"][0]["step"].device.type == "cuda"


def test_meta_module_restores_without_reading_tensor_data(saved, monkeypatch):
    mgr, _, _ = saved
    import ckpt.io.read

    calls = []
    original = ckpt.io.read.read_tensor
    monkeypatch.setattr(
        ckpt.io.read, "read_tensor", lambda *a, **k: calls.append(1) or original(*a, **k)
    )
    with torch.device("meta"):
        meta_model = small_model(0)
    mgr.restore(model=meta_model, rng=False)
    assert calls == []
