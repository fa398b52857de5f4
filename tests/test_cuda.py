"""The GPU half: devices, fused and capturable optimizers, async save from GPU tensors.

Every test needs a CUDA device (conftest skips them without one); bench/gpu_check.sh
runs them, with test_resume.py's CUDA runs (CUDA random streams across a resume
in a new process). Each restore is compared with torch's own ``load_state_dict``
of the same state: ``torch.equal`` plus dtype and device, for the state as
restored and after two more steps.
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import assert_same_state
from helpers import restore_matches_torch, small_model, train_steps

import ckpt

pytestmark = pytest.mark.cuda

CUDA = torch.device("cuda", 0)

OPTIMIZERS = {
    "adam": lambda params: torch.optim.Adam(params, lr=1e-2),
    "adamw": lambda params: torch.optim.AdamW(params, lr=1e-2),
    "adamw-amsgrad": lambda params: torch.optim.AdamW(params, lr=1e-2, amsgrad=True),
    "adam-fused": lambda params: torch.optim.Adam(params, lr=1e-2, fused=True),
    "adamw-fused-amsgrad": lambda params: torch.optim.AdamW(
        params, lr=1e-2, fused=True, amsgrad=True
    ),
    "adam-capturable": lambda params: torch.optim.Adam(params, lr=1e-2, capturable=True),
    "adamw-capturable": lambda params: torch.optim.AdamW(params, lr=1e-2, capturable=True),
    "sgd-momentum": lambda params: torch.optim.SGD(params, lr=1e-2, momentum=0.9),
}
ON_CPU = {
    "adam-fused": "adam",
    "adamw-fused-amsgrad": "adamw-amsgrad",
    "adam-capturable": "adam",
    "adamw-capturable": "adamw",
}
"""The same optimizer class without the flags that need parameters on the GPU."""


def kind_on(kind: str, device: str) -> str:
    return ON_CPU.get(kind, kind) if device == "cpu" else kind


@pytest.fixture(autouse=True)
def _deterministic():
    before = torch.backends.cudnn.deterministic
    torch.backends.cudnn.deterministic = True
    yield
    torch.backends.cudnn.deterministic = before


def pair(kind: str, device: torch.device, seed: int, steps: int = 0):
    model = small_model(seed).to(device)
    optimizer = OPTIMIZERS[kind](model.parameters())
    train_steps(model, optimizer, steps, seed=seed)
    return model, optimizer


@pytest.mark.parametrize("kind", ["adamw", "sgd-momentum", *ON_CPU])
@pytest.mark.parametrize("trained", [False, True], ids=["fresh", "trained"])
@pytest.mark.parametrize(
    ("saved_on", "restored_on"), [("cpu", "cuda"), ("cuda", "cpu"), ("cuda", "cuda")]
)
def test_restore_across_devices_matches_torch(tmp_path, kind, trained, saved_on, restored_on):
    """Optimizer state lands where torch's load_state_dict puts it (step too, by its rule)."""
    if (saved_on, restored_on) == ("cuda", "cpu") and "capturable" in kind:
        pytest.skip("torch cannot step CPU parameters whose loaded groups say capturable")
    saved = pair(kind_on(kind, saved_on), torch.device(saved_on), 0, steps=3)
    mgr = ckpt.CheckpointManager(tmp_path)
    mgr.save(0, model=saved[0], optimizer=saved[1], rng=False)
    steps = 1 if trained else 0
    ours = pair(kind_on(kind, restored_on), torch.device(restored_on), 5, steps=steps)
    ref = pair(kind_on(kind, restored_on), torch.device(restored_on), 5, steps=steps)
    restore_matches_torch(mgr, saved, ours, ref)
    for state in ours[1].state.values():
        for key, value in state.items():
            if isinstance(value, torch.Tensor) and key != "step":
                assert value.device.type == restored_on, key


