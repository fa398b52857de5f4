"""Exact resume: an interrupted run continued in a new process equals an uninterrupted one."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import assert_same_state

import ckpt

WORKER = Path(__file__).with_name("resume_worker.py")
N = 6


def run(*args: str) -> dict:
    done = subprocess.run(
        [sys.executable, str(WORKER), *args],
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    )
    return json.loads(done.stdout)


@pytest.mark.parametrize(
    "optimizer",
    [
        "adamw",
        "adam-fused",
        "sgd",
        pytest.param("adamw-fused-cuda", marks=pytest.mark.cuda),
        pytest.param("adam-capturable-cuda", marks=pytest.mark.cuda),
    ],
)
def test_resumed_run_is_bitwise_identical(tmp_path, optimizer):
    straight = run(str(tmp_path / "straight"), optimizer, str(2 * N))
    first = run(str(tmp_path / "split"), optimizer, str(N))
    second = run(str(tmp_path / "split"), optimizer, str(2 * N), "--resume")

    assert second["start"] == N
    assert first["losses"] + second["losses"] == straight["losses"]
    a = ckpt.CheckpointManager(tmp_path / "straight").read(2 * N - 1)
    b = ckpt.CheckpointManager(tmp_path / "split").read(2 * N - 1)
    assert_same_state(a, b)
