"""Format version 3 (checkpoints saved by several ranks): encoding, decoding, every validation."""

from __future__ import annotations

import copy
import itertools
import json
import math
import os
import random
import shutil
import zlib
from pathlib import Path

import pytest
import torch
from conftest import assert_same_state
from hypothesis import given, settings
from hypothesis import strategies as st

import ckpt
import ckpt.format.manifest
import ckpt.format.sharded
from ckpt.format import (
    FORMAT_VERSION,
    MAX_WORLD_SIZE,
    ChunkRecord,
    FileRecord,
    GlobalTensorRecord,
    ItemRecord,
    Manifest,
    RankSection,
    ShardedSection,
    TensorRecord,
    decode_manifest,
    encode_manifest,
    rank_manifest,
)
from ckpt.format.sealing import sealed

SUM = "xxh3_64:0123456789abcdef"


def chunk(offsets, sizes, file="rank0.safetensors", begin=128) -> ChunkRecord:
    return ChunkRecord(tuple(offsets), tuple(sizes), file, begin, SUM)


def rank_section(rank: int) -> RankSection:
    """A rank's own item, with two tensors packed together (format version 2 records)."""
    file = f"rank{rank}.safetensors"
    tensors = {
        "own/#pack": TensorRecord(file, torch.uint8, (8,), "cpu"),
        "own/a": TensorRecord(file, torch.float32, (1,), "cpu", "own/#pack", 0),
        "own/b": TensorRecord(file, torch.int32, (1,), "cuda:0", "own/#pack", 4),
        "own/big": TensorRecord(file, torch.float64, (3,), "cpu"),
    }
    state = {"a": {"$tensor": "own/a"}, "b": {"$tensor": "own/b"}, "rank": rank}
    return RankSection(tensors, {"own": ItemRecord("dict", state, {"class": "x.Y"})})


def sharded_manifest(world_size: int = 2) -> Manifest:
    tensors = {
        "model/w": GlobalTensorRecord(
            torch.float32,
            (6, 4),
            (chunk([0, 0], [3, 4]), chunk([3, 0], [3, 4], "rank1.safetensors")),
        ),
        "model/b": GlobalTensorRecord(torch.bfloat16, (5,), (chunk([0], [5], begin=1024),)),
        "model/e": GlobalTensorRecord(torch.float32, (0, 3), (chunk([0, 0], [0, 3], begin=0),)),
        "model/s": GlobalTensorRecord(torch.int64, (), (chunk([], [], begin=2048),)),
    }
    state = {name.removeprefix("model/"): {"$tensor": name} for name in tensors}
    items = {"model": ItemRecord("module", state, {"module_metadata": {"": {"version": 1}}})}
    ranks = tuple(rank_section(r) for r in range(world_size))
    files = {
        f"rank{r}.safetensors": FileRecord(4096, f"xxh3_64:{r:016x}") for r in range(world_size)
    }
    section = ShardedSection(world_size, tensors, items, ranks)
    return Manifest(12, 3, {"loss": 0.5}, files, {}, {}, "2026-01-01T00:00:00Z", {}, section)


def doc_of(manifest: Manifest) -> dict:
    raw = encode_manifest(manifest)
    return json.loads(zlib.decompress(raw) if raw[:1] == b"x" else raw)


def raw_of(doc: dict) -> bytes:
    body = {k: v for k, v in doc.items() if k != "checksum"}
    return sealed(json.dumps(body, separators=(",", ":"), ensure_ascii=False))


# ------------------------------------------------------------------ round trip


def test_v3_round_trips_with_packs_in_rank_sections():
    manifest = sharded_manifest()
    raw = encode_manifest(manifest)
    assert json.loads(raw)["format_version"] == 3 <= FORMAT_VERSION
    back = decode_manifest(raw, "manifest.json")
    assert back.sharded == manifest.sharded
    assert back.files == manifest.files and back.tensors == {}
    assert (back.step, back.epoch, back.metrics) == (12, 3, {"loss": 0.5})
    assert list(back.items) == ["model", "own"]  # the sharded items, then rank 0's
    assert back.items["own"] == manifest.sharded.ranks[0].items["own"]
    assert encode_manifest(back) == raw  # items derived from the section: same bytes again


