"""Training code run on the ranks of multi-rank tests: models, wrapping, steps, full states.

Imported by the ranks (through the fork server) and by the tests themselves.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn

WIDTH = 6


def build_model(seed: int = 0) -> nn.Module:
    """A small MLP with a BatchNorm (replicated buffers) and an odd-sized layer (uneven shards)."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(5, WIDTH), nn.BatchNorm1d(WIDTH), nn.Tanh(), nn.Dropout(0.1), nn.Linear(WIDTH, 3)
    )


def wrap(model: nn.Module, how: str) -> nn.Module:
    """``"fsdp"``: FSDP2 per layer and at the root; ``"ddp"``: DDP; anything else: as is."""
    if how == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for layer in model:
            if any(True for _ in layer.parameters()):
                fully_shard(layer)
        fully_shard(model)
        return model
    if how == "ddp":
        return nn.parallel.DistributedDataParallel(model)
    return model


def make(how: str, seed: int = 0, lr: float = 0.05) -> tuple[nn.Module, torch.optim.Optimizer, Any]:
    """A wrapped model, its AdamW optimizer and a step-decay scheduler."""
    model = wrap(build_model(seed), how)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)
    return model, optimizer, scheduler


def batch(step: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's inputs and targets for ``step`` (different per rank, fixed per step)."""
    gen = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randn(8, 5, generator=gen), torch.randn(8, 3, generator=gen)


def train_step(
    model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, step: int
) -> float:
    """One step: forward (dropout draws from the global stream), backward, step, schedule."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    x, y = batch(step, rank)
    optimizer.zero_grad()
    loss = ((model(x) - y) ** 2).mean()
    loss.backward()
    optimizer.step()
    scheduler.step()
    return float(loss.item())


def full_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every module tensor in full on CPU, gathered from the ranks (collective)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    return {k: v.detach().cpu().clone() for k, v in state.items()}


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer's per-parameter state in full on CPU, keyed by parameter name (collective)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True)
    state = get_optimizer_state_dict(model, optimizer, options=options)
    return {
        name: {
            k: v.detach().cpu().clone() if isinstance(v, torch.Tensor) else v
            for k, v in per.items()
        }
        for name, per in state["state"].items()
    }


class Numbers(torch.utils.data.Dataset):  # type: ignore[type-arg]
    """Sample ``i`` is (its index, inputs and target drawn from ``i``): batch ids can be logged."""

    def __init__(self, size: int = 48):
        self.size = size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor, torch.Tensor]:
        gen = torch.Generator().manual_seed(i)
        return i, torch.randn(5, generator=gen), torch.randn(3, generator=gen)


def run_training(
    root: str, how: str, total: int, kill_at: int | None, log: str, every: int = 2
) -> dict[str, Any]:
    """Train to step ``total`` from the latest checkpoint, saving every ``every`` steps.

    Appends one JSON line per step to ``log`` (step, loss, lr, batch ids) and, at
    step ``kill_at``, SIGKILLs this process before the step's save. Returns the
    full final state.
    """
    import json
    import os
    import signal

    import ckpt

    model, optimizer, scheduler = make(how)
    loader = ckpt.resumable_loader(Numbers(), batch_size=4, seed=3, num_workers=0)
    items = dict(model=model, optimizer=optimizer, scheduler=scheduler, sampler=loader.sampler)
    with ckpt.CheckpointManager(root, every_steps=every, keep_last=2) as mgr:
        info = mgr.restore(**items)
        if info is None:
            torch.manual_seed(100 + dist.get_rank())  # dropout differs per rank
        step = 0 if info is None else info.next_step
        while step < total:
            for ids, x, y in loader:
                optimizer.zero_grad()
                loss = ((model(x) - y) ** 2).mean()
                loss.backward()
                optimizer.step()
                scheduler.step()
                lr = optimizer.param_groups[0]["lr"]
                with open(log, "a") as f:
                    f.write(json.dumps([step, loss.item(), lr, ids.tolist()]) + "\n")
                if step == kill_at:
                    os.kill(os.getpid(), signal.SIGKILL)
                if mgr.should_save(step):
                    mgr.save(step, epoch=loader.sampler.epoch, **items)
                step += 1
                if step >= total:
                    break
    return {"model": full_model_state(model), "optimizer": full_optimizer_state(model, optimizer)}
