"""``ckpt import`` against hostile sources: special files, links, bombs, lying DCP records.

Every case runs under an alarm (a hang fails instead of blocking the suite) and
fingerprints everything around the source and the destination before and after:
a refused import is a ``CheckpointError`` naming the file (and the key where
there is one), exit 1 on the command line, and leaves no step, no temp
directory, nothing at all where the checkpoint would have gone.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import pickle
import warnings
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import assert_same_state
from helpers import bounded, fingerprint, small_model
from safetensors.torch import save_file

import ckpt
from ckpt.cli import main
from ckpt.convert import guard, loading

SECONDS = 20


@contextlib.contextmanager
def untouched(tmp_path: Path) -> Iterator[None]:
    """Run under an alarm; afterwards everything below ``tmp_path`` is as it was."""
    before = fingerprint(tmp_path)
    with bounded(SECONDS):
        yield
    assert fingerprint(tmp_path) == before, "a refused import changed its surroundings"


def refused(
    tmp_path: Path, src: Path, *, match: str | None = None, key: str | None = None, **kw: Any
) -> str:
    """Import ``src`` into ``tmp_path/run``: a CheckpointError naming ``src``; nothing written."""
    with untouched(tmp_path), pytest.raises(ckpt.CheckpointError, match=match) as e:
        ckpt.import_checkpoint(src, tmp_path / "run", **kw)
    assert e.value.path is not None and str(src) in e.value.path, e.value
    if key is not None:
        assert e.value.key == key, e.value
    assert not (tmp_path / "run").exists()
    return str(e.value)


def dcp_save(state: dict[str, Any], directory: Path) -> None:
    import torch.distributed.checkpoint as dcp

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "assuming the intent is to save in a single process"
        dcp.save(state, checkpoint_id=str(directory))


def rewrite_metadata(directory: Path, change: Callable[[Any], None]) -> None:
    path = directory / ".metadata"
    metadata = pickle.loads(path.read_bytes())
    change(metadata)
    path.write_bytes(pickle.dumps(metadata))


@pytest.fixture
def two_chunk_dcp(tmp_path: Path) -> tuple[Path, torch.Tensor]:
    """A DCP directory whose ``model.w`` (6x4) is stored as two row chunks."""
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex

    w = torch.arange(24.0).reshape(6, 4)
    src = tmp_path / "dcp"
    dcp_save({"model": {"top": w[:3].clone(), "bottom": w[3:].clone()}, "epoch": 1}, src)

    def merge(m: Any) -> None:
        top, bottom = (
            m.state_dict_metadata.pop("model.top"),
            m.state_dict_metadata.pop("model.bottom"),
        )
        meta = copy.deepcopy(top)
        meta.size = torch.Size([6, 4])
        meta.chunks = [
            ChunkStorageMetadata(torch.Size([0, 0]), torch.Size([3, 4])),
            ChunkStorageMetadata(torch.Size([3, 0]), torch.Size([3, 4])),
        ]
        assert bottom.properties.dtype == meta.properties.dtype
        m.state_dict_metadata["model.w"] = meta
        for index in list(m.storage_data):
            if index.fqn in ("model.top", "model.bottom"):
                info = m.storage_data.pop(index)
                row = 0 if index.fqn == "model.top" else 3
                m.storage_data[MetadataIndex("model.w", torch.Size([row, 0]), 0)] = info
        m.planner_data.pop("model.top"), m.planner_data.pop("model.bottom")
        m.planner_data["model.w"] = ("model", "w")

    rewrite_metadata(src, merge)
    return src, w


def test_the_two_chunk_dcp_fixture_imports_whole(tmp_path, two_chunk_dcp):
    src, w = two_chunk_dcp
    ckpt.import_checkpoint(src, tmp_path / "run")
    with ckpt.CheckpointManager(tmp_path / "run") as mgr:
        got = mgr.read()["model"]["w"]
    assert_same_state({"w": got}, {"w": w})


# ------------------------------------------------------------- special files


def test_a_fifo_source_is_refused_without_hanging(tmp_path):
    os.mkfifo(tmp_path / "ckpt.pt")
    assert "FIFO" in refused(tmp_path, tmp_path / "ckpt.pt")


@pytest.mark.parametrize(
    "name", ["optimizer.pt", "trainer_state.json", "config.json", "model.safetensors"]
)
def test_a_fifo_inside_a_trainer_directory_is_never_opened(tmp_path, name):
    src = tmp_path / "checkpoint-5"
    src.mkdir()
    if name != "model.safetensors":
        save_file(small_model().state_dict(), src / "model.safetensors")
    os.mkfifo(src / name)
    refused(tmp_path, src, match="FIFO")


@pytest.mark.parametrize("name", [".metadata", "__0_0.distcp"])
def test_a_fifo_inside_a_dcp_directory_is_refused(tmp_path, name):
    src = tmp_path / "dcp"
    dcp_save({"model": small_model().state_dict()}, src)
    (src / name).unlink()
    os.mkfifo(src / name)
    refused(tmp_path, src, match="FIFO")


def test_an_unknown_fifo_in_a_trainer_directory_is_reported_not_read(tmp_path):
    src = tmp_path / "checkpoint-5"
    src.mkdir()
    save_file(small_model().state_dict(), src / "model.safetensors")
    os.mkfifo(src / "notes.txt")
    with bounded(SECONDS):
        report = ckpt.import_checkpoint(src, tmp_path / "run")
    assert "FIFO" in report.dropped["notes.txt"]


# --------------------------------------------------------------------- links


def test_a_link_out_of_a_trainer_directory_is_not_followed(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    save_file(small_model().state_dict(), outside / "secret.safetensors")
    src = tmp_path / "checkpoint-5"
    src.mkdir()
    (src / "model.safetensors").symlink_to(outside / "secret.safetensors")
    refused(tmp_path, src, match="symbolic link")


def test_the_path_the_user_names_is_followed_but_never_into_a_fifo(tmp_path):
    model = small_model()
    torch.save({"model": model.state_dict(), "epoch": 3}, tmp_path / "epoch=3.ckpt")
    (tmp_path / "last.ckpt").symlink_to("epoch=3.ckpt")  # as Lightning's save_last="link"
    with bounded(SECONDS):
        assert ckpt.import_checkpoint(tmp_path / "last.ckpt", tmp_path / "run").step == 3
    other = tmp_path / "other"
    other.mkdir()
    os.mkfifo(other / "pipe")
    (other / "pipe.pt").symlink_to("pipe")
    refused(other, other / "pipe.pt", match="FIFO")


def test_a_dcp_storage_record_naming_another_directory_is_refused(tmp_path):
    src = tmp_path / "dcp"
    dcp_save({"model": small_model().state_dict()}, src)

    def escape(m: Any) -> None:
        for info in m.storage_data.values():
            info.relative_path = "../outside.distcp"

    rewrite_metadata(src, escape)
    refused(tmp_path, src, match="bad storage record")


def _hub_cache(tmp_path: Path, state: dict[str, torch.Tensor]) -> Path:
    repo = tmp_path / "hub" / "models--org--tiny"
    (repo / "blobs").mkdir(parents=True)
    snapshot = repo / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    save_file(state, repo / "blobs" / "f00d")
    (repo / "blobs" / "beef").write_text(json.dumps({"global_step": 7}))
    (snapshot / "model.safetensors").symlink_to("../../blobs/f00d")
    (snapshot / "trainer_state.json").symlink_to("../../blobs/beef")
    return snapshot


def test_a_hub_cache_snapshot_imports_through_its_blob_links(tmp_path):
    model = small_model()
    snapshot = _hub_cache(tmp_path, model.state_dict())
    with bounded(SECONDS):
        report = ckpt.import_checkpoint(snapshot, tmp_path / "run")
    assert report.step == 7 and report.mapped["model.safetensors"] == "model"
    live = small_model(seed=3)
    with ckpt.CheckpointManager(tmp_path / "run") as mgr:
        mgr.restore(model=live)
    assert_same_state(live.state_dict(), model.state_dict())


def test_a_hub_cache_link_out_of_its_blobs_is_refused(tmp_path):
    snapshot = _hub_cache(tmp_path, small_model().state_dict())
    save_file(small_model().state_dict(), tmp_path / "elsewhere.safetensors")
    (snapshot / "model.safetensors").unlink()
    (snapshot / "model.safetensors").symlink_to(tmp_path / "elsewhere.safetensors")
    refused(tmp_path, snapshot, match="symbolic link")


# --------------------------------------------------------------- bounded parses


def _trainer_dir(tmp_path: Path) -> Path:
    src = tmp_path / "checkpoint-5"
    src.mkdir()
    save_file(small_model().state_dict(), src / "model.safetensors")
    return src


def test_json_nested_thousands_deep_is_refused(tmp_path):
    src = _trainer_dir(tmp_path)
    (src / "trainer_state.json").write_text("[" * 5000 + "]" * 5000)
    refused(tmp_path, src, match="nested")


def test_json_nested_past_the_bound_is_refused(tmp_path):
    src = _trainer_dir(tmp_path)
    depth = guard.MAX_DEPTH + 1
    (src / "config.json").write_text("[" * depth + "]" * depth)
    refused(tmp_path, src, match="nested")


def test_json_larger_than_the_bound_is_refused_before_reading(tmp_path, monkeypatch):
    src = _trainer_dir(tmp_path)
    (src / "config.json").write_text(json.dumps({"x": "y" * 200}))
    monkeypatch.setattr(loading, "MAX_JSON_BYTES", 100)
    refused(tmp_path, src, match="more than an import reads")


def _with_pickle(path: Path, data_pkl: bytes, keep_storages: bool = False) -> None:
    """A torch.save file (``path``'s, or an empty one's) whose ``data.pkl`` is ``data_pkl``."""
    if not keep_storages:
        torch.save({}, path)
    with zipfile.ZipFile(path) as z:
        entries = {i.filename: z.read(i) for i in z.infolist()}
    name = next(n for n in entries if n.endswith("/data.pkl"))
    entries[name] = data_pkl
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        for n, data in entries.items():
            z.writestr(n, data)


def test_a_tensor_declaring_more_elements_than_its_storage_is_refused(tmp_path):
    torch.save({"model": {"w": torch.ones(4)}}, tmp_path / "big.pt")
    with zipfile.ZipFile(tmp_path / "big.pt") as z:
        data_pkl = z.read(next(n for n in z.namelist() if n.endswith("/data.pkl")))
    assert data_pkl.count(b"K\x04\x85") == 1  # BININT1 4, TUPLE1: the shape (4,)
    inflated = data_pkl.replace(b"K\x04\x85", b"J" + (2**30).to_bytes(4, "little") + b"\x85")
    _with_pickle(tmp_path / "big.pt", inflated, keep_storages=True)
    refused(tmp_path, tmp_path / "big.pt", match="loadable")


@pytest.mark.parametrize("depth", [guard.MAX_DEPTH + 5, 100_000])
def test_a_pickle_nested_deep_is_refused(tmp_path, depth):
    # protocol 2: EMPTY_DICT, then [EMPTY_LIST]*depth, APPEND*(depth-1), SETITEM under "x"
    body = b"\x80\x02}X\x01\x00\x00\x00x" + b"]" * depth + b"a" * (depth - 1) + b"s."
    _with_pickle(tmp_path / "deep.pt", body)
    refused(tmp_path, tmp_path / "deep.pt", match="nested")


def test_shared_references_cannot_multiply_the_work(tmp_path):
    leaf = list(range(200))
    bomb = [[[leaf] * 200] * 200] * 200  # 1.6e9 values when walked, a few KB on disk
    torch.save({"model": small_model().state_dict(), "bomb": bomb}, tmp_path / "bomb.pt")
    assert os.path.getsize(tmp_path / "bomb.pt") < 100_000
    refused(tmp_path, tmp_path / "bomb.pt", match="more than")


def test_an_old_format_torch_save_file_is_refused_before_torch_allocates(tmp_path):
    # the pre-1.6 format: torch allocates each storage at its declared size, then reads it
    torch.save(
        {"model": {"w": torch.ones(4)}}, tmp_path / "old.pt", _use_new_zipfile_serialization=False
    )
    raw = bytearray((tmp_path / "old.pt").read_bytes())
    at = raw.index(b"K\x04N", raw.index(b"cpu"))  # the storage's element count, 4
    raw[at : at + 3] = b"J" + (2**31 - 1).to_bytes(4, "little") + b"N"
    (tmp_path / "old.pt").write_bytes(bytes(raw))
    refused(tmp_path, tmp_path / "old.pt", match="zip format")


def test_a_safetensors_header_declaring_more_than_the_file_is_refused(tmp_path):
    save_file({"w": torch.ones(4)}, tmp_path / "w.safetensors")
    raw = bytearray((tmp_path / "w.safetensors").read_bytes())
    raw[:8] = (2**40).to_bytes(8, "little")
    (tmp_path / "w.safetensors").write_bytes(bytes(raw))
    refused(tmp_path, tmp_path / "w.safetensors", match="header length")


def test_a_refused_pickle_names_the_global_and_not_the_unsafe_advice(tmp_path):
    torch.save({"model": small_model().state_dict(), "f": os.system}, tmp_path / "evil.pt")
    message = refused(tmp_path, tmp_path / "evil.pt", match="global")
    assert "system" in message
    assert "False" not in message and "add_safe_globals" not in message


# ------------------------------------------------------------ lying DCP records


def _chunks(m: Any) -> list[Any]:
    return m.state_dict_metadata["model.w"].chunks


DCP_LIES: dict[str, tuple[Callable[[Any], None], str]] = {
    "a chunk missing (a gap)": (lambda m: _chunks(m).pop(), "gap"),
    "chunks overlap": (
        lambda m: (
            setattr(_chunks(m)[1], "offsets", torch.Size([2, 0]))
            or setattr(m.state_dict_metadata["model.w"], "size", torch.Size([5, 4]))
        ),
        "overlap|outside",
    ),
    "a chunk outside the tensor": (
        lambda m: setattr(_chunks(m)[1], "offsets", torch.Size([4, 0])),
        "outside",
    ),
    "a size far beyond the bytes": (
        lambda m: setattr(m.state_dict_metadata["model.w"], "size", torch.Size([6, 2**40])),
        "gap|overlap|outside|too large|declares",
    ),
    "a dtype the chunks do not have": (
        lambda m: setattr(m.state_dict_metadata["model.w"].properties, "dtype", torch.float64),
        "not a torch.float64 tensor",
    ),
    "a storage offset past the file": (
        lambda m: [setattr(i, "offset", 10**12) for i in m.storage_data.values()],
        "past the end",
    ),
    "a negative length": (
        lambda m: [setattr(i, "length", -1) for i in m.storage_data.values()],
        "bad storage record",
    ),
    "a planner path into a huge list": (
        lambda m: m.planner_data.__setitem__("model.w", ("model", 10**12)),
        "planner path",
    ),
    "a planner path through a value": (
        lambda m: m.planner_data.__setitem__("model.w", ("epoch", "w")),
        "runs through",
    ),
    "a dtype that is not one": (
        lambda m: setattr(m.state_dict_metadata["model.w"].properties, "dtype", "float32"),
        "bad dtype",
    ),
}


@pytest.mark.parametrize("lie", list(DCP_LIES))
def test_a_lying_dcp_directory_commits_nothing(tmp_path, two_chunk_dcp, lie):
    src, _ = two_chunk_dcp
    change, match = DCP_LIES[lie]
    rewrite_metadata(src, change)
    refused(tmp_path, src, match=match)


@pytest.mark.parametrize(
    ("size", "boxes", "ok"),
    [
        ((6, 4), [((0, 0), (3, 4)), ((3, 0), (3, 4))], True),
        ((2, 4), [((0, 0), (2, 2)), ((0, 1), (2, 2))], False),  # overlap + gap, sums agree
        ((2, 2), [((0, 0), (1, 2)), ((0, 0), (1, 2))], False),  # the same chunk twice
        ((), [((), ())], True),
        ((0, 3), [((0, 0), (0, 3))], True),
    ],
)
def test_chunk_cover(size, boxes, ok):
    from ckpt.convert.dcp import _check_cover

    if ok:
        _check_cover(boxes, size, "m", "k")
    else:
        with pytest.raises(ckpt.CorruptCheckpointError, match="overlap"):
            _check_cover(boxes, size, "m", "k")


@pytest.mark.parametrize("overlap", [False, True])
def test_many_column_chunks_are_checked_in_linear_time(overlap):
    from ckpt.convert.dcp import _check_cover

    n = 16384  # pairwise checks would take minutes; the grid check takes a fraction of a second
    boxes = [((0, i), (1, 1)) for i in range(n)]
    if overlap:
        boxes[-1] = ((0, 0), (1, 1))
    with bounded(SECONDS):
        if overlap:
            with pytest.raises(ckpt.CorruptCheckpointError):
                _check_cover(boxes, (1, n), "m", "k")
        else:
            _check_cover(boxes, (1, n), "m", "k")


def test_a_truncated_dcp_data_file_commits_nothing(tmp_path, two_chunk_dcp):
    src, _ = two_chunk_dcp
    data = next(p for p in src.iterdir() if p.suffix == ".distcp")
    data.write_bytes(data.read_bytes()[:-100])
    refused(tmp_path, src, match="past the end", key="model.w")


def test_a_dcp_value_without_storage_commits_nothing(tmp_path, two_chunk_dcp):
    src, _ = two_chunk_dcp
    rewrite_metadata(
        src,
        lambda m: [m.storage_data.pop(i) for i in list(m.storage_data) if i.fqn == "epoch"],
    )
    refused(tmp_path, src, match="storage records", key="epoch")


# ----------------------------------------------------- storage-aware sizes


def test_an_expanded_scalar_is_refused_before_writing(tmp_path):
    torch.save({"model": {"w": torch.zeros(1).expand(50_000_000)}}, tmp_path / "x.pt")
    assert os.path.getsize(tmp_path / "x.pt") < 10_000
    refused(tmp_path, tmp_path / "x.pt", match="bytes on disk")


def test_views_of_one_storage_are_refused_past_the_bound(tmp_path):
    base = torch.zeros(2**18)  # 1 MiB
    views = {f"v{i}": base[i:] for i in range(8)}  # 8 MiB written from 1 MiB
    torch.save({"model": views}, tmp_path / "views.pt")
    refused(tmp_path, tmp_path / "views.pt", match="bytes on disk")


def test_strided_and_sliced_views_restore_exactly(tmp_path):
    w = torch.randn(32, 16)
    state = {"w": w, "t": w.t(), "every_other": w[:, ::2], "row": w[3]}
    torch.save({"model": state}, tmp_path / "views.pt")
    with bounded(SECONDS):
        ckpt.import_checkpoint(tmp_path / "views.pt", tmp_path / "run")
    with ckpt.CheckpointManager(tmp_path / "run") as mgr:
        got = mgr.read()["model"]
    assert_same_state(got, {k: v.contiguous() for k, v in state.items()})


def test_identical_views_are_stored_once_and_restore(tmp_path):
    w = torch.randn(64, 64)
    torch.save({"model": {"a": w, "b": w.view(64, 64)}}, tmp_path / "tied.pt")
    with bounded(SECONDS):
        ckpt.import_checkpoint(tmp_path / "tied.pt", tmp_path / "run")
    with ckpt.CheckpointManager(tmp_path / "run") as mgr:
        got = mgr.read()["model"]
    assert_same_state(got, {"a": w, "b": w})
    assert ckpt.CheckpointReader(tmp_path / "run").describe().to_json()["nbytes"] < 2 * w.nbytes


# --------------------------------------------------------------------- CLI


def test_cli_exit_1_and_nothing_written_for_a_hostile_source(tmp_path, capsys):
    os.mkfifo(tmp_path / "ckpt.pt")
    with untouched(tmp_path):
        assert main(["import", str(tmp_path / "ckpt.pt"), str(tmp_path / "run")]) == 1
    err = capsys.readouterr().err
    assert "ckpt.pt" in err and "FIFO" in err and "Traceback" not in err