def test_top_level_fields_in_the_documented_order():
    doc = json.loads(encode_manifest(sharded_manifest()))
    assert list(doc) == [
        "format",
        "format_version",
        "step",
        "epoch",
        "metrics",
        "created_at",
        "versions",
        "files",
        "world_size",
        "tensors",
        "items",
        "ranks",
        "checksum",
    ]
    assert doc["tensors"]["model/w"]["chunks"][1] == {
        "offsets": [3, 0],
        "sizes": [3, 4],
        "file": "rank1.safetensors",
        "begin": 128,
        "checksum": SUM,
    }


def test_unsharded_manifests_keep_versions_1_and_2():
    manifest = Manifest(1, None, {}, {}, {}, {"d": ItemRecord("dict", {"x": 1})})
    assert json.loads(encode_manifest(manifest))["format_version"] == 1
    assert decode_manifest(encode_manifest(manifest), "m").sharded is None


def test_a_sharded_manifest_with_flat_tensors_is_refused_when_written():
    manifest = sharded_manifest()
    flat = {"x": TensorRecord("rank0.safetensors", torch.float32, (1,), "cpu")}
    with pytest.raises(ValueError, match="sharded"):
        encode_manifest(Manifest(**{**manifest.__dict__, "tensors": flat}))
    section = manifest.sharded
    wrong = ShardedSection(3, section.tensors, section.items, section.ranks)
    with pytest.raises(ValueError, match="world_size"):
        encode_manifest(Manifest(**{**manifest.__dict__, "sharded": wrong}))


def test_large_v3_manifest_is_compressed_and_small_per_chunk():
    """Bytes per chunk entry, measured: plain JSON and as stored (zlib)."""
    world = 64
    rows = 128
    files = {
        f"model_r{r:05d}.0a1b2c3d.safetensors": FileRecord(2**34, f"xxh3_64:{r:016x}")
        for r in range(world)
    }
    names = list(files)
    rng = random.Random(0)  # checksums are random: they do not compress
    tensors = {}
    for t in range(50):
        tensors[f"model/layers/{t}/mlp/w"] = GlobalTensorRecord(
            torch.bfloat16,
            (rows * world, 4096),
            tuple(
                ChunkRecord(
                    (r * rows, 0),
                    (rows, 4096),
                    names[r],
                    2**30 + t * 2**20,  # ten digits, as in a large file
                    f"xxh3_64:{rng.getrandbits(64):016x}",
                )
                for r in range(world)
            ),
        )
    state = {name: {"$tensor": name} for name in tensors}
    ranks = tuple(RankSection({}, {}) for _ in range(world))
    section = ShardedSection(world, tensors, {"model": ItemRecord("module", state)}, ranks)
    manifest = Manifest(1, None, {}, files, {}, {}, sharded=section)
    raw = encode_manifest(manifest)
    assert raw[:1] == b"x"  # over 64 KiB of JSON: stored compressed, still version 3
    plain = zlib.decompress(raw)
    n = 50 * world
    chunk_json = len(json.dumps(json.loads(plain)["tensors"], separators=(",", ":")))
    per_chunk, stored_per_chunk = chunk_json / n, len(raw) / n
    print(f"manifest bytes per chunk: {per_chunk:.0f} plain, {stored_per_chunk:.0f} stored")
    assert per_chunk < 150
    assert stored_per_chunk < per_chunk
    assert decode_manifest(raw, "m").sharded == section


def test_readers_of_version_2_are_told_version_3_is_newer(monkeypatch):
    raw = encode_manifest(sharded_manifest())
    monkeypatch.setattr(ckpt.format.manifest, "FORMAT_VERSION", 2)
    with pytest.raises(ckpt.IncompatibleCheckpointError, match="newer"):
        decode_manifest(raw, "manifest.json")


