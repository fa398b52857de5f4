"""One rank of a 2-rank gloo job run as its own process, for tests of how a rank exits.

Usage: python save_exit_worker.py ROLE DIR [MARKS] (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT
set, as torchrun sets them)

ROLE ``crash``: save step 0, start an async save of step 1, then the main thread
raises while the save waits on rank 1 (which stops itself before writing).
ROLE ``resume``: restore (prints the restored step), then save step 1.
ROLE ``train``: train until ``should_stop`` with preemption signals watched; writes
``MARKS/ready<rank>`` after a few steps and ``MARKS/rank<rank>.json`` (the stop step).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from datetime import timedelta

import torch
import torch.distributed as dist

import ckpt
import ckpt.distributed.saving


def train(root: str, marks: str) -> None:
    """Save only when a signal comes (to one rank or all), then stop, every rank alike."""
    rank = dist.get_rank()
    state = {"w": torch.zeros(4)}
    mgr = ckpt.CheckpointManager(root, preemption_signals=True, handshake_timeout=60)
    for step in range(100_000):
        state["w"] += 1
        time.sleep(0.02)
        if step == 3:
            open(os.path.join(marks, f"ready{rank}"), "w").close()
        if mgr.should_save(step):
            mgr.save(step, state=state)
        if mgr.should_stop:
            with open(os.path.join(marks, f"rank{rank}.json"), "w") as f:
                json.dump({"stopped": step}, f)
            break
    mgr.close()


def main(role: str, root: str, marks: str | None) -> None:
    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    rank = dist.get_rank()
    if role == "train":
        assert marks is not None
        return train(root, marks)
    state = {"w": torch.full((4,), float(rank))}
    mgr = ckpt.CheckpointManager(root, async_save=True, collective_timeout=300)
    if role == "resume":
        info = mgr.restore(state=state)
        print(f"restored {None if info is None else info.step}", flush=True)
        mgr.save(1, state=state)
        mgr.close()
        return
    mgr.save(0, state=state)
    mgr.wait()
    if rank == 1:  # stops in its writer, before writing anything of step 1
        write = ckpt.distributed.saving.write_rank_files

        def stop_then_write(*args: object) -> object:
            os.kill(os.getpid(), signal.SIGSTOP)
            return write(*args)  # type: ignore[arg-type]

        ckpt.distributed.saving.write_rank_files = stop_then_write  # type: ignore[assignment]
    mgr.save(1, state=state)
    if rank == 0:
        print("step 1 in flight", flush=True)
        raise RuntimeError("the training crashed with a save in flight")
    mgr.wait()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3] if len(sys.argv) > 3 else None)
