"""The read-only reader: lists, describes, verifies, reads and streams; never writes."""

from __future__ import annotations

import os
import threading
import uuid
from typing import Any

import fsspec
import pytest
import torch
from conftest import assert_same_state
from helpers import (
    ManySmall,
    flat_tensors,
    read_manifest_doc,
    trained_live_objects,
    write_manifest,
    write_sharded_checkpoint,
)

import ckpt
from ckpt.format import MANIFEST_NAME, step_dir_name
from ckpt.manager import LOCK_NAME
from ckpt.storage import open_storage


def _same_tensors(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert sorted(got) == sorted(want)
    for key, t in want.items():
        assert got[key].dtype == t.dtype and got[key].device == t.device, key
        assert got[key].shape == t.shape and torch.equal(got[key], t), key


def _streamed_equals_read(reader: ckpt.CheckpointReader, step: int | None = None) -> None:
    full = reader.read(step)
    for item, state in full.items():
        streamed = list(reader.iter_tensors(step, item=item))
        assert len({k for k, _ in streamed}) == len(streamed), item  # each key once
        _same_tensors(dict(streamed), flat_tensors(state))


@pytest.fixture
def saved(tmp_path):
    model, optimizer = trained_live_objects(2)
    with ckpt.CheckpointManager(tmp_path) as mgr:
        mgr.save(3, model=model, optimizer=optimizer, epoch=1, metrics={"loss": 0.25})
    return tmp_path, model, optimizer


# ------------------------------------------------------------------ missing roots


def _assert_nothing_there(reader: ckpt.CheckpointReader, where: str) -> None:
    assert reader.all_steps() == []
    assert reader.latest_step() is None
    assert reader.checkpoint() is None
    for call in (
        reader.describe,
        reader.read,
        reader.verify,
        lambda: reader.iter_tensors(item="model"),
        lambda: reader.describe(5),
        lambda: reader.read(5),
    ):
        with pytest.raises(ckpt.CheckpointNotFoundError) as e:
            call()
        assert e.value.path is not None and where in e.value.path


def test_a_missing_local_root_lists_nothing_raises_not_found_and_creates_nothing(tmp_path):
    root = tmp_path / "typo" / "run"
    reader = ckpt.CheckpointReader(root)
    _assert_nothing_there(reader, str(root))
    with pytest.raises(ckpt.CheckpointNotFoundError, match="does not exist"):
        reader.describe()
    assert os.listdir(tmp_path) == []


def test_a_missing_memory_root_lists_nothing_and_creates_nothing():
    fs = fsspec.filesystem("memory")
    before = set(fs.store) | set(fs.pseudo_dirs)
    name = f"typo-{uuid.uuid4().hex}"
    _assert_nothing_there(ckpt.CheckpointReader(f"memory://{name}/run"), name)
    assert set(fs.store) | set(fs.pseudo_dirs) == before
    assert not fs.exists(f"/{name}")


def test_an_empty_root_says_nothing_was_saved(tmp_path):
    with pytest.raises(ckpt.CheckpointNotFoundError, match="no checkpoint has been saved"):
        ckpt.CheckpointReader(tmp_path).read()
    assert os.listdir(tmp_path) == []


# ----------------------------------------------------------- reads, as the manager


def test_reader_answers_as_the_manager_does(saved):
    root, model, optimizer = saved
    reader = ckpt.CheckpointReader(root)
    mgr = ckpt.CheckpointManager(root)
    assert reader.all_steps() == mgr.all_steps() == [3]
    assert reader.latest_step() == 3
    assert reader.checkpoint() == mgr.checkpoint(3)
    assert reader.verify() == mgr.verify()
    assert reader.directory == os.fspath(root)
    read = reader.read()
    assert_same_state(read["model"], model.state_dict())
    assert_same_state(read["optimizer"], optimizer.state_dict())
    assert_same_state(read, mgr.read())
    with pytest.raises(ckpt.CheckpointNotFoundError, match="step 4"):
        reader.read(4)


def test_a_reader_is_usable_in_a_with_statement(saved):
    root, model, _ = saved
    with ckpt.CheckpointReader(root) as reader:
        assert_same_state(reader.read()["model"], model.state_dict())
    assert reader.latest_step() == 3  # it held nothing: still usable after the block


def test_read_some_items_reads_only_their_files(saved, monkeypatch):
    root, model, _ = saved
    reader = ckpt.CheckpointReader(root)
    opened: list[str] = []
    original = type(reader._storage).open_read

    def spy(self: Any, *parts: str) -> Any:
        opened.append(parts[-1])
        return original(self, *parts)

    monkeypatch.setattr(type(reader._storage), "open_read", spy)
    read = reader.read(items=["model"])
    assert list(read) == ["model"]
    assert_same_state(read["model"], model.state_dict())
    assert "optimizer.safetensors" not in opened and "rng.safetensors" not in opened
    with pytest.raises(ckpt.CheckpointNotFoundError, match="'ema' is not in") as e:
        reader.read(items=["model", "ema"])
    assert e.value.key == "ema"
    with pytest.raises(TypeError, match="not a str"):
        reader.read(items="model")


def test_iter_tensors_equals_read_bit_for_bit_v1(saved):
    root, _, _ = saved
    _streamed_equals_read(ckpt.CheckpointReader(root))


def test_iter_tensors_equals_read_with_packs_tied_weights_and_odd_keys(tmp_path):
    model, optimizer = trained_live_objects(2, build=ManySmall)
    shared = torch.arange(6.0)
    odd = {
        "a/b": torch.ones(3),
        "%x#": torch.zeros(2, dtype=torch.int8),
        "nested": {0: torch.tensor(1.5), "0": [torch.eye(2), shared]},
        "tied": shared,
        "big": torch.randn(5000),
        "bf": torch.randn(3).to(torch.bfloat16),
        "empty": torch.empty(0, 4),
    }
    with ckpt.CheckpointManager(tmp_path) as mgr:
        mgr.save(1, model=model, optimizer=optimizer, odd=odd)
    reader = ckpt.CheckpointReader(tmp_path)
    assert reader.describe().format_version == 2  # the small tensors are packed
    _streamed_equals_read(reader)
    streamed = dict(reader.iter_tensors(item="odd"))
    assert streamed["tied"] is streamed["nested/0/1"]
    assert "a%2Fb" in streamed and "%25x#" in streamed


def test_iter_tensors_is_lazy_but_looks_up_at_once(saved):
    root, _, _ = saved
    reader = ckpt.CheckpointReader(root)
    with pytest.raises(ckpt.CheckpointNotFoundError, match="'ema' is not in") as e:
        reader.iter_tensors(item="ema")
    assert e.value.key == "ema"
    stream = reader.iter_tensors(3, item="model")
    key, tensor = next(stream)
    assert isinstance(key, str) and tensor.device.type == "cpu"
    stream.close()


def test_iter_tensors_checks_every_byte_as_it_streams(saved):
    root, model, _ = saved
    path = root / step_dir_name(3) / "model.safetensors"
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 0xFF
    path.write_bytes(bytes(raw))
    reader = ckpt.CheckpointReader(root)
    with pytest.raises(ckpt.CorruptCheckpointError, match="checksum mismatch") as e:
        list(reader.iter_tensors(item="model"))
    assert e.value.path == str(path)
    unchecked = dict(reader.iter_tensors(item="model", verify=False))
    assert sorted(unchecked) == sorted(model.state_dict())
    with pytest.raises(ckpt.CorruptCheckpointError):
        reader.verify()


def test_fallback_to_intact_reads_the_newest_intact_step(tmp_path):
    with ckpt.CheckpointManager(tmp_path) as mgr:
        mgr.save(1, data={"t": torch.ones(3)})
        mgr.save(2, data={"t": torch.full((3,), 2.0)})
    path = tmp_path / step_dir_name(2) / "data.safetensors"
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(ckpt.CorruptCheckpointError):
        ckpt.CheckpointReader(tmp_path).read()
    read = ckpt.CheckpointReader(tmp_path, fallback_to_intact=True).read()
    assert torch.equal(read["data"]["t"], torch.ones(3))


# ------------------------------------------------------------ version 3 (several ranks)


def test_reader_on_a_checkpoint_saved_by_several_ranks(tmp_path):
    storage = open_storage(str(tmp_path))
    state = {"w": torch.randn(7, 3), "b": torch.arange(5, dtype=torch.int64)}
    write_sharded_checkpoint(storage, step_dir_name(4), state, world_size=2, step=4)
    reader = ckpt.CheckpointReader(tmp_path)
    assert reader.all_steps() == [4]
    assert reader.verify().items == ("model", "own")
    _streamed_equals_read(reader)
    model = dict(reader.iter_tensors(item="model"))
    _same_tensors(model, state)
    assert torch.equal(dict(reader.iter_tensors(item="own"))["t"], torch.full((2,), 0))
    only = reader.read(items=["own"])
    assert list(only) == ["own"] and only["own"]["rank"] == 0


def test_iter_tensors_checks_each_chunk_of_a_sharded_tensor(tmp_path):
    storage = open_storage(str(tmp_path))
    manifest = write_sharded_checkpoint(storage, step_dir_name(0), {"w": torch.randn(6, 2)})
    chunk = manifest.sharded.tensors["model/w"].chunks[1]
    path = tmp_path / step_dir_name(0) / chunk.file
    raw = bytearray(path.read_bytes())
    raw[chunk.begin] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(ckpt.CorruptCheckpointError, match="checksum mismatch") as e:
        list(ckpt.CheckpointReader(tmp_path).iter_tensors(item="model"))
    assert e.value.key == "model/w"


# ------------------------------------------------------------ readers and a writer


def test_readers_never_take_the_lock_or_write(saved):
    root, _, _ = saved
    before = {
        p: os.stat(os.path.join(dp, p)).st_mtime_ns for dp, _, fs in os.walk(root) for p in fs
    }
    os.unlink(root / LOCK_NAME)
    reader = ckpt.CheckpointReader(root)
    reader.describe(), reader.verify(), reader.read(), list(reader.iter_tensors(item="model"))
    assert LOCK_NAME not in os.listdir(root)
    after = {p: os.stat(os.path.join(dp, p)).st_mtime_ns for dp, _, fs in os.walk(root) for p in fs}
    assert after == {p: t for p, t in before.items() if p != LOCK_NAME}


def test_two_readers_and_a_writer_at_once(tmp_path, monkeypatch):
    """The writer holds the lock and deletes old steps; readers read, verify, stream meanwhile."""

    def state(step: int) -> dict[str, torch.Tensor]:
        return {"w": torch.full((256,), float(step)), "n": torch.tensor(step)}

    lockers: list[str] = []
    original_lock = type(open_storage(str(tmp_path))).lock

    def spy_lock(self: Any, *args: Any, **kwargs: Any) -> Any:
        lockers.append(threading.current_thread().name)
        return original_lock(self, *args, **kwargs)

    monkeypatch.setattr(type(open_storage(str(tmp_path))), "lock", spy_lock)
    mgr = ckpt.CheckpointManager(tmp_path, keep_last=2)
    mgr.save(0, data=state(0))
    stop = threading.Event()
    seen: list[list[int]] = [[], []]
    errors: list[BaseException] = []

    def read_loop(i: int) -> None:
        reader = ckpt.CheckpointReader(tmp_path)
        while not stop.is_set():
            try:
                read = reader.read()["data"]
                step = int(read["n"])
                assert_same_state(read, state(step))
                streamed = dict(reader.iter_tensors(reader.verify().step, item="data"))
                assert torch.equal(streamed["w"], state(int(streamed["n"]))["w"])
                seen[i].append(step)
            except ckpt.CheckpointNotFoundError as e:  # an explicit step deleted meanwhile
                assert "deleted" in str(e), e
            except BaseException as e:
                errors.append(e)
                return

    readers = [threading.Thread(target=read_loop, args=(i,)) for i in range(2)]
    for t in readers:
        t.start()
    try:
        for step in range(1, 25):
            mgr.save(step, data=state(step))
    finally:
        stop.set()
        for t in readers:
            t.join(timeout=60)
        mgr.close()
    assert not errors, errors
    assert all(seen), seen
    assert lockers == [threading.main_thread().name]  # the writer's one lock, no reader's
    assert ckpt.CheckpointReader(tmp_path).all_steps() == [23, 24]


def test_a_state_referring_to_a_pack_is_refused(tmp_path):
    model, _ = trained_live_objects(2, build=ManySmall)
    with ckpt.CheckpointManager(tmp_path) as mgr:
        mgr.save(1, model=model, rng=False)
    path = tmp_path / step_dir_name(1) / MANIFEST_NAME
    doc = read_manifest_doc(path)
    state = doc["items"]["model"]["state"]
    state[next(iter(state))] = {"$tensor": "model/#pack"}
    write_manifest(path, doc)
    reader = ckpt.CheckpointReader(tmp_path)
    for call in (reader.describe, lambda: reader.iter_tensors(item="model"), reader.read):
        with pytest.raises(ckpt.CorruptCheckpointError, match="pack") as e:
            call()
        assert e.value.path == str(path)
