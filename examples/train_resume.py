"""Demo: a run is killed mid-way, resumed, and ends bit-identical to one that never stopped.

Run it with no arguments. The training has everything that usually makes a
resumed run drift: dropout, a DataLoader that shuffles every epoch, a OneCycle
learning-rate schedule, a GradScaler, and two DataLoader workers that prefetch
batches ahead of training. It starts three child processes:

1. an uninterrupted run of all steps;
2. the same run, SIGKILLed with its workers right after a random step (work
   since the last checkpoint is lost, as in a real crash);
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

EPOCHS = 4
BATCH = 16
SAMPLES = 200  # 13 batches per epoch, the last one short
SAVE_EVERY = 5


def build() -> dict:
    """The model, optimizer, schedule, scaler and data of the run, seeded."""
    torch.manual_seed(0)
    random.seed(0)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(SAMPLES, 16, generator=gen)
    y = x[:, :4].sin() + 0.1 * torch.randn(SAMPLES, 4, generator=gen)
    loader = ckpt.resumable_loader(
        torch.utils.data.TensorDataset(x, y), batch_size=BATCH, shuffle=True, seed=0, num_workers=2
    )
    model = nn.Sequential(
        nn.Linear(16, 64), nn.Dropout(0.2), nn.GELU(), nn.LayerNorm(64), nn.Linear(64, 4)
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    total_steps = EPOCHS * len(loader)
    return {
        "loader": loader,
        "model": model,
        "optimizer": optimizer,
        "scheduler": torch.optim.lr_scheduler.OneCycleLR(optimizer, 1e-2, total_steps=total_steps),
        "scaler": torch.amp.GradScaler("cpu", init_scale=2.0**12, growth_interval=10),
        "total_steps": total_steps,
    }


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
    run = build()
    loader, model, optimizer, scheduler, scaler = (
        run[k] for k in ("loader", "model", "optimizer", "scheduler", "scaler")
    )
    items = {
        "model": model,
        "optimizer": optimizer,
        "scheduler": scheduler,
        "scaler": scaler,
        "sampler": loader.sampler,
    }
    mgr = ckpt.CheckpointManager(directory, keep_last=2, every_steps=SAVE_EVERY)
    info = mgr.restore(**items)  # also restores the random streams, last
    step = 0 if info is None else info.next_step
    if info is not None:
        print(f"  resumed from step {info.step}, continuing at step {step} "
              f"(epoch {loader.sampler.epoch}, batch {loader.sampler.position // BATCH})",
              file=sys.stderr)  # fmt: skip
    while step < run["total_steps"]:
        for x, y in loader:  # after a resume, the rest of the interrupted epoch
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = nn.functional.mse_loss(model(x + 0.01 * torch.randn_like(x)), y)
            optimizer.zero_grad()
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            if mgr.should_save(step) or step == run["total_steps"] - 1:
                mgr.save(step, epoch=loader.sampler.epoch, metrics={"loss": loss.item()}, **items)
            if step == kill_after:
                print(f"  SIGKILL after step {step} (last checkpoint: {mgr.latest_step()})",
                      file=sys.stderr)  # fmt: skip
                os.killpg(0, signal.SIGKILL)  # the whole job: the DataLoader workers too
            step += 1
    print(json.dumps({"hash": state_hash(model, optimizer), "loss": loss.item()}))


def child(directory: str, kill_after: int | None = None) -> dict | None:
    cmd = [sys.executable, __file__, "--child", directory]
    if kill_after is not None:
        cmd += ["--kill-after", str(kill_after)]
    # A session of its own, so that the kill takes the run's DataLoader workers with it.
    done = subprocess.run(
        cmd, stdout=subprocess.PIPE, text=True, check=False, start_new_session=True
    )
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

    total_steps = EPOCHS * -(-SAMPLES // BATCH)
    kill_after = random.Random(args.seed).randrange(SAVE_EVERY, total_steps - 2)
    with tempfile.TemporaryDirectory(prefix="ckpt-demo-") as tmp:
        print(f"1) uninterrupted run of {total_steps} steps ({EPOCHS} epochs)")
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
