"""Incremental saves in a process group (issue 20, format version 5): blobs written once.

DDP and FSDP2 models with most of their bytes frozen save several steps with
``incremental=True`` on 2 ranks: the bytes each save adds to the root stay within
the changed bytes + 1 % + the manifests; a replicated tensor's blob is written once
across ranks and steps (the blob files are counted); after ``keep_last=1`` the
newest step restores bitwise into fresh models on the ranks and into one process;
a corrupt blob fails the restore on every rank with the same error class.
Functions named ``on_ranks_*`` run on the ranks.
"""

from __future__ import annotations

import dataclasses
import os
import signal
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import assert_same_state
from dist_training import full_model_state, full_optimizer_state, wrap
from test_format_v3 import doc_of, raw_of, sharded_manifest
from torch import nn

import ckpt
import ckpt.format.manifest
from ckpt.format import FORMAT_VERSION, FileRecord, decode_manifest, encode_manifest
from ckpt.format import bounds as format_bounds
from ckpt.format.blobs import BLOB_DIR, ref_key
from ckpt.format.sharded import chunk_ref

KEY = "0123456789abcdef" * 2

WIDTH = 256  # a 256 x 256 float32 weight is 256 KiB: its FSDP2 halves are blobs too
LAYERS = 10
FROZEN = 9


def _model(how: str, seed: int) -> tuple[nn.Module, torch.optim.Optimizer]:
    """``LAYERS`` linear layers, the first ``FROZEN`` frozen; AdamW on the rest."""
    torch.manual_seed(seed)
    plain = nn.Sequential(*(nn.Linear(WIDTH, WIDTH) for _ in range(LAYERS)))
    for layer in list(plain)[:FROZEN]:
        layer.requires_grad_(False)
    model = wrap(plain, how)
    trainable = [p for p in model.parameters() if p.requires_grad]
    return model, torch.optim.AdamW(trainable, lr=0.01)


def _step(model: nn.Module, optimizer: torch.optim.Optimizer, step: int, rank: int) -> None:
    gen = torch.Generator().manual_seed(100 * step + rank)
    x = torch.randn(4, WIDTH, generator=gen)
    optimizer.zero_grad()
    model(x).square().mean().backward()
    optimizer.step()


def _root_bytes(root: Path) -> tuple[int, int]:
    """Bytes of every file in the root, and of its manifests alone."""
    files = [p for p in root.rglob("*") if p.is_file() and not p.name.startswith(".ckpt-writer")]
    return sum(p.stat().st_size for p in files), sum(
        p.stat().st_size for p in files if p.name == "manifest.json"
    )


def _tensors(state: dict[str, Any]) -> dict[str, torch.Tensor]:
    flat: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if isinstance(value, dict):
            flat.update({f"{key}.{k}": v for k, v in _tensors(value).items()})
        elif isinstance(value, torch.Tensor):
            flat[key] = value
    return flat