def test_rank_manifest_is_a_version_2_view_of_one_rank():
    manifest = decode_manifest(encode_manifest(sharded_manifest(3)), "m")
    view = rank_manifest(manifest, 2)
    assert view.sharded is None and view.files == manifest.files
    assert view.tensors == manifest.sharded.ranks[2].tensors
    assert view.items["own"].state["rank"] == 2
    with pytest.raises(ValueError, match="rank"):
        rank_manifest(manifest, 3)
    with pytest.raises(ValueError, match="several ranks"):
        rank_manifest(view, 0)


def test_many_ranks_and_a_fine_grid_decode():
    """A 2-d grid of 32 x 32 chunks (dim 0 and dim 1) over 1024 ranks is disjoint and exact."""
    world = 1024
    file = "rank0.safetensors"
    chunks = tuple(
        ChunkRecord((i * 2, j * 3), (2, 3), file, 8 * (i * 32 + j) * 8, SUM)
        for i in range(32)
        for j in range(32)
    )
    tensors = {"m/w": GlobalTensorRecord(torch.float32, (64, 96), chunks)}
    state = {"w": {"$tensor": "m/w"}}
    ranks = tuple(RankSection({}, {"rng": ItemRecord("rng", {"rank": r})}) for r in range(world))
    section = ShardedSection(world, tensors, {"m": ItemRecord("module", state)}, ranks)
    files = {file: FileRecord(10**6, SUM)}
    manifest = Manifest(0, None, {}, files, {}, {}, sharded=section)
    assert decode_manifest(encode_manifest(manifest), "m").sharded == section


# ------------------------------------------------------------------ hostile manifests


def w_chunk(doc: dict, i: int) -> dict:
    return doc["tensors"]["model/w"]["chunks"][i]


def edit(path_and_value):
    """A mutation that sets ``doc[k1][k2]... = value``."""
    *path, value = path_and_value

    def apply(doc: dict) -> None:
        node = doc
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value

    return apply


W = ["tensors", "model/w"]
C0, C1 = [*W, "chunks", 0], [*W, "chunks", 1]
R1 = ["ranks", 1]

