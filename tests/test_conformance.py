"""One storage conformance suite, run over local disk, memory:// and S3 (moto on loopback)."""

from __future__ import annotations

import errno
import tempfile
import uuid

import pytest
import torch
from conftest import assert_same_state
from helpers import trained_live_objects

import ckpt
import ckpt.saving.commit
import ckpt.storage.remote
from ckpt.format import MANIFEST_NAME, step_dir_name

BACKENDS = ["local", "memory", pytest.param("s3", marks=pytest.mark.s3)]


@pytest.fixture(params=BACKENDS)
def place(request, tmp_path):
    """(url, storage_options) of a fresh checkpoint root on each backend."""
    if request.param == "local":
        return str(tmp_path / "run"), None
    if request.param == "memory":
        return f"memory://ckpt-{uuid.uuid4().hex}/run", None
    bucket, options = request.getfixturevalue("s3_bucket")
    return f"s3://{bucket}/run", options


def manager(place, **kwargs) -> ckpt.CheckpointManager:
    url, options = place
    return ckpt.CheckpointManager(url, storage_options=options, **kwargs)


def state(step: int) -> dict:
    return {"w": torch.full((32, 16), float(step)), "n": torch.arange(7) * step, "step": step}


def test_round_trip_listing_and_verify(place):
    mgr = manager(place)
    assert mgr.latest_step() is None and mgr.restore(data={}) is None
    for step in (3, 1, 10):
        mgr.save(step, data=state(step), metrics={"loss": 1.0 / (step + 1)})
    assert mgr.all_steps() == [1, 3, 10]
    live: dict = {}
    info = mgr.restore(data=live)
    assert info is not None and info.step == 10 and info.metrics == {"loss": 1.0 / 11}
    assert_same_state(live, state(10))
    assert_same_state(mgr.read(3)["data"], state(3))
    assert mgr.verify(1).step == 1
    with pytest.raises(ckpt.CheckpointExistsError):
        mgr.save(3, data=state(3))
    mgr.close()


def test_restore_reads_into_the_live_model_and_optimizer(place, tmp_path, monkeypatch):
    """Local disk reads twice; elsewhere the checked bytes wait in an unnamed local file."""
    spills = tmp_path / "tmpdir"
    spills.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(spills))
    model, optimizer = trained_live_objects(1)
    mgr = manager(place)
    mgr.save(1, model=model, optimizer=optimizer)
    live_model, live_opt = trained_live_objects(2)
    kept = [t.data_ptr() for state in live_opt.state.values() for t in state.values()]
    mgr.restore(model=live_model, optimizer=live_opt)
    assert [t.data_ptr() for state in live_opt.state.values() for t in state.values()] == kept
    assert_same_state(live_model.state_dict(), model.state_dict())
    assert_same_state(live_opt.state_dict(), optimizer.state_dict())
    # Nothing of ckpt's is left behind (torch may put its own cache directory there).
    assert [p.name for p in spills.iterdir() if p.name.startswith("tmp")] == []
    mgr.close()


def test_files_without_a_manifest_are_never_listed(place):
    mgr = manager(place)
    mgr.save(1, data=state(1))
    storage = mgr._storage
    storage.makedirs(step_dir_name(2))
    storage.write_file((step_dir_name(2), "data.0123abcd.safetensors"), lambda f: f.write(b"x"))
    assert mgr.all_steps() == [1]
    mgr.close()


def test_retention_overwrite_and_a_new_manager_see_the_same_state(place):
    mgr = manager(place, keep_last=2, keep_best=1, best_metric="loss")
    for step in range(6):
        mgr.save(step, data=state(step), metrics={"loss": abs(step - 1)})
    assert mgr.all_steps() == [1, 4, 5]
    mgr.save(5, data=state(50), overwrite=True)
    mgr.close()
    again = manager(place)
    assert again.all_steps() == [1, 4, 5]
    assert_same_state(again.read(5)["data"], state(50))
    again.verify(5)


def test_a_damaged_file_is_detected(place):
    mgr = manager(place)
    mgr.save(1, data=state(1))
    storage = mgr._storage
    name = next(n for n in storage.list_dir(step_dir_name(1)) if n != MANIFEST_NAME)
    data = bytearray(storage.read_bytes(step_dir_name(1), name))
    data[-1] ^= 1
    storage.remove_file(step_dir_name(1), name)
    storage.write_file((step_dir_name(1), name), lambda f: f.write(bytes(data)))
    with pytest.raises(ckpt.CorruptCheckpointError, match="checksum mismatch"):
        mgr.restore(data={})
    mgr.close()


