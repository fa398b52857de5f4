"""Readers racing a writer that commits and deletes: they list again, never report nothing.

Two kinds of trial. The deterministic one runs an operation once for every call
it makes to the storage, with another "process" committing a newer step and
deleting the one being read right before that call: every window between
listing, reading the manifest and reading the files is hit once. The live one
runs a real second process saving with ``keep_last=1`` in a tight loop while
this one restores, reads, verifies and describes the latest step thousands of
times. Either way: never ``None``, never a step reported missing, and what is
loaded is exactly what the step returned holds.
"""

from __future__ import annotations

import os
import shutil
import threading
from collections.abc import Callable
from typing import Any

import pytest
import torch
from conftest import assert_same_state
from race_worker import save_in_a_loop, state

import ckpt
import ckpt.reading.steps
from ckpt.format import MANIFEST_NAME, step_dir_name

POOL = 80


@pytest.fixture(scope="module")
def pool(tmp_path_factory) -> str:
    """Checkpoints of steps 1..POOL, to be moved into a root one at a time."""
    root = tmp_path_factory.mktemp("pool")
    with ckpt.CheckpointManager(root) as mgr:
        for step in range(1, POOL + 1):
            mgr.save(step, data=state(step), rng=False)
    return str(root)


class Churn:
    """Plays another process saving with ``keep_last=1``: commits the next step, deletes the old.

    Committing is one rename (as ckpt commits); deleting removes the manifest
    first, then the directory (as ckpt's retention does).
    """

    def __init__(self, pool: str, root: str, first: int = 1) -> None:
        self.pool, self.root, self.latest = pool, root, first
        shutil.copytree(os.path.join(pool, step_dir_name(first)), self._at(first))

    def _at(self, step: int) -> str:
        return os.path.join(self.root, step_dir_name(step))

    def __call__(self) -> None:
        new = self.latest + 1
        if new > POOL:
            raise AssertionError("the pool of checkpoints ran out")
        shutil.copytree(os.path.join(self.pool, step_dir_name(new)), self._at(new) + ".copy")
        os.rename(self._at(new) + ".copy", self._at(new))
        os.remove(os.path.join(self._at(self.latest), MANIFEST_NAME))
        shutil.rmtree(self._at(self.latest))
        self.latest = new


class Hooked:
    """A storage whose every method call first runs ``hook(call number)``."""

    def __init__(self, storage: Any, hook: Callable[[int], None]) -> None:
        self._storage, self._hook, self.calls = storage, hook, 0

    def __getattr__(self, name: str) -> Any:
        value = getattr(self._storage, name)
        if not callable(value):
            return value

        def called(*args: Any, **kwargs: Any) -> Any:
            self.calls += 1
            self._hook(self.calls)
            return value(*args, **kwargs)

        return called


def hook_storage(mgr: ckpt.CheckpointManager, hook: Callable[[int], None]) -> Hooked:
    """Route every storage call of ``mgr`` through ``hook``."""
    hooked = Hooked(mgr._storage, hook)
    mgr._storage = hooked  # type: ignore[assignment]
    mgr._reader.storage = hooked  # type: ignore[assignment]
    return hooked


def run_operation(mgr: ckpt.CheckpointManager, operation: str, step: int | None = None) -> int:
    """Run ``operation`` on ``step`` (the latest when ``None``); return the step it got.

    Checks that what was loaded is exactly what that step holds.
    """
    if operation == "restore":
        live = {"w": torch.zeros(64), "b": torch.zeros(8, dtype=torch.int64)}
        info = mgr.restore(step, data=live, rng=False)
        assert info is not None, "restore found nothing while a checkpoint was committed"
        assert_same_state(live, state(info.step))
        return info.step
    if operation == "read":
        data = mgr.read(step)["data"]
        got = int(data["w"][0])
        assert_same_state(data, state(got))
        return got
    if operation == "verify":
        return mgr.verify(step).step
    if operation == "checkpoint":
        info = mgr.checkpoint(step)
        assert info is not None, "checkpoint() found nothing while a checkpoint was committed"
        return info.step
    if operation == "latest_step":
        latest = mgr.latest_step()
        assert latest is not None, "latest_step() found nothing while a checkpoint was committed"
        return latest
    raise AssertionError(operation)


OPERATIONS = ["restore", "read", "verify", "checkpoint", "latest_step"]


def calls_made(pool: str, root: str, operation: str, **kwargs: Any) -> int:
    """How many storage calls ``operation`` makes when nothing changes."""
    Churn(pool, root)
    mgr = ckpt.CheckpointManager(root, **kwargs)
    hooked = hook_storage(mgr, lambda n: None)
    run_operation(mgr, operation)
    shutil.rmtree(root)
    return hooked.calls


@pytest.mark.parametrize("fallback", [False, True])
@pytest.mark.parametrize("operation", OPERATIONS)
def test_the_latest_step_deleted_at_any_point_is_replaced_by_the_newer_one(
    pool, tmp_path, operation, fallback
):
    total = calls_made(pool, str(tmp_path / "count"), operation, fallback_to_intact=fallback)
    for at in range(1, total + 2):
        root = str(tmp_path / f"at{at}")
        churn = Churn(pool, root)
        mgr = ckpt.CheckpointManager(root, fallback_to_intact=fallback)
        hook_storage(mgr, lambda n, at=at, churn=churn: churn() if n == at else None)
        got = run_operation(mgr, operation)
        assert got in (1, 2), (at, got)


