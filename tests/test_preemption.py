"""Preemption: a signal only sets a flag; the loop saves at its next step and stops."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading

import pytest
import torch

import ckpt
from ckpt.policies.preemption import PreemptionWatch


def test_a_watched_signal_sets_the_flag_and_close_restores_the_handler():
    previous = signal.getsignal(signal.SIGUSR1)
    watch = PreemptionWatch([signal.SIGUSR1])
    assert watch.received is None
    os.kill(os.getpid(), signal.SIGUSR1)
    os.kill(os.getpid(), signal.SIGUSR1)  # a second one changes nothing
    assert watch.received == signal.SIGUSR1
    watch.close()
    assert signal.getsignal(signal.SIGUSR1) == previous


def test_handlers_can_only_be_installed_on_the_main_thread():
    errors = []

    def install():
        try:
            PreemptionWatch([signal.SIGUSR1])
        except ValueError as e:
            errors.append(e)

    thread = threading.Thread(target=install)
    thread.start()
    thread.join()
    assert len(errors) == 1 and "main thread" in str(errors[0])
    with pytest.raises(ValueError, match="at least one"):
        PreemptionWatch([])


def test_manager_saves_at_the_next_step_after_a_signal_then_says_stop(tmp_path):
    with ckpt.CheckpointManager(
        tmp_path, every_steps=100, preemption_signals=[signal.SIGUSR1]
    ) as mgr:
        data = {"x": torch.zeros(1)}
        assert not mgr.should_save(3) and not mgr.preempted
        os.kill(os.getpid(), signal.SIGUSR1)
        assert mgr.preempted and not mgr.should_stop
        assert mgr.should_save(4)
        mgr.save(4, data=data)
        assert mgr.should_stop and not mgr.should_save(5)
    assert signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL


def test_should_save_is_never_true_twice_for_a_saved_step(tmp_path):
    mgr = ckpt.CheckpointManager(tmp_path, every_steps=2)
    assert [s for s in range(6) if mgr.should_save(s)] == [1, 3, 5]
    mgr.save(1, data={})
    assert not mgr.should_save(1)
    with pytest.raises(ValueError):
        mgr.should_save(-1)


def test_every_seconds_counts_from_the_last_save(tmp_path, monkeypatch):
    now = [1000.0]
    monkeypatch.setattr("ckpt.policies.cadence.time.monotonic", lambda: now[0])
    mgr = ckpt.CheckpointManager(tmp_path, every_seconds=30)
    assert not mgr.should_save(0)
    now[0] += 30
    assert mgr.should_save(0)
    mgr.save(0, data={})
    now[0] += 29
    assert not mgr.should_save(1)
    now[0] += 1
    assert mgr.should_save(1)


def test_preemption_is_opt_in(tmp_path):
    before = signal.getsignal(signal.SIGTERM)
    mgr = ckpt.CheckpointManager(tmp_path)
    assert signal.getsignal(signal.SIGTERM) == before and not mgr.preempted
    mgr.close()


def test_sigterm_to_a_training_process_saves_once_and_exits_cleanly(tmp_path):
    script = textwrap.dedent(
        """
        import sys, time, torch, ckpt
        mgr = ckpt.CheckpointManager(sys.argv[1], preemption_signals=True)
        net = torch.nn.Linear(2, 2)
        print("ready", flush=True)
        for step in range(10_000):
            net.weight.data += 1
            time.sleep(0.01)
            if mgr.should_save(step):
                mgr.save(step, model=net)
            if mgr.should_stop:
                print(step, flush=True)
                break
        mgr.close()
        """
    )
    child = subprocess.Popen(
        [sys.executable, "-c", script, str(tmp_path)], stdout=subprocess.PIPE, text=True
    )
    assert child.stdout.readline().strip() == "ready"
    child.send_signal(signal.SIGTERM)
    out, _ = child.communicate(timeout=120)
    assert child.returncode == 0
    step = int(out.strip())
    assert ckpt.CheckpointManager(tmp_path).all_steps() == [step]
    state = ckpt.CheckpointManager(tmp_path).read()["model"]
    assert state["weight"].sub(step + 1).abs().max() < 1.0
