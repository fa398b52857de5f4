"""Chunks checked once, their files held, then read into live tensors (``ckpt.io.held_chunks``).

No process group: a version 3 checkpoint is written as two ranks would
(``helpers.write_sharded_checkpoint``), on local disk and on an fsspec memory
store (whose checked bytes wait in the local spill, or in memory).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest
import torch
from helpers import split_chunks, write_sharded_checkpoint

import ckpt
from ckpt.format import GlobalTensorRecord
from ckpt.io import held_chunks, held_files, read_manifest
from ckpt.io.held_chunks import ChunkReads, HeldChunks
from ckpt.storage import Storage

STEP = "step_000000000001"

STATE = {
    "w": torch.randn(9, 4, generator=torch.Generator().manual_seed(1)),
    "b": torch.arange(7, dtype=torch.int64),
    "h": torch.randn(5, 6, generator=torch.Generator().manual_seed(2)).bfloat16(),
}
CHUNKS = {
    "model/w": split_chunks((9, 4), 0, 3),
    "model/b": split_chunks((7,), 0, 2),
    "model/h": split_chunks((5, 6), 1, 3),  # along dim 1: not contiguous in the whole tensor
}


@pytest.fixture(params=["local", "memory"])
def storage(request, tmp_path) -> Iterator[Storage]:
    if request.param == "local":
        yield Storage(str(tmp_path))
        return
    store = Storage(f"memory://held-chunks-{uuid.uuid4().hex}")
    yield store
    store.fs.rm(store.root, recursive=True)


def _records(storage: Storage) -> dict[str, GlobalTensorRecord]:
    write_sharded_checkpoint(storage, STEP, dict(STATE), chunks=CHUNKS, step=1)
    sharded = read_manifest(storage, STEP).sharded
    assert sharded is not None
    return {name: sharded.tensors[f"model/{name}"] for name in STATE}


def _check_all(
    held: HeldChunks, records: dict[str, GlobalTensorRecord], live: dict[str, torch.Tensor]
) -> ChunkReads:
    """Check every chunk; schedule each into its region of a zeroed tensor of the live dict."""
    reads = ChunkReads()
    for name, record in records.items():
        for index, chunk in enumerate(record.chunks):
            checked = held.check(f"model/{name}", record, index)
            region = tuple(slice(o, o + s) for o, s in zip(chunk.offsets, chunk.sizes, strict=True))
            view = live[name][region]
            if view.is_contiguous():
                reads.into(checked, view)
            else:
                reads.fill(checked, lambda whole, view=view: view.copy_(whole))
    return reads


def _fresh_live() -> dict[str, torch.Tensor]:
    return {name: torch.zeros_like(t) for name, t in STATE.items()}


def _assert_live_is_saved(live: dict[str, torch.Tensor]) -> None:
    for name, t in STATE.items():
        assert live[name].dtype == t.dtype and torch.equal(live[name], t), name


@pytest.mark.parametrize("verify", [True, False])
def test_checked_chunks_are_read_into_live_tensors_bit_for_bit(storage, verify):
    records = _records(storage)
    live = _fresh_live()
    with HeldChunks(storage, STEP, verify=verify) as held:
        reads = _check_all(held, records, live)
        assert not any(t.any() for t in live.values())  # checking wrote nothing
        held.recheck()
        reads.run(storage)
    _assert_live_is_saved(live)


def test_spilled_chunks_go_through_memory_when_the_spill_has_no_room(monkeypatch):
    storage = Storage(f"memory://held-chunks-{uuid.uuid4().hex}")
    monkeypatch.setattr(held_files, "spill_room", lambda nbytes: False)
    records = _records(storage)
    live = _fresh_live()
    with HeldChunks(storage, STEP, verify=True) as held:
        reads = _check_all(held, records, live)
        reads.run(storage)
    _assert_live_is_saved(live)
    storage.fs.rm(storage.root, recursive=True)


def _flip_last_byte(path: str) -> None:
    with open(path, "r+b") as f:
        f.seek(-1, os.SEEK_END)
        byte = f.read(1)[0]
        f.seek(-1, os.SEEK_END)
        f.write(bytes([byte ^ 1]))


def test_a_corrupt_chunk_fails_its_check(tmp_path):
    storage = Storage(str(tmp_path))
    records = _records(storage)
    _flip_last_byte(str(tmp_path / STEP / "rank1.safetensors"))
    live = _fresh_live()
    with (
        HeldChunks(storage, STEP, verify=True) as held,
        pytest.raises(ckpt.CorruptCheckpointError, match="checksum mismatch"),
    ):
        _check_all(held, records, live)


@pytest.mark.parametrize("limit", [16, 0], ids=["held", "reopened"])
def test_a_file_written_to_after_its_checks_fails_the_recheck(tmp_path, monkeypatch, limit):
    monkeypatch.setattr(held_chunks, "held_files_limit", lambda: limit)
    storage = Storage(str(tmp_path))
    records = _records(storage)
    live = _fresh_live()
    with HeldChunks(storage, STEP, verify=True) as held:
        _check_all(held, records, live)
        held.recheck()  # nothing changed yet
        _flip_last_byte(str(tmp_path / STEP / "rank0.safetensors"))
        with pytest.raises(ckpt.CorruptCheckpointError, match="changed after it was checked"):
            held.recheck()
    assert not any(t.any() for t in live.values())


def test_held_files_deleted_after_their_checks_still_give_the_bytes_checked(tmp_path):
    storage = Storage(str(tmp_path))
    records = _records(storage)
    live = _fresh_live()
    with HeldChunks(storage, STEP, verify=True) as held:
        reads = _check_all(held, records, live)
        for name in os.listdir(tmp_path / STEP):
            os.remove(tmp_path / STEP / name)
        held.recheck()
        reads.run(storage)
    _assert_live_is_saved(live)


def test_a_missing_file_is_not_found_with_verify_and_corrupt_without(tmp_path):
    storage = Storage(str(tmp_path))
    records = _records(storage)
    os.remove(tmp_path / STEP / "rank1.safetensors")
    live = _fresh_live()
    with (
        HeldChunks(storage, STEP, verify=True) as held,
        pytest.raises(ckpt.CheckpointNotFoundError),
    ):
        _check_all(held, records, live)
    with (
        HeldChunks(storage, STEP, verify=False) as held,
        pytest.raises(ckpt.CorruptCheckpointError, match="missing"),
    ):
        _check_all(held, records, live)