def _full(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    return {"model": full_model_state(model), "optimizer": full_optimizer_state(model, optimizer)}


def on_ranks_save_incrementally(
    rank: int, world: int, root: str, full_root: str, how: str, saves: int, async_save: bool = False
) -> dict[str, Any]:
    """Train and save ``saves`` steps incrementally (and each also in full elsewhere).

    Returns, per save, the root's bytes before and after and the full states gathered
    before the save, then the blob files after a last save with ``keep_last=1``.
    """
    model, optimizer = _model(how, seed=3)
    records: list[dict[str, Any]] = []
    with (
        ckpt.CheckpointManager(root, incremental=True, async_save=async_save) as mgr,
        ckpt.CheckpointManager(full_root, keep_last=1) as full_mgr,
    ):
        for step in range(saves):
            _step(model, optimizer, step, rank)
            full = _full(model, optimizer)
            before = _root_bytes(Path(root))
            mgr.save(step, model=model, optimizer=optimizer, rng=False)
            mgr.wait()
            after = _root_bytes(Path(root))
            full_mgr.save(step, model=model, optimizer=optimizer, rng=False)
            full_bytes = _root_bytes(Path(full_root))
            blobs = sorted(p.name for p in (Path(root) / BLOB_DIR).iterdir())
            record = {"before": before, "after": after, "full": full_bytes, "blobs": blobs}
            records.append({**record, "state": full})
    _step(model, optimizer, saves, rank)
    last = _full(model, optimizer)
    with ckpt.CheckpointManager(root, incremental=True, keep_last=1) as mgr:
        mgr.save(saves, model=model, optimizer=optimizer, rng=False)
        steps = mgr.all_steps()
    blobs = sorted(p.name for p in (Path(root) / BLOB_DIR).iterdir())
    return {"records": records, "last": last, "steps": steps, "blobs": blobs}


def on_ranks_restore(rank: int, world: int, root: str, how: str) -> dict[str, Any]:
    """Restore the latest step into a fresh model; its full state, or the error."""
    model, optimizer = _model(how, seed=99)
    try:
        with ckpt.CheckpointManager(root, incremental=True) as mgr:
            info = mgr.restore(model=model, optimizer=optimizer)
    except Exception as e:
        return {"error": type(e).__name__, "message": str(e)}
    assert info is not None
    return {"step": info.step, "state": _full(model, optimizer)}


def _exact(a: dict[str, Any], b: dict[str, Any]) -> None:
    assert set(a) == set(b)
    for key, value in a.items():
        assert_same_state(value, b[key], key)


def _large(state: dict[str, Any]) -> dict[str, torch.Tensor]:
    return {
        k: t for k, t in _tensors(state).items() if t.nbytes >= format_bounds.MIN_BLOB_BYTES // 2
    }


@pytest.mark.distributed
@pytest.mark.parametrize(("how", "async_save"), [("ddp", False), ("fsdp", False), ("fsdp", True)])
def test_incremental_saves_on_two_ranks_write_each_blob_once_and_restore_bitwise(
    rank_pool, tmp_path, how, async_save
):
    root, full_root = tmp_path / "inc", tmp_path / "full"
    saves = 3
    outcomes = rank_pool.run(
        on_ranks_save_incrementally, str(root), str(full_root), how, saves, async_save
    )
    result = outcomes[0]
    records = result["records"]
    for r, previous in zip(records[1:], records, strict=False):
        old, new = _tensors(previous["state"]), _tensors(r["state"])
        changed = sum(t.nbytes for k, t in new.items() if not torch.equal(t, old[k]))
        full_total, _ = r["full"]
        added = r["after"][0] - r["before"][0]
        manifests = r["after"][1] - r["before"][1]
        assert changed < 0.3 * full_total  # most bytes are frozen
        assert added <= changed + 0.01 * full_total + manifests, (added, changed, full_total)
    # Each large tensor once: a blob per distinct large tensor (FSDP2: one per half).
    per_blob = 1 if how == "ddp" else 2
    large = _large(records[0]["state"])
    distinct_first = len({(t.dtype, t.shape, t.numpy().tobytes()) for t in large.values()})
    assert len(records[0]["blobs"]) == distinct_first * per_blob
    for r, previous in zip(records[1:], records, strict=False):
        old, new = _large(previous["state"]), _large(r["state"])
        fresh = sum(1 for k, t in new.items() if not torch.equal(t, old[k]))
        assert len(r["blobs"]) == len(previous["blobs"]) + fresh * per_blob
    assert result["steps"] == [saves]
    last_large = _large(result["last"])
    assert len(result["blobs"]) == len(last_large) * per_blob  # the swept store: step 3's only
    manifest = (root / f"step_{saves:012d}" / "manifest.json").read_bytes()
    assert b'"format_version":5' in manifest
    # Restored bitwise on the ranks, and in one process.
    restored = rank_pool.run(on_ranks_restore, str(root), how)
    for o in restored:
        assert o["step"] == saves
        _exact(o["state"]["model"], result["last"]["model"])
        _exact(o["state"]["optimizer"], result["last"]["optimizer"])
    plain, optimizer = _model("none", seed=42)
    with ckpt.CheckpointManager(root, process_group=False) as mgr:
        info = mgr.restore(model=plain, optimizer=optimizer)
    assert info is not None and info.step == saves
    _exact(_full(plain, optimizer)["model"], result["last"]["model"])
    _exact(_full(plain, optimizer)["optimizer"], result["last"]["optimizer"])
    assert ckpt.CheckpointReader(root).verify(saves) is not None
    assert ckpt.CheckpointReader(root).describe(saves).format_version == 5


@pytest.mark.distributed
def test_a_corrupt_blob_fails_the_restore_on_every_rank_alike(rank_pool, tmp_path):
    root, full_root = tmp_path / "inc", tmp_path / "full"
    rank_pool.run(on_ranks_save_incrementally, str(root), str(full_root), "ddp", 1)
    blob = sorted((root / BLOB_DIR).iterdir())[0]
    data = bytearray(blob.read_bytes())
    data[-3] ^= 0xFF
    blob.write_bytes(bytes(data))
    outcomes = rank_pool.run(on_ranks_restore, str(root), "ddp")
    assert [o.get("error") for o in outcomes] == ["CorruptCheckpointError"] * 2
    with pytest.raises(ckpt.CorruptCheckpointError):
        ckpt.CheckpointReader(root).verify(1)


def on_ranks_blob_write_fails(rank: int, world: int, root: str) -> dict[str, Any]:
    """Save step 0; then step 1 with rank 1 unable to write blobs; what each rank saw."""
    from ckpt.distributed import writing

    model, optimizer = _model("ddp", seed=3)
    with ckpt.CheckpointManager(root, incremental=True) as mgr:
        _step(model, optimizer, 0, rank)
        mgr.save(0, model=model, optimizer=optimizer, rng=False)
        expected = _full(model, optimizer)
        _step(model, optimizer, 1, rank)
        real = writing.write_blob

        def failing(*args: Any) -> Any:
            raise OSError(28, "No space left on device")

        if rank == 1:
            writing.write_blob = failing  # type: ignore[assignment]
        try:
            mgr.save(1, model=model, optimizer=optimizer, rng=False)
            outcome: dict[str, Any] = {"error": None}
        except Exception as e:
            outcome = {"error": type(e).__name__, "message": str(e)}
        finally:
            writing.write_blob = real
        outcome["steps"] = mgr.all_steps()
    outcome["expected"] = expected
    return outcome


@pytest.mark.distributed
def test_a_rank_failing_to_write_a_blob_fails_the_save_everywhere_and_step_0_restores(
    rank_pool, tmp_path
):
    root = tmp_path / "inc"
    outcomes = rank_pool.run(on_ranks_blob_write_fails, str(root))
    assert [o["error"] for o in outcomes] == ["CheckpointWriteError"] * 2
    assert all("rank 1" in o["message"] and "No space" in o["message"] for o in outcomes)
    assert all(o["steps"] == [0] for o in outcomes)
    restored = rank_pool.run(on_ranks_restore, str(root), "ddp")
    for o in restored:
        assert o["step"] == 0
        _exact(o["state"]["model"], outcomes[0]["expected"]["model"])
        _exact(o["state"]["optimizer"], outcomes[0]["expected"]["optimizer"])


def on_ranks_die_after_a_blob(rank: int, world: int, root: str) -> str:
    """Save step 0; in step 1's save rank 1 is SIGKILLed right after writing its first blob."""
    from ckpt.distributed import writing

    model, optimizer = _model("fsdp", seed=3)
    mgr = ckpt.CheckpointManager(root, incremental=True, collective_timeout=20)
    _step(model, optimizer, 0, rank)
    mgr.save(0, model=model, optimizer=optimizer, rng=False)
    _step(model, optimizer, 1, rank)
    if rank == 1:
        real = writing.write_blob

        def write_then_die(*args: Any) -> Any:
            real(*args)
            os.kill(os.getpid(), signal.SIGKILL)

        writing.write_blob = write_then_die  # type: ignore[assignment]
    try:
        mgr.save(1, model=model, optimizer=optimizer, rng=False)
    except ckpt.CheckpointError as e:
        return f"{type(e).__name__}: {e}"
    return "saved"


def on_ranks_save_one(rank: int, world: int, root: str, step: int, seed: int) -> None:
    model, optimizer = _model("fsdp", seed=seed)
    _step(model, optimizer, step, rank)
    with ckpt.CheckpointManager(root, incremental=True) as mgr:
        mgr.save(step, model=model, optimizer=optimizer, rng=False)


def _referenced(root: Path) -> set[str]:
    """The blob file names the committed steps' manifests reference."""
    names = set()
    for step_dir in root.glob("step_*"):
        manifest = decode_manifest((step_dir / "manifest.json").read_bytes(), str(step_dir))
        for file in manifest.files:
            key = ref_key(file)
            if key is not None:
                names.add(f"{key}.safetensors")
    return names


@pytest.mark.distributed
def test_a_rank_killed_after_writing_a_blob_leaves_every_step_whole_and_the_orphan_is_swept(
    fresh_ranks, rank_pool, tmp_path
):
    root = tmp_path / "inc"
    outcomes = fresh_ranks(on_ranks_die_after_a_blob, 2, 90, args=(str(root),))
    assert outcomes[1].exitcode == -signal.SIGKILL
    assert outcomes[0].returned and not outcomes[0].timed_out, outcomes[0].error
    assert outcomes[0].result.startswith(("CollectiveError", "CheckpointWriteError"))
    present = {p.name for p in (root / BLOB_DIR).iterdir()}
    assert _referenced(root) < present  # the dead rank's blob, referenced by nothing
    rank_pool.run(on_ranks_save_one, str(root), 2, 7)
    assert ckpt.CheckpointManager(root, process_group=False).all_steps() == [0, 2]
    assert {p.name for p in (root / BLOB_DIR).iterdir()} == _referenced(root)
    for step in (0, 2):
        assert ckpt.CheckpointReader(root).verify(step).step == step


# ---------------------------------------------------------------- the format


def _v5() -> Any:
    """test_format_v3's manifest, the second chunk of ``model/w`` (and ``model/b``) in one blob."""
    manifest = sharded_manifest()
    section = manifest.sharded
    w, b = section.tensors["model/w"], section.tensors["model/b"]
    ref_w, ref_b = chunk_ref("model/w", (3, 0), KEY), chunk_ref("model/b", (0,), KEY)
    tensors = {
        **section.tensors,
        "model/w": dataclasses.replace(
            w, chunks=(w.chunks[0], dataclasses.replace(w.chunks[1], file=ref_w, begin=80))
        ),
        "model/b": dataclasses.replace(
            b, chunks=(dataclasses.replace(b.chunks[0], file=ref_b, begin=80),)
        ),
    }
    blob = FileRecord(200, "xxh3_64:00000000000000ff")
    files = {**manifest.files, ref_w: blob, ref_b: blob}
    return dataclasses.replace(
        manifest, files=files, sharded=dataclasses.replace(section, tensors=tensors)
    )


def test_v5_round_trips_and_lists_each_blob_once():
    manifest = _v5()
    doc = doc_of(manifest)
    assert doc["format_version"] == 5 == FORMAT_VERSION
    assert doc["blobs"] == {KEY: {"size": 200, "checksum": "xxh3_64:00000000000000ff"}}
    assert doc["tensors"]["model/w"]["chunks"][1]["blob"] == KEY
    assert "file" not in doc["tensors"]["model/w"]["chunks"][1]
    assert all(not name.startswith(BLOB_DIR) for name in doc["files"])
    back = decode_manifest(raw_of(doc), "manifest.json")
    assert back.sharded == manifest.sharded
    assert back.files == manifest.files


def test_readers_of_version_4_are_told_version_5_is_newer(monkeypatch):
    monkeypatch.setattr(ckpt.format.manifest, "FORMAT_VERSION", 4)
    with pytest.raises(ckpt.IncompatibleCheckpointError, match="newer"):
        decode_manifest(encode_manifest(_v5()), "m.json")


@pytest.mark.parametrize(
    ("edit", "key", "why"),
    [
        (lambda d: d.update(format_version=3), "tensors.model/w.chunks[1]", "exactly the fields"),
        (lambda d: d["blobs"].clear(), "tensors.model/w.chunks[1]", "not in 'blobs'"),
        (
            lambda d: d["tensors"]["model/w"]["chunks"][1].update(blob="XY"),
            "tensors.model/w.chunks[1]",
            "32 lower-case hex",
        ),
        (
            lambda d: d["tensors"]["model/w"]["chunks"][1].update(file="rank0.safetensors"),
            "tensors.model/w.chunks[1]",
            "exactly the fields",
        ),
        (
            lambda d: d["tensors"]["model/w"]["chunks"][1].update(begin=160),
            "tensors.model/w.chunks[1]",
            "run past the end",
        ),
        (
            lambda d: d["ranks"][0]["tensors"]["own/big"].update(blob=KEY),
            "ranks[0].tensors.own/big",
            "version 4",
        ),
    ],
)
def test_v5_refuses_malformed_blob_chunks(edit, key, why):
    doc = doc_of(_v5())
    edit(doc)
    with pytest.raises(ckpt.CorruptCheckpointError, match=why) as info:
        decode_manifest(raw_of(doc), "m.json")
    assert info.value.key == key


def on_ranks_incremental_node_local(rank: int, world: int, root: str) -> str:
    try:
        ckpt.CheckpointManager(
            os.path.join(root, "{rank}"),
            tiers=[ckpt.Tier(os.path.join(root, "shared"))],
            incremental=True,
        )
    except ValueError as e:
        return str(e)
    return "built"


def test_incremental_with_node_local_roots_is_refused_when_the_manager_is_built(
    rank_pool, tmp_path
):
    for said in rank_pool.run(on_ranks_incremental_node_local, str(tmp_path)):
        assert "incremental=True" in said and "node-local" in said and "not supported" in said
