"""Async save: returns once staged, one in flight, errors surface, the state is the staged one."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading

import pytest
import torch
from conftest import assert_same_state
from helpers import small_model

import ckpt
import ckpt.io.write
import ckpt.saving.commit
import ckpt.saving.pipeline


@pytest.fixture
def gate(monkeypatch):
    """Hold background writes until the test opens the gate."""
    opened = threading.Event()
    started = threading.Event()
    original = ckpt.saving.commit.write_checkpoint_files

    def gated(*args, **kwargs):
        started.set()
        assert opened.wait(60)
        return original(*args, **kwargs)

    monkeypatch.setattr(ckpt.saving.commit, "write_checkpoint_files", gated)
    return opened, started


def test_the_checkpoint_holds_the_state_of_when_save_returned(tmp_path, gate):
    opened, started = gate
    model = small_model(0)
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.randn(4, 6)).sum().backward()
    optimizer.step()
    packed = optimizer.state_dict()["state"]
    expected = (
        {k: v.clone() for k, v in model.state_dict().items()},
        {"state": {i: {k: v.clone() for k, v in s.items()} for i, s in packed.items()}},
    )
    mgr = ckpt.CheckpointManager(tmp_path, async_save=True)
    info = mgr.save(1, model=model, optimizer=optimizer, rng=False)
    assert info.step == 1 and started.wait(60)
    assert mgr.all_steps() == []  # still being written
    with torch.no_grad():  # training goes on while the save is written
        for p in model.parameters():
            p.add_(1.0)
        for s in optimizer.state.values():
            s["exp_avg"].mul_(-3)
    opened.set()
    mgr.wait()
    assert mgr.all_steps() == [1]
    saved = mgr.read(1)
    assert_same_state(saved["model"], expected[0])
    for index, state in expected[1]["state"].items():
        assert torch.equal(saved["optimizer"]["state"][index]["exp_avg"], state["exp_avg"])
    mgr.close()


def test_at_most_one_save_is_in_flight(tmp_path, gate):
    opened, started = gate
    mgr = ckpt.CheckpointManager(tmp_path, async_save=True)
    mgr.save(1, data={"t": torch.ones(3)})
    assert started.wait(60)
    second = threading.Thread(target=mgr.save, args=(2,), kwargs={"data": {"t": torch.zeros(3)}})
    second.start()
    second.join(0.3)
    assert second.is_alive()  # waits for the first save
    opened.set()
    second.join(60)
    mgr.wait()
    assert mgr.all_steps() == [1, 2]
    mgr.close()


def test_staging_buffers_are_reused(tmp_path):
    mgr = ckpt.CheckpointManager(tmp_path, async_save=True)
    data = {"t": torch.randn(1000)}
    mgr.save(1, data=data, rng=False)
    first = {n: b.data_ptr() for n, b in mgr._staging._buffers.items()}
    data["t"].add_(1)
    mgr.save(2, data=data, rng=False)
    mgr.wait()
    assert {n: b.data_ptr() for n, b in mgr._staging._buffers.items()} == first
    assert torch.equal(mgr.read(2)["data"]["t"], data["t"])
    assert not torch.equal(mgr.read(1)["data"]["t"], data["t"])
    mgr.close()


def test_a_background_failure_surfaces_on_the_next_call_and_on_wait(tmp_path, monkeypatch):
    mgr = ckpt.CheckpointManager(tmp_path, async_save=True)
    mgr.save(1, data={"t": torch.ones(2)})
    mgr.wait()

    def broken(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ckpt.io.write, "write_tensors", broken)
    mgr.save(2, data={"t": torch.ones(2)})  # returns: the failure happens in the background
    with pytest.raises(ckpt.CheckpointWriteError, match="No space left"):
        mgr.wait()
    mgr.wait()  # raised once
    mgr.save(3, data={"t": torch.ones(2)})
    with pytest.raises(ckpt.CheckpointWriteError):
        mgr.save(4, data={"t": torch.ones(2)})  # the next call reports it
    monkeypatch.undo()
    mgr.save(5, data={"t": torch.ones(2)})
    mgr.close()
    assert ckpt.CheckpointManager(tmp_path).all_steps() == [1, 5]


def test_restore_and_read_wait_for_the_save_in_flight(tmp_path):
    mgr = ckpt.CheckpointManager(tmp_path, async_save=True)
    mgr.save(1, data={"t": torch.arange(5)})
    live: dict = {}
    assert mgr.restore(data=live) is not None  # not None: it waited for step 1
    assert torch.equal(live["t"], torch.arange(5))
    mgr.close()


def test_a_process_exiting_without_wait_still_commits(tmp_path):
    script = textwrap.dedent(
        """
        import sys, torch, ckpt
        mgr = ckpt.CheckpointManager(sys.argv[1], async_save=True)
        mgr.save(1, data={"t": torch.randn(1_000_000)})
        """
    )
    subprocess.run([sys.executable, "-c", script, str(tmp_path)], check=True, timeout=120)
    mgr = ckpt.CheckpointManager(tmp_path)
    assert mgr.all_steps() == [1]
    mgr.verify(1)


def test_should_stop_waits_for_the_save_requested_after_a_signal(tmp_path):
    import os
    import signal

    with ckpt.CheckpointManager(
        tmp_path, async_save=True, preemption_signals=[signal.SIGUSR1]
    ) as mgr:
        os.kill(os.getpid(), signal.SIGUSR1)
        assert mgr.should_save(0)
        mgr.save(0, data={"t": torch.ones(2)})
        assert mgr.should_stop
        assert mgr.all_steps() == [0]


def _writer_niceness(tmp_path, monkeypatch, **kwargs) -> int:
    seen: list[int] = []
    original = ckpt.saving.pipeline.commit_checkpoint

    def record(*args, **kw):
        seen.append(os.getpriority(os.PRIO_PROCESS, threading.get_native_id()))
        return original(*args, **kw)

    monkeypatch.setattr(ckpt.saving.pipeline, "commit_checkpoint", record)
    with ckpt.CheckpointManager(tmp_path, async_save=True, **kwargs) as mgr:
        mgr.save(1, model=small_model())
    return seen[0]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread nice is Linux's")
def test_the_background_writer_yields_the_cpu_to_training(tmp_path, monkeypatch):
    own = os.getpriority(os.PRIO_PROCESS, 0)
    assert _writer_niceness(tmp_path / "a", monkeypatch) == 19
    assert _writer_niceness(tmp_path / "b", monkeypatch, background_nice=None) == own
    assert os.getpriority(os.PRIO_PROCESS, 0) == own  # the caller's thread is untouched


@pytest.mark.parametrize("bad", [-1, 20, True, 1.5, "19"])
def test_background_nice_is_checked(tmp_path, bad):
    with pytest.raises(ValueError, match="background_nice"):
        ckpt.CheckpointManager(tmp_path, async_save=True, background_nice=bad)
