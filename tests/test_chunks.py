"""Chunks of global tensors (format version 3): checked reads, assembly, streaming verification."""

from __future__ import annotations

import dataclasses
import os
import uuid

import pytest
import torch
from helpers import split_chunks, write_sharded_checkpoint

import ckpt
from ckpt.format import MANIFEST_NAME, Manifest
from ckpt.format.checksums import hash_bytes
from ckpt.format.tensorfile import parse_header, tensor_bytes, write_tensors
from ckpt.io import (
    assemble_tensor,
    chunk_checksum,
    data_offsets,
    read_chunk,
    read_chunk_slice,
    read_manifest,
    verify_sharded_files,
)
from ckpt.storage import Storage

STEP = "step_000000000003"


@pytest.fixture(params=["local", "memory"])
def storage(request, tmp_path):
    if request.param == "local":
        yield Storage(str(tmp_path))
        return
    url = f"memory://h3-chunks-{uuid.uuid4().hex}"
    store = Storage(url)
    yield store
    store.fs.rm(store.root, recursive=True)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def grid(shape, rows, cols):
    """A 2-d grid of uneven chunks: ``rows`` cuts of dimension 0 times ``cols`` of dimension 1."""
    out = []
    for o0, s0 in [(c[0][0], c[1][0]) for c in split_chunks(shape, 0, rows)]:
        for o1, s1 in [(c[0][1], c[1][1]) for c in split_chunks(shape, 1, cols)]:
            out.append(((o0, o1), (s0, s1)))
    return out


CASES = {
    "1d": (torch.randn(10, generator=gen(1)), lambda s: split_chunks(s, 0, 3)),
    "2d-dim0": (torch.randn(7, 5, generator=gen(2)), lambda s: split_chunks(s, 0, 3)),
    "2d-dim1": (torch.randn(4, 11, generator=gen(3)), lambda s: split_chunks(s, 1, 4)),
    "bf16-dim1": (torch.randn(6, 9, generator=gen(4)).bfloat16(), lambda s: split_chunks(s, 1, 4)),
    "bf16-dim0": (torch.randn(5, 3, generator=gen(5)).bfloat16(), lambda s: split_chunks(s, 0, 4)),
    "grid": (torch.randn(7, 10, generator=gen(6)).double(), lambda s: grid(s, 3, 4)),
    "empty": (torch.empty(0, 4), split_chunks),
    "empty-1d": (torch.empty(0, dtype=torch.int64), split_chunks),
    "scalar": (torch.tensor(2.5), split_chunks),
    "int8-3d": (
        torch.arange(60, dtype=torch.int8).reshape(3, 4, 5),
        lambda s: split_chunks(s, 2, 3),
    ),
    "bool": (torch.arange(13) % 3 == 0, lambda s: split_chunks(s, 0, 5)),
}


def write_cases(storage: Storage, names: list[str]) -> Manifest:
    state = {name: CASES[name][0] for name in names}
    chunks = {f"model/{name}": CASES[name][1](tuple(CASES[name][0].shape)) for name in names}
    write_sharded_checkpoint(storage, STEP, state, world_size=2, chunks=chunks, step=3)
    return read_manifest(storage, STEP)


def test_assembled_tensors_equal_the_originals(storage):
    manifest = write_cases(storage, list(CASES))
    assert manifest.sharded is not None and manifest.sharded.world_size == 2
    for name, (original, _) in CASES.items():
        record = manifest.sharded.tensors[f"model/{name}"]
        full = assemble_tensor(storage, STEP, f"model/{name}", record)
        assert full.dtype == original.dtype and full.device.type == "cpu", name
        assert full.shape == original.shape and torch.equal(full, original), name


def test_every_chunk_layout_is_what_was_asked(storage):
    manifest = write_cases(storage, ["grid", "2d-dim1"])
    chunks = manifest.sharded.tensors["model/grid"].chunks
    assert len(chunks) == 12 and {c.file for c in chunks} == {
        "rank0.safetensors",
        "rank1.safetensors",
    }
    assert len({c.sizes for c in chunks}) > 1  # uneven
    assert [c.offsets for c in manifest.sharded.tensors["model/2d-dim1"].chunks] == [
        (0, 0),
        (0, 3),
        (0, 6),
        (0, 9),
    ]


def test_assemble_into_out_of_another_dtype_and_a_strided_out(storage):
    manifest = write_cases(storage, ["grid", "2d-dim0"])
    record = manifest.sharded.tensors["model/grid"]
    out = torch.zeros(7, 10, dtype=torch.float32)
    assert assemble_tensor(storage, STEP, "model/grid", record, out=out) is out
    assert torch.equal(out, CASES["grid"][0].float())
    strided = torch.zeros(5, 7).t()  # (7, 5), not contiguous
    assemble_tensor(
        storage, STEP, "model/2d-dim0", manifest.sharded.tensors["model/2d-dim0"], out=strided
    )
    assert torch.equal(strided, CASES["2d-dim0"][0])
    with pytest.raises(ValueError, match="shape"):
        assemble_tensor(storage, STEP, "model/grid", record, out=torch.zeros(10, 7))


