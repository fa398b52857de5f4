"""Describing a checkpoint from its manifest alone: every field, every format version."""

from __future__ import annotations

import json
import math
import os
from typing import Any

import pytest
import torch
from dist_training import make, train_step
from helpers import ManySmall, flat_tensors, trained_live_objects, write_sharded_checkpoint

import ckpt
from ckpt.format import MANIFEST_NAME, decode_manifest, step_dir_name
from ckpt.reading.describe import describe_manifest, key_of
from ckpt.storage import open_storage


def _spy_reads(monkeypatch: pytest.MonkeyPatch, reader: ckpt.CheckpointReader) -> list[str]:
    """Record the name of every file ``reader`` opens or reads whole."""
    cls = type(reader._storage)
    seen: list[str] = []
    open_read, read_bytes = cls.open_read, cls.read_bytes

    def spy_open(self: Any, *parts: str) -> Any:
        seen.append(parts[-1])
        return open_read(self, *parts)

    def spy_bytes(self: Any, *parts: str) -> bytes:
        seen.append(parts[-1])
        return read_bytes(self, *parts)

    monkeypatch.setattr(cls, "open_read", spy_open)
    monkeypatch.setattr(cls, "read_bytes", spy_bytes)
    return seen


def test_describe_lists_every_field_of_a_v1_checkpoint(tmp_path, monkeypatch):
    model, optimizer = trained_live_objects(2)
    with ckpt.CheckpointManager(tmp_path) as mgr:
        mgr.save(7, model=model, optimizer=optimizer, epoch=2, metrics={"loss": 0.5, "x": math.nan})
    reader = ckpt.CheckpointReader(tmp_path)
    seen = _spy_reads(monkeypatch, reader)
    d = reader.describe()
    assert set(seen) == {MANIFEST_NAME}  # no tensor file, not even a header
    assert (d.step, d.epoch, d.format_version, d.world_size) == (7, 2, 1, 1)
    assert d.metrics["loss"] == 0.5 and math.isnan(d.metrics["x"])
    assert set(d.versions) == {"ckpt", "torch", "python"} and d.created_at
    step_dir = tmp_path / step_dir_name(7)
    assert d.files == {n: os.path.getsize(step_dir / n) for n in d.files}
    assert set(d.files) == {"model.safetensors", "optimizer.safetensors", "rng.safetensors"}
    assert d.nbytes == sum(d.files.values())
    assert [i.name for i in d.items] == ["model", "optimizer", "rng"]
    items = {i.name: i for i in d.items}

    m = items["model"]
    assert m.kind == "module" and m.optimizer_class is None and m.param_names is None
    assert [t.key for t in m.tensors] == list(model.state_dict())
    for t, (key, live) in zip(m.tensors, model.state_dict().items(), strict=True):
        assert (t.key, t.dtype, t.shape) == (key, str(live.dtype)[6:], tuple(live.shape))
        assert (t.nbytes, t.file, t.shards) == (live.nbytes, "model.safetensors", 1)
    assert m.nbytes == sum(t.nbytes for t in model.state_dict().values())

    o = items["optimizer"]
    assert o.optimizer_class == f"{type(optimizer).__module__}.{type(optimizer).__qualname__}"
    groups = optimizer.state_dict()["param_groups"]
    assert len(o.param_groups) == len(groups)
    for described, group in zip(o.param_groups, groups, strict=True):
        assert described["params"] == len(group["params"])
        assert described["lr"] == group["lr"]
        assert described["betas"] == list(group["betas"])
    names = [f"model.{n}" for n, _ in model.named_parameters()]
    assert list(o.param_names or ()) == names
    assert [t.key for t in o.tensors] == list(flat_tensors(optimizer.state_dict()))

    doc = d.to_json()
    assert json.loads(json.dumps(doc, allow_nan=False)) == doc
    assert doc["metrics"]["x"] == "nan"
    assert doc["items"][1]["param_groups"][0]["params"] == len(groups[0]["params"])
    assert set(doc["items"][0]["tensors"][0]) == {
        "key",
        "dtype",
        "shape",
        "nbytes",
        "file",
        "shards",
    }


def test_describe_of_a_packed_checkpoint_is_version_2(tmp_path):
    model, optimizer = trained_live_objects(2, build=ManySmall)
    with ckpt.CheckpointManager(tmp_path) as mgr:
        mgr.save(1, model=model, optimizer=optimizer)
    d = ckpt.CheckpointReader(tmp_path).describe()
    assert d.format_version == 2
    model_info = next(i for i in d.items if i.name == "model")
    assert [t.key for t in model_info.tensors] == list(model.state_dict())
    assert "model/#pack" not in {t.key for t in model_info.tensors}


def test_a_compressed_manifest_without_packs_is_version_2(tmp_path):
    with ckpt.CheckpointManager(tmp_path) as mgr:
        mgr.save(1, data={"ids": list(range(30000)), "t": torch.ones(2)})
    assert (tmp_path / step_dir_name(1) / MANIFEST_NAME).read_bytes()[:1] == b"x"
    assert ckpt.CheckpointReader(tmp_path).describe().format_version == 2


