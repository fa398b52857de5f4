"""Restores in a process group (issue 18): any checkpoint into any layout, agreed outcomes.

A checkpoint saved by one process (format 1/2) restores into DDP, FSDP2 and
tensor-parallel models on several ranks, each rank's local shards equal to the
matching part of the one-process tensors; a restore that fails anywhere fails
everywhere with the same error class; ``fallback_to_intact`` picks the same step
on every rank. Functions named ``on_ranks_*`` run on the ranks.
"""

from __future__ import annotations

import contextlib
import copy
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import assert_same_state, states_differ
from dist_training import full_model_state, full_optimizer_state, make, train_step

import ckpt

pytestmark = pytest.mark.distributed


def _exact(a: dict[str, Any], b: dict[str, Any]) -> None:
    assert set(a) == set(b)
    for key, value in a.items():
        assert_same_state(value, b[key], key)


def _one_process_checkpoint(root: Path, steps: int = 3) -> dict[str, Any]:
    """Train the plain model ``steps`` steps in this process (no group), save; its full state."""
    model, optimizer, scheduler = make("none")
    torch.manual_seed(11)
    for step in range(steps):
        train_step(model, optimizer, scheduler, step)
    with ckpt.CheckpointManager(root) as mgr:
        mgr.save(steps - 1, model=model, optimizer=optimizer, scheduler=scheduler, data={"k": 1})
    assert (
        '"format_version":3' not in (root / f"step_{steps - 1:012d}" / "manifest.json").read_text()
    )
    names = [n for n, _ in model.named_parameters()]
    packed = optimizer.state_dict()
    return {
        "model": {k: v.clone() for k, v in model.state_dict().items()},
        "optimizer": {names[i]: s for i, s in packed["state"].items()},
        "packed": packed,
        "scheduler": scheduler.state_dict(),
        "lr": optimizer.param_groups[0]["lr"],
    }


def _check_local_shards(state: dict[str, Any], full: dict[str, Any], where: str) -> int:
    """Each DTensor's local shard (each plain tensor) equals its part of the full tensor."""
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    checked = 0
    for key, value in state.items():
        if isinstance(value, dict):
            checked += _check_local_shards(value, full[key], f"{where}.{key}")
            continue
        if not isinstance(value, torch.Tensor):
            assert value == full[key], f"{where}.{key}"
            continue
        expected = full[key]
        local = value
        if isinstance(value, DTensor):
            shape, offset = compute_local_shape_and_global_offset(
                value.shape, value.device_mesh, value.placements
            )
            index = tuple(slice(o, o + s) for o, s in zip(offset, shape, strict=True))
            expected = expected[index] if expected.dim() else expected
            local = value.to_local()
        assert local.dtype == expected.dtype, f"{where}.{key}: dtype"
        assert local.device == expected.device, f"{where}.{key}: device"
        assert torch.equal(local, expected), f"{where}.{key}: values differ"
        checked += 1
    return checked


