"""Hostile cases for incremental roots (format version 4): the content store attacked.

Each case ends in a :class:`ckpt.CheckpointError` naming the file and key (or a clean
outcome), touches nothing outside the root, never hangs, and leaves earlier steps intact.
"""

from __future__ import annotations

import json
import os
import shutil

import fsspec
import pytest
import torch
from conftest import assert_same_state
from helpers import bounded, read_manifest_doc, write_manifest

import ckpt
from ckpt.cli import main
from ckpt.format.blobs import BLOB_DIR, blob_file_name
from ckpt.format.names import step_dir_name
from ckpt.reading.sharing import describe_sharing

BIG = 32768  # float32 elements: 128 KiB, above the store's threshold


def save_steps(root, steps=(1, 2)) -> dict[int, dict[str, torch.Tensor]]:
    """Save ``steps``: a frozen tensor shared by all and a tensor of each step's own."""
    saved = {}
    with ckpt.CheckpointManager(root, incremental=True) as mgr:
        for step in steps:
            state = {
                "frozen": torch.arange(BIG, dtype=torch.float32),
                "w": torch.full((BIG,), float(step)),
            }
            mgr.save(step, data=state, rng=False)
            saved[step] = {k: v.clone() for k, v in state.items()}
    return saved


def doc_of(root, step: int) -> dict:
    return read_manifest_doc(root / step_dir_name(step) / "manifest.json")


def key_of(root, step: int, tensor: str = "data/frozen") -> str:
    return doc_of(root, step)["tensors"][tensor]["blob"]


def blob_path(root, key: str):
    return root / BLOB_DIR / blob_file_name(key)


def restore(root, step=None, **kwargs) -> tuple[int, dict[str, torch.Tensor]]:
    live = {"frozen": torch.zeros(BIG), "w": torch.zeros(BIG)}
    with bounded():
        info = ckpt.CheckpointManager(root, **kwargs).restore(step, data=live, rng=False)
    return info.step, live


def cli(capsys: pytest.CaptureFixture[str], *argv: object) -> tuple[int, str]:
    """Run ``ckpt ARGV`` in this process: its exit status and its stdout and stderr together."""
    with bounded():
        code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out + err


# ------------------------------------------------------- the store's directory


def test_a_store_that_is_a_link_outside_the_root_is_never_followed(tmp_path):
    root = tmp_path / "run"
    save_steps(root, (1,))
    outside = tmp_path / "outside"
    (root / BLOB_DIR).rename(outside)
    (root / BLOB_DIR).symlink_to(outside)
    before = sorted(os.listdir(outside))
    with bounded(), pytest.raises(ckpt.CorruptCheckpointError) as e:
        ckpt.CheckpointReader(root).verify(1)
    assert BLOB_DIR in str(e.value)
    with (
        bounded(),
        ckpt.CheckpointManager(root, incremental=True, keep_last=1) as mgr,
        pytest.raises(ckpt.CheckpointError),
    ):
        mgr.save(2, data={"frozen": torch.ones(BIG)}, rng=False)
    assert sorted(os.listdir(outside)) == before


@pytest.mark.parametrize("kind", ["file", "fifo"])
def test_a_store_that_is_not_a_directory_fails_cleanly(tmp_path, kind):
    root = tmp_path / "run"
    save_steps(root, (1,))
    store = root / BLOB_DIR
    for name in os.listdir(store):
        os.remove(store / name)
    store.rmdir()
    if kind == "file":
        store.write_bytes(b"not a directory")
    else:
        os.mkfifo(store)
    with bounded():
        with pytest.raises(ckpt.CorruptCheckpointError) as e:
            ckpt.CheckpointReader(root).verify(1)
        assert BLOB_DIR in str(e.value)
        with (
            ckpt.CheckpointManager(root, incremental=True) as mgr,
            pytest.raises(ckpt.CheckpointError),
        ):
            mgr.save(2, data={"frozen": torch.ones(BIG)}, rng=False)
        assert ckpt.CheckpointReader(root).all_steps() == [1]


