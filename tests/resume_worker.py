"""A deterministic training run for the exact-resume tests, run as its own process.

Usage: python resume_worker.py DIR OPTIMIZER UNTIL [--resume]

An OPTIMIZER ending in ``-cuda`` trains on the GPU, with noise and dropout drawn
from the CUDA random stream, which the checkpoint must bring back.

Trains steps [start, UNTIL) where start is 0, or one past the restored step
with --resume; saves a checkpoint after every step; prints the losses of the
steps it ran as JSON (float.hex, so equality is bit equality).
"""

from __future__ import annotations

import json
import random
import sys

import torch
from torch import nn

import ckpt

try:
    import numpy
except ImportError:  # bench/gpu_check.sh may run where NumPy is absent
    numpy = None


def build(optimizer: str) -> tuple[nn.Module, torch.optim.Optimizer]:
    random.seed(1234)
    if numpy is not None:
        numpy.random.seed(1234)
    torch.manual_seed(1234)  # and every CUDA device's stream
    model = nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.GELU(), nn.Linear(16, 4))
    if optimizer.endswith("-cuda"):
        model.cuda()
    if optimizer == "adamw-fused-cuda":
        return model, torch.optim.AdamW(model.parameters(), lr=3e-3, fused=True)
    if optimizer == "adam-capturable-cuda":
        return model, torch.optim.Adam(model.parameters(), lr=3e-3, capturable=True)
    if optimizer == "adamw":
        opt: torch.optim.Optimizer = torch.optim.AdamW(
            model.parameters(), lr=3e-3, weight_decay=0.05
        )
    elif optimizer == "adam-fused":
        opt = torch.optim.Adam(model.parameters(), lr=3e-3, amsgrad=True, fused=True)
    else:
        opt = torch.optim.SGD(
            [
                {"params": model[0].parameters(), "lr": 0.05},
                {"params": [*model[1].parameters(), *model[3].parameters()]},
            ],
            lr=0.02,
            momentum=0.9,
            nesterov=True,
        )
    return model, opt


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(10_000 + step)
    return torch.randn(16, 8, generator=gen), torch.randn(16, 4, generator=gen)


def main(argv: list[str]) -> None:
    directory, optimizer, until = argv[0], argv[1], int(argv[2])
    model, opt = build(optimizer)
    mgr = ckpt.CheckpointManager(directory)
    start = 0
    if "--resume" in argv:
        info = mgr.restore(model=model, optimizer=opt)
        assert info is not None
        start = info.step + 1
    losses = []
    for step in range(start, until):
        x, y = batch(step)
        if optimizer.endswith("-cuda"):
            x, y = x.cuda(), y.cuda()
            x = nn.functional.dropout(x + 0.01 * torch.randn_like(x), 0.1)
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item().hex())
        mgr.save(step, model=model, optimizer=opt)
    print(json.dumps({"start": start, "losses": losses}))


if __name__ == "__main__":
    main(sys.argv[1:])
