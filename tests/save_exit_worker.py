"""One rank of a 2-rank gloo job run as its own process, for tests of how a rank exits.

Usage: python save_exit_worker.py ROLE DIR (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT set)

ROLE ``crash``: save step 0, start an async save of step 1, then the main thread
raises while the save waits on rank 1 (which stops itself before writing).
ROLE ``resume``: restore (prints the restored step), then save step 1.
"""

from __future__ import annotations

import os
import signal
import sys
from datetime import timedelta

import torch
import torch.distributed as dist

import ckpt
import ckpt.distributed.saving


def main(role: str, root: str) -> None:
    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    rank = dist.get_rank()
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
    main(sys.argv[1], sys.argv[2])
