"""A training run with every kind of state, for the SIGKILL-and-resume tests.

``run(directory, config, kill, log_path, restore_rng)`` trains (resuming from
``directory`` when it holds a checkpoint) and SIGKILLs itself at ``kill``, a
``(step, phase)`` pair. Each step appends one JSON line to ``log_path`` with
everything that must match an uninterrupted run: the batch indices, the loss,
every group's lr, the loss scale and digests of the random streams, all as
exact values (floats as ``float.hex``). The run ends with a line holding a
digest of the final model and optimizer state.

Meant to run in a child of a fork server that has imported torch already
(see test_kill_resume.py), so a trial costs a fork, not an interpreter start.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import signal
import warnings
from typing import Any

import numpy
import torch
from torch import nn

import ckpt

TOTAL_STEPS = 20
SAMPLES = 23  # 5 batches of 5 per epoch, the last one short
BATCH = 5
SAVE_EVERY = 3
PHASES = ("before_step", "mid_step", "after_step", "epoch_end")


STEPS_PER_EPOCH = math.ceil(SAMPLES / BATCH)


def dataset() -> torch.utils.data.TensorDataset:
    gen = torch.Generator().manual_seed(99)
    x = torch.randn(SAMPLES, 8, generator=gen)
    y = torch.randn(SAMPLES, 4, generator=gen)
    return torch.utils.data.TensorDataset(x, y, torch.arange(SAMPLES))


def build(config: str) -> dict[str, Any]:
    """The objects of one configuration, in the order they are created."""
    random.seed(1234)
    numpy.random.seed(1234)
    torch.manual_seed(1234)
    model = nn.Sequential(
        nn.Linear(8, 32), nn.Dropout(0.3), nn.GELU(), nn.LayerNorm(32), nn.Linear(32, 4)
    )
    lr = 3e-3
    sched = torch.optim.lr_scheduler
    if config == "onecycle":
        opt: torch.optim.Optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
        scheduler: Any = sched.OneCycleLR(opt, max_lr=1e-2, total_steps=TOTAL_STEPS)
    elif config == "sequential":
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True)
        scheduler = sched.SequentialLR(
            opt,
            [sched.LinearLR(opt, 0.1, total_iters=4), sched.CosineAnnealingWarmRestarts(opt, 5)],
            milestones=[4],
        )
    elif config == "plateau":
        opt = torch.optim.Adam(model.parameters(), lr=lr, amsgrad=True, fused=True)
        scheduler = sched.ReduceLROnPlateau(opt, patience=1, factor=0.5)
    else:  # the loader configurations: "[persistent-]workers", "stateful-loader[-workers]"
        opt = torch.optim.AdamW(model.parameters(), lr=lr, foreach=True)
        scheduler = sched.LambdaLR(opt, lambda step: 0.97**step)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=3)
    data = dataset()
    if config.startswith("stateful-loader"):
        # torchdata's own shuffling draws from the global torch stream whenever an
        # iterator is created (also when it resumes), so it gets ckpt's sampler.
        from torchdata.stateful_dataloader import StatefulDataLoader

        sampler = ckpt.ResumableSampler(data, seed=7)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            loader: Any = StatefulDataLoader(
                data,
                batch_size=BATCH,
                sampler=sampler,
                generator=sampler.loader_generator,
                **_workers(config),
            )
        data_item = loader
    else:  # ckpt's loader, with 2 workers that prefetch in the worker configurations
        loader = ckpt.resumable_loader(data, batch_size=BATCH, seed=7, **_workers(config))
        data_item = loader.sampler
    return {
        "model": model,
        "optimizer": opt,
        "scheduler": scheduler,
        "scaler": scaler,
        "data": data_item,
        "loader": loader,
    }


def _workers(config: str) -> dict[str, Any]:
    """DataLoader worker options: 2 prefetching workers in the worker configurations.

    They are forked from the run, as in a training script: a run forked from the
    test's fork server would otherwise start them from the fork server, outside
    the run's process group, and slowly.
    """
    if not config.endswith("workers"):
        return {}
    options: dict[str, Any] = {"num_workers": 2, "multiprocessing_context": "fork"}
    if config.startswith("persistent"):
        options.update(persistent_workers=True, prefetch_factor=3)
    return options


def _hex(value: float) -> str:
    return float(value).hex()


def streams_digest() -> str:
    digest = hashlib.sha256()
    digest.update(repr(random.getstate()).encode())
    state = numpy.random.get_state()
    digest.update(state[1].tobytes() + repr(state[2:]).encode())
    digest.update(torch.get_rng_state().numpy().tobytes())
    return digest.hexdigest()[:16]


def state_digest(model: nn.Module, opt: torch.optim.Optimizer) -> str:
    digest = hashlib.sha256()
    for prefix, state in (("model", model.state_dict()), ("optimizer", opt.state_dict())):
        stack: list[tuple[str, Any]] = [(prefix, state)]
        while stack:
            key, value = stack.pop()
            digest.update(key.encode())
            if isinstance(value, dict):
                stack.extend((f"{key}.{k}", v) for k, v in value.items())
            elif isinstance(value, (list, tuple)):
                stack.extend((f"{key}.{i}", v) for i, v in enumerate(value))
            elif isinstance(value, torch.Tensor):
                digest.update(str(value.dtype).encode())
                digest.update(
                    value.detach().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes()
                )
            else:
                digest.update(repr(value).encode())
    return digest.hexdigest()


def run(
    directory: str,
    config: str,
    kill: tuple[int, str] | None,
    log_path: str,
    restore_rng: bool = True,
) -> None:
    """Train to TOTAL_STEPS (resuming if possible); SIGKILL self at ``kill``."""
    os.setpgrp()  # a process group of its own, for this run and its DataLoader workers
    torch.set_num_threads(1)
    objs = build(config)
    model, opt, scheduler, scaler, loader = (
        objs[k] for k in ("model", "optimizer", "scheduler", "scaler", "loader")
    )
    items = {k: objs[k] for k in ("model", "optimizer", "scheduler", "scaler", "data")}
    log = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def emit(record: dict[str, Any]) -> None:
        os.write(log, (json.dumps(record) + "\n").encode())

    def maybe_kill(step: int, phase: str) -> None:
        if kill == (step, phase):  # the whole job dies at once: DataLoader workers too
            os.killpg(0, signal.SIGKILL)

    mgr = ckpt.CheckpointManager(directory, keep_last=2, every_steps=SAVE_EVERY)
    info = mgr.restore(rng=restore_rng, **items)
    step = 0 if info is None else info.next_step
    emit({"start": step, "pid": os.getpid()})
    while step < TOTAL_STEPS:
        for x, y, idx in loader:
            maybe_kill(step, "before_step")
            model.train()
            noisy = x + 0.01 * torch.randn_like(x)
            weight = 1.0 + 0.1 * float(numpy.random.rand())
            loss = weight * nn.functional.mse_loss(model(noisy), y)
            if step > 0 and random.random() < 0.15:
                loss = loss * math.inf  # an overflow: the scaler skips the step and backs off
            opt.zero_grad()
            scaler.scale(loss).backward()
            maybe_kill(step, "mid_step")
            scaler.step(opt)
            scaler.update()
            if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
                scheduler.step(loss.item() if math.isfinite(loss.item()) else 1e3)
            else:
                scheduler.step()
            emit(
                {
                    "step": step,
                    "epoch": getattr(items["data"], "epoch", None),
                    "idx": idx.tolist(),
                    "loss": _hex(loss.item()),
                    "lr": [_hex(g["lr"]) for g in opt.param_groups],
                    "scale": _hex(scaler.get_scale()),
                    "streams": streams_digest(),
                }
            )
            if mgr.should_save(step) or step == TOTAL_STEPS - 1:
                mgr.save(step, metrics={"loss": loss.item()}, **items)
            maybe_kill(step, "after_step")
            step += 1
            if step == TOTAL_STEPS:
                break
        maybe_kill(step - 1, "epoch_end")
    emit({"final": state_digest(model, opt), "streams": streams_digest()})
    os.close(log)
