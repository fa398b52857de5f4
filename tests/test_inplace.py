"""Restoring straight into live tensors: when it happens, and that it changes nothing else."""

from __future__ import annotations

import copy
import os
import shutil
import uuid

import fsspec
import pytest
import torch
from conftest import assert_same_state
from helpers import small_model, snapshot, train_steps, trained_live_objects
from torch import nn

import ckpt
import ckpt.io.live_reads
import ckpt.io.spill
import ckpt.restoring.restorer
from ckpt.format import TensorRecord, step_dir_name
from ckpt.restoring.inplace import (
    choose_destinations,
    module_loads_plainly,
    optimizer_loads_plainly,
)

CPU = torch.device("cpu")


def record(t: torch.Tensor, device: str = "cpu") -> TensorRecord:
    return TensorRecord("x.safetensors", t.dtype, tuple(t.shape), device)


def choose(counterparts, written=(), map_location=None, records=None):
    records = records or {n: record(lives[0][0]) for n, lives in counterparts.items()}
    return choose_destinations(counterparts, list(written), records, map_location)


# ------------------------------------------------------------------ the pure choice


def test_a_plain_cpu_tensor_is_a_destination():
    w = torch.zeros(4, 3)
    assert choose({"m/w": [(w, (CPU, None))]}, [w]) == {"m/w": w}


@pytest.mark.parametrize(
    "live",
    [
        torch.zeros(3, 4).t(),  # not contiguous
        torch.zeros(0),  # nothing to read
        torch.zeros(4, 3, device="meta"),
    ],
    ids=["strided", "empty", "meta"],
)
def test_tensors_that_cannot_take_raw_bytes_are_not_destinations(live):
    saved = record(torch.zeros(tuple(live.shape)))
    assert choose({"m/w": [(live, (CPU, None))]}, [live], records={"m/w": saved}) == {}


def test_a_module_takes_a_cast_in_place_but_not_a_shape_change():
    w = torch.zeros(4, 3)
    as_double = TensorRecord("x.safetensors", torch.float64, (4, 3), "cpu")
    reshaped = TensorRecord("x.safetensors", torch.float32, (3, 4), "cpu")
    from_gpu = TensorRecord("x.safetensors", torch.float32, (4, 3), "cuda:0")
    module = {"m/w": [(w, None)]}  # None: load_state_dict copies into w, casting
    assert choose(module, [w], records={"m/w": as_double}) == {"m/w": w}
    assert choose(module, [w], records={"m/w": from_gpu}) == {"m/w": w}
    assert choose(module, [w], records={"m/w": reshaped}) == {}
    # An optimizer keeps what it is given: only a value already cast to w's dtype lands in w.
    assert choose({"o/s": [(w, (CPU, None))]}, [w], records={"o/s": as_double}) == {}
    assert choose({"o/s": [(w, (CPU, torch.float32))]}, [w], records={"o/s": as_double}) == {
        "o/s": w
    }


def test_an_optimizer_cast_target_is_respected():
    state = torch.zeros(5)
    assert choose({"o/s": [(state, (CPU, torch.float64))]}, [state]) == {}
    step = torch.tensor(3.0)
    assert choose({"o/step": [(step, (None, None))]}, [step]) == {"o/step": step}
    on_gpu = record(step, device="cuda:0")  # saved on a GPU, left there by the policy
    assert choose({"o/step": [(step, (None, None))]}, [step], records={"o/step": on_gpu}) == {}


def test_map_location_must_keep_the_bytes_on_the_cpu():
    w = torch.zeros(4)
    cp = {"m/w": [(w, (CPU, None))]}
    assert choose(cp, [w], map_location="cpu") == {"m/w": w}
    assert choose(cp, [w], map_location={"cuda:0": "cpu"}) == {"m/w": w}
    assert choose(cp, [w], map_location="meta") == {}
    assert choose(cp, [w], map_location=lambda storage, location: storage) == {}


def test_tied_tensors_stored_once_are_one_destination():
    shared = torch.zeros(4, 3)
    view_again = shared.view(4, 3)
    cp = {"m/emb": [(shared, (CPU, None)), (view_again, (CPU, None))]}
    assert choose(cp, [shared, view_again]) == {"m/emb": shared}


def test_tied_tensors_stored_twice_are_not_destinations():
    shared = torch.zeros(4, 3)
    cp = {"m/a": [(shared, (CPU, None))], "m/b": [(shared.view(4, 3), (CPU, None))]}
    assert choose(cp, [shared, shared]) == {}


