"""Demo: a run is killed mid-way, resumed, and ends bit-identical to one that never stopped.

Run it with no arguments. It starts three child processes:

1. an uninterrupted run of all steps;
2. the same run, SIGKILLed right after a random step (some work since the last
   checkpoint is lost, as in a real crash);
3. a new process that restores the latest checkpoint and finishes the run.

Then it prints a hash of the final weights and optimizer state of both runs.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import tempfile

import torch
from torch import nn

import ckpt

TOTAL_STEPS = 60
SAVE_EVERY = 5


def build() -> tuple[nn.Module, torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.LayerNorm(64), nn.GELU(), nn.Linear(64, 4))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=20, gamma=0.5)
    return model, optimizer, scheduler


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The data of one step: a pure function of the step number."""
    gen = torch.Generator().manual_seed(step)
    x = torch.randn(32, 16, generator=gen)
    return x, x[:, :4].sin() + 0.1 * torch.randn(32, 4, generator=gen)


def state_hash(model: nn.Module, optimizer: torch.optim.Optimizer) -> str:
    digest = hashlib.sha256()
    for prefix, state in (("model", model.state_dict()), ("optimizer", optimizer.state_dict())):
        for key, value in sorted(_leaves(state, prefix)):
            digest.update(key.encode())
            if isinstance(value, torch.Tensor):
                digest.update(bytes(value.detach().cpu().reshape(-1).view(torch.uint8).tolist()))
            else:
                digest.update(repr(value).encode())
    return digest.hexdigest()[:16]


def _leaves(obj: object, prefix: str) -> list[tuple[str, object]]:
    if isinstance(obj, dict):
        return [leaf for k, v in obj.items() for leaf in _leaves(v, f"{prefix}.{k}")]
    if isinstance(obj, (list, tuple)):
        return [leaf for i, v in enumerate(obj) for leaf in _leaves(v, f"{prefix}.{i}")]
    return [(prefix, obj)]


def train(directory: str, kill_after: int | None) -> None:
    """One training process: resume if a checkpoint exists, train, save every few steps."""
    model, optimizer, scheduler = build()
    mgr = ckpt.CheckpointManager(directory, keep_last=2)
    info = mgr.restore(model=model, optimizer=optimizer, scheduler=scheduler)
    start = 0 if info is None else info.step + 1
    if info is not None:
        print(f"  resumed from step {info.step}, continuing at step {start}", file=sys.stderr)
    for step in range(start, TOTAL_STEPS):
        x, y = batch(step)
        optimizer.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        optimizer.step()
        scheduler.step()
        if (step + 1) % SAVE_EVERY == 0 or step == TOTAL_STEPS - 1:
            mgr.save(step, metrics={"loss": loss.item()}, model=model, optimizer=optimizer,
                     scheduler=scheduler)  # fmt: skip
        if step == kill_after:
            print(f"  SIGKILL after step {step} (last checkpoint: {mgr.latest_step()})",
                  file=sys.stderr)  # fmt: skip
            os.kill(os.getpid(), signal.SIGKILL)
    print(json.dumps({"hash": state_hash(model, optimizer), "loss": loss.item()}))


def child(directory: str, kill_after: int | None = None) -> dict | None:
    cmd = [sys.executable, __file__, "--child", directory]
    if kill_after is not None:
        cmd += ["--kill-after", str(kill_after)]
    done = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=False)
    if done.returncode == -signal.SIGKILL:
        return None
    done.check_returncode()
    return json.loads(done.stdout)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", metavar="DIR", help=argparse.SUPPRESS)
    parser.add_argument("--kill-after", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, default=None, help="seed for the kill point")
    args = parser.parse_args()
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    if args.child:
        train(args.child, args.kill_after)
        return 0

    kill_after = random.Random(args.seed).randrange(SAVE_EVERY, TOTAL_STEPS - 2)
    with tempfile.TemporaryDirectory(prefix="ckpt-demo-") as tmp:
        print(f"1) uninterrupted run of {TOTAL_STEPS} steps")
        straight = child(os.path.join(tmp, "straight"))
        print(f"2) interrupted run, killed after step {kill_after}")
        assert child(os.path.join(tmp, "resumed"), kill_after) is None, "the run was not killed"
        print("3) new process resumes from the latest checkpoint")
        resumed = child(os.path.join(tmp, "resumed"))
    assert straight is not None and resumed is not None
    print(f"uninterrupted: state hash {straight['hash']}  final loss {straight['loss']!r}")
    print(f"resumed:       state hash {resumed['hash']}  final loss {resumed['loss']!r}")
    same = straight == resumed
    print("IDENTICAL: the resumed run matches bit for bit" if same else "MISMATCH")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