@pytest.mark.parametrize("kind", sorted(ON_CPU))
def test_fused_and_capturable_step_follows_torch_from_a_cpu_checkpoint(tmp_path, kind):
    """A fused/capturable state read onto the CPU and loaded: ``step`` moves to the GPU."""
    saved = pair(kind, CUDA, 0, steps=3)
    cpu_state = copy.deepcopy(saved[1].state_dict())
    for state in cpu_state["state"].values():
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                state[key] = value.cpu()
    mgr = ckpt.CheckpointManager(tmp_path)
    mgr.save(0, model=saved[0], optimizer=saved[1], rng=False)
    ours, ref = pair(kind, CUDA, 5), pair(kind, CUDA, 5)
    mgr.restore(model=ours[0], optimizer=ours[1], map_location="cpu")
    ref[0].load_state_dict(saved[0].state_dict())
    ref[1].load_state_dict(cpu_state)
    assert all(s["step"].device == CUDA for s in ours[1].state.values())
    assert_same_state(ours[1].state_dict(), ref[1].state_dict())
    train_steps(*ours, 2, seed=7)
    train_steps(*ref, 2, seed=7)
    assert_same_state(ours[1].state_dict(), ref[1].state_dict())
    assert_same_state(ours[0].state_dict(), ref[0].state_dict())


def test_map_location_sends_everything_where_torch_load_would(tmp_path):
    saved = pair("adamw", CUDA, 0, steps=2)
    mgr = ckpt.CheckpointManager(tmp_path)
    mgr.save(0, model=saved[0], optimizer=saved[1], data={"t": torch.arange(3, device=CUDA)})
    read = mgr.read(0, map_location=None)
    assert read["data"]["t"].device == CUDA
    assert all(t.device == CUDA for t in read["model"].values())
    on_cpu = mgr.read(0)
    assert_same_state(on_cpu["model"], {k: v.cpu() for k, v in saved[0].state_dict().items()})


def test_async_save_from_gpu_tensors_holds_the_state_of_when_save_returned(tmp_path):
    model, optimizer = pair("adamw-capturable", CUDA, 0, steps=2)
    expected_model = {k: v.clone() for k, v in model.state_dict().items()}
    expected_state = copy.deepcopy(optimizer.state_dict())
    with ckpt.CheckpointManager(tmp_path, async_save=True) as mgr:
        mgr.save(1, model=model, optimizer=optimizer, rng=False)
        with torch.no_grad():  # training goes on at once, on the GPU
            for p in model.parameters():
                p.add_(1.0)
            for state in optimizer.state.values():
                state["exp_avg"].mul_(-3)
        buffers = dict(mgr._staging._buffers)
        assert buffers and all(b.is_pinned() for b in buffers.values())
        mgr.wait()
        train_steps(model, optimizer, 1)
        mgr.save(2, model=model, optimizer=optimizer, rng=False)  # reuses the pinned buffers
        mgr.wait()
        assert all(mgr._staging._buffers[n] is b for n, b in buffers.items())
        saved = mgr.read(1, map_location=None)
    assert_same_state(saved["model"], expected_model)
    assert_same_state(saved["optimizer"]["state"], expected_state["state"])


def test_cuda_random_streams_come_back(tmp_path):
    torch.cuda.manual_seed_all(3)
    torch.randn(5, device=CUDA)
    mgr = ckpt.CheckpointManager(tmp_path)
    mgr.save(0, data={})
    expected = [torch.randn(7, device=CUDA), torch.rand(3, device=CUDA)]
    torch.cuda.manual_seed_all(99)
    mgr.restore(data={})
    assert_same_state([torch.randn(7, device=CUDA), torch.rand(3, device=CUDA)], expected)


def test_a_bfloat16_gpu_model_restores_from_a_float32_checkpoint_as_torch_casts(tmp_path):
    saved = small_model(0)
    mgr = ckpt.CheckpointManager(tmp_path)
    mgr.save(0, model=saved)
    ours = small_model(1).to(CUDA, torch.bfloat16)
    ref = small_model(1).to(CUDA, torch.bfloat16)
    mgr.restore(model=ours)
    ref.load_state_dict(saved.state_dict())
    assert_same_state(ours.state_dict(), ref.state_dict())
