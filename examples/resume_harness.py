"""The kill-and-resume harness shared by ddp_resume.py and fsdp_resume.py.

Launched as ``torchrun --standalone --nproc-per-node 2 examples/<demo>.py``
(or plainly with ``python``, which relaunches itself under torchrun), a demo:

1. trains the uninterrupted reference run in the job torchrun started;
2. from rank 0, starts a second torchrun job of the same size and SIGKILLs all
   of it (the torchrun agent and every rank, with their DataLoader workers)
   right after a random step, losing the work since its last checkpoint;
3. starts a third job that restores the latest checkpoint and finishes the run.

Every rank of every run appends one JSON line per step to its own log: loss,
learning rates and the dataset indices of its batch. The demo prints IDENTICAL
when every step the interrupted and resumed runs took logs exactly what the
reference logged for that rank and step, and the final parameters and
optimizer state of every rank hash the same, bit for bit; else DIFFERENT and
the first difference, with exit status 1.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

# Variables torchrun sets for its workers: a nested torchrun must not inherit the outer job's.
_JOB_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK",
            "GROUP_WORLD_SIZE", "ROLE_RANK", "ROLE_WORLD_SIZE", "ROLE_NAME", "MASTER_ADDR",
            "MASTER_PORT")  # fmt: skip
JOB_TIMEOUT = 300  # seconds a nested job may take before it is killed and the demo fails


@dataclass
class Run:
    """What a training function gets: where to checkpoint, when to die, where to log."""

    directory: str
    kill_after: int | None
    device: torch.device
    log_path: Path
    _pids: list[int]

    @property
    def rank(self) -> int:
        return dist.get_rank()

    def log_step(
        self, step: int, loss: torch.Tensor, lrs: list[float], batch: torch.Tensor
    ) -> None:
        """Append this rank's record of a completed step (one write: a kill never splits it)."""
        record = {
            "step": step,
            "loss": float(loss.detach()).hex(),
            "lr": [float(x).hex() for x in lrs],
            "batch": batch.tolist(),
        }
        self._append(record)

    def log_final(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self._append({"final": state_hash(model, optimizer)})

    def _append(self, record: dict[str, Any]) -> None:
        fd = os.open(self.log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, (json.dumps(record) + "\n").encode())
        finally:
            os.close(fd)

    def maybe_kill(self, step: int) -> None:
        """After ``kill_after``: rank 0 SIGKILLs the torchrun agent, every rank and itself."""
        if step != self.kill_after or self.rank != 0:
            return
        print(f"  SIGKILL of the whole job after step {step}", file=sys.stderr, flush=True)
        os.kill(os.getppid(), signal.SIGKILL)  # the agent first: it must not restart anyone
        for pid in self._pids[1:]:
            _kill_group_of(pid)
        _kill_group_of(os.getpid())  # this rank and its DataLoader workers


def _kill_group_of(pid: int) -> None:
    # torchrun starts each worker in a session of its own, which holds its DataLoader workers.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(os.getpgid(pid), signal.SIGKILL)


def state_hash(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> str:
    """SHA-256 over this rank's parameters and optimizer state (its shards, under FSDP)."""
    digest = hashlib.sha256()
    for prefix, state in (("model", model.state_dict()), ("optimizer", optimizer.state_dict())):
        for key, value in _leaves(state, prefix):
            digest.update(key.encode())
            if isinstance(value, torch.Tensor):
                local = value.to_local() if hasattr(value, "to_local") else value
                data = local.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
                digest.update(data.numpy().tobytes())
            else:
                digest.update(repr(value).encode())
    return digest.hexdigest()[:16]


def _leaves(obj: object, prefix: str) -> list[tuple[str, object]]:
    if isinstance(obj, dict):
        return [leaf for k, v in obj.items() for leaf in _leaves(v, f"{prefix}.{k}")]
    if isinstance(obj, (list, tuple)):
        return [leaf for i, v in enumerate(obj) for leaf in _leaves(v, f"{prefix}.{i}")]
    return [(prefix, obj)]


def main(
    train: Callable[[Run], None], total_steps: Callable[[int], int], save_every: int, doc: str
) -> int:
    """Entry point of a demo.

    ``train(run)`` is one rank's training, inside the process group;
    ``total_steps(world_size)`` the number of steps it runs.
    """
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--seed", type=int, default=None, help="seed for the kill point")
    parser.add_argument("--child", metavar="DIR", help=argparse.SUPPRESS)
    parser.add_argument("--kill-after", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if "LOCAL_RANK" not in os.environ:  # started without torchrun: start under it
        nproc = os.environ.get("NPROC", "2")
        os.execv(sys.executable, [sys.executable, *_torchrun(nproc), sys.argv[0], *sys.argv[1:]])
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend, timeout=timedelta(seconds=120))
    device = _device()
    try:
        if args.child:
            _train(train, device, args.child, args.kill_after)
            return 0
        steps = total_steps(dist.get_world_size())
        return _orchestrate(train, device, args.seed, steps, save_every)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _torchrun(nproc: str) -> list[str]:
    return ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", nproc]


def _device() -> torch.device:
    if torch.cuda.is_available():
        index = int(os.environ["LOCAL_RANK"])
        torch.cuda.set_device(index)
        return torch.device("cuda", index)
    return torch.device("cpu")


def _train(
    train: Callable[[Run], None], device: torch.device, directory: str, kill_after: int | None
) -> None:
    pids = torch.zeros(dist.get_world_size(), dtype=torch.int64, device=device)
    pids[dist.get_rank()] = os.getpid()
    dist.all_reduce(pids)  # every rank's pid, for rank 0's kill
    log_path = Path(directory).with_name(f"{Path(directory).name}-rank{dist.get_rank()}.jsonl")
    train(Run(directory, kill_after, device, log_path, pids.tolist()))


def _orchestrate(
    train: Callable[[Run], None], device: torch.device, seed: int | None, total_steps: int,
    save_every: int,
) -> int:  # fmt: skip
    rank, world = dist.get_rank(), dist.get_world_size()
    tmp = _broadcast_str(tempfile.mkdtemp(prefix="ckpt-dist-demo-") if rank == 0 else "", device)
    try:
        if rank == 0:
            print(f"1) uninterrupted run of {total_steps} steps on {world} ranks")
        _train(train, device, os.path.join(tmp, "straight"), None)
        dist.barrier()
        if rank != 0:
            return 0
        dist.destroy_process_group()  # the other ranks are done; rank 0 runs the rest
        kill_after = random.Random(seed).randrange(save_every, total_steps - 2)
        print(f"2) interrupted run, every rank SIGKILLed after step {kill_after}")
        if _job(tmp, str(world), kill_after) != -signal.SIGKILL:
            print("DIFFERENT: the interrupted run was not killed")
            return 1
        print("3) a new job resumes from the latest checkpoint")
        if _job(tmp, str(world), None) != 0:
            print("DIFFERENT: the resumed run failed")
            return 1
        return _compare(Path(tmp), world)
    finally:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)


def _broadcast_str(text: str, device: torch.device) -> str:
    """Rank 0's string on every rank, through a tensor (no pickle)."""
    data = torch.zeros(4096, dtype=torch.uint8, device=device)
    encoded = text.encode()
    data[: len(encoded)] = torch.tensor(list(encoded), dtype=torch.uint8)
    dist.broadcast(data, src=0)
    return bytes(data.cpu().tolist()).rstrip(b"\0").decode()


def _job(tmp: str, nproc: str, kill_after: int | None) -> int:
    """One nested torchrun job; returns its exit status (negative: killed by that signal)."""
    cmd = [sys.executable, *_torchrun(nproc), sys.argv[0], "--child", os.path.join(tmp, "resumed")]
    if kill_after is not None:
        cmd += ["--kill-after", str(kill_after)]
    env = {k: v for k, v in os.environ.items()
           if k not in _JOB_ENV and not k.startswith("TORCHELASTIC_")}  # fmt: skip
    # A session of its own: the job's kill reaches nothing else.
    job = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, start_new_session=True)
    previous = signal.signal(signal.SIGTERM, _exit_on_signal)  # torchrun stopping us
    try:
        return job.wait(timeout=JOB_TIMEOUT)
    finally:
        signal.signal(signal.SIGTERM, previous)
        if job.poll() is None:  # timed out, or we are being stopped: stop the job too
            os.killpg(job.pid, signal.SIGTERM)  # its agent passes it on to its ranks
            try:
                job.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(job.pid, signal.SIGKILL)
                job.wait()


