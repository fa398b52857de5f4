"""Training loops for verify_resume tests, importable by a new interpreter as resume_loops."""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

import ckpt


class Points(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """A fixed regression dataset; ``augment`` adds noise drawn from the global torch stream."""

    def __init__(self, size: int = 24, augment: bool = False):
        gen = torch.Generator().manual_seed(123)
        self.x = torch.randn(size, 6, generator=gen)
        self.y = torch.randn(size, 3, generator=gen)
        self.augment = augment

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.x[index]
        if self.augment:
            x = x + 0.1 * torch.rand(6)
        return x, self.y[index]


LOADER: Any = None
NOISE = torch.Generator()
_ITERATORS: dict[int, Any] = {}


def _next_batch(loader: Any) -> Any:
    """The loader's next batch, starting the next epoch when one ends."""
    it = _ITERATORS.get(id(loader))
    if it is None:
        it = _ITERATORS[id(loader)] = iter(loader)
    try:
        return next(it)
    except StopIteration:
        it = _ITERATORS[id(loader)] = iter(loader)
        return next(it)


def _model_and_optimizer() -> dict[str, Any]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Dropout(0.2), nn.Tanh(), nn.Linear(8, 3))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=0.05, total_steps=100)
    return {"model": model, "optimizer": optimizer, "scheduler": scheduler}


def _train(items: dict[str, Any], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    items["optimizer"].zero_grad()
    loss = ((items["model"](x) - y) ** 2).mean()
    loss.backward()
    items["optimizer"].step()
    items["scheduler"].step()
    return loss.detach()


def readme_build() -> dict[str, Any]:
    """The README loop: model with dropout, AdamW, OneCycle, a resumable loader."""
    global LOADER  # noqa: PLW0603 - a script-level loader, as in a training script
    _ITERATORS.clear()
    items = _model_and_optimizer()
    LOADER = ckpt.resumable_loader(Points(), batch_size=4, seed=0)
    items["sampler"] = LOADER.sampler
    items["counters"] = {"seen": 0}
    return items


def readme_step(items: dict[str, Any], i: int) -> torch.Tensor:
    x, y = _next_batch(LOADER)
    items["counters"]["seen"] += len(x)
    return _train(items, x, y)


def generator_build() -> dict[str, Any]:
    """The README loop plus a script-owned generator for input noise, not saved."""
    items = readme_build()
    NOISE.manual_seed(7)
    return items


def generator_step(items: dict[str, Any], i: int) -> torch.Tensor:
    x, y = _next_batch(LOADER)
    x = x + 0.1 * torch.randn(x.shape, generator=NOISE)
    return _train(items, x, y)


def workers_build() -> dict[str, Any]:
    """A plain DataLoader with two workers drawing random augmentations."""
    global LOADER  # noqa: PLW0603 - a script-level loader, as in a training script
    _ITERATORS.clear()
    items = _model_and_optimizer()
    LOADER = DataLoader(Points(augment=True), batch_size=4, shuffle=True, num_workers=2)
    return items


def workers_step(items: dict[str, Any], i: int) -> torch.Tensor:
    x, y = _next_batch(LOADER)
    return _train(items, x, y)


def nondeterministic_step(items: dict[str, Any], i: int) -> torch.Tensor:
    """The README step whose loss is summed in an order the OS chooses (a non-deterministic sum).

    The sum feeds the state through ``counters`` and the returned loss.
    """
    x, y = _next_batch(LOADER)
    items["optimizer"].zero_grad()
    squares = ((items["model"](x) - y) ** 2).flatten()
    terms = torch.cat([squares, torch.tensor([1e8, -1e8])])  # float32: the order decides
    seed = int.from_bytes(os.urandom(8), "little") % 2**63
    order = torch.randperm(len(terms), generator=torch.Generator().manual_seed(seed))
    total = torch.zeros(())
    for k in order.tolist():  # one float32 add at a time (cumsum accumulates in double)
        total = total + terms[k]
    loss = total / len(terms)
    loss.backward()
    items["optimizer"].step()
    items["scheduler"].step()
    loss = loss.detach()
    items["counters"]["seen"] += float(loss)
    return loss


class Averager:
    """Keeps a running mean; its ``state_dict`` forgets ``count``."""

    def __init__(self) -> None:
        self.total = 0.0
        self.count = 0

    def state_dict(self) -> dict[str, Any]:
        return {"total": self.total}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.total = state["total"]


def omitting_build() -> dict[str, Any]:
    items = readme_build()
    items["average"] = Averager()
    return items


def omitting_step(items: dict[str, Any], i: int) -> torch.Tensor:
    loss = readme_step(items, i)
    average = items["average"]
    average.count += 1
    average.total += float(loss)
    for group in items["optimizer"].param_groups:
        group["weight_decay"] = 0.01 * average.count
    return loss