# ------------------------------------------------------------- one blob's file


@pytest.mark.parametrize("kind", ["symlink", "fifo", "directory"])
def test_a_blob_that_is_not_a_regular_file_is_corruption_naming_it(tmp_path, kind):
    root = tmp_path / "run"
    saved = save_steps(root, (1, 2))
    key = key_of(root, 2, "data/w")
    path = blob_path(root, key)
    outside = tmp_path / "target.safetensors"
    outside.write_bytes(path.read_bytes())
    os.remove(path)
    if kind == "symlink":
        path.symlink_to(outside)
    elif kind == "fifo":
        os.mkfifo(path)
    else:
        path.mkdir()
    for check in ("verify", "read"):
        with bounded(), pytest.raises(ckpt.CorruptCheckpointError) as e:
            getattr(ckpt.CheckpointReader(root), check)(2)
        assert blob_file_name(key) in str(e.value)
    step, live = restore(root, fallback_to_intact=True)
    assert step == 1
    assert_same_state(live, saved[1])
    # The next writer does not take the bad entry for the blob: it writes the blob anew.
    with bounded(), ckpt.CheckpointManager(root, incremental=True) as mgr:
        if kind == "directory":
            with pytest.raises(ckpt.CheckpointError):
                mgr.save(3, data=saved[2], rng=False)
        else:
            mgr.save(3, data=saved[2], rng=False)
            step, live = restore(root)
            assert step == 3
            assert_same_state(live, saved[2])
    assert outside.read_bytes()[:8]  # the link's target is untouched
    ckpt.CheckpointReader(root).verify(1)


def test_a_truncated_blob_is_written_anew_by_the_next_writer(tmp_path):
    root = tmp_path / "run"
    saved = save_steps(root, (1,))
    key = key_of(root, 1)
    path = blob_path(root, key)
    path.write_bytes(path.read_bytes()[:100])
    with bounded(), pytest.raises(ckpt.CorruptCheckpointError) as e:
        ckpt.CheckpointReader(root).verify(1)
    assert blob_file_name(key) in str(e.value) and "data/frozen" in str(e.value)
    with ckpt.CheckpointManager(root, incremental=True) as mgr:
        mgr.save(2, data=saved[1], rng=False)
    reader = ckpt.CheckpointReader(root)
    reader.verify(2)
    reader.verify(1)  # the same bytes again: step 1 is whole once more


def test_a_hard_linked_blob_is_read_like_any_file(tmp_path):
    root = tmp_path / "run"
    saved = save_steps(root, (1,))
    key = key_of(root, 1)
    path = blob_path(root, key)
    os.link(path, tmp_path / "elsewhere")
    ckpt.CheckpointReader(root).verify(1)
    _, live = restore(root)
    assert_same_state(live, saved[1])


# ----------------------------------------------------------- hostile manifests


@pytest.mark.parametrize(
    "key",
    ["../" + "0" * 29, "0" * 31 + "/", "A" * 32, "0" * 31 + "\x00", "..", "0" * 33, "g" * 32, 7],
)
def test_a_bad_blob_key_is_refused_before_any_file_is_opened(tmp_path, key):
    root = tmp_path / "run"
    save_steps(root, (1,))
    path = root / step_dir_name(1) / "manifest.json"
    doc = read_manifest_doc(path)
    good = doc["tensors"]["data/frozen"]["blob"]
    doc["tensors"]["data/frozen"]["blob"] = key
    write_manifest(path, doc)
    with bounded(), pytest.raises(ckpt.CorruptCheckpointError, match="32 lower-case hex") as e:
        ckpt.CheckpointReader(root).verify(1)
    assert "manifest.json" in str(e.value) and "data/frozen" in str(e.value)
    doc["tensors"]["data/frozen"]["blob"] = good
    doc["blobs"][key if isinstance(key, str) else str(key)] = doc["blobs"][good]
    write_manifest(path, doc)
    with bounded(), pytest.raises(ckpt.CorruptCheckpointError, match="32 lower-case hex"):
        ckpt.CheckpointReader(root).verify(1)