def test_read_chunk_and_rows_of_a_chunk(storage):
    manifest = write_cases(storage, ["2d-dim0", "bf16-dim1"])
    original = CASES["2d-dim0"][0]
    record = manifest.sharded.tensors["model/2d-dim0"]
    chunk = record.chunks[1]  # rows 3:5
    got = read_chunk(storage, STEP, record, chunk)
    assert torch.equal(got, original[3:5]) and got.dtype == original.dtype
    out = torch.empty(2, 5)
    assert read_chunk(storage, STEP, record, chunk, out=out) is out and torch.equal(out, got)
    rows = read_chunk_slice(storage, STEP, record, chunk, 1, 2)
    assert torch.equal(rows, original[4:5])
    assert read_chunk_slice(storage, STEP, record, chunk, 2, 2).shape == (0, 5)
    with pytest.raises(ValueError, match="rows"):
        read_chunk_slice(storage, STEP, record, chunk, 1, 3)
    with pytest.raises(ValueError, match="contiguous CPU"):
        read_chunk(storage, STEP, record, chunk, out=torch.empty(5, 2))
    with pytest.raises(ValueError, match="contiguous CPU"):
        read_chunk(storage, STEP, record, chunk, out=torch.empty(2, 5, dtype=torch.float64))
    bf = manifest.sharded.tensors["model/bf16-dim1"]
    cols = read_chunk(storage, STEP, bf, bf.chunks[0])
    assert torch.equal(cols, CASES["bf16-dim1"][0][:, :3]) and cols.dtype == torch.bfloat16


def test_verify_reads_every_file_and_counts_its_bytes(storage):
    manifest = write_cases(storage, list(CASES))
    total = sum(f.size for f in manifest.files.values())
    assert verify_sharded_files(storage, STEP, manifest) == total


def corrupt_one_byte(storage: Storage, file: str, at: int) -> None:
    data = bytearray(storage.read_bytes(STEP, file))
    data[at] ^= 0x01
    storage.remove_file(STEP, file)
    storage.write_file((STEP, file), lambda f: f.write(bytes(data)))


def test_a_corrupted_chunk_byte_names_the_file_and_the_tensor(storage):
    manifest = write_cases(storage, ["grid"])
    record = manifest.sharded.tensors["model/grid"]
    chunk = record.chunks[5]
    corrupt_one_byte(storage, chunk.file, chunk.begin + 3)
    with pytest.raises(ckpt.CorruptCheckpointError, match="checksum mismatch") as info:
        read_chunk(storage, STEP, record, chunk, name="model/grid", index=5)
    assert info.value.path == storage.path(STEP, chunk.file) and info.value.key == "model/grid"
    assert "chunk 5" in str(info.value)
    with pytest.raises(ckpt.CorruptCheckpointError, match="checksum mismatch") as info:
        assemble_tensor(storage, STEP, "model/grid", record)
    assert info.value.key == "model/grid" and chunk.file in info.value.path
    with pytest.raises(ckpt.CorruptCheckpointError, match=r"chunk 5.*checksum mismatch") as info:
        verify_sharded_files(storage, STEP, manifest)
    assert info.value.key == "model/grid" and chunk.file in info.value.path
    unchecked = assemble_tensor(storage, STEP, "model/grid", record, verify=False)
    assert not torch.equal(unchecked, CASES["grid"][0])  # the flipped byte, read as is
    other = record.chunks[0] if record.chunks[0].file != chunk.file else record.chunks[1]
    read_chunk(storage, STEP, record, other)  # the other file's chunks still read


def test_a_corrupted_byte_outside_any_chunk_fails_the_file_checksum(storage):
    manifest = write_cases(storage, ["1d"])
    corrupt_one_byte(storage, "rank0.safetensors", 10)  # inside the safetensors header
    with pytest.raises(ckpt.CorruptCheckpointError) as info:
        verify_sharded_files(storage, STEP, manifest)
    assert "rank0.safetensors" in info.value.path


def with_chunk(manifest: Manifest, name: str, index: int, **changes: object) -> Manifest:
    section = manifest.sharded
    record = section.tensors[name]
    chunks = list(record.chunks)
    chunks[index] = dataclasses.replace(chunks[index], **changes)
    tensors = {**section.tensors, name: dataclasses.replace(record, chunks=tuple(chunks))}
    return dataclasses.replace(manifest, sharded=dataclasses.replace(section, tensors=tensors))


