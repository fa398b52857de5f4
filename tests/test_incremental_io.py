"""How an incremental root's blobs are written and read back (issue 20's speed work).

Saves: new blobs are fsynced on a helper thread and the store directory once per
save; a name a crashed save left is replaced atomically; a save whose blobs could
not be made durable fails and forgets them; tensors hashed ahead on helper
threads and tensors hashed as they are copied get the same keys. Restores: the
files of a step are checked on several threads, and a failure is the same
whatever the threads.
Differential throughout (``torch.equal``, dtype, device).
"""

from __future__ import annotations

import os

import pytest
import torch
from conftest import assert_same_state
from helpers import read_manifest_doc, write_manifest

import ckpt
import ckpt.io.read
import ckpt.saving.blobs
import ckpt.storage
from ckpt.format.blobs import BLOB_DIR, BLOB_TENSOR, blob_file_name, blob_key
from ckpt.format.checksums import hash_bytes
from ckpt.format.names import step_dir_name
from ckpt.format.tensorfile import TensorEntry, encode_header, tensor_bytes

BIG = 32768
"""Floats of a tensor stored as a blob (128 KiB, above the 64 KiB threshold)."""


def big(value: float) -> torch.Tensor:
    return torch.arange(BIG, dtype=torch.float32) + value


def key_of(t: torch.Tensor) -> str:
    return blob_key(t, tensor_bytes(t))


def blob(root, t: torch.Tensor):
    return root / BLOB_DIR / blob_file_name(key_of(t))


def test_a_save_fsyncs_every_new_blob_and_the_store_once(tmp_path, monkeypatch):
    with ckpt.CheckpointManager(tmp_path, incremental=True) as mgr:
        mgr.save(1, data={"a": big(0)}, rng=False)
        synced: list[int] = []
        original = ckpt.storage.SYSCALLS.fsync

        def fsync(fd: int) -> None:
            synced.append(os.fstat(fd).st_ino)
            original(fd)

        monkeypatch.setattr(ckpt.storage.SYSCALLS, "fsync", fsync)
        state = {"a": big(0), "b": big(1), "c": big(2), "d": big(3)}
        mgr.save(2, data=state, rng=False)
        monkeypatch.undo()
    store = (tmp_path / BLOB_DIR).stat().st_ino
    assert synced.count(store) == 1
    for name in "bcd":  # each new blob, and only those: "a" was stored by step 1
        assert synced.count(blob(tmp_path, state[name]).stat().st_ino) == 1
    assert blob(tmp_path, state["a"]).stat().st_ino not in synced
    live = {n: torch.zeros(BIG) for n in state}
    ckpt.CheckpointManager(tmp_path).restore(data=live, rng=False)
    assert_same_state(live, state)


def test_a_name_a_crashed_save_left_is_replaced_whole(tmp_path):
    with ckpt.CheckpointManager(tmp_path, incremental=True) as mgr:
        mgr.save(1, data={"a": big(0)}, rng=False)
        half = blob(tmp_path, big(5))
        half.write_bytes(b"half a blob")  # as a save killed after creating it would leave
        state = {"a": big(0), "b": big(5)}
        mgr.save(2, data=state, rng=False)
    reader = ckpt.CheckpointReader(tmp_path)
    reader.verify(1)
    reader.verify(2)
    assert half.stat().st_size > BIG * 4
    assert_same_state(reader.read(2)["data"], state)


def test_blobs_not_made_durable_fail_the_save_and_are_written_again(tmp_path, monkeypatch):
    with ckpt.CheckpointManager(tmp_path, incremental=True) as mgr:
        mgr.save(1, data={"a": big(0)}, rng=False)

        def failing(self, *parts):
            raise OSError(5, "Input/output error")

        monkeypatch.setattr(ckpt.storage.LocalStorage, "sync_dir", failing)
        state = {"a": big(0), "b": big(7)}
        with pytest.raises(ckpt.CheckpointWriteError, match="durable") as e:
            mgr.save(2, data=state, rng=False)
        assert BLOB_DIR in str(e.value)
        monkeypatch.undo()
        assert mgr.all_steps() == [1]
        first = blob(tmp_path, big(7)).stat().st_ino
        mgr.save(2, data=state, rng=False)  # not taken for durable: written anew
        assert blob(tmp_path, big(7)).stat().st_ino != first
    reader = ckpt.CheckpointReader(tmp_path)
    reader.verify(2)
    assert_same_state(reader.read(2)["data"], state)