def test_a_blob_listed_but_never_referenced_is_harmless_and_kept(tmp_path):
    root = tmp_path / "run"
    saved = save_steps(root, (1, 2))
    only2 = key_of(root, 2, "data/w")
    path = root / step_dir_name(1) / "manifest.json"
    doc = read_manifest_doc(path)
    doc["blobs"][only2] = doc_of(root, 2)["blobs"][only2]
    write_manifest(path, doc)
    ckpt.CheckpointReader(root).verify(1)
    _, live = restore(root, 1)
    assert_same_state(live, saved[1])


def test_a_blob_record_disagreeing_with_the_file_is_corruption(tmp_path):
    root = tmp_path / "run"
    save_steps(root, (1,))
    key = key_of(root, 1)
    path = root / step_dir_name(1) / "manifest.json"
    doc = read_manifest_doc(path)
    doc["blobs"][key]["size"] += 8
    write_manifest(path, doc)
    for check in ("verify", "read"):
        with bounded(), pytest.raises(ckpt.CorruptCheckpointError, match="size") as e:
            getattr(ckpt.CheckpointReader(root), check)(1)
        assert blob_file_name(key) in str(e.value) and "data/frozen" in str(e.value)


def test_a_blob_checksum_disagreeing_names_the_blob_and_tensor(tmp_path):
    root = tmp_path / "run"
    save_steps(root, (1,))
    key = key_of(root, 1)
    path = root / step_dir_name(1) / "manifest.json"
    doc = read_manifest_doc(path)
    doc["blobs"][key]["checksum"] = "xxh3_64:" + "0" * 16
    write_manifest(path, doc)
    for check in ("verify", "read"):
        with bounded(), pytest.raises(ckpt.CorruptCheckpointError, match="checksum") as e:
            getattr(ckpt.CheckpointReader(root), check)(1)
        assert blob_file_name(key) in str(e.value) and "data/frozen" in str(e.value)
    with bounded(), pytest.raises(ckpt.CorruptCheckpointError, match="checksum") as e:
        dict(ckpt.CheckpointReader(root).iter_tensors(1, item="data"))
    assert blob_file_name(key) in str(e.value) and "data/frozen" in str(e.value)
    with pytest.raises(ckpt.CorruptCheckpointError, match="checksum") as e:
        restore(root)
    assert blob_file_name(key) in str(e.value) and "data/frozen" in str(e.value)


def _blob_bytes(header: dict, data: bytes) -> bytes:
    text = json.dumps(header)
    text += " " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text.encode() + data


@pytest.mark.parametrize(
    "header,data",
    [
        ({"data": {"dtype": "F32", "shape": [2**40, 2**20], "data_offsets": [0, 8]}}, bytes(8)),
        (
            {
                "data": {"dtype": "F32", "shape": [BIG], "data_offsets": [0, BIG * 4]},
                "other": {"dtype": "F32", "shape": [1], "data_offsets": [BIG * 4, BIG * 4 + 4]},
            },
            bytes(BIG * 4 + 4),
        ),
        (
            {"data": {"dtype": "F32", "shape": [BIG], "data_offsets": [0, BIG * 4]}},
            bytes(BIG * 4 + 64),
        ),
        (
            {"weights": {"dtype": "F32", "shape": [BIG], "data_offsets": [0, BIG * 4]}},
            bytes(BIG * 4),
        ),
        (
            {"data": {"dtype": "F16", "shape": [BIG * 2], "data_offsets": [0, BIG * 4]}},
            bytes(BIG * 4),
        ),
    ],
    ids=["huge-shape", "two-tensors", "trailing-bytes", "wrong-name", "wrong-dtype"],
)
def test_a_blob_with_a_hostile_header_is_corruption(tmp_path, header, data):
    root = tmp_path / "run"
    saved = save_steps(root, (1, 2))
    key = key_of(root, 2, "data/w")
    raw = _blob_bytes(header, data)
    blob_path(root, key).write_bytes(raw)
    # The manifest agrees with the bytes: only the header's content is wrong.
    path = root / step_dir_name(2) / "manifest.json"
    doc = read_manifest_doc(path)
    from ckpt.format.checksums import hash_bytes

    doc["blobs"][key] = {"size": len(raw), "checksum": hash_bytes(raw)}
    write_manifest(path, doc)
    for check in ("verify", "read"):
        with bounded(), pytest.raises(ckpt.CorruptCheckpointError) as e:
            getattr(ckpt.CheckpointReader(root), check)(2)
        assert blob_file_name(key) in str(e.value)
    step, live = restore(root, fallback_to_intact=True)
    assert step == 1
    assert_same_state(live, saved[1])