def test_one_stored_tensor_loaded_into_two_places_is_not_a_destination():
    a, b = torch.zeros(3), torch.zeros(3)
    assert choose({"m/x": [(a, (CPU, None)), (b, (CPU, None))]}, [a, b]) == {}


def test_partial_overlap_with_any_written_tensor_rules_out_both():
    base = torch.zeros(10)
    first, overlapping = base[:6], base[4:]
    separate = torch.zeros(3)
    cp = {
        "m/a": [(first, (CPU, None))],
        "m/b": [(overlapping, (CPU, None))],
        "m/c": [(separate, (CPU, None))],
    }
    assert choose(cp, [first, overlapping, separate]) == {"m/c": separate}
    # A written tensor that is not a destination still rules out what it overlaps.
    cp = {"m/a": [(first, (CPU, None))]}
    assert choose(cp, [first, base[5:7]]) == {}


def test_only_torchs_own_loading_counts_as_plain():
    assert module_loads_plainly(small_model())  # BatchNorm overrides it, in torch.nn

    class Custom(nn.Linear):
        def _load_from_state_dict(self, *args, **kwargs):
            super()._load_from_state_dict(*args, **kwargs)

    assert not module_loads_plainly(nn.Sequential(nn.Linear(2, 2), Custom(2, 2)))
    model = small_model()
    assert optimizer_loads_plainly(torch.optim.AdamW(model.parameters()))

    class OwnLoad(torch.optim.SGD):
        def load_state_dict(self, state_dict):
            super().load_state_dict(state_dict)

    assert not optimizer_loads_plainly(OwnLoad(model.parameters(), lr=0.1))


def test_swapping_load_is_not_plain(monkeypatch):
    monkeypatch.setattr(torch.__future__, "get_swap_module_params_on_conversion", lambda: True)
    assert not module_loads_plainly(small_model())


# ------------------------------------------------------------------ end to end


@pytest.fixture
def saved(tmp_path):
    model, optimizer = trained_live_objects(1)
    mgr = ckpt.CheckpointManager(tmp_path)
    mgr.save(5, model=model, optimizer=optimizer)
    mgr.close()
    return tmp_path, model, optimizer


def pointers(model, optimizer):
    out = {f"model.{k}": v.data_ptr() for k, v in model.state_dict().items()}
    for p, state in optimizer.state.items():
        for k, v in state.items():
            out[f"optim.{id(p)}.{k}"] = v.data_ptr()
    return out


@pytest.mark.parametrize("threads", ["one thread", "threads"])
@pytest.mark.parametrize("verify", [True, False])
def test_restore_reads_into_the_live_tensors_memory(saved, verify, threads, monkeypatch):
    root, model, optimizer = saved
    if threads == "threads":  # slices of 64 bytes over a thread pool, as for a large state
        monkeypatch.setattr(ckpt.io.live_reads, "PARALLEL_READ_BYTES", 0)
        monkeypatch.setattr(ckpt.io.live_reads, "READ_SLICE_BYTES", 64)
    live_model, live_opt = trained_live_objects(2)
    before = pointers(live_model, live_opt)
    ckpt.CheckpointManager(root).restore(model=live_model, optimizer=live_opt, verify=verify)
    assert pointers(live_model, live_opt) == before
    assert_same_state(live_model.state_dict(), model.state_dict())
    assert_same_state(live_opt.state_dict(), optimizer.state_dict())


def test_restore_into_a_fresh_optimizer_builds_its_state(saved):
    root, model, optimizer = saved
    live_model = small_model(2)
    live_opt = torch.optim.AdamW(live_model.parameters())
    ckpt.CheckpointManager(root).restore(model=live_model, optimizer=live_opt)
    assert_same_state(live_model.state_dict(), model.state_dict())
    assert_same_state(live_opt.state_dict(), optimizer.state_dict())


def test_checkpoint_deleted_between_checks_and_reads_still_loads_what_was_checked(
    saved, monkeypatch
):
    root, model, optimizer = saved
    original = ckpt.restoring.pipeline.load_tensors

    def then_delete(*args, **kwargs):
        out = original(*args, **kwargs)
        shutil.rmtree(root / step_dir_name(5))
        return out

    monkeypatch.setattr(ckpt.restoring.pipeline, "load_tensors", then_delete)
    live_model, live_opt = trained_live_objects(2)
    ckpt.CheckpointManager(root).restore(5, model=live_model, optimizer=live_opt)
    assert_same_state(live_model.state_dict(), model.state_dict())
    assert_same_state(live_opt.state_dict(), optimizer.state_dict())