def _exit_on_signal(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def _compare(tmp: Path, world: int) -> int:
    for rank in range(world):
        straight = _read_log(tmp / f"straight-rank{rank}.jsonl")
        runs = _read_log(tmp / f"resumed-rank{rank}.jsonl")
        reference = {r["step"]: r for r in straight if "step" in r}
        seen = set()
        for record in runs:
            if "final" in record:
                continue
            seen.add(record["step"])
            if record != reference.get(record["step"]):
                print(f"DIFFERENT: rank {rank}, step {record['step']}: "
                      f"{record} != {reference.get(record['step'])}")  # fmt: skip
                return 1
        if seen != set(reference):
            print(f"DIFFERENT: rank {rank} ran steps {sorted(seen)}, expected {sorted(reference)}")
            return 1
        final = (
            [r["final"] for r in straight if "final" in r],
            [r["final"] for r in runs if "final" in r],
        )
        print(f"rank {rank}: {len(reference)} steps, losses, lrs and batches equal; "
              f"state hash {final[0][-1]} uninterrupted, {final[1][-1]} resumed")  # fmt: skip
        if final[0] != final[1]:
            print(f"DIFFERENT: rank {rank} ends with state {final[1]}, expected {final[0]}")
            return 1
    print("IDENTICAL: the resumed run matches bit for bit on every rank")
    return 0


def _read_log(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]