@pytest.mark.parametrize("operation", ["restore", "read", "verify", "checkpoint"])
def test_an_explicit_step_deleted_at_any_point_is_reported_deleted_or_loaded(
    pool, tmp_path, operation
):
    total = calls_made(pool, str(tmp_path / "count"), operation)
    outcomes = set()
    for at in range(1, total + 2):
        root = str(tmp_path / f"at{at}")
        churn = Churn(pool, root)
        mgr = ckpt.CheckpointManager(root)
        hook_storage(mgr, lambda n, at=at, churn=churn: churn() if n == at else None)
        try:
            assert run_operation(mgr, operation, step=1) == 1
            outcomes.add("loaded")
        except ckpt.CheckpointNotFoundError as e:
            assert "step 1" in str(e) or step_dir_name(1) in str(e), e
            outcomes.add("not found")
    assert outcomes == {"loaded", "not found"}


@pytest.mark.parametrize("operation", ["restore", "read", "verify", "checkpoint"])
@pytest.mark.parametrize("fallback", [False, True])
def test_checkpoints_that_never_stop_changing_end_in_a_clear_error(
    pool, tmp_path, monkeypatch, operation, fallback
):
    monkeypatch.setattr(ckpt.reading.steps, "RETRY_SECONDS", 0.0)
    monkeypatch.setattr(ckpt.reading.steps, "LIST_ATTEMPTS", 2)
    churn = Churn(pool, str(tmp_path))
    mgr = ckpt.CheckpointManager(tmp_path, fallback_to_intact=fallback)
    hook_storage(mgr, lambda n: churn())  # another save commits before every single call
    with pytest.raises(ckpt.CheckpointError, match="kept changing") as e:
        run_operation(mgr, operation)
    assert not isinstance(e.value, ckpt.CheckpointNotFoundError)  # "start afresh" would be wrong


def test_listing_again_when_the_listed_step_vanished(pool, tmp_path):
    """The bug: listing sees step 1, it is deleted (step 2 committed) before its manifest is
    checked, and the list came back empty: restore() returned None."""
    churn = Churn(pool, str(tmp_path))
    mgr = ckpt.CheckpointManager(tmp_path)
    listed = []

    def after_listing(n: int) -> None:
        if listed == [1]:
            churn()
        listed.append(n)

    hook_storage(mgr, after_listing)
    assert mgr.all_steps() == [2]


def test_a_corrupt_step_is_still_corrupt_when_nothing_changes(pool, tmp_path):
    Churn(pool, str(tmp_path))
    path = tmp_path / step_dir_name(1) / "data.safetensors"
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 1
    path.write_bytes(bytes(raw))
    with pytest.raises(ckpt.CorruptCheckpointError, match="checksum"):
        ckpt.CheckpointManager(tmp_path).restore(data={}, rng=False)
    with pytest.raises(ckpt.CorruptCheckpointError, match="no intact checkpoint"):
        ckpt.CheckpointManager(tmp_path, fallback_to_intact=True).restore(data={}, rng=False)


def race(forkserver, root: str, iterations: int, operations: list[str], **kwargs: Any) -> None:
    """Run ``operations`` in turn ``iterations`` times on the latest step while another process
    saves with ``keep_last=1`` as fast as it can."""
    committed, stop = forkserver.Event(), forkserver.Event()
    writer = forkserver.Process(target=save_in_a_loop, args=(root, committed, stop))
    writer.start()
    try:
        assert committed.wait(60), "the writer never committed"
        mgr = ckpt.CheckpointManager(root, **kwargs)
        seen = []
        for i in range(iterations):
            seen.append(run_operation(mgr, operations[i % len(operations)]))
    finally:
        stop.set()
        writer.join(60)
    assert writer.exitcode == 0
    assert seen == sorted(seen), "a step older than one already seen came back"


@pytest.mark.parametrize("fallback", [False, True])
def test_reading_the_latest_while_another_process_saves_with_keep_last_1(
    forkserver, tmp_path, fallback
):
    race(forkserver, str(tmp_path), 1000, OPERATIONS, fallback_to_intact=fallback)


@pytest.mark.slow
def test_reading_the_latest_while_another_process_saves_many_times(forkserver, tmp_path):
    race(forkserver, str(tmp_path / "a"), 3000, OPERATIONS)
    race(forkserver, str(tmp_path / "b"), 3000, OPERATIONS, fallback_to_intact=True)


def test_reading_the_latest_while_a_thread_saves_on_an_object_store():
    """On memory:// (commit by manifest, no rename) a writer thread races the reader."""
    url = f"memory://races-{os.getpid()}-{threading.get_ident()}"
    mgr_w = ckpt.CheckpointManager(url, keep_last=1)
    mgr_w.save(1, data=state(1), rng=False)
    stop = threading.Event()
    errors: list[BaseException] = []

    def writer() -> None:
        step = 2
        try:
            while not stop.is_set():
                mgr_w.save(step, data=state(step), rng=False)
                step += 1
        except BaseException as e:  # reported below
            errors.append(e)

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        reader = ckpt.CheckpointManager(url)
        seen = [run_operation(reader, OPERATIONS[i % 5]) for i in range(300)]
    finally:
        stop.set()
        thread.join()
        mgr_w.close()
    assert errors == []
    assert seen == sorted(seen)