def test_a_read_that_fails_after_the_checks_says_what_it_left(saved, monkeypatch):
    root, _, _ = saved
    path = root / step_dir_name(5) / "optimizer.safetensors"
    original = ckpt.restoring.pipeline.load_tensors

    def then_shrink(*args, **kwargs):
        out = original(*args, **kwargs)
        os.truncate(path, path.stat().st_size // 2)  # the open file itself shrinks
        return out

    monkeypatch.setattr(ckpt.restoring.pipeline, "load_tensors", then_shrink)
    live_model, live_opt = trained_live_objects(2)
    with pytest.raises(ckpt.CorruptCheckpointError, match="after every check had passed") as e:
        ckpt.CheckpointManager(root).restore(model=live_model, optimizer=live_opt)
    assert e.value.key is not None and e.value.key.startswith("optimizer/")


def test_a_failed_check_leaves_live_tensors_alone_even_when_read_in_place(saved):
    root, _, _ = saved
    path = root / step_dir_name(5) / "optimizer.safetensors"
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 0xFF  # the last byte of the last tensor: every other one reads fine first
    path.write_bytes(bytes(raw))
    assert_refused_and_nothing_changed(root)


def assert_refused_and_nothing_changed(url) -> None:
    """Restoring the damaged checkpoint at ``url`` fails and changes no trained object."""
    live_model, live_opt = trained_live_objects(2)
    before = snapshot(live_model, live_opt)
    with pytest.raises(ckpt.CorruptCheckpointError, match="checksum"):
        ckpt.CheckpointManager(url).restore(model=live_model, optimizer=live_opt)
    assert_same_state(live_model.state_dict(), before[0])
    assert_same_state(live_opt.state_dict(), before[1])


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(7, 4)
        self.out = nn.Linear(4, 7, bias=False)
        self.out.weight = self.embed.weight


def test_tied_weights_match_torch(tmp_path):
    torch.manual_seed(0)
    model = Tied()
    mgr = ckpt.CheckpointManager(tmp_path)
    mgr.save(1, model=model)
    ours, ref = Tied(), Tied()
    ref.load_state_dict(copy.deepcopy(ours.state_dict()))
    ptr = ours.embed.weight.data_ptr()
    mgr.restore(model=ours, rng=False)
    ref.load_state_dict(model.state_dict())
    assert_same_state(ours.state_dict(), ref.state_dict())
    assert ours.out.weight is ours.embed.weight and ours.embed.weight.data_ptr() == ptr


class AliasedBuffer(nn.Module):
    """A buffer that is a view of part of a parameter: torch's copy order decides the result."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(6))
        self.register_buffer("head", self.weight.data[:2])


def test_overlapping_live_tensors_are_loaded_like_torch(tmp_path):
    torch.manual_seed(0)
    model = AliasedBuffer()
    with torch.no_grad():
        model.head.copy_(torch.tensor([100.0, 200.0]))  # also changes weight[:2]
    saved_state = copy.deepcopy(model.state_dict())
    saved_state["head"] = torch.tensor([-1.0, -2.0])  # stored apart: the two disagree
    mgr = ckpt.CheckpointManager(tmp_path)
    mgr.save(1, model=_Holder(saved_state))
    ours, ref = AliasedBuffer(), AliasedBuffer()
    ref.load_state_dict(copy.deepcopy(ours.state_dict()))
    mgr.restore(model=ours, rng=False)
    ref.load_state_dict(saved_state)
    assert_same_state(ours.state_dict(), ref.state_dict())


class _Holder(nn.Module):
    """Saves a given state as a module's (to store tensors that disagree)."""

    def __init__(self, state) -> None:
        super().__init__()
        self._state = state

    def state_dict(self, *args, **kwargs):  # type: ignore[override]
        return self._state


class ReadsOldValue(nn.Linear):
    """A user override that looks at the parameter's value before loading."""

    seen: list[torch.Tensor]

    def _load_from_state_dict(self, *args, **kwargs):
        self.seen = [self.weight.detach().clone()]
        super()._load_from_state_dict(*args, **kwargs)


def test_modules_with_their_own_loading_see_what_torch_shows_them(tmp_path):
    torch.manual_seed(0)
    mgr = ckpt.CheckpointManager(tmp_path)
    mgr.save(1, model=ReadsOldValue(3, 2))
    ours = ReadsOldValue(3, 2)
    old = ours.weight.detach().clone()
    mgr.restore(model=ours, rng=False)
    assert torch.equal(ours.seen[0], old)


def assert_cast_in_place_like_torch(saved, build) -> None:
    """Restore into trained objects from ``build()``: memory kept, values as torch's."""
    root, model, optimizer = saved
    ours, ref = build(), build()
    ours_opt = torch.optim.AdamW(ours.parameters())
    ref_opt = torch.optim.AdamW(ref.parameters())
    train_steps(ours, ours_opt, 1)  # state in the live dtype and device, for the cast to land in
    train_steps(ref, ref_opt, 1)
    before = pointers(ours, ours_opt)
    ckpt.CheckpointManager(root).restore(model=ours, optimizer=ours_opt, rng=False)
    ref.load_state_dict(model.state_dict())
    ref_opt.load_state_dict(optimizer.state_dict())
    assert pointers(ours, ours_opt) == before
    assert_same_state(ours.state_dict(), ref.state_dict())
    assert_same_state(ours_opt.state_dict(), ref_opt.state_dict())


@pytest.mark.parametrize("live_dtype", [torch.float64, torch.bfloat16, torch.float16])
def test_a_dtype_change_is_cast_into_the_live_tensors_like_torch(saved, live_dtype, monkeypatch):
    monkeypatch.setattr(ckpt.io.live_reads, "CAST_CHUNK_BYTES", 24)  # several chunks per tensor
    assert_cast_in_place_like_torch(saved, lambda: small_model(2, live_dtype))


@pytest.mark.cuda
def test_parameters_on_a_gpu_are_filled_in_place_a_chunk_at_a_time(saved, monkeypatch):
    monkeypatch.setattr(ckpt.io.live_reads, "CAST_CHUNK_BYTES", 24)
    assert_cast_in_place_like_torch(saved, lambda: small_model(2).cuda())


def test_training_goes_on_identically_after_an_in_place_restore(saved):
    root, model, optimizer = saved
    ours_model, ours_opt = trained_live_objects(2)
    ckpt.CheckpointManager(root).restore(model=ours_model, optimizer=ours_opt)
    ref_model, ref_opt = trained_live_objects(2)
    ref_model.load_state_dict(model.state_dict())
    ref_opt.load_state_dict(optimizer.state_dict())
    train_steps(ours_model, ours_opt, 3, seed=9)
    train_steps(ref_model, ref_opt, 3, seed=9)
    assert_same_state(ours_model.state_dict(), ref_model.state_dict())
    assert_same_state(ours_opt.state_dict(), ref_opt.state_dict())


# ------------------------------------------------------------------ object stores


def saved_in_memory() -> tuple[str, nn.Module, torch.optim.Optimizer]:
    url = f"memory://ckpt-inplace-{uuid.uuid4().hex}/run"
    model, optimizer = trained_live_objects(1)
    with ckpt.CheckpointManager(url) as mgr:
        mgr.save(5, model=model, optimizer=optimizer)
    return url, model, optimizer


def optimizer_pointers(optimizer) -> list[int]:
    return [t.data_ptr() for state in optimizer.state.values() for t in state.values()]


def test_without_room_to_spill_an_object_store_restore_goes_through_memory(monkeypatch):
    url, model, optimizer = saved_in_memory()
    monkeypatch.setattr(ckpt.io.spill, "SPILL_MARGIN_BYTES", 2**62)
    live_model, live_opt = trained_live_objects(2)
    before = optimizer_pointers(live_opt)
    ckpt.CheckpointManager(url).restore(model=live_model, optimizer=live_opt)
    assert optimizer_pointers(live_opt) != before  # fresh tensors, as before in-place reads
    assert_same_state(live_model.state_dict(), model.state_dict())
    assert_same_state(live_opt.state_dict(), optimizer.state_dict())


def test_a_damaged_object_changes_nothing_even_with_a_spill():
    url, _, _ = saved_in_memory()
    fs = fsspec.filesystem("memory")
    path = f"{url.removeprefix('memory://')}/{step_dir_name(5)}"
    (name,) = [p for p in fs.ls(path, detail=False) if "optimizer" in p]
    raw = bytearray(fs.cat_file(name))
    raw[-1] ^= 0xFF
    fs.pipe_file(name, bytes(raw))
    assert_refused_and_nothing_changed(url)
