"""Demo: a 2-rank DDP run is SIGKILLed, resumed, and ends bit-identical to one that never stopped.

Launch it with torchrun (gloo on CPU, NCCL when CUDA is available)::

    torchrun --standalone --nproc-per-node 2 examples/ddp_resume.py [--seed N]

(``python examples/ddp_resume.py`` relaunches itself that way.) The training
has what usually makes a resumed run drift: dropout and input noise drawn from
each rank's own random streams, a DataLoader that shuffles every epoch and
splits it over the ranks, and a OneCycle learning-rate schedule. Every rank
builds one ``ckpt.CheckpointManager`` on the same directory and calls
``save``/``restore`` with the same items, exactly as a single process would;
ckpt writes the replicated weights once and each rank's random streams and
data position for that rank. See resume_harness.py for the three runs and the
comparison.
"""

from __future__ import annotations

import sys

import resume_harness
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import ckpt

EPOCHS = 3
BATCH = 8  # per rank
SAMPLES = 120  # 60 per rank: 8 batches per epoch, the last one short
SAVE_EVERY = 5


def total_steps(world_size: int) -> int:
    per_rank = -(-SAMPLES // world_size)
    return EPOCHS * -(-per_rank // BATCH)


def train(run: resume_harness.Run) -> None:
    """One rank of a training job: resume if a checkpoint exists, train, save every few steps."""
    torch.manual_seed(0)  # the same initial weights on every rank
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(SAMPLES, 16, generator=gen)
    y = x[:, :4].sin() + 0.1 * torch.randn(SAMPLES, 4, generator=gen)
    dataset = torch.utils.data.TensorDataset(torch.arange(SAMPLES), x, y)
    # The sampler splits every epoch over the ranks of the process group (num_replicas, rank).
    loader = ckpt.resumable_loader(dataset, batch_size=BATCH, shuffle=True, seed=0)
    model = nn.Sequential(
        nn.Linear(16, 64), nn.Dropout(0.2), nn.GELU(), nn.LayerNorm(64), nn.Linear(64, 4)
    ).to(run.device)
    model = DistributedDataParallel(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    steps = EPOCHS * len(loader)  # total_steps(world_size)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, 1e-2, total_steps=steps)
    torch.manual_seed(100 + run.rank)  # each rank's own dropout and noise
    items = {
        "model": model,
        "optimizer": optimizer,
        "scheduler": scheduler,
        "sampler": loader.sampler,
    }

    # Every rank, together: the same calls as in a single process.
    mgr = ckpt.CheckpointManager(run.directory, keep_last=2, every_steps=SAVE_EVERY)
    info = mgr.restore(**items)  # each rank gets its own random streams and data position back
    step = 0 if info is None else info.next_step
    if info is not None and run.rank == 0:
        print(f"  resumed from step {info.step}, continuing at step {step}", file=sys.stderr)
    while step < steps:
        for ids, x, y in loader:  # after a resume, the rest of the interrupted epoch
            x, y = x.to(run.device), y.to(run.device)  # noqa: PLW2901
            loss = nn.functional.mse_loss(model(x + 0.01 * torch.randn_like(x)), y)
            optimizer.zero_grad()
            loss.backward()  # DDP averages the gradients over the ranks
            optimizer.step()
            scheduler.step()
            run.log_step(step, loss, scheduler.get_last_lr(), ids)
            if mgr.should_save(step) or step == steps - 1:
                mgr.save(step, epoch=loader.sampler.epoch, **items)
            run.maybe_kill(step)
            step += 1
    mgr.close()
    run.log_final(model, optimizer)


if __name__ == "__main__":
    sys.exit(resume_harness.main(train, total_steps, SAVE_EVERY, __doc__))
