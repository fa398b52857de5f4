"""CheckpointManager: save, restore, listing, commit, retention, failures."""

from __future__ import annotations

import json
import logging
import os
import uuid
from collections import OrderedDict

import pytest
import torch
from conftest import assert_same_state, states_differ
from helpers import keys, small_model, train_steps, trees, write_manifest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import ckpt
from ckpt.format import MANIFEST_NAME, step_dir_name
from ckpt.manager import LOCK_NAME


def trained(seed: int = 0, steps: int = 2):
    model = small_model(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    train_steps(model, opt, steps, seed=seed)
    return model, opt


class Counter:
    """A user-defined Stateful object."""

    def __init__(self) -> None:
        self.n = 0
        self.history = [0.5]

    def state_dict(self):
        return {"n": self.n, "history": list(self.history), "t": torch.tensor([self.n])}

    def load_state_dict(self, state):
        self.n = state["n"]
        self.history = list(state["history"])
        self.t = state["t"]


def test_round_trip_restores_every_kind_of_item(tmp_path):
    model, opt = trained()
    counter = Counter()
    counter.n = 7
    extra = {"best": 0.25, "ema": torch.randn(3), "names": ("a", "b")}
    mgr = ckpt.CheckpointManager(str(tmp_path))
    info = mgr.save(
        10, epoch=2, metrics={"loss": 0.5}, model=model, optim=opt, counter=counter, extra=extra
    )
    assert (info.step, info.epoch, dict(info.metrics)) == (10, 2, {"loss": 0.5})
    assert info.path == os.path.join(str(tmp_path), "step_000000000010")
    assert info.items == ("model", "optim", "counter", "extra", "rng")

    model2, opt2 = trained(seed=1)
    counter2, extra2 = Counter(), {"stale": 1}
    assert states_differ(model2.state_dict(), model.state_dict())
    restored = mgr.restore(model=model2, optim=opt2, counter=counter2, extra=extra2)
    assert restored is not None and restored.step == 10 and restored.epoch == 2
    assert_same_state(model2.state_dict(), model.state_dict())
    assert_same_state(opt2.state_dict(), opt.state_dict())
    assert (counter2.n, counter2.history) == (7, [0.5])
    assert_same_state(extra2, extra)


def test_restore_returns_none_when_nothing_is_saved(tmp_path):
    mgr = ckpt.CheckpointManager(tmp_path)
    model = small_model()
    before = model.state_dict()
    assert mgr.restore(model=model) is None
    assert mgr.latest_step() is None and mgr.all_steps() == [] and mgr.checkpoint() is None
    assert_same_state(model.state_dict(), before)


def test_steps_sort_numerically_and_latest_is_restored(tmp_path):
    mgr = ckpt.CheckpointManager(tmp_path)
    for step in (9, 10, 100, 2):
        mgr.save(step, data={"step": step})
    assert mgr.all_steps() == [2, 9, 10, 100]
    assert mgr.latest_step() == 100
    data: dict = {}
    assert mgr.restore(data=data).step == 100 and data == {"step": 100}
    assert mgr.restore(9, data=data).step == 9 and data == {"step": 9}


def test_saving_an_existing_step_is_an_error_and_keeps_the_original(tmp_path):
    mgr = ckpt.CheckpointManager(tmp_path)
    mgr.save(1, data={"v": 1})
    with pytest.raises(ckpt.CheckpointExistsError, match="already saved") as info:
        mgr.save(1, data={"v": 2})
    assert isinstance(info.value, FileExistsError)
    assert mgr.read(1)["data"] == {"v": 1}
    assert [n for n in os.listdir(tmp_path) if n.startswith(".ckpt-tmp")] == []


def test_unknown_step_and_missing_item_are_not_found_errors(tmp_path):
    mgr = ckpt.CheckpointManager(tmp_path)
    mgr.save(1, data={"v": 1})
    with pytest.raises(ckpt.CheckpointNotFoundError, match="step 5") as info:
        mgr.restore(5, data={})
    assert isinstance(info.value, FileNotFoundError)
    with pytest.raises(ckpt.CheckpointNotFoundError, match="'model' is not in checkpoint") as info:
        mgr.restore(model=small_model())
    assert info.value.key == "model" and info.value.path.endswith(MANIFEST_NAME)


def test_failed_restore_leaves_every_live_object_untouched(tmp_path):
    model, opt = trained()
    mgr = ckpt.CheckpointManager(tmp_path)
    mgr.save(1, model=model, optimizer=opt, data={"x": 1})
    live_model, live_opt = trained(seed=3)
    wrong = nn.Linear(2, 2)  # saved as a module with other keys
    data = {"x": 0}
    before = (live_model.state_dict(), live_opt.state_dict(), wrong.state_dict())
    before = tuple(
        {k: v.clone() for k, v in s.items()} if k == 0 else s for k, s in enumerate(before)
    )
    with pytest.raises(ckpt.IncompatibleCheckpointError, match="Missing key"):
        mgr.restore(model=wrong, optimizer=live_opt, data=data)
    with pytest.raises(ckpt.IncompatibleCheckpointError):
        mgr.restore(data=data, optimizer=torch.optim.SGD(wrong.parameters(), lr=1))
    assert_same_state(live_model.state_dict(), before[0])
    assert_same_state(live_opt.state_dict(), before[1])
    assert data == {"x": 0}


def test_shape_mismatch_names_the_key_in_torch_wording(tmp_path):
    mgr = ckpt.CheckpointManager(tmp_path)
    mgr.save(1, model=nn.Linear(3, 2))
    target = nn.Linear(4, 2)
    before = target.weight.detach().clone()
    with pytest.raises(ckpt.IncompatibleCheckpointError, match="size mismatch for weight") as info:
        mgr.restore(model=target, strict=False)
    assert info.value.key == "model"
    assert info.value.path == str(tmp_path / step_dir_name(1) / MANIFEST_NAME)
    assert torch.equal(target.weight, before)


def test_non_strict_restore_reports_missing_and_unexpected_keys(tmp_path, caplog):
    mgr = ckpt.CheckpointManager(tmp_path)
    mgr.save(1, model=nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2)))
    target = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 2))
    with caplog.at_level(logging.WARNING, logger="ckpt"):
        info = mgr.restore(model=target, strict=False)
    assert info.missing_keys == {"model": ["2.weight", "2.bias"]}
    assert info.unexpected_keys == {"model": ["1.weight", "1.bias"]}
    assert "missing keys" in caplog.text