def _local_states(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    local = StateDictOptions(full_state_dict=False)
    return {
        "model": get_model_state_dict(model, options=local),
        "optimizer": get_optimizer_state_dict(model, optimizer, options=local)["state"],
    }


# ------------------------------------------------------------------ on the ranks


def make_tp(world: int, seed: int = 0) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """An MLP split column- then row-wise (DTensors sharded on dim 0 and dim 1), with Adam."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        parallelize_module,
    )

    model = _tp_model(seed)
    mesh = init_device_mesh("cpu", (world,))
    parallelize_module(model, mesh, {"0": ColwiseParallel(), "2": RowwiseParallel()})
    return model, torch.optim.Adam(model.parameters(), lr=0.5)


def _tp_model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))


def on_ranks_restore_one_process(
    rank: int, world: int, root: str, how: str, full: dict[str, Any]
) -> dict[str, Any]:
    """Restore a one-process checkpoint into ``how``; check local shards; the full state."""
    if how == "tp":
        model, optimizer = make_tp(world, seed=7)
        items: dict[str, Any] = {"model": model, "optimizer": optimizer}
    else:
        model, optimizer, scheduler = make(how, seed=7, lr=0.5)
        items = {"model": model, "optimizer": optimizer, "scheduler": scheduler, "data": {}}
    with ckpt.CheckpointManager(root) as mgr:
        info = mgr.restore(**items)
    assert info is not None
    checked = _check_local_shards(_local_states(model, optimizer), full, f"rank {rank}")
    return {
        "model": full_model_state(model),
        "optimizer": full_optimizer_state(model, optimizer),
        "lr": optimizer.param_groups[0]["lr"],
        "data": items.get("data"),
        "checked": checked,
        "scheduler": items["scheduler"].state_dict() if "scheduler" in items else None,
    }


def on_ranks_continue_after(
    rank: int, world: int, root: str | None, how: str, full: dict[str, Any], more: int
) -> dict[str, Any]:
    """Restore (``root``) or load the same state with DCP (``None``), then train ``more`` steps."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    model, optimizer, scheduler = make(how, seed=7, lr=0.5)
    if root is not None:
        with ckpt.CheckpointManager(root) as mgr:
            info = mgr.restore(model=model, optimizer=optimizer, scheduler=scheduler, rng=False)
        assert info is not None
    else:
        options = StateDictOptions(full_state_dict=True)
        set_model_state_dict(model, full["model"], options=options)
        names = list(full["optimizer"])
        packed = full["packed"]
        by_name = {
            "state": {names[i]: s for i, s in packed["state"].items()},
            "param_groups": [
                {**g, "params": [names[i] for i in g["params"]]} for g in packed["param_groups"]
            ],
        }
        set_optimizer_state_dict(model, optimizer, copy.deepcopy(by_name), options=options)
        scheduler.load_state_dict(full["scheduler"])
    torch.manual_seed(500 + rank)
    losses = [train_step(model, optimizer, scheduler, 3 + i) for i in range(more)]
    return {
        "losses": losses,
        "model": full_model_state(model),
        "optimizer": full_optimizer_state(model, optimizer),
    }


# -------------------------------------------------------------------------- tests


@pytest.mark.parametrize("how", ["fsdp", "ddp"])
def test_a_one_process_checkpoint_restores_into_a_group_exactly_and_trains_on_identically(
    rank_pool, tmp_path, how, caplog
):
    full = _one_process_checkpoint(tmp_path)
    restored = rank_pool.run(on_ranks_restore_one_process, str(tmp_path), how, full)
    for rank in range(2):
        assert restored[rank]["checked"] > 10
        _exact(full["model"], restored[rank]["model"])
        _exact(full["optimizer"], restored[rank]["optimizer"])
        assert restored[rank]["lr"] == full["lr"]
        assert restored[rank]["scheduler"] == full["scheduler"]
        assert restored[rank]["data"] == {"k": 1}  # rank 0's own items, on every rank
    after = rank_pool.run(on_ranks_continue_after, str(tmp_path), how, full, 2)
    reference = rank_pool.run(on_ranks_continue_after, None, how, full, 2)
    for rank in range(2):
        assert after[rank]["losses"] == reference[rank]["losses"]
        _exact(reference[rank]["model"], after[rank]["model"])
        _exact(reference[rank]["optimizer"], after[rank]["optimizer"])


def test_a_one_process_checkpoint_restores_into_tensor_parallel_dtensors(rank_pool, tmp_path):
    model = _tp_model(0)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
    x = torch.randn(3, 5, generator=torch.Generator().manual_seed(1))
    model(x).sum().backward()
    optimizer.step()
    ckpt.CheckpointManager(tmp_path).save(0, model=model, optimizer=optimizer)
    names = [n for n, _ in model.named_parameters()]
    full = {
        "model": dict(model.state_dict()),
        "optimizer": {names[i]: s for i, s in optimizer.state_dict()["state"].items()},
    }
    restored = rank_pool.run(on_ranks_restore_one_process, str(tmp_path), "tp", full)
    for rank in range(2):
        assert restored[rank]["checked"] == 4 + 4 * 3  # every tensor of both items
        _exact(full["model"], restored[rank]["model"])
        _exact(full["optimizer"], restored[rank]["optimizer"])


def _wide(seed: int) -> torch.nn.Module:
    """An MLP 7 wide: its layers shard unevenly over 2 ranks (4, 3) and 3 ranks (3, 3, 1)."""
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3))


def on_ranks_hop(rank: int, world: int, src: str, dst: str, full: dict[str, Any]) -> dict[str, Any]:
    """Restore ``src`` into a fresh FSDP2 model (local shards checked), save it to ``dst``."""
    from torch.distributed.fsdp import fully_shard

    model = _wide(9)
    for layer in (model[0], model[2]):
        fully_shard(layer)
    fully_shard(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.5)
    with ckpt.CheckpointManager(src) as mgr:
        mgr.restore(model=model, optimizer=optimizer)
    checked = _check_local_shards(_local_states(model, optimizer), full, f"rank {rank}")
    with ckpt.CheckpointManager(dst) as mgr:
        mgr.save(5, model=model, optimizer=optimizer)
    return {
        "checked": checked,
        "model": full_model_state(model),
        "optimizer": full_optimizer_state(model, optimizer),
    }


