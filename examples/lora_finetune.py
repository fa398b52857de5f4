"""Demo: a LoRA-style fine-tune saves incremental checkpoints, is killed, resumes IDENTICAL.

Run it with no arguments. A frozen base model (plain PyTorch, about 24 MiB) gets
small trainable low-rank adapters; the resume state holds the whole model, the
optimizer and the random streams, saved every few steps with
``CheckpointManager(..., incremental=True)``: the frozen base is written once,
each later save writes only the adapters and the optimizer state. It starts
three child processes:

1. an uninterrupted run, printing the bytes each save added to the root next to
   what a full save of the same state writes;
2. the same run, SIGKILLed right after a random step;
3. a new process that restores the latest checkpoint and finishes the run.

Then it prints a hash of the final state of both runs. If they differ, it names
the tensors that differ and runs the uninterrupted run once more: if that one
differs too, training itself is not reproducible on this machine; if it agrees,
the resume is at fault.
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
from pathlib import Path

import torch
from torch import nn

import ckpt

STEPS = 30
SAVE_EVERY = 5
WIDTH, RANK, LAYERS = 1024, 8, 6


class LoRALinear(nn.Module):
    """A frozen linear layer plus a trainable low-rank update ``B @ A``."""

    def __init__(self, width: int, rank: int) -> None:
        super().__init__()
        self.base = nn.Linear(width, width)
        self.base.requires_grad_(False)
        self.lora_a = nn.Parameter(torch.randn(rank, width) / width**0.5)
        self.lora_b = nn.Parameter(torch.zeros(width, rank))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + x @ self.lora_a.T @ self.lora_b.T


def build() -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = nn.Sequential(*(LoRALinear(WIDTH, RANK) for _ in range(LAYERS)))
    trainable = [p for p in model.parameters() if p.requires_grad]
    return model, torch.optim.AdamW(trainable, lr=1e-3)


def files_of(directory: str) -> dict[Path, int]:
    return {p: p.stat().st_size for p in Path(directory).rglob("*") if p.is_file()}


def state_digests(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, str]:
    """A short hash of each tensor of the final state, and of the random stream."""
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    for index, state in optimizer.state_dict()["state"].items():
        tensors |= {f"optimizer.{index}.{name}": v for name, v in state.items()}
    tensors["rng"] = torch.get_rng_state()
    return {k: hashlib.sha256(v.numpy().tobytes()).hexdigest()[:16] for k, v in tensors.items()}


def train(directory: str, kill_after: int | None, report: bool) -> None:
    """One training process: resume if a checkpoint exists, train, save every few steps."""
    # One CPU thread: a multi-threaded BLAS may split a product's sums over threads and
    # add them in whatever order they finish, so two runs differ in the last bits
    # whether or not they resumed (seen once on a CI machine, never on ours).
    torch.set_num_threads(1)
    model, optimizer = build()
    mgr = ckpt.CheckpointManager(directory, keep_last=2, incremental=True)
    full = ckpt.CheckpointManager(directory + "-full", keep_last=1) if report else None
    info = mgr.restore(model=model, optimizer=optimizer)
    step = 0 if info is None else info.step + 1
    if info is not None:
        print(f"  resumed from step {info.step}, continuing at step {step}", file=sys.stderr)
    while step < STEPS:
        x = torch.randn(32, WIDTH)
        loss = (model(x) - x.roll(1, dims=1)).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % SAVE_EVERY == SAVE_EVERY - 1:
            before = files_of(directory)
            mgr.save(step, model=model, optimizer=optimizer)
            if full is not None:  # new names only: blobs are named by content, steps by step
                written = sum(n for p, n in files_of(directory).items() if p not in before)
                whole = full.save(step, model=model, optimizer=optimizer)
                print(f"  step {step}: the incremental save wrote {written / 2**20:6.2f} MiB; "
                      f"a full save writes {sum(files_of(whole.path).values()) / 2**20:6.2f} MiB",
                      file=sys.stderr)  # fmt: skip
        if step == kill_after:
            print(f"  SIGKILL after step {step} (last checkpoint: {mgr.latest_step()})",
                  file=sys.stderr)  # fmt: skip
            os.kill(os.getpid(), signal.SIGKILL)
        step += 1
    mgr.close()
    digests = state_digests(model, optimizer)
    whole = hashlib.sha256(json.dumps(digests, sort_keys=True).encode()).hexdigest()[:16]
    print(json.dumps({"hash": whole, "loss": loss.item(), "tensors": digests}))


def child(directory: str, kill_after: int | None = None, report: bool = False) -> dict | None:
    cmd = [sys.executable, __file__, "--child", directory]
    if kill_after is not None:
        cmd += ["--kill-after", str(kill_after)]
    if report:
        cmd.append("--report")
    done = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=False)
    if done.returncode == -signal.SIGKILL:
        return None
    done.check_returncode()
    return json.loads(done.stdout)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", metavar="DIR", help=argparse.SUPPRESS)
    parser.add_argument("--kill-after", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--report", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, default=None, help="seed for the kill point")
    args = parser.parse_args()
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    if args.child:
        train(args.child, args.kill_after, args.report)
        return 0

    kill_after = random.Random(args.seed).randrange(SAVE_EVERY, STEPS - 2)
    with tempfile.TemporaryDirectory(prefix="ckpt-lora-") as tmp:
        print(f"1) uninterrupted run of {STEPS} steps, saving every {SAVE_EVERY}")
        straight = child(os.path.join(tmp, "straight"), report=True)
        print(f"2) interrupted run, killed after step {kill_after}")
        assert child(os.path.join(tmp, "resumed"), kill_after) is None, "the run was not killed"
        print("3) new process resumes from the latest checkpoint")
        resumed = child(os.path.join(tmp, "resumed"))
        # on a mismatch: do two uninterrupted runs agree? (else training is not reproducible)
        again = child(os.path.join(tmp, "again")) if resumed != straight else None
    assert straight is not None and resumed is not None
    print(f"uninterrupted: state hash {straight['hash']}  final loss {straight['loss']!r}")
    print(f"resumed:       state hash {resumed['hash']}  final loss {resumed['loss']!r}")
    if straight == resumed:
        print("IDENTICAL: the resumed run matches bit for bit")
        return 0
    print(f"MISMATCH in {differing(straight, resumed)}")
    assert again is not None
    if again == straight:
        print("a second uninterrupted run matches the first: the resume is at fault")
    else:  # then the resumed run cannot be expected to match either
        where = differing(straight, again)
        print(f"a second uninterrupted run differs from the first too, in {where}: "
              "training is not reproducible on this machine, whatever the resume")  # fmt: skip
    return 1


def differing(a: dict, b: dict) -> str:
    """Which tensors of the final state differ between two runs."""
    names = [k for k in a["tensors"] if a["tensors"][k] != b["tensors"].get(k)]
    return f"{len(names)} of {len(a['tensors'])} tensors: {', '.join(names) or '(the loss only)'}"


if __name__ == "__main__":
    sys.exit(main())
