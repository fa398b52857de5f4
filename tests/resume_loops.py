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


class TinyGPT(nn.Module):
    """A GPT-2-shaped decoder (token and position embeddings, pre-norm blocks, tied head)."""

    def __init__(self, vocab: int = 256, width: int = 64, layers: int = 2, context: int = 32):
        super().__init__()
        self.tokens = nn.Embedding(vocab, width)
        self.positions = nn.Embedding(context, width)
        block = nn.TransformerEncoderLayer(
            width, nhead=4, dim_feedforward=4 * width, dropout=0.1, batch_first=True,
            norm_first=True, activation="gelu",
        )  # fmt: skip
        self.blocks = nn.TransformerEncoder(block, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        self.context = context

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        n = ids.shape[1]
        mask = nn.Transformer.generate_square_subsequent_mask(n)
        h = self.tokens(ids) + self.positions(torch.arange(n))
        h = self.blocks(h, mask=mask, is_causal=True)
        return self.norm(h) @ self.tokens.weight.T


def warmup(step: int) -> float:
    """A linear warmup over 4 steps."""
    return min(1.0, (step + 1) / 4)


GPT_WIDTH = {"width": 64, "layers": 2}
if os.environ.get("CKPT_BENCH_GPT"):  # bench/verify_resume_bench.py sizes the child's model too
    _width, _layers = os.environ["CKPT_BENCH_GPT"].split(",")
    GPT_WIDTH = {"width": int(_width), "layers": int(_layers)}


def gpt_build() -> dict[str, Any]:
    """A GPT-2-shaped language model on random tokens, AdamW with warmup, a resumable loader."""
    global LOADER  # noqa: PLW0603 - a script-level loader, as in a training script
    _ITERATORS.clear()
    torch.manual_seed(0)
    model = TinyGPT(**GPT_WIDTH)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup)
    tokens = torch.randint(0, 256, (64, 33), generator=torch.Generator().manual_seed(1))
    LOADER = ckpt.resumable_loader(tokens, batch_size=8, seed=0)
    return {
        "model": model,
        "optimizer": optimizer,
        "scheduler": scheduler,
        "sampler": LOADER.sampler,
    }


def gpt_step(items: dict[str, Any], i: int) -> torch.Tensor:
    batch = _next_batch(LOADER)
    logits = items["model"](batch[:, :-1])
    loss = nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1)
    )
    items["optimizer"].zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(items["model"].parameters(), 1.0)
    items["optimizer"].step()
    items["scheduler"].step()
    return loss.detach()


class Block(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(x + self.bn2(self.conv2(h)))


def resnet_build() -> dict[str, Any]:
    """A ResNet-shaped classifier (BatchNorm buffers), SGD with momentum and nesterov, OneCycle."""
    global LOADER  # noqa: PLW0603 - a script-level loader, as in a training script
    _ITERATORS.clear()
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
        Block(16), Block(16), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10),
    )  # fmt: skip
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=0.2, total_steps=50)
    gen = torch.Generator().manual_seed(2)
    data = torch.utils.data.TensorDataset(
        torch.randn(48, 3, 16, 16, generator=gen), torch.randint(0, 10, (48,), generator=gen)
    )
    LOADER = ckpt.resumable_loader(data, batch_size=8, seed=0)
    return {
        "model": model,
        "optimizer": optimizer,
        "scheduler": scheduler,
        "sampler": LOADER.sampler,
    }


def resnet_step(items: dict[str, Any], i: int) -> torch.Tensor:
    x, y = _next_batch(LOADER)
    flip = torch.rand(len(x)) < 0.5  # a random flip from the global stream
    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    loss = nn.functional.cross_entropy(items["model"](x), y)
    items["optimizer"].zero_grad()
    loss.backward()
    items["optimizer"].step()
    items["scheduler"].step()
    return loss.detach()


def cuda_build() -> dict[str, Any]:
    """The README loop on the first CUDA device (dropout draws from the CUDA stream)."""
    items = readme_build()
    items["model"].cuda()
    items["optimizer"] = torch.optim.AdamW(items["model"].parameters(), lr=0.01)
    items["scheduler"] = torch.optim.lr_scheduler.OneCycleLR(
        items["optimizer"], max_lr=0.05, total_steps=100
    )
    return items


def cuda_step(items: dict[str, Any], i: int) -> torch.Tensor:
    x, y = _next_batch(LOADER)
    return _train(items, x.cuda(), y.cuda())


BUILDS = {"count": 0}


def counting_build() -> dict[str, Any]:
    """The README loop, counting its builds (in one process: the third is the first resume)."""
    BUILDS["count"] += 1
    return readme_build()


def noisy_after_resume_step(items: dict[str, Any], i: int) -> torch.Tensor:
    """Exact in the two uninterrupted runs; OS-random noise in the loss of resumed runs."""
    loss = readme_step(items, i)
    if BUILDS["count"] >= 3:
        loss = loss + int.from_bytes(os.urandom(2), "little") * 1e-3
    return loss


def resumable_workers_build() -> dict[str, Any]:
    """The README loop with two workers drawing random augmentations, through resumable_loader."""
    global LOADER  # noqa: PLW0603 - a script-level loader, as in a training script
    _ITERATORS.clear()
    items = _model_and_optimizer()
    LOADER = ckpt.resumable_loader(Points(augment=True), batch_size=4, seed=0, num_workers=2)
    items["sampler"] = LOADER.sampler
    return items


def plain_workers_build() -> dict[str, Any]:
    """The README loop with two workers and no randomness in the dataset: exact."""
    global LOADER  # noqa: PLW0603 - a script-level loader, as in a training script
    _ITERATORS.clear()
    items = _model_and_optimizer()
    LOADER = ckpt.resumable_loader(Points(), batch_size=4, seed=0, num_workers=2)
    items["sampler"] = LOADER.sampler
    return items


def list_build() -> list[Any]:
    """Returns a list, not the dict of items by name."""
    return list(_model_and_optimizer().values())


def int_keys_build() -> dict[Any, Any]:
    return dict(enumerate(_model_and_optimizer().values()))


def raising_step(items: dict[str, Any], i: int) -> torch.Tensor:
    if i == 2:
        raise ValueError("the loss went NaN at step 2")
    return readme_step(items, i)


def raising_when_resumed_step(items: dict[str, Any], i: int) -> torch.Tensor:
    """Raises at step 3 in the fresh interpreter of a resumed run only (``python -c``)."""
    import sys

    if sys.argv[0] == "-c" and i == 3:
        raise RuntimeError("out of memory in the resumed run")
    return readme_step(items, i)


def hanging_when_resumed_step(items: dict[str, Any], i: int) -> torch.Tensor:
    """Hangs at step 3 of a resumed run in a fresh interpreter, with a child process of
    its own (its pid written to ``$CKPT_TEST_GRANDCHILD``), as a stuck DataLoader would."""
    import subprocess
    import sys
    import time

    if sys.argv[0] == "-c" and i == 3:
        sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
        with open(os.environ["CKPT_TEST_GRANDCHILD"], "w") as f:
            f.write(str(sleeper.pid))
        time.sleep(600)
    return readme_step(items, i)


NOT_CALLABLE = 3


def loader_item_build() -> dict[str, Any]:
    """Returns the loader itself as an item (ckpt saves ``loader.sampler``)."""
    items = readme_build()
    items["loader"] = LOADER
    return items


def dict_loss_step(items: dict[str, Any], i: int) -> dict[str, Any]:
    return {"loss": readme_step(items, i)}