HOSTILE = [
    # chunks against the global shape: overlap, gap, out of bounds, empty
    ("overlap", edit([*C1, "offsets", [2, 0]]), "tensors.model/w.chunks[1]", "overlaps chunk 0"),
    ("gap", edit([*C1, "sizes", [2, 4]]), "tensors.model/w.chunks", "leave a gap"),
    ("gap-dim1", edit([*C1, "sizes", [3, 3]]), "tensors.model/w.chunks", "leave a gap"),
    ("past-shape", edit([*C1, "offsets", [4, 0]]), "tensors.model/w.chunks[1]", "past the shape"),
    ("past-dim1", edit([*C1, "offsets", [3, 1]]), "tensors.model/w.chunks[1]", "past the shape"),
    (
        "huge-offset",
        edit([*C1, "offsets", [2**70, 0]]),
        "tensors.model/w.chunks[1]",
        "past the shape",
    ),
    ("negative", edit([*C1, "offsets", [-3, 0]]), "tensors.model/w.chunks[1]", "non-negative"),
    (
        "float-size",
        edit([*C1, "sizes", [3.0, 4]]),
        "tensors.model/w.chunks[1]",
        "non-negative ints",
    ),
    (
        "bool-size",
        edit([*C1, "sizes", [True, 4]]),
        "tensors.model/w.chunks[1]",
        "non-negative ints",
    ),
    ("ndim", edit([*C1, "sizes", [3, 4, 1]]), "tensors.model/w.chunks[1]", "2 dimensions"),
    ("empty-chunk", edit([*C1, "sizes", [0, 4]]), "tensors.model/w.chunks[1]", "no elements"),
    ("no-chunks", edit([*W, "chunks", []]), "tensors.model/w.chunks", "non-empty list"),
    (
        "dup-chunk",
        lambda d: d["tensors"]["model/w"]["chunks"].append(w_chunk(d, 1)),
        "tensors.model/w.chunks[2]",
        "overlaps",
    ),
    (
        "empty-two",
        lambda d: d["tensors"]["model/e"]["chunks"].append(d["tensors"]["model/e"]["chunks"][0]),
        "tensors.model/e.chunks",
        "one chunk",
    ),
    (
        "empty-offset",
        edit(["tensors", "model/e", "chunks", 0, "sizes", [0, 1]]),
        "tensors.model/e.chunks",
        "one chunk",
    ),
    (
        "scalar-two",
        lambda d: d["tensors"]["model/s"]["chunks"].append(d["tensors"]["model/s"]["chunks"][0]),
        "tensors.model/s.chunks[1]",
        "overlaps",
    ),
    # byte ranges against the files
    ("past-file", edit([*C1, "begin", 4096 - 44]), "tensors.model/w.chunks[1]", "past the end"),
    ("begin-huge", edit([*C1, "begin", 2**64]), "tensors.model/w.chunks[1]", "past the end"),
    ("begin-negative", edit([*C1, "begin", -8]), "tensors.model/w.chunks[1]", "non-negative"),
    ("begin-string", edit([*C1, "begin", "128"]), "tensors.model/w.chunks[1]", "non-negative"),
    ("misaligned", edit([*C1, "begin", 130]), "tensors.model/w.chunks[1]", "not aligned"),
    (
        "wrong-file",
        edit([*C1, "file", "rank7.safetensors"]),
        "tensors.model/w.chunks[1]",
        "not in 'files'",
    ),
    (
        "path-file",
        edit([*C1, "file", "../rank0.safetensors"]),
        "tensors.model/w.chunks[1]",
        "not in 'files'",
    ),
    (
        "shared-bytes",
        edit(["tensors", "model/b", "chunks", 0, "begin", 136]),
        "tensors.model/b.chunks[0]",
        "overlap",
    ),
    ("checksum", edit([*C1, "checksum", "md5:00"]), "tensors.model/w.chunks[1].checksum", "16 hex"),
    ("extra-field", edit([*C1, "x", 1]), "tensors.model/w.chunks[1]", "exactly the fields"),
    (
        "missing-field",
        lambda d: w_chunk(d, 1).pop("begin"),
        "tensors.model/w.chunks[1]",
        "exactly the fields",
    ),
    (
        "file-no-checksum",
        lambda d: d["files"]["rank1.safetensors"].pop("checksum"),
        "files.rank1.safetensors.checksum",
        "required",
    ),
    # global tensors
    ("overflow", edit([*W, "shape", [2**62, 2**62]]), "tensors.model/w", "overflows"),
    ("overflow-empty", edit([*W, "shape", [0, 2**62, 2**62]]), "tensors.model/w", "overflows"),
    ("bad-dtype", edit([*W, "dtype", "complex128"]), "tensors.model/w", "not one ckpt writes"),
    ("not-dtype", edit([*W, "dtype", "float32x"]), "tensors.model/w", "not one ckpt writes"),
    ("dtype-int", edit([*W, "dtype", 5]), "tensors.model/w", "not one ckpt writes"),
    ("tensor-field", edit([*W, "device", "cpu"]), "tensors.model/w", "unknown fields"),
    ("tensors-list", edit(["tensors", []]), "tensors", "object"),
    # sharded items
    (
        "bad-ref",
        edit(["items", "model", "state", "w", {"$tensor": "model/zzz"}]),
        "items.model",
        "not in 'tensors'",
    ),
    (
        "rank-ref",
        edit(["items", "model", "state", "w", {"$tensor": "own/a"}]),
        "items.model",
        "not in 'tensors'",
    ),
    (
        "bad-tree",
        edit(["items", "model", "state", "w", {"$bogus": 1}]),
        "items.model['w']",
        "misplaced",
    ),
    ("sharded-kind", edit(["items", "model", "kind", "dict"]), "items.model", "kind must be"),
    ("unknown-kind", edit(["items", "model", "kind", "pickle"]), "items.model", "kind in"),
    # ranks
    ("world-mismatch", edit(["world_size", 3]), "ranks", "3 rank sections"),
    ("world-zero", edit(["world_size", 0]), "world_size", "from 1"),
    ("world-huge", edit(["world_size", MAX_WORLD_SIZE + 1]), "world_size", "from 1"),
    ("world-bool", edit(["world_size", True]), "world_size", "from 1"),
    ("world-missing", lambda d: d.pop("world_size"), "world_size", "from 1"),
    ("ranks-dict", edit(["ranks", {}]), "ranks", "rank sections"),
    ("rank-field", edit([*R1, "extra", {}]), "ranks[1]", "exactly the fields"),
    (
        "rank-renamed",
        lambda d: d["ranks"][1]["items"].update(own2=d["ranks"][1]["items"].pop("own")),
        "ranks[1].items",
        "differ from rank 0",
    ),
    (
        "rank-kind",
        edit([*R1, "items", "own", "kind", "stateful"]),
        "ranks[1].items",
        "differ from rank 0",
    ),
    (
        "rank-extra-item",
        edit([*R1, "items", "more", {"kind": "dict", "state": 1}]),
        "ranks[1].items",
        "differ",
    ),
    (
        "rank-clash",
        lambda d: [r["items"].update(model=r["items"].pop("own")) for r in d["ranks"]],
        "ranks[0].items.model",
        "sharded item",
    ),
    (
        "rank-file",
        edit([*R1, "tensors", "own/big", "file", "rank9.safetensors"]),
        "ranks[1].tensors.own/big",
        "not in 'files'",
    ),
    (
        "rank-dtype",
        edit([*R1, "tensors", "own/big", "dtype", "nope"]),
        "ranks[1].tensors.own/big",
        "dtype",
    ),
    (
        "rank-pack-gap",
        edit([*R1, "tensors", "own/b", "offset", 8]),
        "ranks[1].tensors.own/",
        "pack",
    ),
    (
        "rank-pack-missing",
        edit([*R1, "tensors", "own/a", "pack", "own/nope"]),
        "ranks[1].tensors.own/a",
        "not a stored tensor",
    ),
    (
        "rank-too-big",
        edit([*R1, "tensors", "own/big", "shape", [1000]]),
        "ranks[1].tensors.own/big",
        "smaller",
    ),
    (
        "rank-item-kind",
        edit([*R1, "items", "own", "kind", "pickle"]),
        "ranks[1].items.own",
        "kind in",
    ),
    (
        "rank-device",
        edit([*R1, "tensors", "own/big", "device", "gpu:x"]),
        "ranks[1].tensors.own/big",
        "device",
    ),
]


