"""Learning-rate schedulers: keep an optimizer's lr consistent with a restored scheduler."""

from __future__ import annotations

import logging

import torch

from ckpt.torch_compat import scheduler_last_lr

__all__ = ["align_lr_to_scheduler", "scheduler_optimizer"]

logger = logging.getLogger(__name__)


def scheduler_optimizer(obj: object) -> torch.optim.Optimizer | None:
    """Return the optimizer a learning-rate scheduler drives, or ``None`` for other objects."""
    if not isinstance(obj, torch.optim.lr_scheduler.LRScheduler):
        return None
    optimizer = getattr(obj, "optimizer", None)
    return optimizer if isinstance(optimizer, torch.optim.Optimizer) else None


def align_lr_to_scheduler(name: str, scheduler: torch.optim.lr_scheduler.LRScheduler) -> int:
    """Set each param group's ``lr`` to the scheduler's last lr; return how many changed.

    Used when a scheduler is restored without its optimizer: the optimizer's
    groups still hold the lr they were built with, while chainable schedulers
    compute the next lr from the group's current one.
    """
    optimizer = scheduler_optimizer(scheduler)
    last = scheduler_last_lr(scheduler)
    if optimizer is None or not isinstance(last, list) or len(last) != len(optimizer.param_groups):
        return 0
    changed = 0
    for group, lr in zip(optimizer.param_groups, last, strict=True):
        current = group.get("lr")
        if isinstance(current, torch.Tensor):
            if current.item() != lr:
                current.fill_(lr)
                changed += 1
        elif current != lr:
            group["lr"] = lr
            changed += 1
    if changed:
        logger.info(
            "set the lr of %d param group(s) to scheduler %r's last lr %s "
            "(its optimizer was not restored with it)",
            changed,
            name,
            last,
        )
    return changed