def test_tied_weights_are_written_once_and_stay_tied(tmp_path):
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(10, 4)
            self.out = nn.Linear(4, 10, bias=False)
            self.out.weight = self.emb.weight

    model = Tied()
    mgr = ckpt.CheckpointManager(tmp_path)
    mgr.save(0, model=model, rng=False)
    manifest = json.loads((tmp_path / step_dir_name(0) / MANIFEST_NAME).read_text())
    assert list(manifest["tensors"]) == ["model/emb.weight"]
    state = mgr.read()["model"]
    assert state["emb.weight"] is state["out.weight"]
    fresh = Tied()
    mgr.restore(model=fresh)
    assert fresh.out.weight is fresh.emb.weight
    assert torch.equal(fresh.emb.weight, model.emb.weight)


def test_read_returns_plain_state_dicts_like_torch(tmp_path):
    model, opt = trained()
    mgr = ckpt.CheckpointManager(tmp_path)
    mgr.save(4, model=model, optimizer=opt)
    states = mgr.read()
    assert isinstance(states["model"], OrderedDict)
    assert states["model"]._metadata == model.state_dict()._metadata
    assert_same_state(states["model"], model.state_dict())
    assert_same_state(states["optimizer"], opt.state_dict())


def test_keep_last_deletes_only_after_commit_and_keeps_the_newest(tmp_path):
    mgr = ckpt.CheckpointManager(tmp_path, keep_last=2)
    for step in range(5):
        mgr.save(step, data={"s": step})
    assert mgr.all_steps() == [3, 4]
    assert sorted(os.listdir(tmp_path)) == [LOCK_NAME, step_dir_name(3), step_dir_name(4)]
    mgr.save(1, data={"s": 1})  # an older step just saved is kept
    assert mgr.all_steps() == [1, 3, 4]
    mgr.save(5, data={"s": 5})
    assert mgr.all_steps() == [4, 5]