@pytest.mark.parametrize(
    ("mutate", "key", "message"), [h[1:] for h in HOSTILE], ids=[h[0] for h in HOSTILE]
)
def test_hostile_v3_manifests_are_corrupt_and_name_the_key(mutate, key, message):
    doc = doc_of(sharded_manifest())
    mutate(doc)
    with pytest.raises(ckpt.CorruptCheckpointError, match=message) as info:
        decode_manifest(raw_of(doc), "/x/manifest.json")
    assert info.value.path == "/x/manifest.json"
    assert info.value.key.startswith(key), info.value.key


def test_the_unedited_document_is_valid():
    doc = doc_of(sharded_manifest())
    assert decode_manifest(raw_of(copy.deepcopy(doc)), "m").sharded == sharded_manifest().sharded


def test_an_irregular_layout_beyond_the_check_budget_is_refused(monkeypatch):
    """Proving chunks disjoint is bounded: a layout needing more comparisons is refused."""
    file = "rank0.safetensors"
    chunks = tuple(
        ChunkRecord((i, j), (1, 1), file, 8 * (i * 4 + j), SUM) for i in range(4) for j in range(4)
    )
    tensors = {"m/w": GlobalTensorRecord(torch.float32, (4, 4), chunks)}
    section = ShardedSection(
        1, tensors, {"m": ItemRecord("module", {"w": {"$tensor": "m/w"}})}, (RankSection({}, {}),)
    )
    raw = encode_manifest(
        Manifest(0, None, {}, {file: FileRecord(4096, SUM)}, {}, {}, sharded=section)
    )
    assert decode_manifest(raw, "m").sharded == section
    monkeypatch.setattr(ckpt.format.sharded, "MAX_OVERLAP_CHECKS", 10)
    with pytest.raises(ckpt.CorruptCheckpointError, match="too irregular"):
        decode_manifest(raw, "m")


