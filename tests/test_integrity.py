"""Integrity: every file's checksum is in the manifest and checked on every read."""

from __future__ import annotations

import json
import logging

import pytest
import torch
import xxhash
from conftest import assert_same_state, states_differ
from helpers import small_model

import ckpt
from ckpt.format import MANIFEST_NAME, step_dir_name


def saved(tmp_path, steps=(1,), **options):
    mgr = ckpt.CheckpointManager(tmp_path, **options)
    models = {}
    for step in steps:
        models[step] = small_model(step)
        mgr.save(step, model=models[step], rng=False)
    return mgr, models


def flip(path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def flip_data(path) -> None:
    flip(path, path.stat().st_size - 1)


def test_manifest_records_each_files_xxh3_and_size(tmp_path):
    mgr, _ = saved(tmp_path)
    step_dir = tmp_path / step_dir_name(1)
    files = json.loads((step_dir / MANIFEST_NAME).read_text())["files"]
    data = (step_dir / "model.safetensors").read_bytes()
    assert files["model.safetensors"] == {
        "size": len(data),
        "checksum": "xxh3_64:" + xxhash.xxh3_64_hexdigest(data),
    }
    assert mgr.verify(1).step == 1


@pytest.mark.parametrize("where", ["header", "data", "last byte"])
def test_a_flipped_bit_fails_restore_naming_step_file_expected_and_actual(tmp_path, where):
    mgr, _ = saved(tmp_path)
    path = tmp_path / step_dir_name(1) / "model.safetensors"
    size = path.stat().st_size
    flip(path, {"header": 20, "data": size - 40, "last byte": size - 1}[where])
    live = small_model(9)
    before = {k: v.clone() for k, v in live.state_dict().items()}
    with pytest.raises(ckpt.CorruptCheckpointError) as info:
        mgr.restore(model=live)
    assert info.value.path == str(path)
    if where != "header":  # a header flip may already break the header's JSON
        assert "step 1" in str(info.value) and "expected xxh3_64:" in str(info.value)
        assert "actual xxh3_64:" in str(info.value)
    assert_same_state(live.state_dict(), before)
    with pytest.raises(ckpt.CorruptCheckpointError):
        mgr.verify(1)
    with pytest.raises(ckpt.CorruptCheckpointError):
        mgr.read(1)


def test_verify_false_skips_the_checksum(tmp_path):
    mgr, models = saved(tmp_path)
    path = tmp_path / step_dir_name(1) / "model.safetensors"
    flip(path, path.stat().st_size - 1)
    live = small_model(9)
    mgr.restore(model=live, verify=False)
    assert states_differ(live.state_dict(), models[1].state_dict())


def test_a_changed_manifest_fails_its_own_checksum(tmp_path):
    mgr, _ = saved(tmp_path)
    path = tmp_path / step_dir_name(1) / MANIFEST_NAME
    text = path.read_text()
    path.write_text(text.replace('"epoch":null', '"epoch":7 '))
    with pytest.raises(ckpt.CorruptCheckpointError, match="manifest checksum mismatch"):
        mgr.checkpoint(1)


def test_truncated_files_are_caught_by_size_before_reading(tmp_path):
    mgr, _ = saved(tmp_path)
    path = tmp_path / step_dir_name(1) / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-8])
    with pytest.raises(ckpt.CorruptCheckpointError, match="manifest says") as info:
        mgr.verify(1)
    assert "step 1" in str(info.value)


def test_verify_finds_tensors_the_manifest_does_not_list(tmp_path):
    mgr, _ = saved(tmp_path)
    manifest_path = tmp_path / step_dir_name(1) / MANIFEST_NAME
    doc = json.loads(manifest_path.read_text())
    dropped = next(iter(doc["tensors"]))
    del doc["tensors"][dropped]
    from helpers import write_manifest

    write_manifest(manifest_path, doc)
    with pytest.raises(ckpt.CorruptCheckpointError):
        mgr.verify(1)


def test_a_corrupt_latest_raises_by_default(tmp_path):
    mgr, _ = saved(tmp_path, steps=(1, 2))
    flip_data(tmp_path / step_dir_name(2) / "model.safetensors")
    with pytest.raises(ckpt.CorruptCheckpointError, match="step 2"):
        mgr.restore(model=small_model(9))


def test_fallback_restores_the_newest_intact_checkpoint_and_names_what_it_skipped(tmp_path, caplog):
    mgr, models = saved(tmp_path, steps=(1, 2, 3), fallback_to_intact=True)
    flip_data(tmp_path / step_dir_name(3) / "model.safetensors")
    (tmp_path / step_dir_name(2) / "model.safetensors").unlink()
    live = small_model(9)
    with caplog.at_level(logging.WARNING, logger="ckpt"):
        info = mgr.restore(model=live)
    assert info is not None and info.step == 1
    assert_same_state(live.state_dict(), models[1].state_dict())
    assert "skipped corrupt [3, 2]" in caplog.text
    with pytest.raises(ckpt.CorruptCheckpointError, match="step 3"):
        mgr.restore(3, model=live)  # an explicit step never falls back


def test_fallback_with_nothing_intact_raises(tmp_path):
    mgr, _ = saved(tmp_path, steps=(1, 2), fallback_to_intact=True)
    for step in (1, 2):
        flip(tmp_path / step_dir_name(step) / "model.safetensors", 100)
    with pytest.raises(ckpt.CorruptCheckpointError, match=r"step\(s\) \[2, 1\] are corrupt"):
        mgr.restore(model=small_model(9))


def test_fallback_does_not_hide_incompatible_objects(tmp_path):
    mgr, _ = saved(tmp_path, steps=(1, 2), fallback_to_intact=True)
    with pytest.raises(ckpt.IncompatibleCheckpointError):
        mgr.restore(model=torch.nn.Linear(2, 2))


def test_checkpoints_without_checksums_load_and_verify_with_a_warning(tmp_path, caplog):
    import shutil
    from pathlib import Path

    golden = Path(__file__).parent / "golden" / "v1-ckpt-0.1.0-no-checksums"
    shutil.copytree(golden, tmp_path / step_dir_name(7))
    mgr = ckpt.CheckpointManager(tmp_path)
    with caplog.at_level(logging.WARNING, logger="ckpt"):
        assert mgr.verify(7).step == 7
    assert "predates checksums" in caplog.text