def test_uncommitted_and_foreign_directories_are_never_listed(tmp_path):
    mgr = ckpt.CheckpointManager(tmp_path)
    mgr.save(1, data={"v": 1})
    (tmp_path / step_dir_name(2)).mkdir()  # no manifest: not committed
    (tmp_path / "step_2").mkdir()  # not canonical
    (tmp_path / "notes").mkdir()
    (tmp_path / ".ckpt-tmp.step_000000000003.otherhost-1.abcd").mkdir()
    assert mgr.all_steps() == [1]
    mgr.close()  # releases the writer lock for the next manager
    mgr2 = ckpt.CheckpointManager(tmp_path, keep_last=1)
    mgr2.save(5, data={"v": 5})
    assert mgr2.all_steps() == [5]
    assert (tmp_path / "notes").exists() and (tmp_path / "step_2").exists()


def test_leftover_temp_directory_of_a_dead_writer_is_cleaned(tmp_path):
    import socket

    from ckpt.format import temp_dir_name

    dead_pid = 2**22 + 12345  # above the default pid_max, never alive
    leftover = tmp_path / temp_dir_name(3, socket.gethostname(), dead_pid, "0000")
    leftover.mkdir()
    (leftover / "model.safetensors").write_bytes(b"partial")
    mgr = ckpt.CheckpointManager(tmp_path)
    assert mgr.all_steps() == []
    mgr.save(3, data={"v": 3})
    assert not leftover.exists()
    assert mgr.read(3)["data"] == {"v": 3}


def test_failed_save_keeps_earlier_checkpoints_and_leaves_no_temp(tmp_path):
    mgr = ckpt.CheckpointManager(tmp_path)
    mgr.save(1, data={"v": 1})

    class Exploding:
        def state_dict(self):
            return {"t": torch.ones(2)}

        def load_state_dict(self, state):
            pass

    import ckpt.io.write as ckpt_io_write

    original = ckpt_io_write.write_tensors

    def failing(f, tensors, metadata=None):
        original(f, tensors, metadata)
        raise OSError(28, "No space left on device")

    ckpt_io_write.write_tensors = failing
    try:
        with pytest.raises(OSError, match="No space"):
            mgr.save(2, thing=Exploding())
    finally:
        ckpt_io_write.write_tensors = original
    assert mgr.all_steps() == [1]
    assert sorted(os.listdir(tmp_path)) == [LOCK_NAME, step_dir_name(1)]
    mgr.save(2, data={"v": 2})
    assert mgr.all_steps() == [1, 2]


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"step": -1}, ValueError),
        ({"step": 1.0}, ValueError),
        ({"step": True}, ValueError),
        ({"step": 1, "epoch": "one"}, ValueError),
        ({"step": 1, "metrics": {"loss": "low"}}, TypeError),
        ({"step": 1, "metrics": [1]}, TypeError),
    ],
)
def test_bad_save_arguments_are_refused(tmp_path, kwargs, error):
    mgr = ckpt.CheckpointManager(tmp_path)
    with pytest.raises(error):
        mgr.save(**kwargs, data={"v": 1})
    assert mgr.all_steps() == []