def test_fsdp2_from_one_process_to_two_ranks_to_three_uneven_and_back_to_one(
    rank_pool, fresh_ranks, tmp_path
):
    model = _wide(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    for step in range(2):
        optimizer.zero_grad()
        model(torch.randn(4, 5, generator=torch.Generator().manual_seed(step))).sum().backward()
        optimizer.step()
    ckpt.CheckpointManager(tmp_path / "one").save(0, model=model, optimizer=optimizer)
    names = [n for n, _ in model.named_parameters()]
    full = {
        "model": {k: v.clone() for k, v in model.state_dict().items()},
        "optimizer": {names[i]: s for i, s in optimizer.state_dict()["state"].items()},
    }
    paths = [str(tmp_path / d) for d in ("one", "two", "three")]
    on_two = rank_pool.run(on_ranks_hop, paths[0], paths[1], full)
    on_three = fresh_ranks(on_ranks_hop, 3, 120, args=(paths[1], paths[2], full))
    assert all(o.returned for o in on_three), [o.error for o in on_three]
    for result in [*on_two, *(o.result for o in on_three)]:
        assert result["checked"] == 4 + 4 * 3
        _exact(full["model"], result["model"])
        _exact(full["optimizer"], result["optimizer"])
    back = _wide(3)
    back_optimizer = torch.optim.AdamW(back.parameters())
    ckpt.CheckpointManager(paths[2]).restore(model=back, optimizer=back_optimizer)
    _exact(full["model"], dict(back.state_dict()))
    packed = back_optimizer.state_dict()["state"]
    _exact(full["optimizer"], {names[i]: s for i, s in packed.items()})


# ------------------------------------------------------- agreed outcomes, fallback


class _Warnings(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def on_ranks_save_two_steps(rank: int, world: int, root: str, how: str) -> dict[str, Any]:
    """Save steps 1 and 2 (trained further); return the full state of step 1."""
    model, optimizer, scheduler = make(how)
    torch.manual_seed(100 + rank)
    with ckpt.CheckpointManager(root) as mgr:
        for step in range(3):
            train_step(model, optimizer, scheduler, step)
            if step == 1:
                expected = full_model_state(model)
            if step:
                mgr.save(step, model=model, optimizer=optimizer)
    return expected


def on_ranks_restore_outcome(
    rank: int, world: int, root: str, fallback: bool, verify: bool = True
) -> dict[str, Any]:
    """Restore the latest step; what happened, and the warnings logged on this rank."""
    model, optimizer, _ = make("fsdp", seed=5)
    before = full_model_state(model)
    handler = _Warnings()
    logging.getLogger("ckpt").addHandler(handler)
    try:
        with ckpt.CheckpointManager(root, fallback_to_intact=fallback) as mgr:
            info = mgr.restore(model=model, optimizer=optimizer, verify=verify)
        outcome = {"step": None if info is None else info.step}
    except Exception as e:
        _exact(before, full_model_state(model))  # nothing changed on any rank
        outcome = {"error": type(e).__name__, "message": str(e)}
    finally:
        logging.getLogger("ckpt").removeHandler(handler)
    outcome.update(warnings=handler.messages, model=full_model_state(model))
    return outcome


def _corrupt(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF
    path.write_bytes(bytes(data))


def test_a_shard_only_one_rank_reads_fails_every_rank_with_the_same_class(rank_pool, tmp_path):
    rank_pool.run(on_ranks_save_two_steps, str(tmp_path), "fsdp")
    _corrupt(tmp_path / "step_000000000002" / "rank1_shards.safetensors")
    outcomes = rank_pool.run(on_ranks_restore_outcome, str(tmp_path), False)
    assert [o["error"] for o in outcomes] == ["CorruptCheckpointError"] * 2
    assert all("rank1_shards" in o["message"] for o in outcomes)


def test_a_short_shard_file_fails_every_rank_before_anything_changes_without_verify(
    rank_pool, tmp_path
):
    rank_pool.run(on_ranks_save_two_steps, str(tmp_path), "fsdp")
    shard = tmp_path / "step_000000000002" / "rank1_shards.safetensors"
    shard.write_bytes(shard.read_bytes()[:-8])
    outcomes = rank_pool.run(on_ranks_restore_outcome, str(tmp_path), False, False)
    assert [o["error"] for o in outcomes] == ["CorruptCheckpointError"] * 2


@pytest.mark.parametrize("saved_by", ["ranks", "one process"])
def test_fallback_to_intact_picks_the_same_older_step_on_every_rank(rank_pool, tmp_path, saved_by):
    if saved_by == "ranks":
        expected = rank_pool.run(on_ranks_save_two_steps, str(tmp_path), "fsdp")
        _corrupt(tmp_path / "step_000000000002" / "rank1_shards.safetensors")
    else:
        model, optimizer, scheduler = make("none")
        with ckpt.CheckpointManager(tmp_path) as mgr:
            for step in range(3):
                train_step(model, optimizer, scheduler, step)
                if step == 1:
                    expected = [{k: v.clone() for k, v in model.state_dict().items()}] * 2
                if step:
                    mgr.save(step, model=model, optimizer=optimizer)
        _corrupt(tmp_path / "step_000000000002" / "model.safetensors")
    outcomes = rank_pool.run(on_ranks_restore_outcome, str(tmp_path), True)
    for rank, outcome in enumerate(outcomes):
        assert outcome["step"] == 1, outcome.get("message")
        _exact(expected[rank], outcome["model"])  # each rank's own buffers
        skipped = [m for m in outcome["warnings"] if "skipped corrupt" in m]
        assert len(skipped) == 1 and "step 2" in skipped[0], outcome["warnings"]


class Flaky:
    """A stateful item whose ``load_state_dict`` raises on the live object or on copies."""

    def __init__(self, fail_live: bool = False, fail_copy: bool = False, n: int = -1) -> None:
        self.fail_live, self.fail_copy, self.n = fail_live, fail_copy, n
        self.is_copy = False

    def state_dict(self) -> dict[str, Any]:
        return {"n": self.n}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.fail_copy if self.is_copy else self.fail_live:
            raise RuntimeError("refused on this rank")
        self.n = state["n"]

    def __deepcopy__(self, memo: dict[int, Any]) -> Flaky:
        copied = Flaky(self.fail_live, self.fail_copy, self.n)
        copied.is_copy = True
        return copied


def on_ranks_one_rank_refuses(rank: int, world: int, root: str, where: str) -> dict[str, Any]:
    """Save, then restore into fresh objects whose item refuses on rank 1 only (``where``)."""
    model, optimizer, scheduler = make("fsdp")
    train_step(model, optimizer, scheduler, 0)
    with ckpt.CheckpointManager(root) as mgr:
        mgr.save(0, model=model, optimizer=optimizer, flaky=Flaky(n=rank))
    fresh, fresh_optimizer, _ = make("fsdp", seed=5)
    before = full_model_state(fresh)
    refusing = rank == 1
    flaky = Flaky(fail_live=refusing and where == "apply", fail_copy=refusing and where == "check")
    with ckpt.CheckpointManager(root) as mgr:
        try:
            mgr.restore(model=fresh, optimizer=fresh_optimizer, flaky=flaky)
        except ckpt.CheckpointError as e:
            error = e
    after = full_model_state(fresh)
    return {
        "error": type(error).__name__,
        "message": str(error),
        "item": getattr(error, "item", None),
        "applied": list(getattr(error, "applied", [])),
        "not_applied": list(getattr(error, "not_applied", [])),
        "unchanged": not [k for k in before if not torch.equal(before[k], after[k])],
        "n": flaky.n,
    }


def test_a_check_failing_on_one_rank_fails_every_rank_before_anything_changes(rank_pool, tmp_path):
    outcomes = rank_pool.run(on_ranks_one_rank_refuses, str(tmp_path), "check")
    assert [o["error"] for o in outcomes] == ["IncompatibleCheckpointError"] * 2
    assert all(o["unchanged"] and o["n"] == -1 for o in outcomes)
    assert "rank 1" in outcomes[0]["message"] and "refused on this rank" in outcomes[0]["message"]


def test_a_load_failing_on_one_rank_raises_partial_restore_on_every_rank(rank_pool, tmp_path):
    outcomes = rank_pool.run(on_ranks_one_rank_refuses, str(tmp_path), "apply")
    assert [o["error"] for o in outcomes] == ["PartialRestoreError"] * 2
    assert all("rank(s) [1]" in o["message"] for o in outcomes)
    # every rank stops at the item that failed on rank 1: rank 0 loaded it, loads nothing after
    assert [o["item"] for o in outcomes] == ["flaky"] * 2
    assert outcomes[0]["applied"] == ["model", "optimizer"] and outcomes[0]["n"] == 0
    assert outcomes[1]["applied"] == ["model", "optimizer"] and outcomes[1]["n"] == -1
    assert [o["not_applied"] for o in outcomes] == [["rng"]] * 2


APPLY_ORDER = ["model", "optimizer", "flaky", "scheduler", "extra", "rng"]
"""The steps of the restores below, in apply order, on every rank."""


def _items_state(model: Any, optimizer: Any, scheduler: Any, flaky: Flaky, extra: dict) -> dict:
    """Every item's state (module and optimizer in full: a collective), the torch stream's."""
    rng = torch.get_rng_state()  # first: before anything else runs
    return {
        "rng": rng,
        "model": full_model_state(model),
        "optimizer": full_optimizer_state(model, optimizer),
        "scheduler": scheduler.state_dict(),
        "flaky": flaky.n,
        "extra": dict(extra),
    }


def on_ranks_save_items(rank: int, world: int, root: str) -> dict[str, Any]:
    """Train one step and save every item of ``APPLY_ORDER``; their states as saved."""
    model, optimizer, scheduler = make("fsdp")
    train_step(model, optimizer, scheduler, 0)
    flaky, extra = Flaky(n=rank), {"x": rank}
    saved = _items_state(model, optimizer, scheduler, flaky, extra)
    torch.set_rng_state(saved["rng"])  # as it was when the state was taken
    with ckpt.CheckpointManager(root) as mgr:
        mgr.save(0, model=model, optimizer=optimizer, scheduler=scheduler, flaky=flaky, extra=extra)
    return saved


def _boom(*args: Any) -> None:
    raise RuntimeError("a hook refused on this rank")


def on_ranks_hook_fails(
    rank: int, world: int, root: str, where: str, failing: list[int], no_rng: tuple[int, ...] = ()
) -> dict[str, Any]:
    """Restore into objects trained apart whose item ``where`` raises on the ranks ``failing``.

    ``where``: ``model`` or ``optimizer`` (a ``load_state_dict`` post-hook raises,
    after loading), ``flaky`` (its ``load_state_dict`` raises) or ``rng`` (setting
    the torch stream raises: the last step, agreed with the end). The ranks ``no_rng``
    restore with ``rng=False``.
    """
    model, optimizer, scheduler = make("fsdp", seed=5)
    for step in range(2):
        train_step(model, optimizer, scheduler, step)
    flaky, extra = Flaky(n=-1), {"x": -1}
    if rank in failing:
        if where == "model":
            model.register_load_state_dict_post_hook(_boom)
        elif where == "optimizer":
            optimizer.register_load_state_dict_post_hook(_boom)
        elif where == "flaky":
            flaky.fail_live = True
    before = _items_state(model, optimizer, scheduler, flaky, extra)
    torch.set_rng_state(before["rng"])
    error: Exception | None = None
    set_rng_state = torch.set_rng_state
    if rank in failing and where == "rng":  # the last step: loading the torch stream raises
        torch.set_rng_state = _boom  # type: ignore[assignment]
    with ckpt.CheckpointManager(root) as mgr:
        try:
            mgr.restore(
                model=model,
                optimizer=optimizer,
                scheduler=scheduler,
                flaky=flaky,
                extra=extra,
                rng=rank not in no_rng,
            )
        except Exception as e:
            error = e
        finally:
            torch.set_rng_state = set_rng_state
    return {
        "error": type(error).__name__,
        "message": str(error),
        "item": getattr(error, "item", None),
        "applied": list(getattr(error, "applied", [])),
        "not_applied": list(getattr(error, "not_applied", [])),
        "before": before,
        "after": _items_state(model, optimizer, scheduler, flaky, extra),
    }


def _check_stopped_at(where: str, outcome: dict[str, Any], saved: dict[str, Any]) -> None:
    """The items up to ``where`` hold the saved state, those after it their state before."""
    at = APPLY_ORDER.index(where)
    for name in APPLY_ORDER:
        assert states_differ(saved[name], outcome["before"][name]), name  # a restore shows
        expected = saved[name] if APPLY_ORDER.index(name) <= at else outcome["before"][name]
        assert_same_state(expected, outcome["after"][name], name)


@pytest.mark.parametrize("where", ["model", "optimizer", "flaky", "rng"])
def test_an_item_failing_on_one_rank_stops_every_rank_at_that_item(rank_pool, tmp_path, where):
    saved = rank_pool.run(on_ranks_save_items, str(tmp_path))
    outcomes = rank_pool.run(on_ranks_hook_fails, str(tmp_path), where, [1])
    at = APPLY_ORDER.index(where)
    for outcome in outcomes:
        assert outcome["error"] == "PartialRestoreError", outcome["message"]
        assert outcome["item"] == where
        assert outcome["applied"] == APPLY_ORDER[:at]
        assert outcome["not_applied"] == APPLY_ORDER[at + 1 :]
        assert "rank(s) [1] (rank 1: RuntimeError: " in outcome["message"]
    _check_stopped_at(where, outcomes[0], saved[0])  # the healthy rank
    if where not in ("flaky", "rng"):  # a post-hook raises after the load: rank 1 loaded it
        _check_stopped_at(where, outcomes[1], saved[1])


def test_ranks_loading_different_items_agree_on_a_failure_at_the_end(rank_pool, tmp_path):
    """Rank 1 restores no streams: the ranks' items differ, each loads all it can, no hang."""
    rank_pool.run(on_ranks_save_items, str(tmp_path))
    outcomes = rank_pool.run(on_ranks_hook_fails, str(tmp_path), "flaky", [1], (1,))
    assert [o["error"] for o in outcomes] == ["PartialRestoreError"] * 2
    assert all("rank(s) [1]" in o["message"] for o in outcomes)
    assert outcomes[0]["applied"] == APPLY_ORDER and outcomes[0]["not_applied"] == []
    assert outcomes[1]["item"] == "flaky" and outcomes[1]["applied"] == ["model", "optimizer"]
    assert outcomes[1]["not_applied"] == ["scheduler", "extra"]


def test_three_ranks_one_reseeding_stop_alike_at_an_item_failing_on_two(
    rank_pool, fresh_ranks, tmp_path
):
    saved = rank_pool.run(on_ranks_save_items, str(tmp_path))
    ran = fresh_ranks(on_ranks_hook_fails, 3, 120, args=(str(tmp_path), "flaky", [0, 2]))
    assert all(o.returned for o in ran), [o.error for o in ran]
    outcomes = [o.result for o in ran]
    for outcome in outcomes:
        assert outcome["error"] == "PartialRestoreError", outcome["message"]
        assert outcome["item"] == "flaky"
        assert outcome["applied"] == ["model", "optimizer"]
        assert outcome["not_applied"] == ["scheduler", "extra", "rng"]
        assert "rank(s) [0, 2]" in outcome["message"]
    # rank 1 (healthy) loaded up to flaky; rank 2 (saved streams: none) kept its own
    _check_stopped_at("flaky", outcomes[1], saved[1])
    assert_same_state(outcomes[2]["before"]["rng"], outcomes[2]["after"]["rng"], "rng")


@contextlib.contextmanager
def _collectives_run() -> Iterator[list[str]]:
    """The names of ckpt's collectives this rank runs in the block (patched in for it only)."""
    from ckpt.distributed.group import RankGroup

    ran: list[str] = []
    run = RankGroup._run

    def counted(self: Any, operation: str, collective: Any) -> Any:
        ran.append(operation)
        return run(self, operation, collective)

    RankGroup._run = counted  # type: ignore[method-assign]
    try:
        yield ran
    finally:
        RankGroup._run = run  # type: ignore[method-assign]


def _failed_apply(error: Exception | None, ran: list[str]) -> dict[str, Any]:
    """What a restore that should fail raised on this rank, and the collectives it ran."""
    return {
        "error": type(error).__name__,
        "message": str(error),
        "item": getattr(error, "item", None),
        "applied": list(getattr(error, "applied", [])),
        "not_applied": list(getattr(error, "not_applied", [])),
        "ran": ran,
    }


def on_ranks_finish_fails(rank: int, world: int, root: str, failing: str) -> dict[str, Any]:
    """Restore where rank 1 fails at ``failing`` (``flaky``, or ``finish``: after every item).

    Returns the error and the collectives this rank ran (patched in for this call only).
    """
    from ckpt.restoring.pipeline import PreparedRestore

    finish = PreparedRestore.finish

    def refusing(self: Any) -> None:
        raise RuntimeError("finishing refused on this rank")

    model, optimizer, scheduler = make("fsdp", seed=5)
    flaky = Flaky(fail_live=rank == 1 and failing == "flaky")
    if rank == 1 and failing == "finish":
        PreparedRestore.finish = refusing  # type: ignore[method-assign]
    error: Exception | None = None
    try:
        with _collectives_run() as ran, ckpt.CheckpointManager(root) as mgr:
            mgr.restore(
                model=model, optimizer=optimizer, scheduler=scheduler, flaky=flaky, extra={}
            )
    except ckpt.CheckpointError as e:
        error = e
    finally:
        PreparedRestore.finish = finish  # type: ignore[method-assign]
    return _failed_apply(error, ran)


def test_every_path_runs_the_same_collectives_on_every_rank(rank_pool, tmp_path):
    """A failure at an item runs none after it; one after the items, one agreement more."""
    rank_pool.run(on_ranks_save_items, str(tmp_path))
    at_item = rank_pool.run(on_ranks_finish_fails, str(tmp_path), "flaky")
    at_end = rank_pool.run(on_ranks_finish_fails, str(tmp_path), "finish")
    assert at_item[0]["ran"] == at_item[1]["ran"]
    assert at_end[0]["ran"] == at_end[1]["ran"]
    # construct 1, items and step 1, checks 1, recheck 1; then 3 items; then the end
    # (the last of the 6 items is agreed with the end)
    assert len(at_item[0]["ran"]) == 4 + 3 and len(at_end[0]["ran"]) == 4 + 5 + 1
    for outcome in at_end:
        assert outcome["error"] == "PartialRestoreError", outcome["message"]
        assert "rank(s) [1] (rank 1: RuntimeError: finishing refused" in outcome["message"]
        assert outcome["applied"] == APPLY_ORDER and outcome["not_applied"] == []


class _Unprintable(RuntimeError):
    """An error whose message cannot be printed (its ``__str__`` raises)."""

    def __str__(self) -> str:
        raise ValueError("no message")


def _raise_unprintable(*args: Any) -> None:
    raise _Unprintable()


def on_ranks_apply_breaks(rank: int, world: int, root: str, how: str) -> dict[str, Any]:
    """Restore where rank 1 breaks as ``how`` says; the error and the collectives run.

    ``close``: rank 0's ``flaky`` refuses, then rank 1's files fail to close (after the
    failure was agreed). ``unprintable``: rank 1's torch stream (the last step) raises
    an error whose message cannot be printed.
    """
    from ckpt.distributed.restoring import ShardedRestore

    close, set_rng_state = ShardedRestore.close, torch.set_rng_state

    def failing_close(self: Any) -> None:
        close(self)
        raise OSError("closing the files failed on this rank")

    model, optimizer, scheduler = make("fsdp", seed=5)
    flaky = Flaky(fail_live=rank == 0 and how == "close")
    if rank == 1 and how == "close":
        ShardedRestore.close = failing_close  # type: ignore[method-assign]
    error: Exception | None = None
    try:
        with _collectives_run() as ran, ckpt.CheckpointManager(root) as mgr:
            if rank == 1 and how == "unprintable":
                torch.set_rng_state = _raise_unprintable  # type: ignore[assignment]
            try:
                mgr.restore(
                    model=model, optimizer=optimizer, scheduler=scheduler, flaky=flaky, extra={}
                )
            finally:
                torch.set_rng_state = set_rng_state
    except Exception as e:
        error = e
    finally:
        ShardedRestore.close = close  # type: ignore[method-assign]
    return _failed_apply(error, ran)


def test_a_rank_failing_again_after_an_agreed_failure_runs_no_collective_more(rank_pool, tmp_path):
    """Rank 1's files fail to close after every rank stopped at flaky: it raises the same."""
    rank_pool.run(on_ranks_save_items, str(tmp_path))
    outcomes = rank_pool.run(on_ranks_apply_breaks, str(tmp_path), "close")
    assert outcomes[0]["ran"] == outcomes[1]["ran"]
    for outcome in outcomes:
        assert outcome["error"] == "PartialRestoreError"
        assert outcome["item"] == "flaky"
        assert outcome["applied"] == ["model", "optimizer"]
        assert outcome["not_applied"] == ["scheduler", "extra", "rng"]


def test_an_unprintable_error_at_the_last_item_is_agreed_as_any_other(rank_pool, tmp_path):
    rank_pool.run(on_ranks_save_items, str(tmp_path))
    outcomes = rank_pool.run(on_ranks_apply_breaks, str(tmp_path), "unprintable")
    assert outcomes[0]["ran"] == outcomes[1]["ran"]
    for outcome in outcomes:
        assert outcome["error"] == "PartialRestoreError"
        assert outcome["item"] == "rng"
        assert outcome["applied"] == APPLY_ORDER[:-1]
        assert outcome["not_applied"] == []


# ------------------------------------------------- reads into live tensors


def on_ranks_reads_into_live(rank: int, world: int, root: str) -> dict[str, Any]:
    """Prepare a restore of a group's checkpoint: chunks checked, read into live ones at apply."""
    from ckpt.distributed.planning import local_shards
    from ckpt.distributed.restoring import apply_sharded_restore, prepare_on_rank
    from ckpt.restoring.pipeline import RestoreRequest
    from ckpt.state.kinds import RestoreOptions

    model, optimizer, scheduler = make("fsdp", seed=5)
    train_step(model, optimizer, scheduler, 9)  # the optimizer has state of the same layout
    before = full_model_state(model)
    optimizer_before = full_optimizer_state(model, optimizer)
    state_ptrs = {
        local_shards(t).untyped_storage().data_ptr()
        for per in optimizer.state.values()
        for t in per.values()
    }
    mgr = ckpt.CheckpointManager(root)
    found = mgr._reader.manifest(None)
    assert found is not None
    request = RestoreRequest(
        RestoreOptions(None, True, False, False, False), rng=False, verify=True
    )
    items: dict[str, Any] = {"model": model, "optimizer": optimizer}
    prepared = prepare_on_rank(mgr._storage, *found, items, request, rank=rank, world_size=world)
    live = {local_shards(p).untyped_storage().data_ptr() for p in model.parameters()}
    dest = prepared.reads["model"].dest
    into_live = all(
        local_shards(t).untyped_storage().data_ptr() in live
        for n, t in dest.items()
        if "running" not in n and "num_batches" not in n
    )
    optimizer_dest = prepared.reads["optimizer"].dest
    optimizer_into_live = len(optimizer_dest) == len(state_ptrs) and all(
        local_shards(t).untyped_storage().data_ptr() in state_ptrs for t in optimizer_dest.values()
    )
    unchanged = full_model_state(model)
    _exact(optimizer_before, full_optimizer_state(model, optimizer))
    apply_sharded_restore(prepared, root)
    mgr.close()
    after_ptrs = {
        local_shards(t).untyped_storage().data_ptr()
        for per in optimizer.state.values()
        for t in per.values()
    }
    return {
        "into_live": into_live and optimizer_into_live and after_ptrs == state_ptrs,
        "before": before,
        "unchanged": unchanged,
        "after": full_model_state(model),
        "optimizer": full_optimizer_state(model, optimizer),
    }


def test_chunks_are_checked_first_then_read_into_live_parameters_and_optimizer_state(
    rank_pool, tmp_path
):
    rank_pool.run(on_ranks_save_two_steps, str(tmp_path), "fsdp")
    outcomes = rank_pool.run(on_ranks_reads_into_live, str(tmp_path))
    for outcome in outcomes:
        assert outcome["into_live"]
        _exact(outcome["before"], outcome["unchanged"])  # checking wrote nothing
    expected = rank_pool.run(on_ranks_restore_and_return, str(tmp_path))
    for rank, outcome in enumerate(outcomes):
        _exact(expected[rank]["model"], outcome["after"])
        _exact(expected[rank]["optimizer"], outcome["optimizer"])


def on_ranks_restore_and_return(rank: int, world: int, root: str) -> dict[str, Any]:
    """Restore into fresh objects (an optimizer without state); the full states."""
    model, optimizer, _ = make("fsdp", seed=5)
    with ckpt.CheckpointManager(root) as mgr:
        mgr.restore(model=model, optimizer=optimizer)
    return {"model": full_model_state(model), "optimizer": full_optimizer_state(model, optimizer)}


def test_fallback_with_every_step_corrupt_fails_every_rank_alike(rank_pool, tmp_path):
    rank_pool.run(on_ranks_save_two_steps, str(tmp_path), "fsdp")
    for step in (1, 2):
        _corrupt(tmp_path / f"step_{step:012d}" / "rank1_shards.safetensors")
    outcomes = rank_pool.run(on_ranks_restore_outcome, str(tmp_path), True)
    assert [o["error"] for o in outcomes] == ["CorruptCheckpointError"] * 2
    assert all("no intact checkpoint" in o["message"] for o in outcomes)


def on_ranks_restore_without_saved_streams(rank: int, world: int, root: str) -> dict[str, Any]:
    """Save step 1 with ``rng=False``, restore it with ``rng=True``; warnings, streams kept."""
    model, optimizer, _ = make("fsdp")
    with ckpt.CheckpointManager(root) as mgr:
        mgr.save(1, model=model, optimizer=optimizer, data={"rank": rank}, rng=False)
    torch.manual_seed(40 + rank)
    expected = torch.rand(3)
    torch.manual_seed(40 + rank)
    handler = _Warnings()
    logging.getLogger("ckpt").addHandler(handler)
    try:
        with ckpt.CheckpointManager(root) as mgr:
            data: dict[str, Any] = {}
            mgr.restore(model=model, optimizer=optimizer, data=data)
    finally:
        logging.getLogger("ckpt").removeHandler(handler)
    return {"data": data, "draw": torch.rand(3), "expected": expected, "warnings": handler.messages}


def test_a_group_restoring_a_step_without_random_streams_warns_once_and_keeps_them(
    rank_pool, tmp_path
):
    """Each rank's own items go through the one-process preparation: the same warning, once."""
    outcomes = rank_pool.run(on_ranks_restore_without_saved_streams, str(tmp_path))
    for rank, outcome in enumerate(outcomes):
        assert outcome["data"] == {"rank": rank}
        assert_same_state(outcome["draw"], outcome["expected"])
    assert ["holds no random state" in m for m in outcomes[0]["warnings"]] == [True]
    assert not any("random" in m for o in outcomes[1:] for m in o["warnings"])


def on_ranks_private_restore_of_a_group_checkpoint(
    rank: int, world: int, root: str
) -> dict[str, Any]:
    """Save step 1 on the group; then each rank restores it alone (``process_group=False``)."""
    model, optimizer, scheduler = make("fsdp")
    torch.manual_seed(60 + rank)
    train_step(model, optimizer, scheduler, 0)
    expected = full_model_state(model)
    with ckpt.CheckpointManager(root) as mgr:
        mgr.save(1, model=model, optimizer=optimizer, data={"rank": rank})
    draws = torch.rand(4)
    plain, plain_opt, _ = make("none", seed=9)
    data: dict[str, Any] = {}
    torch.manual_seed(999)
    with ckpt.CheckpointManager(root, process_group=False) as private:
        private.restore(model=plain, optimizer=plain_opt, data=data)
    return {
        "model": {k: v.detach().clone() for k, v in plain.state_dict().items()},
        "expected": expected,
        "data": data,
        "draws": (draws, torch.rand(4)),
    }


def test_a_private_manager_on_each_rank_restores_its_own_streams_from_a_group_checkpoint(
    rank_pool, tmp_path
):
    """``process_group=False`` on rank r takes rank r's own items and streams, full tensors."""
    outcomes = rank_pool.run(on_ranks_private_restore_of_a_group_checkpoint, str(tmp_path))
    for rank, outcome in enumerate(outcomes):
        assert outcome["data"] == {"rank": rank}
        _exact(outcome["model"], outcome["expected"])
        assert_same_state(*outcome["draws"])
