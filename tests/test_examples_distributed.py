"""The multi-rank demos, launched as their docstrings say: torchrun, 2 ranks, killed and resumed.

Each demo trains an uninterrupted 2-rank reference run, SIGKILLs a second run
(the torchrun agent and both ranks) after a random step, resumes it in a third
job and prints IDENTICAL only if every rank's losses, learning rates, batch
indices, parameters and optimizer state match the reference bit for bit.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
TIMEOUT = 240  # seconds; a demo takes 40-60 s on two loaded cores


def run_demo(script: str, seed: int) -> subprocess.CompletedProcess[str]:
    """``torchrun --standalone --nproc-per-node 2 examples/<script>``; nothing left behind."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(ROOT / "examples" / script), "--seed", str(seed)]  # fmt: skip
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    job = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                           start_new_session=True)  # fmt: skip
    try:
        out, err = job.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(job.pid, signal.SIGTERM)  # torchrun passes it on to its ranks and nested jobs
        try:
            out, err = job.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(job.pid, signal.SIGKILL)
            out, err = job.communicate()
        pytest.fail(f"{script} --seed {seed} hung:\n{out}\n{err[-4000:]}")
    return subprocess.CompletedProcess(cmd, job.returncode, out, err)


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("script", ["ddp_resume.py", "fsdp_resume.py"])
def test_distributed_demo_resumes_bit_identically(script):
    seed = random.SystemRandom().randrange(2**16)  # the kill step; in the failure message
    done = run_demo(script, seed)
    assert done.returncode == 0 and "IDENTICAL" in done.stdout, (
        f"{script} --seed {seed}:\n{done.stdout}\n{done.stderr[-4000:]}"
    )
    assert "DIFFERENT" not in done.stdout