def test_two_steps_claiming_one_blob_with_different_shapes(tmp_path):
    root = tmp_path / "run"
    saved = save_steps(root, (1, 2))
    key = key_of(root, 1)
    path = root / step_dir_name(2) / "manifest.json"
    doc = read_manifest_doc(path)
    doc["tensors"]["data/frozen"]["shape"] = [BIG // 2, 2]
    write_manifest(path, doc)
    with bounded(), pytest.raises(ckpt.CorruptCheckpointError, match="manifest says") as e:
        ckpt.CheckpointReader(root).verify(2)
    assert blob_file_name(key) in str(e.value) and "data/frozen" in str(e.value)
    ckpt.CheckpointReader(root).verify(1)
    step, live = restore(root, fallback_to_intact=True)
    assert step == 1
    assert_same_state(live, saved[1])


# ------------------------------------------------------------------- sweeping


def test_the_sweep_never_deletes_files_ckpt_did_not_write(tmp_path):
    root = tmp_path / "run"
    save_steps(root, (1,))
    store = root / BLOB_DIR
    foreign = [
        "notes.txt",
        "README",
        "0" * 32 + ".bak",
        "0" * 32 + ".safetensors.orig",
        "A" * 32 + ".safetensors",
        ".ckpt-new.zz." + blob_file_name("f" * 32),
    ]
    for name in foreign:
        (store / name).write_text("mine")
    (store / "subdir").mkdir()
    (store / "subdir" / "x").write_text("mine")
    leftover = ".ckpt-new.0123abcd." + blob_file_name("f" * 32)
    (store / leftover).write_bytes(b"half")
    unreferenced = blob_file_name("e" * 32)
    (store / unreferenced).write_bytes(b"old")
    with bounded(), ckpt.CheckpointManager(root, incremental=True) as mgr:
        mgr.save(2, data={"frozen": torch.arange(BIG, dtype=torch.float32)}, rng=False)
    names = set(os.listdir(store))
    assert set(foreign) | {"subdir"} <= names
    assert (store / "subdir" / "x").read_text() == "mine"
    assert leftover not in names and unreferenced not in names
    ckpt.CheckpointReader(root).verify(1)


@pytest.mark.parametrize("damage", ["garbage", "unreadable"])
def test_the_sweep_deletes_nothing_when_a_manifest_is_damaged(tmp_path, damage):
    root = tmp_path / "run"
    save_steps(root, (1, 2))
    path = root / step_dir_name(1) / "manifest.json"
    if damage == "garbage":
        path.write_bytes(b"{not json")
    else:
        path.chmod(0)
        if os.access(path, os.R_OK):
            pytest.skip("running as root: permissions do not bind")
    before = set(os.listdir(root / BLOB_DIR))
    try:
        with bounded(), ckpt.CheckpointManager(root, incremental=True) as mgr:
            mgr.save(3, data={"other": torch.ones(BIG)}, rng=False)
        assert before <= set(os.listdir(root / BLOB_DIR))
    finally:
        path.chmod(0o644)


def test_a_step_directory_named_like_a_blob_is_not_a_step(tmp_path):
    root = tmp_path / "run"
    save_steps(root, (1,))
    (root / blob_file_name("a" * 32)).mkdir()
    assert ckpt.CheckpointReader(root).all_steps() == [1]


# ------------------------------------------------- mixing managers and formats


def test_a_non_incremental_manager_sweeps_only_unreferenced_blobs(tmp_path):
    root = tmp_path / "run"
    saved = save_steps(root, (1, 2, 3))
    with ckpt.CheckpointManager(root, keep_last=2) as mgr:
        mgr.save(4, data=saved[3], rng=False)
    reader = ckpt.CheckpointReader(root)
    assert reader.all_steps() == [3, 4]
    reader.verify(3)
    reader.verify(4)
    referenced = {blob_file_name(k) for k in doc_of(root, 3)["blobs"]}
    assert set(os.listdir(root / BLOB_DIR)) == referenced


def test_incremental_on_a_root_of_older_steps_and_back(tmp_path):
    root = tmp_path / "run"
    state = {"frozen": torch.arange(BIG, dtype=torch.float32), "w": torch.ones(BIG)}
    with ckpt.CheckpointManager(root) as mgr:
        mgr.save(1, data=state, rng=False)
    with ckpt.CheckpointManager(root, incremental=True) as mgr:
        mgr.save(2, data=state, rng=False)
    with ckpt.CheckpointManager(root, keep_last=2) as mgr:
        mgr.save(3, data=state, rng=False)
    reader = ckpt.CheckpointReader(root)
    assert doc_of(root, 2)["format_version"] == 4
    assert doc_of(root, 3)["format_version"] != 4
    for step in reader.all_steps():
        reader.verify(step)
    assert os.listdir(root / BLOB_DIR) != []
    with ckpt.CheckpointManager(root, keep_last=1) as mgr:
        mgr.save(4, data=state, rng=False)
    assert os.listdir(root / BLOB_DIR) == []


def test_overwriting_an_incremental_step_keeps_the_blobs_others_need(tmp_path):
    root = tmp_path / "run"
    saved = save_steps(root, (1, 2))
    new = {"frozen": torch.zeros(BIG), "w": torch.full((BIG,), 9.0)}
    with ckpt.CheckpointManager(root, incremental=True) as mgr:
        mgr.save(2, data=new, rng=False, overwrite=True)
    reader = ckpt.CheckpointReader(root)
    reader.verify(1)
    reader.verify(2)
    step, live = restore(root)
    assert step == 2
    assert_same_state(live, new)
    _, live = restore(root, 1)
    assert_same_state(live, saved[1])
    referenced = {blob_file_name(k) for s in (1, 2) for k in doc_of(root, s)["blobs"]}
    assert set(os.listdir(root / BLOB_DIR)) == referenced


# -------------------------------------------------------------------- the CLI


def test_the_cli_on_a_root_with_a_damaged_blob(tmp_path, capsys):
    root = tmp_path / "run"
    save_steps(root, (1, 2))
    key = key_of(root, 2, "data/w")
    path = blob_path(root, key)
    path.write_bytes(path.read_bytes()[:-1] + b"\x01")
    name = blob_file_name(key)
    code, text = cli(capsys, "verify", root)
    assert code == 1 and name in text and "checksum" in text
    code, text = cli(capsys, "verify", f"{root}:1")
    assert code == 0, text
    code, text = cli(capsys, "ls", root)  # manifests only: the blob is not read
    assert code == 0, text
    code, text = cli(capsys, "info", f"{root}:2")
    assert code == 0, text
    code, text = cli(capsys, "export", f"{root}:2", tmp_path / "out", "--item", "data")
    assert code == 1 and name in text
    code, text = cli(capsys, "diff", f"{root}:1", f"{root}:2")
    assert code == 1 and name in text
    code, text = cli(capsys, "prune", root, "--keep-last", "1")
    assert code == 0, text
    assert ckpt.CheckpointReader(root).all_steps() == [2]
    assert {n for n in os.listdir(root / BLOB_DIR)} == {
        blob_file_name(k) for k in doc_of(root, 2)["blobs"]
    }


# ------------------------------------------------- ckpt info: shared and own bytes


def info(capsys, target) -> dict:
    code, text = cli(capsys, "info", target, "--json")
    assert code == 0, text
    return json.loads(text)


def test_info_splits_a_steps_bytes_into_shared_and_its_own(tmp_path, capsys):
    root = tmp_path / "run"
    save_steps(root, (1, 2, 3))
    docs = {s: info(capsys, f"{root}:{s}") for s in (1, 2, 3)}
    frozen = doc_of(root, 1)["blobs"][key_of(root, 1)]["size"]
    for step, doc in docs.items():
        assert doc["shared_nbytes"] + doc["own_nbytes"] == doc["nbytes"]
        assert doc["shared_nbytes"] == frozen
        assert doc["shared_with"] == [s for s in (1, 2, 3) if s != step]
        assert doc["sharing_unknown"] == []
    # Differential: the bytes only step 1 holds are exactly what deleting it frees.
    step_dir = root / step_dir_name(1)
    own_files = sum(f.stat().st_size for f in step_dir.iterdir() if f.name != "manifest.json")
    blobs_before = {n: (root / BLOB_DIR / n).stat().st_size for n in os.listdir(root / BLOB_DIR)}
    code, text = cli(capsys, "prune", root, "--keep-last", "2")
    assert code == 0, text
    gone = set(blobs_before) - set(os.listdir(root / BLOB_DIR))
    assert docs[1]["own_nbytes"] == own_files + sum(blobs_before[n] for n in gone)
    code, text = cli(capsys, "info", f"{root}:2")
    assert code == 0 and "shared:" in text and "with step(s) 3" in text


def test_info_of_a_non_incremental_step_owns_all_its_bytes(tmp_path, capsys):
    with ckpt.CheckpointManager(tmp_path) as mgr:
        mgr.save(1, data={"big": torch.ones(BIG)}, rng=False)
    doc = info(capsys, tmp_path)
    assert (doc["shared_nbytes"], doc["own_nbytes"], doc["shared_with"]) == (0, doc["nbytes"], [])
    code, text = cli(capsys, "info", tmp_path)
    assert code == 0 and "shared:" not in text


def test_info_names_the_steps_it_could_not_count(tmp_path, capsys):
    root = tmp_path / "run"
    save_steps(root, (1, 2, 3))
    (root / step_dir_name(1) / "manifest.json").write_bytes(b"{not json")
    doc = info(capsys, f"{root}:3")
    assert doc["sharing_unknown"] == [1]
    assert doc["shared_with"] == [2]
    assert doc["shared_nbytes"] + doc["own_nbytes"] == doc["nbytes"]


# ------------------------------------------------- a blob changed while a restore runs


@pytest.mark.parametrize("change", ["delete", "truncate", "replace"])
def test_a_blob_changed_as_a_restore_opens_it_is_corruption_naming_it(
    tmp_path, monkeypatch, change
):
    root = tmp_path / "run"
    saved = save_steps(root, (1, 2))
    key = key_of(root, 2, "data/w")
    path = blob_path(root, key)
    other = blob_path(root, key_of(root, 1, "data/w"))
    opened = ckpt.storage.local.LocalStorage.open_read
    done = []

    def hostile_open(self, *parts):
        if parts == (BLOB_DIR, blob_file_name(key)) and not done:
            done.append(parts)
            if change == "delete":
                os.remove(path)
            elif change == "truncate":
                path.write_bytes(path.read_bytes()[:-4])
            else:
                path.write_bytes(other.read_bytes())
        return opened(self, *parts)

    monkeypatch.setattr(ckpt.storage.local.LocalStorage, "open_read", hostile_open)
    live = {"frozen": torch.zeros(BIG), "w": torch.zeros(BIG)}
    before = {k: v.clone() for k, v in live.items()}
    with bounded(), pytest.raises(ckpt.CorruptCheckpointError) as e:
        ckpt.CheckpointManager(root).restore(data=live, rng=False)
    assert blob_file_name(key) in str(e.value)
    assert_same_state(live, before)  # a failed restore leaves live objects untouched
    assert done
    monkeypatch.undo()
    step, live = restore(root, fallback_to_intact=True)
    assert step == 1
    assert_same_state(live, saved[1])


def test_a_latest_step_deleted_with_its_blobs_during_a_restore_relists(tmp_path, monkeypatch):
    root = tmp_path / "run"
    saved = save_steps(root, (1, 2))
    key = key_of(root, 2, "data/w")
    opened = ckpt.storage.local.LocalStorage.open_read
    done = []

    def pruning_open(self, *parts):
        if parts == (BLOB_DIR, blob_file_name(key)) and not done:
            done.append(parts)
            # Another process's retention: the manifest first, the step, then the blob.
            os.remove(root / step_dir_name(2) / "manifest.json")
            shutil.rmtree(root / step_dir_name(2))
            os.remove(blob_path(root, key))
        return opened(self, *parts)

    monkeypatch.setattr(ckpt.storage.local.LocalStorage, "open_read", pruning_open)
    step, live = restore(root)
    assert done and step == 1
    assert_same_state(live, saved[1])


def test_fallback_skips_a_step_whose_blob_vanishes_as_it_is_opened(tmp_path, monkeypatch):
    root = tmp_path / "run"
    saved = save_steps(root, (1, 2))
    key = key_of(root, 2, "data/w")
    opened = ckpt.storage.local.LocalStorage.open_read

    def deleting_open(self, *parts):
        if parts == (BLOB_DIR, blob_file_name(key)) and blob_path(root, key).exists():
            os.remove(blob_path(root, key))
        return opened(self, *parts)

    monkeypatch.setattr(ckpt.storage.local.LocalStorage, "open_read", deleting_open)
    step, live = restore(root, fallback_to_intact=True)
    assert step == 1
    assert_same_state(live, saved[1])


def test_the_sweep_on_an_object_store_leaves_foreign_objects(tmp_path):
    url = f"memory://hostile-sweep-{os.getpid()}"
    fs, path = fsspec.core.url_to_fs(url)
    with ckpt.CheckpointManager(url, incremental=True) as mgr:
        mgr.save(1, data={"big": torch.ones(BIG)}, rng=False)
    fs.pipe_file(f"{path}/{BLOB_DIR}/notes.txt", b"mine")
    fs.pipe_file(f"{path}/{BLOB_DIR}/{blob_file_name('e' * 32)}", b"old")
    with ckpt.CheckpointManager(url, incremental=True, keep_last=1) as mgr:
        mgr.save(2, data={"big": torch.zeros(BIG)}, rng=False)
    names = {n.rsplit("/", 1)[-1] for n in fs.ls(f"{path}/{BLOB_DIR}", detail=False)}
    assert "notes.txt" in names and blob_file_name("e" * 32) not in names
    assert len(names) == 2  # the notes and step 2's blob
    fs.rm(path, recursive=True)


def test_copying_a_step_with_a_damaged_blob_fails_naming_it(tmp_path, capsys):
    root = tmp_path / "run"
    save_steps(root, (1, 2))
    key = key_of(root, 2, "data/w")
    path = blob_path(root, key)
    path.write_bytes(path.read_bytes()[:-1] + b"\x01")
    code, text = cli(capsys, "copy", f"{root}:2", tmp_path / "dst")
    assert code == 1 and blob_file_name(key) in text
    assert ckpt.CheckpointReader(tmp_path / "dst").all_steps() == []
    code, text = cli(capsys, "copy", f"{root}:1", tmp_path / "dst")
    assert code == 0, text
    ckpt.CheckpointReader(tmp_path / "dst").verify(1)


@pytest.mark.parametrize("damage", ["truncated", "symlink"])
def test_a_copy_replaces_a_damaged_blob_the_target_already_has(tmp_path, capsys, damage):
    root, dst = tmp_path / "run", tmp_path / "dst"
    saved = save_steps(root, (1, 2))
    code, text = cli(capsys, "copy", f"{root}:1", dst)
    assert code == 0, text
    key = key_of(root, 1)
    target = blob_path(dst, key)
    if damage == "truncated":
        target.write_bytes(target.read_bytes()[:100])
    else:
        os.remove(target)
        target.symlink_to(blob_path(root, key))
    code, text = cli(capsys, "copy", f"{root}:2", dst)
    assert code == 0, text
    reader = ckpt.CheckpointReader(dst)
    reader.verify(2)
    reader.verify(1)  # the same bytes: step 1 is whole again
    _, live = restore(dst, 2)
    assert_same_state(live, saved[2])
    ckpt.CheckpointReader(root).verify(1)  # the link's target is untouched


def test_a_raw_os_error_reading_a_manifest_at_the_first_sweep_deletes_nothing(
    tmp_path, monkeypatch
):
    root = tmp_path / "run"
    save_steps(root, (1, 2))
    (root / BLOB_DIR / blob_file_name("e" * 32)).write_bytes(b"unreferenced")
    before = set(os.listdir(root / BLOB_DIR))
    opened = ckpt.storage.local.LocalStorage.open_read

    def denied(self, *parts):
        if parts == (step_dir_name(1), "manifest.json"):
            raise PermissionError(13, "Permission denied", "manifest.json")
        return opened(self, *parts)

    monkeypatch.setattr(ckpt.storage.local.LocalStorage, "open_read", denied)
    with bounded(), ckpt.CheckpointManager(root, incremental=True) as mgr:
        mgr.save(3, data={"other": torch.ones(BIG)}, rng=False)
    assert before <= set(os.listdir(root / BLOB_DIR))
    monkeypatch.undo()
    for step in (1, 2, 3):
        ckpt.CheckpointReader(root).verify(step)


def test_sharing_counts_a_blob_referenced_twice_in_one_step_once(tmp_path):
    same = torch.arange(BIG, dtype=torch.float32)
    with ckpt.CheckpointManager(tmp_path, incremental=True) as mgr:
        mgr.save(1, data={"a": same, "b": same.clone(), "c": torch.ones(BIG)}, rng=False)
        mgr.save(2, data={"a": same, "c": torch.zeros(BIG)}, rng=False)
    reader = ckpt.CheckpointReader(tmp_path)
    m1, m2 = (reader.manifest(s)[1] for s in (1, 2))
    nbytes = reader.describe(1).nbytes
    alone = describe_sharing(m1, [])
    assert (alone.shared_nbytes, alone.own_nbytes, alone.shared_with) == (0, nbytes, ())
    both = describe_sharing(m1, [m1, m2])
    blob = doc_of(tmp_path, 1)["blobs"][key_of(tmp_path, 1, "data/a")]["size"]
    assert (both.shared_nbytes, both.own_nbytes, both.shared_with) == (blob, nbytes - blob, (2,))


def test_a_blob_rotted_in_place_is_written_anew_not_referenced(tmp_path):
    root = tmp_path / "run"
    saved = save_steps(root, (1,))
    path = blob_path(root, key_of(root, 1))
    raw = bytearray(path.read_bytes())
    raw[-3] ^= 0x10  # same size: only the checksum tells
    path.write_bytes(bytes(raw))
    with pytest.raises(ckpt.CorruptCheckpointError, match="checksum"):
        ckpt.CheckpointReader(root).verify(1)
    with bounded(), ckpt.CheckpointManager(root, incremental=True) as mgr:
        mgr.save(2, data=saved[1], rng=False)
    reader = ckpt.CheckpointReader(root)
    reader.verify(2)
    reader.verify(1)  # the same bytes renamed over it: step 1 is whole again
    _, live = restore(root, 2)
    assert_same_state(live, saved[1])
