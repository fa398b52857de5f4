"""ckpt.CheckpointWriter: the one writer of a root (the manager, prune and import use it)."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_same_state

import ckpt
from ckpt.policies.retention import RetentionPolicy
from ckpt.state.items import capture


def _captured(value: float) -> dict[str, object]:
    return {"data": capture("data", {"t": torch.full((3,), value), "n": 1}, {})}


def test_a_writer_commits_what_a_reader_sharing_its_storage_lists_and_reads(tmp_path):
    with ckpt.CheckpointWriter(tmp_path) as writer:
        reader = ckpt.CheckpointReader(storage=writer.storage)
        assert reader.all_steps() == []
        manifest = writer.commit_captured(3, _captured(1.5), epoch=2, metrics={"loss": 0.5})
        assert manifest.step == 3 and writer.is_committed(3)
        assert reader.all_steps() == [3]
        assert_same_state(reader.read(3)["data"], {"t": torch.full((3,), 1.5), "n": 1})
        assert reader.checkpoint(3).epoch == 2
        with pytest.raises(ckpt.CheckpointExistsError):
            writer.commit_captured(3, _captured(2.0))
        writer.commit_captured(3, _captured(2.0), overwrite=True)
        assert_same_state(reader.read(3)["data"], {"t": torch.full((3,), 2.0), "n": 1})


def test_one_writer_per_root_until_it_closes(tmp_path):
    first = ckpt.CheckpointWriter(tmp_path)
    first.commit_captured(0, _captured(0.0))
    second = ckpt.CheckpointWriter(tmp_path)
    with pytest.raises(ckpt.CheckpointLockedError):
        second.commit_captured(1, _captured(1.0))
    with pytest.raises(ckpt.CheckpointLockedError):
        ckpt.CheckpointManager(tmp_path).save(1, data={"n": 1})
    first.close()
    first.close()  # idempotent
    second.commit_captured(1, _captured(1.0))
    second.close()
    assert ckpt.CheckpointReader(tmp_path).all_steps() == [0, 1]


def test_prune_and_delete_under_the_lock(tmp_path):
    with ckpt.CheckpointWriter(tmp_path) as writer:
        for step in range(6):
            writer.commit_captured(step, _captured(float(step)))
        steps, deleted = writer.prune(RetentionPolicy(keep_last=2, keep_every=3))
        assert steps == list(range(6)) and deleted == [0, 1, 3]
        writer.delete(2, "test")
        assert ckpt.CheckpointReader(tmp_path).all_steps() == [4, 5]


def test_storage_or_directory_not_both(tmp_path):
    writer = ckpt.CheckpointWriter(tmp_path)
    with pytest.raises(ValueError):
        ckpt.CheckpointWriter(tmp_path, storage=writer.storage)
    with pytest.raises(ValueError):
        ckpt.CheckpointReader()
    with pytest.raises(ValueError):
        ckpt.CheckpointReader(tmp_path, storage=writer.storage)