def test_bad_items_are_refused_with_their_names(tmp_path):
    mgr = ckpt.CheckpointManager(tmp_path)
    with pytest.raises(ValueError, match="at least one item"):
        mgr.save(1)
    with pytest.raises(TypeError, match="'thing' is a int"):
        mgr.save(1, thing=3)
    with pytest.raises(ValueError, match="identifier"):
        mgr.save(1, **{"a/b": {"x": 1}})
    with pytest.raises(TypeError, match=r"data\['fn'\]"):
        mgr.save(1, data={"fn": print})
    with pytest.raises(TypeError, match="complex128"):
        mgr.save(1, data={"z": torch.zeros(1, dtype=torch.complex128)})
    assert mgr.all_steps() == []


@pytest.mark.parametrize(
    ("value", "error"), [({"keep_last": 0}, ValueError), ({"storage_options": 3}, TypeError)]
)
def test_bad_manager_configuration_is_refused(tmp_path, value, error):
    with pytest.raises(error):
        ckpt.CheckpointManager(tmp_path, **value)


def test_metric_tensors_are_stored_as_numbers(tmp_path):
    mgr = ckpt.CheckpointManager(tmp_path)
    info = mgr.save(1, metrics={"loss": torch.tensor(0.25), "nan": float("nan")}, data={"v": 1})
    assert info.metrics["loss"] == 0.25
    again = mgr.checkpoint(1)
    assert again is not None and again.metrics["loss"] == 0.25


def test_item_saved_as_another_kind_is_incompatible(tmp_path):
    mgr = ckpt.CheckpointManager(tmp_path)
    mgr.save(1, model={"weight": torch.ones(1)})
    with pytest.raises(ckpt.IncompatibleCheckpointError, match="saved as a dict"):
        mgr.restore(model=nn.Linear(1, 1, bias=False))


def test_manifest_in_the_wrong_directory_is_corrupt(tmp_path):
    mgr = ckpt.CheckpointManager(tmp_path)
    mgr.save(1, data={"v": 1})
    os.rename(tmp_path / step_dir_name(1), tmp_path / step_dir_name(7))
    with pytest.raises(ckpt.CorruptCheckpointError, match="manifest says step 1"):
        mgr.read(7)


def test_memory_filesystem_round_trip():
    model, opt = trained()
    mgr = ckpt.CheckpointManager("memory://ckpt-tests/run1", keep_last=1)
    mgr.save(1, model=model, optimizer=opt)
    mgr.save(2, model=model, optimizer=opt)
    assert mgr.all_steps() == [2]
    model2, opt2 = trained(seed=5)
    info = mgr.restore(model=model2, optimizer=opt2)
    assert info is not None and info.path == "memory://ckpt-tests/run1/step_000000000002"
    assert_same_state(model2.state_dict(), model.state_dict())
    assert_same_state(opt2.state_dict(), opt.state_dict())


def test_missing_driver_names_the_extra(monkeypatch):
    import fsspec.core

    def no_driver(url, **kwargs):
        raise ImportError("Install s3fs to access S3")

    monkeypatch.setattr(fsspec.core, "url_to_fs", no_driver)
    with pytest.raises(ImportError, match=r"ckpt\[s3\]"):
        ckpt.CheckpointManager("s3://bucket/run")


def test_one_info_log_line_per_save_and_restore(tmp_path, caplog):
    mgr = ckpt.CheckpointManager(tmp_path)
    with caplog.at_level(logging.INFO, logger="ckpt"):
        mgr.save(1, data={"t": torch.ones(4)}, rng=False)
        mgr.restore(data={}, rng=False)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2
    assert lines[0].startswith("saved step 1") and "bytes" in lines[0]
    assert lines[1].startswith("restored step 1") and "16 bytes" in lines[1]