def test_headers_must_agree_with_the_chunk_records(storage):
    manifest = write_cases(storage, ["2d-dim0", "1d"])
    chunk = manifest.sharded.tensors["model/2d-dim0"].chunks[0]  # (3, 5) float32
    shifted = with_chunk(manifest, "model/2d-dim0", 0, begin=chunk.begin + 4)
    with pytest.raises(ckpt.CorruptCheckpointError, match=r"no tensor of torch\.float32"):
        verify_sharded_files(storage, STEP, shifted)
    reshaped = with_chunk(manifest, "model/2d-dim0", 0, sizes=(5, 3))
    with pytest.raises(ckpt.CorruptCheckpointError, match=r"\[5, 3\]") as info:
        verify_sharded_files(storage, STEP, reshaped)
    assert info.value.key == "model/2d-dim0"
    moved = with_chunk(manifest, "model/2d-dim0", 0, file="rank1.safetensors")
    with pytest.raises(ckpt.CorruptCheckpointError, match=r"does not list|begins at byte"):
        verify_sharded_files(storage, STEP, moved)  # rank0's tensor unclaimed, or none in rank1


def test_rank_tensors_must_agree_with_the_headers(storage):
    manifest = write_cases(storage, ["1d"])
    section = manifest.sharded
    rank = section.ranks[1]
    wrong = {
        n: dataclasses.replace(r, dtype=torch.float16) for n, r in rank.tensors.items()
    }  # "own/t" is int64
    ranks = (section.ranks[0], dataclasses.replace(rank, tensors=wrong))
    bad = dataclasses.replace(manifest, sharded=dataclasses.replace(section, ranks=ranks))
    with pytest.raises(ckpt.CorruptCheckpointError, match="manifest says") as info:
        verify_sharded_files(storage, STEP, bad)
    assert info.value.key == "own/t" and "rank1" in info.value.path
    ranks = (section.ranks[0], dataclasses.replace(rank, tensors={}))
    unlisted = dataclasses.replace(manifest, sharded=dataclasses.replace(section, ranks=ranks))
    with pytest.raises(ckpt.CorruptCheckpointError, match="does not list"):
        verify_sharded_files(storage, STEP, unlisted)


def test_missing_and_truncated_files(storage):
    manifest = write_cases(storage, ["2d-dim0"])
    record = manifest.sharded.tensors["model/2d-dim0"]
    last = max(record.chunks, key=lambda c: c.begin)
    data = storage.read_bytes(STEP, last.file)
    storage.remove_file(STEP, last.file)
    with pytest.raises(ckpt.CheckpointNotFoundError):
        read_chunk(storage, STEP, record, last)
    with pytest.raises(ckpt.CorruptCheckpointError, match="missing"):
        verify_sharded_files(storage, STEP, manifest)
    storage.write_file((STEP, last.file), lambda f: f.write(data[: last.begin + 4]))
    with pytest.raises(ckpt.CorruptCheckpointError, match="file ends") as info:
        read_chunk(storage, STEP, record, last, name="model/2d-dim0")
    assert info.value.key == "model/2d-dim0"
    with pytest.raises(ckpt.CorruptCheckpointError, match="size"):
        verify_sharded_files(storage, STEP, manifest)


@pytest.mark.parametrize("kind", ["symlink", "fifo"])
def test_links_and_fifos_are_refused_as_the_storage_layer_does(tmp_path, kind):
    storage = Storage(str(tmp_path))
    manifest = write_cases(storage, ["1d"])
    record = manifest.sharded.tensors["model/1d"]
    chunk = record.chunks[0]
    path = tmp_path / STEP / chunk.file
    os.replace(path, tmp_path / "elsewhere.safetensors")
    if kind == "symlink":
        os.symlink(tmp_path / "elsewhere.safetensors", path)
    else:
        os.mkfifo(path)
    with pytest.raises(ckpt.CorruptCheckpointError):
        read_chunk(storage, STEP, record, chunk)
    with pytest.raises(ckpt.CorruptCheckpointError):
        assemble_tensor(storage, STEP, "model/1d", record)
    with pytest.raises(ckpt.CorruptCheckpointError):
        verify_sharded_files(storage, STEP, manifest)


def test_data_offsets_are_where_write_tensors_puts_the_bytes(tmp_path):
    tensors = {"a": torch.arange(3, dtype=torch.int16), "b": torch.randn(2, 2), "c": torch.empty(0)}
    path = tmp_path / "x.safetensors"
    with open(path, "wb") as f:
        write_tensors(f, tensors, {"format": "pt"})
    raw = path.read_bytes()
    entries, _, start = parse_header(raw, len(raw), str(path))
    assert data_offsets(tensors) == {n: start + e.begin for n, e in entries.items()}
    for name, t in tensors.items():
        at = data_offsets(tensors)[name]
        nbytes = t.numel() * t.element_size()
        assert chunk_checksum(tensor_bytes(t)) == hash_bytes(raw[at : at + nbytes])


def test_the_checkpoint_on_disk_decodes_and_verifies_as_version_3(storage):
    write_cases(storage, ["1d", "empty"])
    raw = storage.read_bytes(STEP, MANIFEST_NAME)
    assert b'"format_version":3' in raw
    manifest = read_manifest(storage, STEP)
    assert list(manifest.items) == ["model", "own"]
    assert [r.items["own"].state["rank"] for r in manifest.sharded.ranks] == [0, 1]
