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