def test_describe_counts_a_tied_tensor_once_and_lists_it_at_every_key(tmp_path):
    shared = torch.randn(4, 4)
    with ckpt.CheckpointManager(tmp_path) as mgr:
        mgr.save(1, data={"a": shared, "b": shared, "c": torch.zeros(2)}, rng=False)
    (item,) = ckpt.CheckpointReader(tmp_path).describe().items
    assert [t.key for t in item.tensors] == ["a", "b", "c"]
    assert item.nbytes == shared.nbytes + 8


def test_describe_of_a_checkpoint_saved_by_several_ranks(tmp_path):
    storage = open_storage(str(tmp_path))
    state = {"w": torch.randn(7, 3), "b": torch.arange(5, dtype=torch.int64)}
    chunks = {"model/b": [((0,), (5,))]}  # one chunk: one file
    write_sharded_checkpoint(storage, step_dir_name(2), state, world_size=2, chunks=chunks, step=2)
    d = ckpt.CheckpointReader(tmp_path).describe()
    assert (d.format_version, d.world_size, d.step) == (3, 2, 2)
    assert [i.name for i in d.items] == ["model", "own"]  # sharded items, then rank 0's own
    model = {t.key: t for t in d.items[0].tensors}
    assert (model["w"].shape, model["w"].dtype, model["w"].shards) == ((7, 3), "float32", 3)
    assert model["w"].file is None  # its chunks are in both ranks' files
    assert (model["b"].shards, model["b"].file, model["b"].nbytes) == (1, "rank0.safetensors", 40)
    own = d.items[1]
    assert own.kind == "dict" and [(t.key, t.file) for t in own.tensors] == [
        ("t", "rank0.safetensors")
    ]


def test_describe_manifest_is_pure(tmp_path):
    with ckpt.CheckpointManager(tmp_path) as mgr:
        mgr.save(1, data={"t": torch.ones(3)}, rng=False)
    raw = (tmp_path / step_dir_name(1) / MANIFEST_NAME).read_bytes()
    d = describe_manifest(decode_manifest(raw, "manifest.json"))
    assert d == ckpt.CheckpointReader(tmp_path).describe()
    assert d.items[0].tensors[0] == ckpt.TensorInfo("t", "float32", (3,), 12, "data.safetensors")


def test_keys_escape_the_separator_and_write_positions_as_digits():
    assert key_of(("state", 0, "exp_avg")) == "state/0/exp_avg"
    assert key_of(("a/b", "%", 3)) == "a%2Fb/%25/3"


def test_a_state_tree_naming_an_unlisted_tensor_is_corrupt(tmp_path):
    from dataclasses import replace

    with ckpt.CheckpointManager(tmp_path) as mgr:
        mgr.save(1, data={"t": torch.ones(3)}, rng=False)
    raw = (tmp_path / step_dir_name(1) / MANIFEST_NAME).read_bytes()
    manifest = decode_manifest(raw, "manifest.json")
    broken = replace(manifest, tensors={})
    with pytest.raises(ckpt.CorruptCheckpointError, match="does not list") as e:
        describe_manifest(broken)
    assert e.value.key == "data/t"


# ------------------------------------------------------------- several ranks (gloo)


def on_ranks_save_fsdp(rank: int, world: int, root: str) -> None:
    model, optimizer, scheduler = make("fsdp")
    for step in range(2):
        train_step(model, optimizer, scheduler, step)
    with ckpt.CheckpointManager(root) as mgr:
        mgr.save(1, model=model, optimizer=optimizer, data={"r": rank})


@pytest.mark.distributed
def test_describe_and_stream_a_multi_rank_fsdp_checkpoint(rank_pool, tmp_path):
    rank_pool.run(on_ranks_save_fsdp, str(tmp_path))
    reader = ckpt.CheckpointReader(tmp_path)
    d = reader.describe()
    assert (d.format_version, d.world_size) == (3, 2)
    items = {i.name: i for i in d.items}
    assert set(items) == {"model", "optimizer", "data", "rng"}
    model, _, _ = make("none")
    assert [t.key for t in items["model"].tensors] == list(model.state_dict())
    opt = items["optimizer"]
    assert opt.optimizer_class == "torch.optim.adamw.AdamW"
    assert list(opt.param_names or ()) == [n for n, _ in model.named_parameters()]
    assert opt.param_groups[0]["params"] == len(list(model.parameters()))
    assert any(t.shards == 2 for t in items["model"].tensors)
    read = reader.read()
    assert [t.key for t in opt.tensors] == list(flat_tensors(read["optimizer"]))
    for name in ("model", "optimizer", "data"):
        streamed = dict(reader.iter_tensors(item=name))
        want = flat_tensors(read[name])
        assert sorted(streamed) == sorted(want)
        for key, t in want.items():
            assert streamed[key].dtype == t.dtype and torch.equal(streamed[key], t), key