def test_a_second_writer_fails_fast(place):
    first = manager(place)
    first.save(1, data=state(1))
    second = manager(place)
    with pytest.raises(ckpt.CheckpointLockedError):
        second.save(2, data=state(2))
    first.close()
    second.save(2, data=state(2))
    second.close()


def test_two_writers_can_never_both_commit_one_step(place, monkeypatch):
    """Even a writer that got past the lock cannot commit over another's step."""
    first = manager(place)
    second = manager(place)
    monkeypatch.setattr(second, "_take_lock", lambda: None)
    original = ckpt.saving.commit.write_checkpoint_files

    def first_commits_meanwhile(*args, **kwargs):
        monkeypatch.setattr(ckpt.saving.commit, "write_checkpoint_files", original)
        first.save(7, data=state(1))  # lands between the check and the commit
        return original(*args, **kwargs)

    monkeypatch.setattr(ckpt.saving.commit, "write_checkpoint_files", first_commits_meanwhile)
    with pytest.raises(ckpt.CheckpointExistsError):
        second.save(7, data=state(2))
    assert_same_state(first.read(7)["data"], state(1))
    first.verify(7)
    first.close()


def test_abandoned_uploads_are_removed_after_the_grace_period(place, monkeypatch):
    mgr = manager(place)
    mgr.save(1, data=state(1))
    mgr.close()
    storage = mgr._storage
    if storage.atomic_rename:
        pytest.skip("local disk commits by rename: abandoned temp dirs are tested elsewhere")
    orphan = (step_dir_name(2), "data.0123abcd.safetensors")
    stray = (step_dir_name(1), "data.89abcdef.safetensors")
    foreign = (step_dir_name(1), "notes.txt")
    for parts in (orphan, stray, foreign):
        storage.write_file(parts, lambda f: f.write(b"leftover"))
    monkeypatch.setattr(ckpt.saving.commit, "STALE_TEMP_SECONDS", 0.0)
    again = manager(place)
    again.save(3, data=state(3))
    assert not storage.exists(*orphan) and not storage.exists(*stray)
    assert storage.exists(*foreign)  # not a name ckpt writes: left alone
    assert_same_state(again.read(1)["data"], state(1))
    again.close()


def test_transient_errors_are_retried_and_a_final_failure_names_the_object(place, monkeypatch):
    mgr = manager(place)
    if mgr._storage.atomic_rename:
        pytest.skip("local disk does not retry")
    monkeypatch.setattr(ckpt.storage.remote, "RETRY_BASE_SECONDS", 0.001)
    fs = mgr._storage.fs
    original = fs.open
    failures = {"left": 3}

    def flaky_open(path, mode="rb", **kwargs):
        if failures["left"] > 0:
            failures["left"] -= 1
            raise OSError(errno.EBUSY, "503 SlowDown: please reduce your request rate")
        return original(path, mode, **kwargs)

    monkeypatch.setattr(fs, "open", flaky_open)
    if getattr(fs, "call_s3", None) is not None:  # S3 writes are multipart uploads, not open()
        call_s3 = fs.call_s3

        def flaky_call(method, *args, **kwargs):
            if method in ("put_object", "create_multipart_upload") and failures["left"] > 0:
                failures["left"] -= 1
                raise OSError(errno.EBUSY, "503 SlowDown: please reduce your request rate")
            return call_s3(method, *args, **kwargs)

        monkeypatch.setattr(fs, "call_s3", flaky_call)
    mgr.save(1, data=state(1))
    assert failures["left"] == 0
    assert_same_state(mgr.read(1)["data"], state(1))
    failures["left"] = 1000
    with pytest.raises(ckpt.CheckpointWriteError, match="failed after 5 attempts") as info:
        mgr.save(2, data=state(2))
    assert step_dir_name(2) in str(info.value)
    failures["left"] = 0
    assert mgr.all_steps() == [1]
    mgr.close()


@pytest.mark.s3
def test_unfinished_multipart_uploads_are_aborted_by_the_first_save(s3_bucket):
    bucket, options = s3_bucket
    mgr = ckpt.CheckpointManager(f"s3://{bucket}/run", storage_options=options)
    fs = mgr._storage.fs
    for key in ("run/step_000000000001/data.0123abcd.safetensors", "elsewhere/x.bin"):
        fs.call_s3("create_multipart_upload", Bucket=bucket, Key=key)
    mgr.save(2, data=state(2))  # moto dates every upload 2010: all are past the grace period
    left = [u["Key"] for u in fs.list_multipart_uploads(bucket)]
    assert left == ["elsewhere/x.bin"]  # outside the checkpoint root: not ckpt's
    mgr.close()
