"""Incremental checkpoints (format version 4): each tensor stored once per root, every step whole.

Differential throughout: every restore is compared bit for bit (``torch.equal``,
dtype, device) with a copy of the live state taken at save time.
"""

from __future__ import annotations

import copy
import json
import os
import random
import signal
import struct
import subprocess
import sys

import fsspec
import incremental_worker
import pytest
import torch
from conftest import assert_same_state
from helpers import (
    blobs_on_disk,
    manifest_doc,
    read_manifest_doc,
    referenced_blobs,
    write_manifest,
)
from torch import nn

import ckpt
import ckpt.format.manifest
from ckpt.format.blobs import BLOB_DIR, blob_file_name
from ckpt.format.checksums import hash_bytes
from ckpt.format.names import step_dir_name

SEED = int(os.environ.get("CKPT_KILL_SEED", random.SystemRandom().randrange(2**32)))
KILL_TRIALS = 100
SLOW_KILL_TRIALS = 1000


@pytest.fixture(params=["local", "memory"])
def root(request, tmp_path) -> str:
    if request.param == "local":
        return str(tmp_path / "run")
    return f"memory://incremental-{os.getpid()}-{request.node.name}"


def usage(url: str) -> int:
    """The bytes of every file below the root except the writer lock."""
    fs, path = fsspec.core.url_to_fs(url)
    if not fs.exists(path):
        return 0
    return sum(
        info["size"]
        for name, info in fs.find(path, detail=True).items()
        if not name.endswith(".ckpt-writer.lock")
    )


# ----------------------------------------------------------- a 90 % frozen model


