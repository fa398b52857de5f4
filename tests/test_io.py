"""Reads into live tensors keep few files open, and load only the bytes that were checked."""

from __future__ import annotations

import os

import pytest
import torch
from conftest import assert_same_state

import ckpt
import ckpt.io.pending
from ckpt.format import step_dir_name

ITEMS = 6


def modules(seed: int) -> dict[str, torch.nn.Module]:
    torch.manual_seed(seed)
    return {f"m{i}": torch.nn.Linear(8, 8) for i in range(ITEMS)}


def states(items: dict[str, torch.nn.Module]) -> dict:
    return {n: {k: v.clone() for k, v in m.state_dict().items()} for n, m in items.items()}


@pytest.fixture
def saved(tmp_path, monkeypatch):
    monkeypatch.setattr(ckpt.io.pending, "MAX_HELD_FILES", 2)  # the rest are closed and reopened
    mgr = ckpt.CheckpointManager(tmp_path)
    items = modules(0)
    mgr.save(1, rng=False, **items)
    return mgr, items


def test_files_beyond_the_limit_are_reopened_and_loaded_in_place(saved):
    mgr, items = saved
    live = modules(1)
    pointers = {n: m.weight.data_ptr() for n, m in live.items()}
    mgr.restore(rng=False, **live)
    assert_same_state(states(live), states(items))
    assert {n: m.weight.data_ptr() for n, m in live.items()} == pointers


def test_a_file_changed_between_the_checks_and_the_reads_fails_before_touching_anything(
    saved, monkeypatch
):
    mgr, _ = saved
    step_dir = mgr._storage.path(step_dir_name(1))
    last = os.path.join(step_dir, f"m{ITEMS - 1}.safetensors")
    original = ckpt.io.pending.PendingReads.run

    def change_then_run(self):
        with open(last, "r+b") as f:  # same size, other bytes: only its identity tells
            f.seek(-1, os.SEEK_END)
            byte = f.read(1)[0]
            f.seek(-1, os.SEEK_END)
            f.write(bytes([byte ^ 1]))
        return original(self)

    monkeypatch.setattr(ckpt.io.pending.PendingReads, "run", change_then_run)
    live = modules(1)
    before = states(live)
    with pytest.raises(ckpt.CorruptCheckpointError, match="changed after it was checked"):
        mgr.restore(rng=False, **live)
    assert_same_state(states(live), before)


def test_the_held_file_limit_follows_the_descriptor_limit(monkeypatch):
    import resource

    monkeypatch.setattr(resource, "getrlimit", lambda which: (64, 1024))
    assert ckpt.io.pending.held_files_limit() == 8
    monkeypatch.setattr(resource, "getrlimit", lambda which: (4, 1024))
    assert ckpt.io.pending.held_files_limit() == 1
    monkeypatch.setattr(resource, "getrlimit", lambda which: (10**6, 10**6))
    assert ckpt.io.pending.held_files_limit() == ckpt.io.pending.MAX_HELD_FILES


def test_tunables_are_patched_where_they_live_not_on_the_package():
    """``ckpt.io`` re-exports only its API, so a patch of a tunable on it fails loudly."""
    import ckpt.io.live_reads
    import ckpt.io.spill

    for name in ("READ_SLICE_BYTES", "PARALLEL_READ_BYTES", "CAST_CHUNK_BYTES", "MAX_HELD_FILES"):
        assert not hasattr(ckpt.io, name)
    assert ckpt.io.live_reads.READ_SLICE_BYTES and ckpt.io.spill.SPILL_MARGIN_BYTES
    assert sorted(ckpt.io.__all__) == ckpt.io.__all__
    assert all(hasattr(ckpt.io, name) for name in ckpt.io.__all__)
