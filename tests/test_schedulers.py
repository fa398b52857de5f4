"""Every lr scheduler and GradScaler restore exactly as torch's own load_state_dict does."""

from __future__ import annotations

import inspect
import logging
import math

import pytest
import torch
from conftest import assert_same_state, states_differ
from torch.optim import lr_scheduler as sched

import ckpt
from ckpt.state.schedulers import align_lr_to_scheduler, scheduler_optimizer


def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Linear(4, 2)


SCHEDULERS = {
    "LambdaLR": lambda o: sched.LambdaLR(o, lambda e: 0.9**e),
    "MultiplicativeLR": lambda o: sched.MultiplicativeLR(o, lambda e: 0.95),
    "StepLR": lambda o: sched.StepLR(o, 2, gamma=0.5),
    "MultiStepLR": lambda o: sched.MultiStepLR(o, [2, 5]),
    "ConstantLR": lambda o: sched.ConstantLR(o, factor=0.5, total_iters=3),
    "LinearLR": lambda o: sched.LinearLR(o, 0.2, total_iters=5),
    "ExponentialLR": lambda o: sched.ExponentialLR(o, 0.9),
    "PolynomialLR": lambda o: sched.PolynomialLR(o, total_iters=8, power=2.0),
    "CosineAnnealingLR": lambda o: sched.CosineAnnealingLR(o, 6, eta_min=1e-4),
    "CosineAnnealingWarmRestarts": lambda o: sched.CosineAnnealingWarmRestarts(o, 3, T_mult=2),
    "CyclicLR": lambda o: sched.CyclicLR(o, 0.01, 0.1, step_size_up=2, mode="exp_range"),
    "OneCycleLR": lambda o: sched.OneCycleLR(o, 0.1, total_steps=20),
    "ReduceLROnPlateau": lambda o: sched.ReduceLROnPlateau(o, patience=0, factor=0.5),
    "SequentialLR": lambda o: sched.SequentialLR(
        o, [sched.LinearLR(o, 0.1, total_iters=3), sched.ExponentialLR(o, 0.8)], milestones=[3]
    ),
    "ChainedScheduler": lambda o: sched.ChainedScheduler(
        [sched.ConstantLR(o, 0.5, total_iters=4), sched.ExponentialLR(o, 0.9)]
    ),
}


def test_every_scheduler_class_is_covered():
    classes = {
        name
        for name, cls in inspect.getmembers(sched, inspect.isclass)
        if issubclass(cls, sched.LRScheduler) and not name.startswith("_") and name != "LRScheduler"
    }
    assert classes == set(SCHEDULERS)


def build(name: str):
    net = model()
    opt = torch.optim.SGD(
        [{"params": [net.weight]}, {"params": [net.bias], "lr": 0.02}], lr=0.05, momentum=0.9
    )
    return net, opt, SCHEDULERS[name](opt)


def advance(net, opt, scheduler, steps: int, start: int = 0) -> list[list[float]]:
    lrs = []
    for i in range(start, start + steps):
        gen = torch.Generator().manual_seed(i)
        loss = net(torch.randn(3, 4, generator=gen)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if isinstance(scheduler, sched.ReduceLROnPlateau):
            scheduler.step(1.0)  # never improves: the lr keeps dropping
        else:
            scheduler.step()
        lrs.append([g["lr"] for g in opt.param_groups])
    return lrs


@pytest.mark.parametrize("name", sorted(SCHEDULERS))
def test_restore_matches_torchs_load_state_dict_and_continues_identically(tmp_path, name):
    net, opt, scheduler = build(name)
    advance(net, opt, scheduler, 4)
    mgr = ckpt.CheckpointManager(tmp_path)
    mgr.save(3, model=net, optimizer=opt, scheduler=scheduler)

    theirs = build(name)  # torch's path
    theirs[0].load_state_dict(net.state_dict())
    theirs[1].load_state_dict(opt.state_dict())
    theirs[2].load_state_dict(scheduler.state_dict())
    ours = build(name)
    assert states_differ(ours[2].state_dict(), scheduler.state_dict())
    mgr.restore(model=ours[0], optimizer=ours[1], scheduler=ours[2])

    assert_same_state(ours[2].state_dict(), theirs[2].state_dict())
    assert_same_state(ours[1].state_dict(), theirs[1].state_dict())
    assert [g["lr"] for g in ours[1].param_groups] == ours[2].get_last_lr()
    assert advance(*ours, 6, start=4) == advance(*theirs, 6, start=4)
    assert_same_state(ours[1].state_dict(), theirs[1].state_dict())


def test_a_scheduler_restored_without_its_optimizer_sets_the_groups_lr(tmp_path, caplog):
    net, opt, scheduler = build("ExponentialLR")
    advance(net, opt, scheduler, 3)
    mgr = ckpt.CheckpointManager(tmp_path)
    mgr.save(2, scheduler=scheduler)
    _, opt2, scheduler2 = build("ExponentialLR")
    assert [g["lr"] for g in opt2.param_groups] != scheduler.get_last_lr()
    with caplog.at_level(logging.INFO, logger="ckpt"):
        mgr.restore(scheduler=scheduler2)
    assert [g["lr"] for g in opt2.param_groups] == scheduler.get_last_lr()
    assert "set the lr of 2 param group(s)" in caplog.text


def test_a_scheduler_restored_with_its_optimizer_keeps_the_saved_lr(tmp_path):
    """A user who set lr by hand after the scheduler keeps it: the pair was saved together."""
    net, opt, scheduler = build("StepLR")
    advance(net, opt, scheduler, 2)
    opt.param_groups[0]["lr"] = 0.123
    mgr = ckpt.CheckpointManager(tmp_path)
    mgr.save(1, optimizer=opt, scheduler=scheduler)
    _, opt2, scheduler2 = build("StepLR")
    mgr.restore(optimizer=opt2, scheduler=scheduler2)
    assert opt2.param_groups[0]["lr"] == 0.123


def test_alignment_handles_tensor_lrs_and_ignores_other_objects():
    param = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.Adam([param], lr=torch.tensor(0.01))
    scheduler = sched.ExponentialLR(opt, 0.5)
    scheduler._last_lr = [0.25]
    assert align_lr_to_scheduler("s", scheduler) == 1
    assert opt.param_groups[0]["lr"].item() == 0.25
    assert scheduler_optimizer({"not": "a scheduler"}) is None
    assert align_lr_to_scheduler("s", scheduler) == 0


def test_grad_scaler_round_trips_after_overflow_and_growth(tmp_path):
    def make():
        return torch.amp.GradScaler("cpu", init_scale=2.0**8, growth_interval=2)

    net = model()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    scaler = make()
    for i in range(6):
        loss = net(torch.ones(1, 4)).sum()
        if i in (1, 2):
            loss = loss * math.inf
        opt.zero_grad()
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
    mgr = ckpt.CheckpointManager(tmp_path)
    mgr.save(5, scaler=scaler)
    assert (scaler.get_scale(), scaler._get_growth_tracker()) == (2.0**7, 1)
    fresh = make()
    mgr.restore(scaler=fresh)
    assert_same_state(fresh.state_dict(), scaler.state_dict())
    assert fresh._get_growth_tracker() == scaler._get_growth_tracker()