# ------------------------------------------------------------------ the cover check, differentially


@st.composite
def layouts(draw):
    """A shape and chunks inside it: a random grid, then perhaps one chunk moved, grown,
    shrunk, dropped or duplicated (so some layouts overlap or leave gaps)."""
    shape = draw(st.lists(st.integers(1, 5), min_size=1, max_size=3))
    cuts = [
        sorted({0, n, *draw(st.lists(st.integers(1, max(1, n - 1)), max_size=3))}) for n in shape
    ]
    boxes = [
        (
            [c[i] for c, i in zip(cuts, idx, strict=True)],
            [c[i + 1] - c[i] for c, i in zip(cuts, idx, strict=True)],
        )
        for idx in itertools.product(*(range(len(c) - 1) for c in cuts))
    ]
    change = draw(st.sampled_from(["none", "move", "grow", "shrink", "drop", "duplicate"]))
    k = draw(st.integers(0, len(boxes) - 1))
    d = draw(st.integers(0, len(shape) - 1))
    offsets, sizes = boxes[k]
    if change == "move" and offsets[d] > 0:
        offsets[d] -= 1
    elif change == "grow" and offsets[d] + sizes[d] < shape[d]:
        sizes[d] += 1
    elif change == "shrink" and sizes[d] > 1:
        sizes[d] -= 1
    elif change == "drop" and len(boxes) > 1:
        boxes.pop(k)
    elif change == "duplicate":
        boxes.append(([*offsets], [*sizes]))
    return shape, boxes


def exact_cover(shape, boxes) -> bool:
    count = torch.zeros(shape, dtype=torch.int32)
    for offsets, sizes in boxes:
        count[tuple(slice(o, o + s) for o, s in zip(offsets, sizes, strict=True))] += 1
    return bool((count == 1).all())


@settings(max_examples=300, deadline=None)
@given(layouts())
def test_the_cover_check_agrees_with_counting_every_element(layout):
    shape, boxes = layout
    chunks, at = [], 0
    for offsets, sizes in boxes:
        chunks.append(ChunkRecord(tuple(offsets), tuple(sizes), "rank0.safetensors", at, SUM))
        at += 4 * math.prod(sizes)
    tensors = {"m/w": GlobalTensorRecord(torch.float32, tuple(shape), tuple(chunks))}
    item = ItemRecord("module", {"w": {"$tensor": "m/w"}})
    section = ShardedSection(1, tensors, {"m": item}, (RankSection({}, {}),))
    files = {"rank0.safetensors": FileRecord(at, SUM)}
    raw = encode_manifest(Manifest(0, None, {}, files, {}, {}, sharded=section))
    if exact_cover(shape, boxes):
        assert decode_manifest(raw, "m").sharded == section
    else:
        with pytest.raises(ckpt.CorruptCheckpointError, match=r"overlaps|gap"):
            decode_manifest(raw, "m")


def test_a_v3_manifest_without_its_checksum_is_corrupt():
    doc = {k: v for k, v in doc_of(sharded_manifest()).items() if k != "checksum"}
    unsealed = json.dumps(doc, separators=(",", ":")).encode()  # no "checksum" field at all
    with pytest.raises(ckpt.CorruptCheckpointError, match="checksum") as info:
        decode_manifest(unsealed, "m.json")
    assert info.value.key == "checksum"