class Adapted(nn.Module):
    """A frozen base with a small trainable adapter: 90 % of the bytes never change."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.base = nn.Sequential(*(nn.Linear(384, 384, bias=False) for _ in range(3)))
        self.adapter = nn.Linear(384, 64, bias=False)  # with up: 1/10 of the bytes
        self.up = nn.Linear(64, 384, bias=False)
        self.base.requires_grad_(False)


def train_step(model: Adapted, ema: Adapted, step: int) -> None:
    with torch.no_grad():
        for p in (model.adapter.weight, model.up.weight):
            p.add_(torch.randn_like(p, generator=torch.Generator().manual_seed(step)))
        for mine, theirs in zip(ema.parameters(), model.parameters(), strict=True):
            if theirs.requires_grad:
                mine.mul_(0.9).add_(theirs, alpha=0.1)


def live_copy(**items: nn.Module) -> dict[str, dict[str, torch.Tensor]]:
    return {n: {k: v.clone() for k, v in m.state_dict().items()} for n, m in items.items()}


def frozen_fraction(model: nn.Module) -> float:
    total = sum(p.nbytes for p in model.parameters())
    return sum(p.nbytes for p in model.parameters() if not p.requires_grad) / total


def test_a_90_percent_frozen_model_writes_only_what_changed_and_restores_bitwise(root):
    model = Adapted()
    ema = copy.deepcopy(model)
    f = frozen_fraction(model)
    assert 0.89 < f < 0.91
    full = 2 * sum(p.nbytes for p in model.parameters())  # the model and its EMA copy
    saved = {}
    with ckpt.CheckpointManager(root, incremental=True) as mgr:
        for step in range(5):
            train_step(model, ema, step)
            before = usage(root)
            mgr.save(step, model=model, ema=ema, rng=False)
            added = usage(root) - before
            manifest = len(json.dumps(manifest_doc(root, step)))
            saved[step] = live_copy(model=model, ema=ema)
            if step == 0:  # the first save writes the frozen bytes once (the EMA shares them)
                assert added <= f * full / 2 + (1 - f) * full + 0.01 * full + manifest
            else:
                assert added <= (1 - f) * full + 0.01 * full + manifest, (step, added, full)
        mgr.close()
    pruner = ckpt.CheckpointWriter(root)
    pruner.prune(ckpt.policies.retention.RetentionPolicy(keep_last=1))
    pruner.close()
    reader = ckpt.CheckpointManager(root)
    assert reader.all_steps() == [4]
    reader.verify()
    fresh, fresh_ema = Adapted(), Adapted()
    nn.init.zeros_(fresh.base[0].weight)
    reader.restore(model=fresh, ema=fresh_ema, rng=False)
    assert_same_state(live_copy(model=fresh, ema=fresh_ema), saved[4])
    assert blobs_on_disk(root) == referenced_blobs(root, [4])  # nothing else is kept


def test_keep_best_and_keep_last_keeping_the_same_state_store_it_once(root):
    model = Adapted()
    with ckpt.CheckpointManager(
        root, incremental=True, keep_last=1, keep_best=1, best_metric="loss"
    ) as mgr:
        mgr.save(1, model=model, metrics={"loss": 0.1}, rng=False)
        best = live_copy(model=model)
        before = usage(root)
        mgr.save(2, model=model, metrics={"loss": 0.5}, rng=False)  # the same state again
        assert usage(root) - before <= len(json.dumps(manifest_doc(root, 2))) + 4096
        train_step(model, model, 3)
        mgr.save(3, model=model, metrics={"loss": 0.9}, rng=False)
        last = live_copy(model=model)
        assert mgr.all_steps() == [1, 3]
        for step, expected in ((1, best), (3, last)):
            fresh = Adapted()
            mgr.restore(step, model=fresh, rng=False)
            assert_same_state(live_copy(model=fresh), expected)
        assert blobs_on_disk(root) == referenced_blobs(root, [1, 3])


# ------------------------------------------------------------ in-place changes


def modify(way: str, model: Adapted, shared: torch.Tensor) -> None:
    if way == "data":
        model.base[0].weight.data[0, 0] += 1
    elif way == "data_assign":
        model.base[1].weight.data = model.base[1].weight.data * 2
    elif way == "no_grad":
        with torch.no_grad():
            model.base[2].weight.mul_(-1)
    elif way == "shared":
        shared[7] = 123.0


@pytest.mark.parametrize("way", ["data", "data_assign", "no_grad", "shared"])
def test_a_tensor_modified_in_place_is_never_taken_for_the_old_one(root, way):
    model = Adapted()
    shared = torch.zeros(32768)
    saved = {}
    with ckpt.CheckpointManager(root, incremental=True) as mgr:
        for step in range(3):
            if step:
                modify(way, model, shared)
            mgr.save(step, model=model, a={"t": shared}, b={"t": shared}, rng=False)
            saved[step] = (live_copy(model=model), shared.clone())
        for step in range(3):
            fresh = Adapted()
            a, b = mgr.read(step)["a"], mgr.read(step)["b"]
            mgr.restore(step, model=fresh, rng=False)
            assert_same_state(live_copy(model=fresh), saved[step][0])
            assert_same_state(a["t"], saved[step][1])
            assert_same_state(b["t"], saved[step][1])


# ------------------------------------------------------------------ corruption


def test_a_corrupt_blob_fails_every_step_referencing_it_and_fallback_skips_exactly_those(
    tmp_path,
):
    root = str(tmp_path)
    frozen = torch.arange(32768, dtype=torch.float32)
    saved = {}
    with ckpt.CheckpointManager(root, incremental=True) as mgr:
        for step in range(4):
            if step == 2:
                frozen = frozen + 1  # steps 2 and 3 share a new blob
            state = {"frozen": frozen.clone(), "w": torch.full((16384,), float(step))}
            mgr.save(step, data=state, rng=False)
            saved[step] = state
    key = manifest_doc(root, 3)["tensors"]["data/frozen"]["blob"]
    assert key != manifest_doc(root, 1)["tensors"]["data/frozen"]["blob"]
    path = tmp_path / BLOB_DIR / blob_file_name(key)
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 1
    path.write_bytes(bytes(raw))
    reader = ckpt.CheckpointReader(root)
    for step in (2, 3):
        with pytest.raises(ckpt.CorruptCheckpointError, match="checksum") as e:
            reader.verify(step)
        assert str(path) in str(e.value)
    for step in (0, 1):
        reader.verify(step)
    with pytest.raises(ckpt.CorruptCheckpointError):
        ckpt.CheckpointManager(root).restore(data={}, rng=False)
    live = {"frozen": torch.zeros(32768), "w": torch.zeros(16384)}
    info = ckpt.CheckpointManager(root, fallback_to_intact=True).restore(data=live, rng=False)
    assert info.step == 1
    assert_same_state(live, saved[1])


def test_a_missing_blob_is_corruption_naming_the_blob_and_the_tensor(tmp_path):
    with ckpt.CheckpointManager(tmp_path, incremental=True) as mgr:
        mgr.save(1, data={"big": torch.ones(32768)}, rng=False)
    key = manifest_doc(str(tmp_path), 1)["tensors"]["data/big"]["blob"]
    os.remove(tmp_path / BLOB_DIR / blob_file_name(key))
    with pytest.raises(ckpt.CorruptCheckpointError, match="missing") as e:
        ckpt.CheckpointReader(tmp_path).verify(1)
    assert blob_file_name(key) in str(e.value) and "data/big" in str(e.value)
    # The next save writes the blob again rather than referencing what is gone.
    with ckpt.CheckpointManager(tmp_path, incremental=True) as mgr:
        mgr.save(2, data={"big": torch.ones(32768)}, rng=False)
    ckpt.CheckpointReader(tmp_path).verify(1)


# ---------------------------------------------------------------------- format


@pytest.fixture
def v4(tmp_path):
    with ckpt.CheckpointManager(tmp_path, incremental=True) as mgr:
        mgr.save(1, data={"big": torch.ones(32768), "small": torch.ones(4)}, rng=False)
    path = tmp_path / step_dir_name(1) / "manifest.json"
    doc = read_manifest_doc(path)
    assert doc["format_version"] == 4
    return path, doc


def test_v4_refuses_a_bad_key(v4):
    path, doc = v4
    doc["tensors"]["data/big"]["blob"] = "XYZ"
    write_manifest(path, doc)
    with pytest.raises(ckpt.CorruptCheckpointError, match="32 lower-case hex") as e:
        ckpt.CheckpointReader(path.parent.parent).verify(1)
    assert "tensors.data/big" in str(e.value) and "manifest.json" in str(e.value)


def test_v4_refuses_a_blob_not_listed(v4):
    path, doc = v4
    doc["tensors"]["data/big"]["blob"] = "0" * 32
    write_manifest(path, doc)
    with pytest.raises(ckpt.CorruptCheckpointError, match="not in 'blobs'") as e:
        ckpt.CheckpointReader(path.parent.parent).verify(1)
    assert "tensors.data/big" in str(e.value)


def test_v4_refuses_a_blob_whose_header_disagrees(v4):
    path, doc = v4
    key = doc["tensors"]["data/big"]["blob"]
    blob = path.parent.parent / BLOB_DIR / blob_file_name(key)
    header = json.dumps({"data": {"dtype": "I32", "shape": [32768], "data_offsets": [0, 131072]}})
    header += " " * (-len(header) % 8)
    raw = struct.pack("<Q", len(header)) + header.encode() + bytes(131072)
    blob.write_bytes(raw)
    doc["blobs"][key] = {"size": len(raw), "checksum": hash_bytes(raw)}
    write_manifest(path, doc)
    for check in ("verify", "read"):
        with pytest.raises(ckpt.CorruptCheckpointError, match="manifest says") as e:
            getattr(ckpt.CheckpointReader(path.parent.parent), check)(1)
        assert blob_file_name(key) in str(e.value) and "data/big" in str(e.value)


def test_readers_of_version_3_are_told_version_4_is_newer(v4, monkeypatch):
    path, _ = v4
    monkeypatch.setattr(ckpt.format.manifest, "FORMAT_VERSION", 3)
    with pytest.raises(ckpt.IncompatibleCheckpointError, match="newer"):
        ckpt.CheckpointReader(path.parent.parent).verify(1)


def test_a_non_incremental_save_is_not_version_4(tmp_path):
    with ckpt.CheckpointManager(tmp_path) as mgr:
        mgr.save(1, data={"big": torch.ones(32768)}, rng=False)
    assert read_manifest_doc(tmp_path / step_dir_name(1) / "manifest.json")["format_version"] == 1
    assert not (tmp_path / BLOB_DIR).exists()


def test_export_and_copy_write_self_contained_steps(tmp_path):
    state = {"big": torch.arange(32768.0), "frozen": torch.ones(32768), "small": torch.ones(4)}
    with ckpt.CheckpointManager(tmp_path / "a", incremental=True) as mgr:
        mgr.save(1, data=state, rng=False)
        mgr.save(2, data=state, rng=False)
    files = ckpt.export(tmp_path / "a", tmp_path / "out", item="data")
    from safetensors.torch import load_file

    exported = load_file(files[0])
    assert_same_state({k: exported[k] for k in state}, state)
    writer = ckpt.CheckpointWriter(tmp_path / "b")
    for step in (1, 2):
        writer.commit_copy(ckpt.storage.open_storage(str(tmp_path / "a")), step)
    writer.close()
    assert blobs_on_disk(str(tmp_path / "b")) == blobs_on_disk(str(tmp_path / "a"))
    for step in (1, 2):
        ckpt.CheckpointReader(tmp_path / "b").verify(step)
        assert_same_state(ckpt.CheckpointReader(tmp_path / "b").read(step)["data"], state)


# ------------------------------------------------------------- kills and races


def launch(context, root: str, kill_at: int | None) -> int:
    process = context.Process(target=incremental_worker.run, args=(root, kill_at))
    process.start()
    process.join(timeout=120)
    assert process.exitcode is not None, "worker hung"
    return process.exitcode


def check_root(root: str, context: str, finished: bool) -> list[int]:
    mgr = ckpt.CheckpointManager(root)
    steps = mgr.all_steps()
    for step in steps:
        mgr.verify(step)
        assert_same_state(mgr.read(step)["data"], incremental_worker.state(step)), context
    referenced = referenced_blobs(root, steps)
    present = blobs_on_disk(root)
    assert referenced <= present, f"{context}: referenced blobs removed"
    if finished:  # a completed run swept what the kills left behind
        assert present == referenced, f"{context}: orphans {sorted(present - referenced)}"
        assert len(steps) <= incremental_worker.KEEP_LAST, context
    return steps


def kill_trials(tmp_path, forkserver, trials: int) -> dict[str, int]:
    rng = random.Random(SEED)
    per_save = 12  # roughly the counted calls of one save and its retention
    counts = {"killed": 0, "finished": 0}
    run = 0
    root = str(tmp_path / f"run{run}")
    for trial in range(trials):
        code = launch(forkserver, root, rng.randint(1, 3 * per_save))
        assert code in (0, -signal.SIGKILL), code
        counts["killed" if code else "finished"] += 1
        context = f"trial {trial}, kill seed {SEED}"
        steps = check_root(root, context, finished=code == 0)
        if steps and steps[-1] == incremental_worker.STEPS - 1:
            run += 1  # done (if killed after the last commit, nothing is left to save)
            root = str(tmp_path / f"run{run}")
    return counts


def test_kills_at_random_points_of_saves_and_retention_lose_nothing(tmp_path, forkserver):
    counts = kill_trials(tmp_path, forkserver, KILL_TRIALS)
    assert counts["killed"] >= KILL_TRIALS // 2, counts


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_many_more_kills_at_random_points(tmp_path, forkserver):
    counts = kill_trials(tmp_path, forkserver, SLOW_KILL_TRIALS)
    assert counts["killed"] >= SLOW_KILL_TRIALS // 2, counts


def race(forkserver, root: str, operations: int) -> None:
    committed, stop = forkserver.Event(), forkserver.Event()
    writer = forkserver.Process(
        target=incremental_worker.save_in_a_loop, args=(root, committed, stop)
    )
    writer.start()
    seen = []
    try:
        assert committed.wait(60), "the writer never committed"
        mgr = ckpt.CheckpointManager(root)
        for i in range(operations):
            if i % 2:
                seen.append(mgr.verify().step)
            else:
                live = {
                    k: torch.zeros_like(v) if isinstance(v, torch.Tensor) else v
                    for k, v in incremental_worker.state(0).items()
                }
                info = mgr.restore(data=live, rng=False)
                assert_same_state(live, incremental_worker.state(info.step))
                seen.append(info.step)
    finally:
        stop.set()
        writer.join(60)
    assert writer.exitcode == 0
    assert seen == sorted(seen)
    assert len(set(seen)) > 1, "the writer made no progress while the reader read"


def test_a_reader_never_finds_bytes_missing_while_the_writer_prunes(forkserver, tmp_path):
    race(forkserver, str(tmp_path), 300)


@pytest.mark.slow
def test_a_reader_never_finds_bytes_missing_in_1000_operations(forkserver, tmp_path):
    race(forkserver, str(tmp_path), 1000)


def test_a_tier_receives_only_the_blobs_it_lacks_and_sweeps_its_own(tmp_path):
    fast, slow = str(tmp_path / "fast"), str(tmp_path / "slow")
    frozen = torch.arange(65536.0)
    with ckpt.CheckpointManager(
        fast, incremental=True, keep_last=1, tiers=[ckpt.Tier(slow, keep_last=2)]
    ) as mgr:
        for step in range(4):
            mgr.save(step, data={"frozen": frozen, "w": torch.full((32768,), step)}, rng=False)
            mgr.wait()
            key = manifest_doc(slow, step)["tensors"]["data/frozen"]["blob"]
            stat = os.stat(os.path.join(slow, BLOB_DIR, blob_file_name(key)))
            if step == 0:
                first = (stat.st_ino, stat.st_mtime_ns)
            assert (stat.st_ino, stat.st_mtime_ns) == first  # never sent again
    reader = ckpt.CheckpointReader(slow)
    assert reader.all_steps() == [2, 3]
    for step in (2, 3):
        reader.verify(step)
        data = reader.read(step)["data"]
        assert_same_state(data, {"frozen": frozen, "w": torch.full((32768,), step)})
    assert blobs_on_disk(slow) == referenced_blobs(slow, [2, 3])
    assert len(blobs_on_disk(slow)) == 3  # the frozen tensor once, and each step's own


def test_an_async_save_hashes_the_staged_copy_not_the_live_tensor(tmp_path):
    model = Adapted()
    with ckpt.CheckpointManager(tmp_path, incremental=True, async_save=True) as mgr:
        mgr.save(1, model=model, rng=False)
        saved = live_copy(model=model)
        with torch.no_grad():
            model.base[0].weight.add_(1)  # while the background save may still run
        mgr.wait()
        mgr.save(2, model=model, rng=False)
        mgr.wait()
        fresh = Adapted()
        mgr.restore(1, model=fresh, rng=False)
        assert_same_state(live_copy(model=fresh), saved)
        mgr.restore(2, model=fresh, rng=False)
        assert_same_state(live_copy(model=fresh), live_copy(model=model))


def test_a_failed_blob_write_fails_the_save_and_leaves_earlier_steps(tmp_path, monkeypatch):
    with ckpt.CheckpointManager(tmp_path, incremental=True) as mgr:
        mgr.save(1, data={"big": torch.ones(32768)}, rng=False)
        original = ckpt.storage.LocalStorage.write_file

        def full(self, parts, *args, **kwargs):
            if parts[0] == BLOB_DIR:
                raise OSError(28, "No space left on device")
            return original(self, parts, *args, **kwargs)

        monkeypatch.setattr(ckpt.storage.LocalStorage, "write_file", full)
        with pytest.raises(ckpt.CheckpointWriteError, match="No space") as e:
            mgr.save(2, data={"big": torch.zeros(32768)}, rng=False)
        assert BLOB_DIR in str(e.value)
        monkeypatch.undo()
        assert mgr.all_steps() == [1]
        mgr.save(2, data={"big": torch.zeros(32768)}, rng=False)
        assert_same_state(mgr.read(1)["data"], {"big": torch.ones(32768)})
        assert_same_state(mgr.read(2)["data"], {"big": torch.zeros(32768)})


@pytest.mark.s3
def test_incremental_saves_and_sweeps_on_s3(s3_bucket):
    bucket, options = s3_bucket
    url = f"s3://{bucket}/run"
    frozen = torch.arange(65536.0)
    with ckpt.CheckpointManager(url, incremental=True, keep_last=1, storage_options=options) as mgr:
        for step in range(3):
            mgr.save(step, data={"frozen": frozen, "w": torch.full((32768,), step)}, rng=False)
    reader = ckpt.CheckpointManager(url, storage_options=options)
    assert reader.all_steps() == [2]
    reader.verify()
    assert_same_state(reader.read()["data"], {"frozen": frozen, "w": torch.full((32768,), 2)})
    fs = fsspec.filesystem("s3", **options)
    blobs = {n.rsplit("/", 1)[-1] for n in fs.ls(f"{bucket}/run/{BLOB_DIR}", detail=False)}
    doc = json.loads(fs.cat_file(f"{bucket}/run/{step_dir_name(2)}/manifest.json"))
    assert blobs == {blob_file_name(k) for k in doc["blobs"]}


@pytest.mark.slow
def test_the_lora_example_resumes_identical():
    script = os.path.join(os.path.dirname(__file__), "..", "examples", "lora_finetune.py")
    command = [sys.executable, script, "--seed", "3"]
    done = subprocess.run(command, check=False, capture_output=True, text=True, timeout=600)
    # on MISMATCH, stdout names the tensors that differ and whether two uninterrupted runs agree
    output = f"stdout:\n{done.stdout}\nstderr:\n{done.stderr}"
    assert done.returncode == 0, output
    assert "IDENTICAL" in done.stdout, output
    saved = "the incremental save wrote   1.18 MiB; a full save writes  25.18 MiB"
    assert saved in done.stderr, output
