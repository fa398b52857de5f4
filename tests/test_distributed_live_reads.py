"""Collective restores read each checked chunk into live tensors from the very file checked.

Every rank checks (hashes) its chunks once and holds their files; once every
rank's checks passed, the ranks agree that those files are unchanged, then
read the checked bytes into the live tensors without hashing them again. A
file changed in place between the checks and the reads fails the restore on
every rank with nothing changed on any; a checkpoint deleted meanwhile still
loads what was checked from the held files. Files beyond the held limit are
closed and reopened only if still the same file. Functions named ``on_ranks_*``
run on the ranks.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
from conftest import assert_same_state
from dist_training import full_model_state, full_optimizer_state, make, train_step

import ckpt

pytestmark = pytest.mark.distributed

STEP_DIR = "step_000000000002"


def on_ranks_save(rank: int, world: int, root: str) -> dict[str, Any]:
    """Train FSDP2 three steps and save step 2; its full states."""
    model, optimizer, scheduler = make("fsdp")
    for step in range(3):
        train_step(model, optimizer, scheduler, step)
    with ckpt.CheckpointManager(root) as mgr:
        mgr.save(2, model=model, optimizer=optimizer)
    return {"model": full_model_state(model), "optimizer": full_optimizer_state(model, optimizer)}


def _flip_a_byte_in_place(path: Path) -> None:
    with open(path, "r+b") as f:  # the same file, size and name: only its identity tells
        f.seek(-3, 2)
        byte = f.read(1)[0]
        f.seek(-3, 2)
        f.write(bytes([byte ^ 0xFF]))


def on_ranks_restore_changed_between_passes(
    rank: int, world: int, root: str, change: str, held: bool
) -> dict[str, Any]:
    """Restore into trained objects; ``change`` the checkpoint after the checks, before the reads.

    ``"rewrite"``: rank 1 flips a byte of the shard file only it reads.
    ``"delete"``: rank 0 deletes the whole step. ``held=False``: no file is held
    open from the checks to the reads (each is closed and reopened).
    """
    from ckpt.distributed import restoring
    from ckpt.io import held_chunks

    model, optimizer, scheduler = make("fsdp", seed=5)
    train_step(model, optimizer, scheduler, 9)  # optimizer state of the same layout: read in place
    before = {"model": full_model_state(model), "optimizer": full_optimizer_state(model, optimizer)}
    apply, limit = restoring.apply_sharded_restore, held_chunks.held_files_limit
    step_dir = Path(root) / STEP_DIR

    def change_then_apply(*args: Any, **kwargs: Any) -> Any:
        if change == "rewrite" and rank == 1:
            _flip_a_byte_in_place(step_dir / "rank1_shards.safetensors")
        if change == "delete" and rank == 0:
            shutil.rmtree(step_dir)
        return apply(*args, **kwargs)

    restoring.apply_sharded_restore = change_then_apply  # type: ignore[assignment]
    if not held:
        held_chunks.held_files_limit = lambda: 0  # type: ignore[assignment]
    outcome: dict[str, Any] = {}
    try:
        with ckpt.CheckpointManager(root) as mgr:
            mgr.restore(model=model, optimizer=optimizer, rng=False)
    except ckpt.CheckpointError as e:
        outcome = {"error": type(e).__name__, "message": str(e)}
        outcome["applied"] = list(getattr(e, "applied", ["not a PartialRestoreError"]))
    finally:
        restoring.apply_sharded_restore = apply  # type: ignore[assignment]
        held_chunks.held_files_limit = limit  # type: ignore[assignment]
    after = {"model": full_model_state(model), "optimizer": full_optimizer_state(model, optimizer)}
    return {**outcome, "before": before, "after": after}


def _unchanged(outcome: dict[str, Any]) -> None:
    assert_same_state(outcome["before"], outcome["after"])


@pytest.mark.parametrize("held", [True, False], ids=["held", "reopened"])
def test_a_shard_rewritten_after_the_checks_fails_every_rank_and_changes_nothing(
    rank_pool, tmp_path, held
):
    rank_pool.run(on_ranks_save, str(tmp_path))
    outcomes = rank_pool.run(
        on_ranks_restore_changed_between_passes, str(tmp_path), "rewrite", held
    )
    for outcome in outcomes:
        assert outcome.get("error") == "PartialRestoreError", outcome.get("message")
        assert outcome["applied"] == []
        assert "rank1_shards" in outcome["message"]
        assert "changed after it was checked" in outcome["message"]
        _unchanged(outcome)


def test_a_step_deleted_after_the_checks_still_loads_what_was_checked(rank_pool, tmp_path):
    saved = rank_pool.run(on_ranks_save, str(tmp_path))
    outcomes = rank_pool.run(on_ranks_restore_changed_between_passes, str(tmp_path), "delete", True)
    assert not (tmp_path / STEP_DIR).exists()
    for rank, outcome in enumerate(outcomes):
        assert "error" not in outcome, outcome.get("message")
        assert_same_state(saved[rank]["model"], outcome["after"]["model"])
        assert_same_state(saved[rank]["optimizer"], outcome["after"]["optimizer"])


def test_a_step_deleted_after_the_checks_fails_every_rank_when_files_were_closed(
    rank_pool, tmp_path
):
    rank_pool.run(on_ranks_save, str(tmp_path))
    outcomes = rank_pool.run(
        on_ranks_restore_changed_between_passes, str(tmp_path), "delete", False
    )
    for outcome in outcomes:
        assert outcome.get("error") == "PartialRestoreError", outcome.get("message")
        assert outcome["applied"] == []
        _unchanged(outcome)


def on_ranks_restore_with_files_closed(rank: int, world: int, root: str) -> dict[str, Any]:
    """Restore into trained objects with no file held open from the checks to the reads."""
    from ckpt.io import held_chunks

    model, optimizer, scheduler = make("fsdp", seed=5)
    train_step(model, optimizer, scheduler, 9)
    limit = held_chunks.held_files_limit
    held_chunks.held_files_limit = lambda: 0  # type: ignore[assignment]
    try:
        with ckpt.CheckpointManager(root) as mgr:
            mgr.restore(model=model, optimizer=optimizer, rng=False)
    finally:
        held_chunks.held_files_limit = limit  # type: ignore[assignment]
    return {"model": full_model_state(model), "optimizer": full_optimizer_state(model, optimizer)}


def test_files_beyond_the_held_limit_are_reopened_and_read_into_live_tensors(rank_pool, tmp_path):
    saved = rank_pool.run(on_ranks_save, str(tmp_path))
    restored = rank_pool.run(on_ranks_restore_with_files_closed, str(tmp_path))
    for rank in range(2):
        assert_same_state(saved[rank], restored[rank])