# ------------------------------------------------------------------ golden bytes

GOLDEN_V3 = Path(__file__).parent / "golden" / "v3"
"""Saved by 2 gloo ranks: an FSDP2 model (uneven shards, replicated buffers) and a
per-rank dict item. Regenerate deliberately with ``CKPT_REGENERATE_GOLDEN=1``."""


def golden_v3_model() -> torch.nn.Module:
    """A model whose every tensor is fixed: an odd width (uneven shards) and a BatchNorm."""
    model = torch.nn.Sequential(
        torch.nn.Linear(3, 5), torch.nn.BatchNorm1d(5), torch.nn.Linear(5, 2)
    )
    with torch.no_grad():
        for i, tensor in enumerate(model.state_dict().values()):
            if tensor.is_floating_point():
                tensor.copy_(torch.arange(tensor.numel()).reshape(tensor.shape) / 8 - i)
            else:
                tensor.fill_(i)
    return model


def golden_v3_data(rank: int) -> dict[str, object]:
    return {"rank": rank, "seen": torch.arange(4, dtype=torch.int16) * (rank + 1), "f": 0.25}


def on_ranks_save_golden_v3(rank: int, world: int, root: str) -> None:
    from torch.distributed.fsdp import fully_shard

    model = golden_v3_model()
    for layer in (model[0], model[2]):
        fully_shard(layer)
    fully_shard(model)
    with ckpt.CheckpointManager(root) as mgr:
        mgr.save(7, epoch=1, metrics={"loss": 0.125}, rng=False, model=model,
                 data=golden_v3_data(rank))  # fmt: skip


def normalized_v3_manifest(path: Path) -> dict[str, object]:
    raw = path.read_bytes()
    doc = json.loads(zlib.decompress(raw) if raw.startswith(b"x") else raw)
    assert isinstance(doc.pop("created_at"), str)
    assert set(doc.pop("versions")) == {"ckpt", "torch", "python"}
    doc.pop("checksum")  # covers created_at and versions, so it changes on every save
    return doc


@pytest.mark.distributed
def test_golden_v3_bytes_pin_the_format(rank_pool, tmp_path):
    """Fails when the bytes 2 ranks write change: that is a format change (bump the version)."""
    rank_pool.run(on_ranks_save_golden_v3, str(tmp_path))
    written = tmp_path / "step_000000000007"
    if os.environ.get("CKPT_REGENERATE_GOLDEN"):
        shutil.rmtree(GOLDEN_V3, ignore_errors=True)
        shutil.copytree(written, GOLDEN_V3)
    assert normalized_v3_manifest(written / "manifest.json")["format_version"] == 3
    assert sorted(os.listdir(written)) == sorted(os.listdir(GOLDEN_V3))
    for name in os.listdir(GOLDEN_V3):
        if name == "manifest.json":
            assert normalized_v3_manifest(written / name) == normalized_v3_manifest(
                GOLDEN_V3 / name
            )
        else:
            assert (written / name).read_bytes() == (GOLDEN_V3 / name).read_bytes(), name


def test_golden_v3_still_loads_bit_for_bit(tmp_path):
    shutil.copytree(GOLDEN_V3, tmp_path / "step_000000000007")
    mgr = ckpt.CheckpointManager(tmp_path)
    assert mgr.verify(7).step == 7
    model = golden_v3_model()
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for tensor in model.state_dict().values():
            tensor.zero_()
    data: dict[str, object] = {}
    info = mgr.restore(model=model, data=data)
    assert info is not None and info.step == 7 and info.epoch == 1
    assert_same_state(dict(model.state_dict()), expected)
    assert_same_state(data, golden_v3_data(0))  # one process restores rank 0's own items
    assert_same_state(dict(mgr.read(7)["model"]), expected)