def test_damaged_files_are_checkpoint_errors_naming_the_file(tmp_path):
    model, opt = trained()
    mgr = ckpt.CheckpointManager(tmp_path)
    mgr.save(1, model=model, optimizer=opt)
    step_dir = tmp_path / step_dir_name(1)
    target = small_model(4)
    before = {k: v.clone() for k, v in target.state_dict().items()}

    data = (step_dir / "model.safetensors").read_bytes()
    (step_dir / "model.safetensors").write_bytes(data[:-3])
    with pytest.raises(ckpt.CorruptCheckpointError, match="size") as info:
        mgr.restore(model=target)
    assert info.value.path == str(step_dir / "model.safetensors")

    (step_dir / "model.safetensors").unlink()
    with pytest.raises(ckpt.CorruptCheckpointError, match="missing") as info:
        mgr.restore(model=target)
    assert info.value.path == str(step_dir / "model.safetensors")

    (step_dir / MANIFEST_NAME).write_text("{not json")
    with pytest.raises(ckpt.CorruptCheckpointError, match="not valid JSON"):
        mgr.restore(model=target)
    assert_same_state(target.state_dict(), before)


def test_manifest_and_file_header_must_agree(tmp_path):
    mgr = ckpt.CheckpointManager(tmp_path)
    mgr.save(1, data={"w": torch.ones(2, 3)})
    manifest_path = tmp_path / step_dir_name(1) / MANIFEST_NAME
    doc = json.loads(manifest_path.read_text())
    doc["tensors"]["data/w"]["shape"] = [3, 2]
    write_manifest(manifest_path, doc)
    with pytest.raises(ckpt.CorruptCheckpointError, match="manifest says") as info:
        mgr.read(1)
    assert info.value.key == "data/w"
    doc["items"]["data"]["state"]["w"] = {"$tensor": "data/nope"}
    write_manifest(manifest_path, doc)
    with pytest.raises(ckpt.CorruptCheckpointError, match="does not list") as info:
        mgr.read(1)
    assert info.value.path == str(manifest_path)


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(value=st.dictionaries(keys, trees, max_size=5))
def test_any_storable_dict_round_trips_through_the_manager(tmp_path, value):
    root = tmp_path / uuid.uuid4().hex
    mgr = ckpt.CheckpointManager(root)
    mgr.save(0, data=value)
    assert_same_state(mgr.read()["data"], value)
    live: dict = {}
    mgr.restore(data=live)
    assert_same_state(live, value)


def test_oversized_manifest_is_refused_before_reading(tmp_path, monkeypatch):
    import ckpt.io.manifest

    mgr = ckpt.CheckpointManager(tmp_path)
    mgr.save(1, data={"v": 1})
    monkeypatch.setattr(ckpt.io.manifest, "MAX_MANIFEST_BYTES", 10)
    with pytest.raises(ckpt.CorruptCheckpointError, match="more than the 10 allowed"):
        mgr.read(1)


def test_checkpoint_names_the_completed_step_and_the_next_one(tmp_path):
    mgr = ckpt.CheckpointManager(tmp_path)
    info = mgr.save(41, epoch=3, data={})
    assert (info.step, info.next_step, info.epoch) == (41, 42, 3)
    restored = mgr.restore(data={})
    assert restored is not None and (restored.step, restored.next_step) == (41, 42)


def test_a_lock_that_cannot_be_released_at_exit_is_logged_not_raised(caplog):
    from ckpt.manager import _release_quietly
    from ckpt.storage import WriterLock

    def unreachable() -> None:
        raise ConnectionError("endpoint gone")

    _release_quietly(WriterLock(unreachable))
    assert "could not release the writer lock" in caplog.text


def test_save_and_restore_pause_the_garbage_collector_and_resume_it(tmp_path):
    import gc

    seen: list[bool] = []

    class Probe:
        def state_dict(self):
            seen.append(gc.isenabled())
            return {"x": 1}

        def load_state_dict(self, state):
            seen.append(gc.isenabled())

    mgr = ckpt.CheckpointManager(tmp_path)
    mgr.save(1, probe=Probe())
    mgr.restore(probe=Probe())
    assert len(seen) >= 2 and not any(seen) and gc.isenabled()
