"""Incremental saves of a 2-rank group (format version 5): on S3, under a reader, corrupted.

The state of step ``s`` is known in advance (:func:`expected`): two frozen weights
holding the same bytes (one blob), one weight changing every second step and one
changing every step, plus small biases kept in the step's own files. The ranks
load it into a DDP or FSDP2 model, gather it back in full before each save (the
reference every restore is compared with: ``torch.equal``, dtype and device) and
save it with ``incremental=True``.

- On S3 (moto on loopback): each blob is written once across ranks and steps (the
  ranks count their blob writes), the store holds exactly the retained steps'
  blobs, and every retained step restores bitwise on the ranks and in one process.
- A reader process restores and verifies while the group saves and prunes with
  ``keep_last=1``: it never finds bytes missing. Some of its operations are held
  after reading a manifest until the group has pruned that step and swept its
  blobs (without biases a step's directory holds only its manifest, so the held
  read meets a missing blob): they must go on to the newer step.
- A corrupt blob shared by two steps: ``verify`` names it for both, and a
  collective restore with ``fallback_to_intact`` lands on the newest step not
  referencing it on every rank (FSDP2: a blob only one rank reads).

Functions named ``on_ranks_*`` run on the ranks.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import fsspec
import pytest
import torch
import torch.distributed as dist
from conftest import assert_same_state
from dist_training import full_model_state, wrap
from helpers import blobs_on_disk, manifest_doc, referenced_blobs
from torch import nn

import ckpt
from ckpt.format.blobs import BLOB_DIR, blob_file_name

WIDTH = 256  # a 256 x 256 float32 weight is 256 KiB: its FSDP2 halves (128 KiB) are blobs too
LAYERS = 4


def version(layer: int, step: int) -> int:
    """Which values ``layer``'s weight holds at ``step``: 0 and 1 frozen alike, 2 every other."""
    return (0, 0, step // 2, step)[layer]


def expected(step: int, bias: bool = True) -> dict[str, torch.Tensor]:
    """The full model state of step ``step`` (without biases: every tensor is a blob)."""
    state = {}
    for layer in range(LAYERS):
        v = version(layer, step)
        gen = torch.Generator().manual_seed(1000 * (layer if layer >= 2 else 0) + v)
        state[f"{layer}.weight"] = torch.randn(WIDTH, WIDTH, generator=gen)
        if bias:
            state[f"{layer}.bias"] = torch.full((WIDTH,), float(step + layer))
    return state


def plain_model(bias: bool = True) -> nn.Module:
    """The model, unwrapped, with values matching no step."""
    torch.manual_seed(12345)
    return nn.Sequential(*(nn.Linear(WIDTH, WIDTH, bias=bias) for _ in range(LAYERS)))


def group_model(how: str, bias: bool = True) -> nn.Module:
    """The model on the ranks: ``"ddp"`` (replicated) or ``"fsdp"`` (FSDP2, sharded)."""
    return wrap(plain_model(bias), how)


def load(model: nn.Module, step: int, bias: bool = True) -> dict[str, torch.Tensor]:
    """Load step ``step``'s state into the ranks' model; return it gathered back in full."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    options = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, expected(step, bias), options=options)  # which it distributes
    full = full_model_state(model)
    assert_same_state(full, expected(step, bias))
    return full


def distinct_weights(steps: list[int]) -> set[tuple[int, int]]:
    """The distinct large tensors of ``steps``: ``(seed layer, version)`` pairs."""
    return {
        (layer if layer >= 2 else 0, version(layer, s)) for s in steps for layer in range(LAYERS)
    }


def restore_in_one_process(
    url: str, step: int | None, bias: bool = True, **kwargs: Any
) -> tuple[int, nn.Module]:
    """Restore ``step`` (the latest if None) into a plain model in this process."""
    model = plain_model(bias)
    info = ckpt.CheckpointManager(url, process_group=False, **kwargs).restore(
        step, model=model, rng=False
    )
    assert info is not None
    return info.step, model


# ----------------------------------------------------------------------- S3


def on_ranks_save_counting_blob_writes(
    rank: int, world: int, url: str, options: dict[str, Any], how: str, saves: int
) -> dict[str, Any]:
    """Save steps ``0 .. saves-1`` with ``keep_last=2``, counting this rank's blob writes.

    Then restore every retained step into a fresh model on the ranks. Returns the
    writes per save, the full states gathered before each save, the retained steps
    and what each restore gave back.
    """
    from ckpt.distributed import writing

    model = group_model(how)
    real = writing.write_blob
    writes: list[int] = []

    def counting(*args: Any) -> Any:
        writes[-1] += 1
        return real(*args)

    gathered = {}
    writing.write_blob = counting  # type: ignore[assignment]
    try:
        with ckpt.CheckpointManager(
            url, storage_options=options, incremental=True, keep_last=2
        ) as mgr:
            for step in range(saves):
                gathered[step] = load(model, step)
                writes.append(0)
                mgr.save(step, model=model, rng=False)
            steps = mgr.all_steps()
    finally:
        writing.write_blob = real
    restored = {}
    with ckpt.CheckpointManager(url, storage_options=options) as mgr:
        for step in steps:
            fresh = group_model(how)
            info = mgr.restore(step, model=fresh, rng=False)
            assert info is not None and info.step == step
            restored[step] = full_model_state(fresh)
    return {"writes": writes, "gathered": gathered, "steps": steps, "restored": restored}


@pytest.mark.s3
@pytest.mark.distributed
@pytest.mark.parametrize("how", ["ddp", pytest.param("fsdp", marks=pytest.mark.slow)])
def test_two_ranks_on_s3_write_each_blob_once_across_ranks_and_steps_and_restore_bitwise(
    rank_pool, s3_bucket, how
):
    bucket, options = s3_bucket
    url, saves = f"s3://{bucket}/run", 4
    outcomes = rank_pool.run(on_ranks_save_counting_blob_writes, url, options, how, saves)
    per_blob = 1 if how == "ddp" else 2  # a replicated weight once; FSDP2: a blob per half
    for step in range(saves):
        new = distinct_weights([step]) - distinct_weights(list(range(step)))
        total = sum(o["writes"][step] for o in outcomes)
        assert total == len(new) * per_blob, (step, [o["writes"] for o in outcomes])
    if how == "fsdp":  # each rank writes its own halves
        assert outcomes[0]["writes"] == outcomes[1]["writes"]
    kept = [saves - 2, saves - 1]
    assert all(o["steps"] == kept for o in outcomes)
    # The store holds exactly the retained steps' blobs: the others were swept.
    names = blobs_on_disk(url, options)
    assert names == referenced_blobs(url, kept, options)
    assert len(names) == len(distinct_weights(kept)) * per_blob
    for step in kept:
        assert manifest_doc(url, step, options)["format_version"] == 5
        for o in outcomes:
            assert_same_state(o["restored"][step], o["gathered"][step])
            assert_same_state(o["gathered"][step], outcomes[0]["gathered"][step])
        ckpt.CheckpointReader(url, storage_options=options).verify(step)
        got, model = restore_in_one_process(url, step, storage_options=options)
        assert got == step
        assert_same_state(dict(model.state_dict()), outcomes[0]["gathered"][step])


# --------------------------------------------------- a reader while the group prunes


def on_ranks_save_until_stopped(
    rank: int, world: int, root: str, how: str, bias: bool, stop: str, limit: int
) -> dict[str, Any]:
    """Save steps with ``keep_last=1`` until ``stop`` exists (agreed by the ranks) or ``limit``."""
    model = group_model(how, bias)
    step = 0
    with ckpt.CheckpointManager(root, incremental=True, keep_last=1) as mgr:
        while step < limit:
            load(model, step, bias)
            mgr.save(step, model=model, rng=False)
            step += 1
            done = torch.tensor([int(os.path.exists(stop))])
            dist.all_reduce(done, op=dist.ReduceOp.MAX)  # both ranks stop after the same save
            if done.item():
                break
        steps = mgr.all_steps()
    return {"saves": step, "steps": steps}


def hold_after_reading_manifests(held: list[list[int]]) -> Callable[[], None]:
    """Make the next manifest read wait until the group has pruned that step; call to arm.

    The operation then reads a step whose files and blobs retention and the sweep
    deleted after it read the manifest: it must find the newer step, never fail.
    Appends ``[step held, step the operation ended on]`` to ``held`` (the second
    filled in by the caller).
    """
    from ckpt.reading.steps import StepReader

    real = StepReader.manifest
    armed = [False]

    def holding(self: StepReader, step: int | None) -> Any:
        found = real(self, step)
        if armed[0] and found is not None:
            armed[0] = False
            k = found[1].step
            for _ in range(6000):  # save k + 2 committed: k pruned and swept (a minute at most)
                latest = self.latest_step()
                if latest is not None and latest >= k + 2:
                    break
                time.sleep(0.01)
            held.append([k])
        return found

    StepReader.manifest = holding  # type: ignore[method-assign]

    def arm() -> None:
        armed[0] = True

    return arm


def read_while_saving(
    root: str, bias: bool, operations: int, hold_every: int, stop: str, result: str
) -> None:
    """Restore and verify the latest step ``operations`` times; then create ``stop``.

    Every ``hold_every``-th operation is held after reading its manifest until the
    group has pruned that step (:func:`hold_after_reading_manifests`). Goes on (up
    to 10 x ``operations``) until it has seen 2 steps. Writes what it saw, and every
    error, as JSON to ``result``.
    """
    seen: list[int] = []
    errors: list[str] = []
    mismatches: list[str] = []
    held: list[list[int]] = []
    try:
        arm = hold_after_reading_manifests(held)
        mgr = ckpt.CheckpointManager(root, process_group=False)
        for _ in range(6000):  # until the group's first commit (a minute at most)
            if mgr.latest_step() is not None:
                break
            time.sleep(0.01)
        i = 0
        while i < operations or (len(set(seen)) < 2 and i < 10 * operations):
            holding = i % hold_every == hold_every - 1
            if holding:
                arm()
            try:
                if i % 2:
                    seen.append(mgr.verify().step)
                else:
                    model = plain_model(bias)
                    info = mgr.restore(model=model, rng=False)
                    assert info is not None
                    seen.append(info.step)
                    try:
                        assert_same_state(dict(model.state_dict()), expected(info.step, bias))
                    except AssertionError as e:
                        mismatches.append(f"step {info.step}: {e}")
                if holding:
                    held[-1].append(seen[-1])
            except Exception as e:
                errors.append(f"operation {i}: {type(e).__name__}: {e}")
            i += 1
    finally:
        Path(stop).touch()
        report = {"seen": seen, "errors": errors, "bad": mismatches, "held": held}
        Path(result).write_text(json.dumps(report))


def race(
    forkserver: Any,
    rank_pool: Any,
    tmp_path: Path,
    how: str,
    bias: bool,
    operations: int,
    hold_every: int,
) -> None:
    root, stop, result = str(tmp_path / "run"), str(tmp_path / "stop"), tmp_path / "seen.json"
    reader = forkserver.Process(
        target=read_while_saving, args=(root, bias, operations, hold_every, stop, result)
    )
    reader.start()
    try:
        limit = 50 * operations
        outcomes = rank_pool.run(
            on_ranks_save_until_stopped, root, how, bias, stop, limit, timeout=60 + operations
        )
    finally:
        Path(stop).touch()
        reader.join(120)
        if reader.is_alive():
            reader.kill()
    assert reader.exitcode == 0
    report = json.loads(result.read_text())
    assert report["errors"] == [], report["errors"][:5]
    assert report["bad"] == [], report["bad"][:5]
    seen = report["seen"]
    assert len(seen) >= operations
    assert seen == sorted(seen)
    assert len(set(seen)) > 1, "the group made no progress while the reader read"
    # Each held operation read a pruned step's manifest, and went on to a newer step.
    assert len(report["held"]) >= operations // hold_every, report["held"]
    assert all(len(h) == 2 and h[1] >= h[0] + 2 for h in report["held"]), report["held"]
    last = outcomes[0]["saves"] - 1
    assert [o["steps"] for o in outcomes] == [[last], [last]]
    assert blobs_on_disk(root) == referenced_blobs(root, [last])
    got, model = restore_in_one_process(root, None, bias)
    assert got == last
    assert_same_state(dict(model.state_dict()), expected(last, bias))


@pytest.mark.distributed
def test_a_reader_never_finds_bytes_missing_while_two_ranks_save_and_prune(
    forkserver, rank_pool, tmp_path
):
    race(forkserver, rank_pool, tmp_path, "fsdp", False, 100, 10)


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.timeout(1800)
@pytest.mark.parametrize(("how", "bias"), [("ddp", True), ("fsdp", False)])
def test_a_reader_never_finds_bytes_missing_in_1000_operations_on_two_ranks(
    forkserver, rank_pool, tmp_path, how, bias
):
    race(forkserver, rank_pool, tmp_path, how, bias, 1000, 50)


# ------------------------------------------------------------- a corrupt shared blob


def on_ranks_save_steps(
    rank: int, world: int, url: str, options: dict[str, Any] | None, how: str, saves: int
) -> list[Any]:
    """Save steps ``0 .. saves-1``; the full states gathered before each save."""
    model = group_model(how)
    gathered = []
    with ckpt.CheckpointManager(url, incremental=True, storage_options=options) as mgr:
        for step in range(saves):
            gathered.append(load(model, step))
            mgr.save(step, model=model, rng=False)
    return gathered


def on_ranks_restore_with_fallback(
    rank: int, world: int, url: str, options: dict[str, Any] | None, how: str
) -> dict[str, Any]:
    """Restore with ``fallback_to_intact``: the step, the full state, or the error."""
    model = group_model(how)
    try:
        with ckpt.CheckpointManager(url, fallback_to_intact=True, storage_options=options) as mgr:
            info = mgr.restore(model=model, rng=False)
    except Exception as e:
        return {"error": f"{type(e).__name__}: {e}"}
    return {"step": None if info is None else info.step, "state": full_model_state(model)}


def shared_blob(
    url: str, options: dict[str, Any] | None, how: str, shared_by: list[int], not_by: list[int]
) -> str:
    """A blob of weight 2 referenced by the steps ``shared_by`` and by none of ``not_by``.

    FSDP2: the blob of rank 1's half (only rank 1 reads it in a collective restore).
    """
    chunks = manifest_doc(url, shared_by[0], options)["tensors"]["model/2.weight"]["chunks"]
    chunk = chunks[-1]
    if how == "fsdp":
        assert len(chunks) == 2 and chunk["offsets"][0] == WIDTH // 2
    key: str = chunk["blob"]
    assert all(key in manifest_doc(url, s, options)["blobs"] for s in shared_by)
    assert all(key not in manifest_doc(url, s, options)["blobs"] for s in not_by)
    return blob_file_name(key)


@pytest.mark.distributed
@pytest.mark.parametrize(
    ("where", "how"),
    [("local", "ddp"), ("local", "fsdp"), pytest.param("s3", "fsdp", marks=pytest.mark.s3)],
)
def test_a_corrupt_shared_blob_fails_each_step_referencing_it_and_the_group_falls_back(
    rank_pool, tmp_path, request, where, how
):
    if where == "s3":
        bucket, options = request.getfixturevalue("s3_bucket")
        url: str = f"s3://{bucket}/run"
    else:
        url, options = str(tmp_path / "run"), None
    gathered = rank_pool.run(on_ranks_save_steps, url, options, how, 4)
    # Weight 2 changes at step 2: steps 2 and 3 share its new blob, steps 0 and 1 the old.
    name = shared_blob(url, options, how, [2, 3], [0, 1])
    fs, path = fsspec.core.url_to_fs(url, **(options or {}))
    blob = f"{path}/{BLOB_DIR}/{name}"
    raw = bytearray(fs.cat_file(blob))
    raw[-5] ^= 0x10
    fs.pipe_file(blob, bytes(raw))
    reader = ckpt.CheckpointReader(url, storage_options=options)
    for step in (2, 3):
        with pytest.raises(ckpt.CorruptCheckpointError) as e:
            reader.verify(step)
        assert name in str(e.value)
    for step in (0, 1):
        assert reader.verify(step).step == step
    outcomes = rank_pool.run(on_ranks_restore_with_fallback, url, options, how)
    for rank, outcome in enumerate(outcomes):
        assert outcome.get("step") == 1, outcome.get("error")
        assert_same_state(outcome["state"], gathered[rank][1])
        assert_same_state(outcome["state"], expected(1))
    got, model = restore_in_one_process(url, None, fallback_to_intact=True, storage_options=options)
    assert got == 1
    assert_same_state(dict(model.state_dict()), gathered[0][1])
