"""Random streams: captured by default, restored last, checked before anything changes."""

from __future__ import annotations

import json
import logging
import random
import sys

import numpy
import pytest
import torch
from conftest import assert_same_state, states_differ
from helpers import small_model, write_manifest

import ckpt
import ckpt.state.rng
from ckpt.format import MANIFEST_NAME, step_dir_name
from ckpt.state.rng import capture_rng_state, check_rng_state, set_rng_state


def draws() -> tuple:
    return (
        random.random(),
        random.gauss(0, 1),
        float(numpy.random.rand()),
        float(numpy.random.randn()),
        torch.rand(3).tolist(),
        torch.randn(2).tolist(),
    )


def seed_all(seed: int) -> None:
    random.seed(seed)
    numpy.random.seed(seed)
    torch.manual_seed(seed)


def test_restore_puts_every_stream_back(tmp_path):
    seed_all(1)
    random.gauss(0, 1)  # leaves a cached gaussian in Python's state
    numpy.random.randn()
    mgr = ckpt.CheckpointManager(tmp_path)
    mgr.save(0, data={})
    expected = draws()
    seed_all(2)
    assert draws() != expected
    mgr.restore(data={})
    assert draws() == expected


def test_streams_are_restored_after_every_other_item(tmp_path):
    class DrawsOnLoad:
        def state_dict(self):
            return {}

        def load_state_dict(self, state):
            torch.rand(5)
            random.random()

    seed_all(3)
    mgr = ckpt.CheckpointManager(tmp_path)
    mgr.save(0, model=small_model(), thing=DrawsOnLoad(), data={"a": 1})
    expected = draws()
    mgr.restore(model=small_model(4), thing=DrawsOnLoad(), data={})
    assert draws() == expected


def test_rng_false_on_save_stores_no_streams_and_restore_warns(tmp_path, caplog):
    mgr = ckpt.CheckpointManager(tmp_path)
    info = mgr.save(0, data={"x": 1}, rng=False)
    assert info.items == ("data",)
    seed_all(5)
    expected = draws()
    seed_all(5)
    with caplog.at_level(logging.WARNING, logger="ckpt"):
        mgr.restore(data={})
    assert "holds no random state" in caplog.text
    assert draws() == expected


def test_rng_false_on_restore_leaves_streams_alone(tmp_path):
    mgr = ckpt.CheckpointManager(tmp_path)
    seed_all(6)
    mgr.save(0, data={})
    seed_all(7)
    expected = draws()
    seed_all(7)
    mgr.restore(data={}, rng=False)
    assert draws() == expected


def test_read_returns_the_streams_as_plain_state(tmp_path):
    seed_all(8)
    state = capture_rng_state()
    mgr = ckpt.CheckpointManager(tmp_path)
    mgr.save(0, data={})
    assert_same_state(mgr.read()["rng"], state)
    assert state["torch"].dtype == torch.uint8 and isinstance(state["python"]["internal"], list)


def test_streams_come_back_on_the_cpu_whatever_map_location_says(tmp_path):
    seed_all(9)
    mgr = ckpt.CheckpointManager(tmp_path)
    mgr.save(0, data={"t": torch.ones(2)})
    expected = draws()
    seen = []

    def map_location(storage, location):
        seen.append(location)
        return storage

    mgr.restore(data={}, map_location=map_location)
    assert draws() == expected and seen == ["cpu"]  # only data/t went through it


def test_numpy_is_skipped_when_not_imported(monkeypatch):
    monkeypatch.setitem(sys.modules, "numpy", None)
    state = capture_rng_state()
    assert "numpy" not in state
    check_rng_state(state)


def test_cuda_states_without_cuda_devices_are_skipped_with_a_warning(caplog):
    state = capture_rng_state()
    state["cuda"] = [torch.zeros(16, dtype=torch.uint8)] * 2
    check_rng_state(state)
    with caplog.at_level(logging.WARNING, logger="ckpt"):
        set_rng_state(state)
    if not torch.cuda.is_available():
        assert "2 CUDA devices and this process sees 0" in caplog.text


def corrupt(state: dict, path: str, value) -> dict:
    keys = path.split(".")
    target = state
    for key in keys[:-1]:
        target = target[key]
    target[keys[-1]] = value
    return state


@pytest.mark.parametrize(
    ("path", "value", "error", "key"),
    [
        ("python.internal", [0] * 10, ckpt.CorruptCheckpointError, "rng.python.internal"),
        ("python.version", "3", ckpt.CorruptCheckpointError, "rng.python"),
        ("python.gauss_next", "x", ckpt.CorruptCheckpointError, "rng.python.gauss_next"),
        ("torch", torch.zeros(5056, dtype=torch.int8), ckpt.CorruptCheckpointError, "rng.torch"),
        (
            "torch",
            torch.zeros(10, dtype=torch.uint8),
            ckpt.IncompatibleCheckpointError,
            "rng.torch",
        ),
        ("numpy.key", [2**32] * 624, ckpt.CorruptCheckpointError, "rng.numpy.key"),
        ("numpy.pos", 625, ckpt.CorruptCheckpointError, "rng.numpy.pos"),
        ("numpy.bit_generator", "PCG64", ckpt.CorruptCheckpointError, "rng.numpy"),
        (
            "cuda",
            [torch.zeros(2, 2, dtype=torch.uint8)],
            ckpt.CorruptCheckpointError,
            "rng.cuda.#0",
        ),
        ("rank", -1, ckpt.CorruptCheckpointError, "rng.rank"),
        # saved with world size 1, so rank 1 does not exist (another rank's streams:
        # test_a_rank_restores_only_its_own_streams)
        ("rank", 1, ckpt.CorruptCheckpointError, "rng.rank"),
        ("world_size", 0, ckpt.CorruptCheckpointError, "rng.world_size"),
        ("world_size", -2, ckpt.CorruptCheckpointError, "rng.world_size"),
        ("python.version", 4, ckpt.CorruptCheckpointError, "rng.python"),
    ],
)
def test_bad_states_are_refused_naming_the_part(path, value, error, key):
    state = corrupt(capture_rng_state(), path, value)
    with pytest.raises(error) as info:
        check_rng_state(state)
    assert info.value.key == key


