"""Demo: a 2-rank FSDP2 run is SIGKILLed, resumed, and ends bit-identical to one that never stopped.

Launch it with torchrun (gloo on CPU, NCCL when CUDA is available)::

    torchrun --standalone --nproc-per-node 2 examples/fsdp_resume.py [--seed N]

(``python examples/fsdp_resume.py`` relaunches itself that way.) The model is
sharded with ``torch.distributed.fsdp.fully_shard`` (FSDP2): every parameter,
and the AdamW state that follows it, is a DTensor of which each rank holds one
slice. Every rank builds one ``ckpt.CheckpointManager`` on the same directory
and calls ``save``/``restore`` with the same items, exactly as a single process
would; each rank writes its own shards, and the manifest records where each
shard sits in the full tensor (so the checkpoint also restores on another
number of ranks, or into a plain model in one process). Dropout, input noise,
a shuffled DataLoader split over the ranks and a OneCycle schedule make the run
drift unless everything comes back. See resume_harness.py for the three runs
and the comparison.
"""

from __future__ import annotations

import sys

import resume_harness
import torch
from torch import nn
from torch.distributed.fsdp import fully_shard

import ckpt

EPOCHS = 3
BATCH = 8  # per rank
SAMPLES = 120  # 60 per rank: 8 batches per epoch, the last one short
SAVE_EVERY = 5


def total_steps(world_size: int) -> int:
    per_rank = -(-SAMPLES // world_size)
    return EPOCHS * -(-per_rank // BATCH)


def build_model(device: torch.device) -> nn.Module:
    """The same initial weights on every rank, then each rank keeps its slices."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(16, 96), nn.Dropout(0.2), nn.GELU(), nn.LayerNorm(96),
        nn.Linear(96, 96), nn.Dropout(0.2), nn.GELU(), nn.Linear(96, 4),
    ).to(device)  # fmt: skip
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer)  # one all-gather per layer in forward
    fully_shard(model)  # the rest (the LayerNorm) with the root
    return model


def train(run: resume_harness.Run) -> None:
    """One rank of a training job: resume if a checkpoint exists, train, save every few steps."""
    model = build_model(run.device)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(SAMPLES, 16, generator=gen)
    y = x[:, :4].sin() + 0.1 * torch.randn(SAMPLES, 4, generator=gen)
    dataset = torch.utils.data.TensorDataset(torch.arange(SAMPLES), x, y)
    # The sampler splits every epoch over the ranks of the process group (num_replicas, rank).
    loader = ckpt.resumable_loader(dataset, batch_size=BATCH, shuffle=True, seed=0)
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

    # Every rank, together: the same calls as in a single process, with sharded items.
    mgr = ckpt.CheckpointManager(run.directory, keep_last=2, every_steps=SAVE_EVERY)
    info = mgr.restore(**items)  # each rank reads the byte ranges of its own shards
    step = 0 if info is None else info.next_step
    if info is not None and run.rank == 0:
        print(f"  resumed from step {info.step}, continuing at step {step}", file=sys.stderr)
    while step < steps:
        for ids, x, y in loader:  # after a resume, the rest of the interrupted epoch
            x, y = x.to(run.device), y.to(run.device)  # noqa: PLW2901
            loss = nn.functional.mse_loss(model(x + 0.01 * torch.randn_like(x)), y)
            optimizer.zero_grad()
            loss.backward()  # FSDP reduce-scatters the gradients: each rank gets its slices'
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