def layers(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(*(torch.nn.Linear(256, 128, bias=i % 2 == 0) for i in range(12)))


def test_a_step_of_many_blobs_restores_in_place_whatever_the_threads(tmp_path, monkeypatch):
    model = layers(0)
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    with ckpt.CheckpointManager(tmp_path, incremental=True) as mgr:
        mgr.save(1, model=model, rng=False)
    for threads in (1, 4):
        monkeypatch.setattr(ckpt.io.read, "read_threads", lambda n=threads: n)
        live = layers(1)
        pointers = {k: v.data_ptr() for k, v in live.state_dict().items()}
        ckpt.CheckpointManager(tmp_path).restore(model=live, rng=False)
        assert_same_state(dict(live.state_dict()), saved)
        assert {k: v.data_ptr() for k, v in live.state_dict().items()} == pointers


def test_corrupt_blobs_fail_a_restore_alike_whatever_the_threads(tmp_path, monkeypatch):
    state = {f"t{i}": big(i) for i in range(8)}
    with ckpt.CheckpointManager(tmp_path, incremental=True) as mgr:
        mgr.save(1, data=state, rng=False)
    for name in ("t3", "t6"):
        path = blob(tmp_path, state[name])
        raw = bytearray(path.read_bytes())
        raw[-1] ^= 1
        path.write_bytes(bytes(raw))
    errors = []
    for threads in (1, 4, 4):
        monkeypatch.setattr(ckpt.io.read, "read_threads", lambda n=threads: n)
        live = {n: torch.zeros(BIG) for n in state}
        with pytest.raises(ckpt.CorruptCheckpointError, match="checksum") as e:
            ckpt.CheckpointManager(tmp_path).restore(data=live, rng=False)
        assert_same_state(live, {n: torch.zeros(BIG) for n in state})  # nothing changed
        errors.append(str(e.value))
    assert errors[0] == errors[1] == errors[2]
    assert "data/t3" in errors[0]


@pytest.mark.parametrize("threads", [1, 4])
def test_tensors_hashed_ahead_and_copied_ones_share_blobs_alike(tmp_path, monkeypatch, threads):
    monkeypatch.setattr(ckpt.saving.blobs, "HASH_THREADS", threads)
    torch.manual_seed(0)
    x = torch.randn(256, 128)
    first = {"t": x.t().contiguous(), "u": big(1), "v": big(2)}  # hashed ahead (with threads)
    second = {"t": x.t(), "u": big(1), "v": big(3)}  # "t" needs a copy: hashed as it is copied
    with ckpt.CheckpointManager(tmp_path, incremental=True) as mgr:
        mgr.save(1, data=first, rng=False)
        stored = set(os.listdir(tmp_path / BLOB_DIR))
        mgr.save(2, data=second, rng=False)
    assert set(os.listdir(tmp_path / BLOB_DIR)) - stored == {blob_file_name(key_of(big(3)))}
    reader = ckpt.CheckpointReader(tmp_path)
    assert_same_state(reader.read(1)["data"], first)
    assert_same_state(reader.read(2)["data"], {n: t.contiguous() for n, t in second.items()})


def test_files_checked_in_batches_fail_at_the_first_bad_file_in_order(tmp_path, monkeypatch):
    state = {f"t{i:02}": big(i) for i in range(40)}
    with ckpt.CheckpointManager(tmp_path, incremental=True) as mgr:
        mgr.save(1, data=state, rng=False)
    for name in ("t30", "t07"):  # in different batches of the checking threads
        path = blob(tmp_path, state[name])
        raw = bytearray(path.read_bytes())
        raw[-1] ^= 1
        path.write_bytes(bytes(raw))
    for threads in (1, 2, 4):
        monkeypatch.setattr(ckpt.io.read, "read_threads", lambda n=threads: n)
        live = {n: torch.zeros(BIG) for n in state}
        with pytest.raises(ckpt.CorruptCheckpointError, match="checksum") as e:
            ckpt.CheckpointManager(tmp_path).restore(data=live, rng=False)
        assert_same_state(live, {n: torch.zeros(BIG) for n in state})  # nothing changed
        assert "data/t07" in str(e.value) and blob_file_name(key_of(state["t07"])) in str(e.value)


@pytest.mark.parametrize("metadata", [None, {"format": "np"}, {"format": "pt", "x": "y"}])
def test_a_blob_header_written_otherwise_is_parsed_and_checked_in_full(tmp_path, metadata):
    # A valid header that is not byte for byte ckpt's own takes the full parse, and reads.
    state = {"a": big(0), "b": big(1)}
    with ckpt.CheckpointManager(tmp_path, incremental=True) as mgr:
        mgr.save(1, data=state, rng=False)
    key = key_of(state["a"])
    entry = TensorEntry(BLOB_TENSOR, torch.float32, (BIG,), 0, BIG * 4)
    raw = encode_header([entry], metadata) + tensor_bytes(state["a"]).tobytes()
    assert raw != blob(tmp_path, state["a"]).read_bytes()
    blob(tmp_path, state["a"]).write_bytes(raw)
    path = tmp_path / step_dir_name(1) / "manifest.json"
    doc = read_manifest_doc(path)
    doc["blobs"][key] = {"size": len(raw), "checksum": hash_bytes(raw)}
    write_manifest(path, doc)
    live = {n: torch.zeros(BIG) for n in state}
    ckpt.CheckpointManager(tmp_path).restore(data=live, rng=False)
    assert_same_state(live, state)
    assert_same_state(ckpt.CheckpointReader(tmp_path).read(1)["data"], state)