def test_python_position_past_the_end_is_refused():
    state = capture_rng_state()
    state["python"]["internal"][-1] = 625
    with pytest.raises(ckpt.CorruptCheckpointError, match="position"):
        check_rng_state(state)


def test_a_bad_stored_state_fails_the_restore_before_anything_changes(tmp_path):
    model = small_model(0)
    mgr = ckpt.CheckpointManager(tmp_path)
    mgr.save(0, model=model)
    manifest_path = tmp_path / step_dir_name(0) / MANIFEST_NAME
    manifest = json.loads(manifest_path.read_text())
    manifest["items"]["rng"]["state"]["python"]["internal"] = [1, 2, 3]
    write_manifest(manifest_path, manifest)

    live = small_model(1)
    before = {k: v.clone() for k, v in live.state_dict().items()}
    assert states_differ(before, model.state_dict())
    seed_all(10)
    expected = draws()
    seed_all(10)
    with pytest.raises(ckpt.CorruptCheckpointError) as info:
        mgr.restore(model=live)
    assert info.value.key == "rng.python.internal"
    assert info.value.path == str(manifest_path)
    assert_same_state(live.state_dict(), before)
    assert draws() == expected


def test_a_rank_restores_only_its_own_streams(tmp_path, monkeypatch):
    monkeypatch.setattr(ckpt.state.rng, "_process_rank", lambda: (0, 2))
    mgr = ckpt.CheckpointManager(tmp_path)
    mgr.save(0, data={})
    monkeypatch.setattr(ckpt.state.rng, "_process_rank", lambda: (1, 2))
    with pytest.raises(
        ckpt.IncompatibleCheckpointError, match="saved by rank 0 but this is rank 1"
    ):
        mgr.restore(data={})
    mgr.restore(data={}, rng=False)


def test_a_changed_world_size_warns(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(ckpt.state.rng, "_process_rank", lambda: (0, 4))
    mgr = ckpt.CheckpointManager(tmp_path)
    mgr.save(0, data={})
    monkeypatch.setattr(ckpt.state.rng, "_process_rank", lambda: (0, 2))
    with caplog.at_level(logging.WARNING, logger="ckpt"):
        mgr.restore(data={})
    assert "world size 4 restored with world size 2" in caplog.text
    # Once: it was logged at the plan's check and again when the streams were set.
    assert caplog.text.count("restored with world size") == 1


def test_rng_is_a_reserved_item_name(tmp_path):
    mgr = ckpt.CheckpointManager(tmp_path)
    with pytest.raises(TypeError):
        mgr.save(0, **{"rng": {"a": 1}})


@pytest.mark.cuda
def test_cuda_streams_round_trip(tmp_path):
    torch.cuda.init()
    torch.cuda.manual_seed_all(11)
    mgr = ckpt.CheckpointManager(tmp_path)
    mgr.save(0, data={})
    expected = torch.rand(4, device="cuda").tolist()
    torch.cuda.manual_seed_all(12)
    mgr.restore(data={})
    assert torch.rand(4, device="cuda").tolist() == expected


def _rank_streams(rank: int, root: str) -> None:
    import torch.distributed as dist

    dist.init_process_group(
        "gloo", init_method=f"file://{root}/rendezvous", rank=rank, world_size=2
    )
    try:
        seed_all(100 + rank)
        mgr = ckpt.CheckpointManager(f"{root}/rank{rank}", process_group=False)
        mgr.save(0, data={})
        saved = mgr.read()["rng"]
        assert (saved["rank"], saved["world_size"]) == (rank, 2)
        expected = draws()
        seed_all(0)
        mgr.restore(data={})
        assert draws() == expected
        dist.barrier()
        other = ckpt.CheckpointManager(f"{root}/rank{1 - rank}", process_group=False)
        with pytest.raises(ckpt.IncompatibleCheckpointError, match=f"this is rank {rank}"):
            other.restore(data={})
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_each_rank_saves_and_restores_its_own_streams(tmp_path):
    torch.multiprocessing.start_processes(
        _rank_streams, args=(str(tmp_path),), nprocs=2, start_method="spawn"
    )


def test_a_torch_state_torch_refuses_fails_before_anything_is_loaded(tmp_path, monkeypatch):
    """Found by the fuzzer: a flipped bit in the generator bytes, checksums rewritten."""
    from ckpt.state.rng import check_rng_values

    state = capture_rng_state()
    bad = state["torch"].clone()
    bad[8:12] = 0  # the "left" counter of the mt19937 state: torch refuses 0
    with pytest.raises(ckpt.CorruptCheckpointError) as info:
        check_rng_values({**state, "torch": bad})
    assert info.value.key == "rng.torch"

    model = small_model(0)
    mgr = ckpt.CheckpointManager(tmp_path)
    mgr.save(0, model=model)
    live = small_model(1)
    before = {k: v.clone() for k, v in live.state_dict().items()}
    with monkeypatch.context() as patch:
        patch.setattr(ckpt.state.rng, "capture_rng_state", lambda: {**state, "torch": bad})
        mgr.save(1, model=model)
    with pytest.raises(ckpt.CorruptCheckpointError):
        mgr.restore(1, model=live)
    assert_same_state(live.state_dict(), before)
