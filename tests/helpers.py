"""Small builders shared by tests."""

from __future__ import annotations

import torch
from torch import nn


def small_model(seed: int = 0, dtype: torch.dtype = torch.float32, bias: bool = True) -> nn.Module:
    """A deterministic two-layer MLP with a BatchNorm (buffers, metadata)."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(6, 5, bias=bias), nn.BatchNorm1d(5), nn.Tanh(), nn.Linear(5, 3, bias=bias)
    ).to(dtype)


def train_steps(model: nn.Module, opt: torch.optim.Optimizer, steps: int, seed: int = 1) -> None:
    """Run ``steps`` deterministic optimizer steps (with a closure, for LBFGS)."""
    gen = torch.Generator().manual_seed(seed)
    dtype = next(model.parameters()).dtype
    for _ in range(steps):
        x = torch.randn(8, 6, generator=gen).to(dtype)
        y = torch.randn(8, 3, generator=gen).to(dtype)

        def closure(x: torch.Tensor = x, y: torch.Tensor = y) -> torch.Tensor:
            opt.zero_grad()
            loss = ((model(x) - y) ** 2).mean()
            loss.backward()
            return loss

        opt.step(closure)
