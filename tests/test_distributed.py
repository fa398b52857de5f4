"""Multi-rank checkpoints (issue 13): DDP and FSDP2 on 2 gloo ranks, resharding, failures.

Functions named ``on_ranks_*`` run on the ranks (``rank_pool.run`` or ``fresh_ranks``);
the tests compare what they return, bit for bit.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import signal
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from conftest import assert_same_state
from dist_training import (
    full_model_state,
    full_optimizer_state,
    make,
    run_training,
    train_step,
)

import ckpt

pytestmark = pytest.mark.distributed


def _exact(a: dict[str, Any], b: dict[str, Any]) -> None:
    assert set(a) == set(b)
    for key, value in a.items():
        assert_same_state(value, b[key], key)


# ------------------------------------------------------------------ on the ranks


def on_ranks_save(rank: int, world: int, root: str, how: str, steps: int = 3) -> dict[str, Any]:
    """Train ``steps`` steps, save at the last, return the full state gathered before the save."""
    model, optimizer, scheduler = make(how)
    torch.manual_seed(100 + rank)
    for step in range(steps):
        train_step(model, optimizer, scheduler, step)
    with ckpt.CheckpointManager(root) as mgr:
        mgr.save(steps - 1, model=model, optimizer=optimizer, scheduler=scheduler, data={"r": rank})
    return {
        "model": full_model_state(model),
        "optimizer": full_optimizer_state(model, optimizer),
        "lr": optimizer.param_groups[0]["lr"],
    }


def on_ranks_restore_and_train(
    rank: int, world: int, root: str, how: str, more: int = 2
) -> dict[str, Any]:
    """Restore into fresh objects, return the full state, then train ``more`` steps and again."""
    model, optimizer, scheduler = make(how, seed=7, lr=0.5)
    data: dict[str, Any] = {}
    with ckpt.CheckpointManager(root) as mgr:
        info = mgr.restore(model=model, optimizer=optimizer, scheduler=scheduler, data=data)
    assert info is not None
    restored = {
        "model": full_model_state(model),
        "optimizer": full_optimizer_state(model, optimizer),
        "lr": optimizer.param_groups[0]["lr"],
        "data": data,
        "step": info.step,
    }
    losses = [train_step(model, optimizer, scheduler, info.next_step + i) for i in range(more)]
    restored["after"] = full_model_state(model)
    restored["losses"] = losses
    return restored


def on_ranks_continue(rank: int, world: int, root: str, how: str, start: int, more: int) -> Any:
    """Train from scratch for ``start`` steps without saving, then ``more``: the reference."""
    model, optimizer, scheduler = make(how)
    torch.manual_seed(100 + rank)
    for step in range(start):
        train_step(model, optimizer, scheduler, step)
    losses = [train_step(model, optimizer, scheduler, start + i) for i in range(more)]
    return {"after": full_model_state(model), "losses": losses}


# -------------------------------------------------------------------------- tests


@pytest.mark.parametrize("how", ["fsdp", "ddp"])
def test_restore_on_the_same_ranks_is_exact_and_training_continues_identically(
    rank_pool, tmp_path, how
):
    saved = rank_pool.run(on_ranks_save, str(tmp_path), how)
    restored = rank_pool.run(on_ranks_restore_and_train, str(tmp_path), how)
    reference = rank_pool.run(on_ranks_continue, str(tmp_path), how, 3, 2)
    for rank in range(2):
        _exact(saved[rank]["model"], restored[rank]["model"])
        _exact(saved[rank]["optimizer"], restored[rank]["optimizer"])
        assert saved[rank]["lr"] == restored[rank]["lr"]
        assert restored[rank]["data"] == {"r": rank}  # each rank's own dict item
        _exact(reference[rank]["after"], restored[rank]["after"])
        assert reference[rank]["losses"] == restored[rank]["losses"]


@pytest.mark.parametrize("saved_by, restored_into", [("fsdp", "ddp"), ("ddp", "fsdp")])
def test_ddp_and_fsdp2_checkpoints_restore_into_each_other(
    rank_pool, tmp_path, saved_by, restored_into
):
    saved = rank_pool.run(on_ranks_save, str(tmp_path), saved_by)
    restored = rank_pool.run(on_ranks_restore_and_train, str(tmp_path), restored_into, 0)
    for rank in range(2):
        _exact(saved[rank]["model"], restored[rank]["model"])
        _exact(saved[rank]["optimizer"], restored[rank]["optimizer"])


@pytest.mark.parametrize("how", ["fsdp", "ddp"])
def test_a_group_checkpoint_consolidates_in_one_process_without_a_group(
    rank_pool, tmp_path, caplog, how
):
    saved = rank_pool.run(on_ranks_save, str(tmp_path), how)[0]
    model, optimizer, scheduler = make("none", seed=3, lr=0.9)
    mgr = ckpt.CheckpointManager(tmp_path)
    mgr.restore(model=model, optimizer=optimizer, scheduler=scheduler, data={})
    assert "saved by 2 ranks on one process" in caplog.text
    _exact(saved["model"], {k: v for k, v in model.state_dict().items()})
    names = [n for n, _ in model.named_parameters()]
    packed = optimizer.state_dict()["state"]
    _exact(saved["optimizer"], {names[i]: s for i, s in packed.items()})
    assert optimizer.param_groups[0]["lr"] == saved["lr"]
    read = mgr.read()
    _exact(saved["model"], dict(read["model"]))
    reference = torch.optim.AdamW(model.parameters())
    reference.load_state_dict(read["optimizer"])  # torch's own index-packed form
    assert mgr.verify().step == 2


def on_rank_zero_alone_save(rank: int, world: int, root: str) -> dict[str, Any]:
    return on_ranks_save(rank, world, root, "fsdp")


def test_a_checkpoint_saved_on_one_rank_restores_on_two(fresh_ranks, rank_pool, tmp_path):
    [outcome] = fresh_ranks(on_rank_zero_alone_save, 1, 120, args=(str(tmp_path),))
    assert outcome.returned, outcome.error
    restored = rank_pool.run(on_ranks_restore_and_train, str(tmp_path), "fsdp", 0)
    for rank in range(2):
        _exact(outcome.result["model"], restored[rank]["model"])
        _exact(outcome.result["optimizer"], restored[rank]["optimizer"])


def on_ranks_fail_on(rank: int, world: int, root: str, failing: int, where: str) -> str:
    from ckpt.distributed import saving

    original = saving.write_rank_files
    try:
        return _fail_on(rank, root, failing, where)
    finally:
        saving.write_rank_files = original  # the pool's ranks live on


def _fail_on(rank: int, root: str, failing: int, where: str) -> str:
    model, optimizer, scheduler = make("fsdp")
    train_step(model, optimizer, scheduler, 0)
    with ckpt.CheckpointManager(root) as mgr:
        mgr.save(0, model=model, optimizer=optimizer)
        if where == "capture":
            data: Any = {"x": object() if rank == failing else 1}
        else:
            data = {"x": 1}
            if rank == failing:
                from ckpt.distributed import saving

                def broken(*args: Any, **kwargs: Any) -> Any:
                    raise OSError(28, "No space left on device")

                saving.write_rank_files = broken  # type: ignore[assignment]
        try:
            mgr.save(1, model=model, optimizer=optimizer, data=data)
        except (ckpt.CheckpointWriteError, TypeError) as e:
            # capturing raises what one process raises (a TypeError), on every rank
            assert type(e) is (TypeError if where == "capture" else ckpt.CheckpointWriteError)
            message = str(e)
        else:
            raise AssertionError("the save should have failed")
        assert mgr.all_steps() == [0]
        assert not [n for n in os.listdir(root) if n.startswith(".ckpt-tmp")]
        info = mgr.restore(model=model, optimizer=optimizer)
        assert info is not None and info.step == 0
    return message


@pytest.mark.parametrize("where", ["capture", "write"])
def test_a_rank_failing_mid_save_commits_nothing_and_every_rank_raises(rank_pool, tmp_path, where):
    messages = rank_pool.run(on_ranks_fail_on, str(tmp_path), 1, where)
    if where == "capture":  # rank 1 raises its own error, naming the value's key path
        assert "data['x']" in messages[1] and "data['x']" in messages[0]
        assert "rank 1" in messages[0] and "nothing was written" in messages[0]
        return
    for message in messages:
        assert "rank 1" in message
        assert "nothing was committed" in message


def on_ranks_die_mid_save(rank: int, world: int, root: str) -> str:
    model, optimizer, scheduler = make("fsdp")
    train_step(model, optimizer, scheduler, 0)
    mgr = ckpt.CheckpointManager(root, collective_timeout=20)
    mgr.save(0, model=model, optimizer=optimizer)
    if rank == 1:
        from ckpt.distributed import saving

        def die(*args: Any, **kwargs: Any) -> Any:
            os.kill(os.getpid(), signal.SIGKILL)

        saving.write_rank_files = die  # type: ignore[assignment]
    try:
        mgr.save(1, model=model, optimizer=optimizer)
    except ckpt.CheckpointError as e:
        return f"{type(e).__name__}: {e}"
    return "saved"


def test_a_rank_killed_mid_save_fails_the_others_without_a_hang(fresh_ranks, rank_pool, tmp_path):
    outcomes = fresh_ranks(on_ranks_die_mid_save, 2, 90, args=(str(tmp_path),))
    assert outcomes[1].exitcode == -signal.SIGKILL
    assert outcomes[0].returned and not outcomes[0].timed_out, outcomes[0].error
    assert outcomes[0].result.startswith(("CollectiveError", "CheckpointWriteError"))
    assert ckpt.CheckpointManager(tmp_path, process_group=False).all_steps() == [0]
    assert rank_pool.run(on_ranks_restore_step, str(tmp_path)) == [0, 0]


def on_ranks_restore_step(rank: int, world: int, root: str) -> int | None:
    model, optimizer, _ = make("fsdp")
    with ckpt.CheckpointManager(root) as mgr:
        info = mgr.restore(model=model, optimizer=optimizer)
    return None if info is None else info.step


def on_ranks_restore_without_pickle(rank: int, world: int, root: str) -> bool:
    model, optimizer, scheduler = make("fsdp")

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("pickle used")

    saved = (pickle.loads, pickle.Unpickler, pickle.load)
    pickle.loads, pickle.load = refuse, refuse  # type: ignore[assignment]
    pickle.Unpickler = refuse  # type: ignore[assignment,misc]
    try:
        with ckpt.CheckpointManager(root) as mgr:
            mgr.restore(model=model, optimizer=optimizer, scheduler=scheduler, data={})
            mgr.read()
            mgr.verify()
    finally:
        pickle.loads, pickle.Unpickler, pickle.load = saved  # type: ignore[misc]
    return True


def test_restore_read_and_verify_never_unpickle(rank_pool, tmp_path):
    rank_pool.run(on_ranks_save, str(tmp_path), "fsdp")
    assert rank_pool.run(on_ranks_restore_without_pickle, str(tmp_path)) == [True, True]
    assert not list(Path(tmp_path).rglob("*.metadata"))  # DCP's pickled metadata: never written


def on_ranks_corrupt_restore(rank: int, world: int, root: str) -> str:
    model, optimizer, _ = make("fsdp", seed=5)
    before = full_model_state(model)
    with ckpt.CheckpointManager(root) as mgr:
        try:
            mgr.restore(model=model, optimizer=optimizer)
        except ckpt.CheckpointError as e:
            message = f"{type(e).__name__}: {e}"
        else:
            raise AssertionError("restore should fail")
    _exact(before, full_model_state(model))  # nothing changed, on any rank
    assert not optimizer.state
    return message


def test_a_corrupt_shard_fails_the_restore_on_every_rank_and_changes_nothing(rank_pool, tmp_path):
    rank_pool.run(on_ranks_save, str(tmp_path), "fsdp")
    shard = tmp_path / "step_000000000002" / "rank1_shards.safetensors"
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0xFF
    shard.write_bytes(bytes(data))
    messages = rank_pool.run(on_ranks_corrupt_restore, str(tmp_path))
    assert all("rank1_shards" in m or "rank 1" in m for m in messages), messages


def on_ranks_async(rank: int, world: int, root: str) -> list[Any]:
    model, optimizer, scheduler = make("fsdp")
    torch.manual_seed(100 + rank)
    with ckpt.CheckpointManager(root, async_save=True, keep_last=2) as mgr:
        for step in range(4):
            train_step(model, optimizer, scheduler, step)
            mgr.save(step, model=model, optimizer=optimizer, scheduler=scheduler)
            if step == 2:
                expected = full_model_state(model)
        mgr.wait()
        steps = mgr.all_steps()
        mgr.restore(step=2, model=model, optimizer=optimizer, scheduler=scheduler)
    _exact(expected, full_model_state(model))
    return steps


def test_async_saves_across_ranks_commit_in_the_background(rank_pool, tmp_path):
    assert rank_pool.run(on_ranks_async, str(tmp_path)) == [[2, 3], [2, 3]]


def on_ranks_new_world_streams(rank: int, world: int, root: str) -> list[float]:
    model, optimizer, scheduler = make("fsdp")
    with ckpt.CheckpointManager(root) as mgr:
        mgr.restore(model=model, optimizer=optimizer, scheduler=scheduler, data={})
    return torch.rand(3).tolist()


def test_random_streams_are_restored_per_rank(rank_pool, tmp_path):
    rank_pool.run(on_ranks_save, str(tmp_path), "fsdp")
    first = rank_pool.run(on_ranks_new_world_streams, str(tmp_path))
    second = rank_pool.run(on_ranks_new_world_streams, str(tmp_path))
    assert first == second and first[0] != first[1]


def test_without_a_group_nothing_changes(tmp_path):
    assert not dist.is_initialized()
    mgr = ckpt.CheckpointManager(tmp_path)
    model, optimizer, _ = make("none")
    mgr.save(0, model=model, optimizer=optimizer)
    text = (tmp_path / "step_000000000000" / "manifest.json").read_text()
    assert '"format_version":1' in text and '"ranks"' not in text


def on_ranks_train(
    rank: int, world: int, root: str, how: str, total: int, kill_at: int | None
) -> dict[str, Any]:
    return run_training(root, how, total, kill_at, f"{root}/log{rank}.jsonl")


def _trajectory(log: Path) -> dict[int, list[Any]]:
    """Each step's last record: what the run that went on from there saw."""
    out: dict[int, list[Any]] = {}
    for line in log.read_text().splitlines():
        record = json.loads(line)
        out[record[0]] = record[1:]
    return out


@pytest.mark.parametrize("how", ["fsdp", "ddp"])
def test_both_ranks_killed_at_random_steps_resume_bit_exactly(fresh_ranks, tmp_path, how):
    total = 14  # 12 batches per epoch per rank: the run crosses an epoch boundary
    reference = fresh_ranks(on_ranks_train, 2, 120, args=(str(tmp_path / "ref"), how, total, None))
    assert all(o.returned for o in reference), [o.error for o in reference]
    rng = random.Random(f"kill-{how}")
    run = tmp_path / "run"
    kills = sorted(rng.sample(range(1, total - 1), 2))
    for kill_at in [*kills, None]:
        outcomes = fresh_ranks(on_ranks_train, 2, 120, args=(str(run), how, total, kill_at))
        if kill_at is not None:
            assert [o.exitcode for o in outcomes] == [-signal.SIGKILL] * 2, outcomes
    assert all(o.returned for o in outcomes), [o.error for o in outcomes]
    for rank in range(2):
        _exact(reference[rank].result["model"], outcomes[rank].result["model"])
        _exact(reference[rank].result["optimizer"], outcomes[rank].result["optimizer"])
        expected = _trajectory(tmp_path / "ref" / f"log{rank}.jsonl")
        assert _trajectory(run / f"log{rank}.jsonl") == expected  # losses, lr, batch ids


def on_ranks_epoch_part(rank: int, world: int, root: str, batches: int | None) -> list[int]:
    """Restore (if saved), take ``batches`` batches (None: the epoch's rest), save; ids seen."""
    from dist_training import Numbers

    model, optimizer, _ = make("fsdp")
    loader = ckpt.resumable_loader(Numbers(), batch_size=4, seed=3)
    seen: list[int] = []
    with ckpt.CheckpointManager(root) as mgr:
        info = mgr.restore(model=model, optimizer=optimizer, sampler=loader.sampler)
        for ids, _, _ in loader:
            seen += ids.tolist()
            if batches is not None and len(seen) == 4 * batches:
                break
        step = 0 if info is None else info.next_step
        mgr.save(step, model=model, optimizer=optimizer, sampler=loader.sampler)
    return seen


@pytest.mark.parametrize("new_world", [1, 4])
def test_a_world_size_change_mid_epoch_sees_every_remaining_sample_once(
    rank_pool, fresh_ranks, tmp_path, caplog, new_world
):
    before = rank_pool.run(on_ranks_epoch_part, str(tmp_path), 2)  # 2 ranks x 2 batches of 4
    after = fresh_ranks(on_ranks_epoch_part, new_world, 120, args=(str(tmp_path), None))
    assert all(o.returned for o in after), [o.error for o in after]
    seen = [i for ids in before for i in ids] + [i for o in after for i in o.result]
    assert sorted(seen) == list(range(48))  # 16 before, 32 after: each exactly once


def on_ranks_tensor_parallel(rank: int, world: int, root: str) -> dict[str, Any]:
    """An MLP split column- then row-wise (DTensors sharded on dim 0 and dim 1), saved."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        parallelize_module,
    )

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))
    mesh = init_device_mesh("cpu", (world,))
    parallelize_module(model, mesh, {"0": ColwiseParallel(), "2": RowwiseParallel()})
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
    x = torch.randn(3, 5, generator=torch.Generator().manual_seed(1))
    model(x).sum().backward()
    optimizer.step()
    with ckpt.CheckpointManager(root) as mgr:
        mgr.save(0, model=model, optimizer=optimizer)
        fresh = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))
        parallelize_module(fresh, mesh, {"0": ColwiseParallel(), "2": RowwiseParallel()})
        fresh_optimizer = torch.optim.Adam(fresh.parameters(), lr=0.5)
        mgr.restore(model=fresh, optimizer=fresh_optimizer)
    _exact(full_model_state(model), full_model_state(fresh))
    _exact(full_optimizer_state(model, optimizer), full_optimizer_state(fresh, fresh_optimizer))
    return {"model": full_model_state(model), "optimizer": full_optimizer_state(model, optimizer)}


def test_tensor_parallel_dtensors_save_restore_and_consolidate(rank_pool, tmp_path):
    saved = rank_pool.run(on_ranks_tensor_parallel, str(tmp_path))[0]
    model = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))
    optimizer = torch.optim.Adam(model.parameters())
    ckpt.CheckpointManager(tmp_path).restore(model=model, optimizer=optimizer)
    _exact(saved["model"], dict(model.state_dict()))
    names = [n for n, _ in model.named_parameters()]
    _exact(saved["optimizer"], {names[i]: s for i, s in optimizer.state_dict()["state"].items()})


def on_ranks_disagree(rank: int, world: int, root: str, what: str) -> str:
    model, optimizer, _ = make("fsdp")
    with ckpt.CheckpointManager(root) as mgr:
        mgr.save(0, model=model, optimizer=optimizer)
        step = 1 + (rank if what == "step" else 0)
        extra = {"extra": {"x": 1}} if what == "items" and rank == 1 else {}
        with pytest.raises(ValueError, match="same step, epoch and item names") as info:
            mgr.save(step, model=model, optimizer=optimizer, **extra)
        assert isinstance(info.value, ckpt.RankMismatchError)
        assert isinstance(info.value, ckpt.CheckpointError)
        assert info.value.path == f"{root}/step_{step:012d}"
        assert info.value.key == ("extra" if what == "items" else None)
        assert mgr.all_steps() == [0]
        assert not [n for n in os.listdir(root) if n.startswith(".ckpt-tmp")]
        dist.barrier()  # both ranks have looked before the next save opens its attempt
        mgr.save(5, model=model, optimizer=optimizer)  # the group still works
    return str(info.value)


@pytest.mark.parametrize("what", ["step", "items"])
def test_ranks_saving_different_steps_or_items_are_refused_together(rank_pool, tmp_path, what):
    messages = rank_pool.run(on_ranks_disagree, str(tmp_path), what)
    assert all("rank 1 saves" in m for m in messages)


def on_ranks_object_store(rank: int, world: int, url: str, options: dict[str, Any]) -> Any:
    model, optimizer, scheduler = make("fsdp")
    train_step(model, optimizer, scheduler, 0)
    expected = full_model_state(model)
    with ckpt.CheckpointManager(url, storage_options=options, keep_last=1) as mgr:
        mgr.save(0, model=model, optimizer=optimizer)
        mgr.save(1, model=model, optimizer=optimizer)
        fresh, fresh_optimizer, _ = make("fsdp", seed=9)
        mgr.restore(model=fresh, optimizer=fresh_optimizer)
        steps = mgr.all_steps()
        mgr.verify()
    _exact(expected, full_model_state(fresh))
    return steps


@pytest.mark.s3
def test_ranks_save_to_an_object_store_with_the_manifest_as_commit(rank_pool, s3_bucket):
    bucket, options = s3_bucket
    assert rank_pool.run(on_ranks_object_store, f"s3://{bucket}/run", options) == [[1], [1]]


def on_ranks_tampered_group(rank: int, world: int, root: str) -> str:
    model, optimizer, _ = make("fsdp", seed=4)
    before = full_model_state(model)
    with (
        ckpt.CheckpointManager(root) as mgr,
        pytest.raises(ckpt.IncompatibleCheckpointError) as info,
    ):
        mgr.restore(model=model, optimizer=optimizer)
    _exact(before, full_model_state(model))
    assert optimizer.param_groups[0]["lr"] == 0.05 and not optimizer.state
    return str(info.value)


def test_a_tampered_hyperparameter_is_refused_before_anything_changes(rank_pool, tmp_path):
    rank_pool.run(on_ranks_save, str(tmp_path), "fsdp")
    manifest = tmp_path / "step_000000000002" / "manifest.json"
    raw = manifest.read_bytes()
    from ckpt.format import decode_manifest, encode_manifest

    decoded = decode_manifest(raw, str(manifest))
    assert decoded.sharded is not None
    record = decoded.sharded.items["optimizer"]
    record.state["param_groups"][0]["lr"] = "fast"  # type: ignore[index,call-overload]
    manifest.write_bytes(encode_manifest(decoded))
    messages = rank_pool.run(on_ranks_tampered_group, str(tmp_path))
    assert all("lr" in m for m in messages), messages


def on_ranks_restore_different_steps(rank: int, world: int, root: str) -> str:
    model, optimizer, _ = make("fsdp")
    with ckpt.CheckpointManager(root) as mgr:
        mgr.save(0, model=model, optimizer=optimizer)
        mgr.save(1, model=model, optimizer=optimizer)
        with pytest.raises(ValueError, match="same step") as info:
            mgr.restore(step=rank, model=model, optimizer=optimizer)
        assert isinstance(info.value, ckpt.RankMismatchError)
        assert isinstance(info.value, ckpt.CheckpointError)
        assert mgr.restore(model=model, optimizer=optimizer).step == 1  # type: ignore[union-attr]
    return str(info.value)


def test_ranks_restoring_different_steps_are_refused_together(rank_pool, tmp_path):
    messages = rank_pool.run(on_ranks_restore_different_steps, str(tmp_path))
    assert all("rank 0: 0, rank 1: 1" in m for m in messages)


class TiedLM(torch.nn.Module):
    """An embedding and an output layer sharing one weight, around a middle layer."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = torch.nn.Embedding(10, 4)
        self.mid = torch.nn.Linear(4, 4)
        self.head = torch.nn.Linear(4, 10, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.mid(self.emb(x)))


def on_ranks_tied(rank: int, world: int, root: str) -> dict[str, Any]:
    from torch.distributed.fsdp import fully_shard

    model = TiedLM()
    fully_shard(model.mid)
    fully_shard(model)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
    model(torch.tensor([[1, 2, 3]])).sum().backward()
    optimizer.step()
    with ckpt.CheckpointManager(root) as mgr:
        mgr.save(0, model=model, optimizer=optimizer)
    return full_model_state(model)


def test_tied_weights_saved_under_fsdp2_consolidate_into_a_plain_tied_model(rank_pool, tmp_path):
    saved = rank_pool.run(on_ranks_tied, str(tmp_path))[0]
    model = TiedLM()
    optimizer = torch.optim.Adam(model.parameters())
    info = ckpt.CheckpointManager(tmp_path).restore(model=model, optimizer=optimizer)
    assert info is not None and not info.unexpected_keys and not info.missing_keys
    assert model.head.weight is model.emb.weight
    _exact(saved, dict(model.state_dict()))


def on_ranks_restore_different_items(rank: int, world: int, root: str) -> str:
    model, optimizer, _ = make("fsdp", seed=2)
    before = full_model_state(model)
    items: dict[str, Any] = (
        {"model": model} if rank == 0 else {"model": model, "optimizer": optimizer}
    )
    with ckpt.CheckpointManager(root) as mgr, pytest.raises(ValueError, match="same items") as info:
        mgr.restore(**items)
    assert isinstance(info.value, ckpt.RankMismatchError)
    assert isinstance(info.value, ckpt.CheckpointError)
    assert info.value.key == "optimizer"
    assert info.value.path is not None and info.value.path.endswith(Path(root).name)
    _exact(before, full_model_state(model))
    return str(info.value)


def test_ranks_restoring_different_items_are_refused_together(rank_pool, tmp_path):
    rank_pool.run(on_ranks_save, str(tmp_path), "fsdp")
    messages = rank_pool.run(on_ranks_restore_different_items, str(tmp_path))
    assert all("rank 1 restores" in m for m in messages)


def test_a_non_strict_consolidation_reports_the_keys_it_could_not_load(rank_pool, tmp_path):
    rank_pool.run(on_ranks_save, str(tmp_path), "fsdp")
    smaller = torch.nn.Sequential(torch.nn.Linear(5, 6))
    info = ckpt.CheckpointManager(tmp_path).restore(model=smaller, strict=False, data={})
    assert info is not None
    assert info.unexpected_keys["model"] == [
        "1.bias",
        "1.num_batches_tracked",
        "1.running_mean",
        "1.running_var",
        "1.weight",
        "4.bias",
        "4.weight",
    ]


def on_ranks_private_manager_with_dtensors(rank: int, world: int, root: str) -> str:
    model, _, _ = make("fsdp")
    mgr = ckpt.CheckpointManager(f"{root}/r{rank}", process_group=False)
    with pytest.raises(TypeError, match="DTensor") as info:
        mgr.save(0, model=model)
    assert mgr.all_steps() == []
    return str(info.value)


def test_a_private_manager_refuses_dtensors_with_a_clear_error(rank_pool, tmp_path):
    assert all(
        "process group" in m
        for m in rank_pool.run(on_ranks_private_manager_with_dtensors, str(tmp_path))
    )


def on_ranks_restore_different_items_and_steps(rank: int, world: int, root: str) -> list[str]:
    """Rank 0 asks for the latest step of the model, rank 1 for step 0 of both items."""
    model, optimizer, _ = make("fsdp", seed=2)
    before = full_model_state(model)
    items: dict[str, Any] = (
        {"model": model} if rank == 0 else {"model": model, "optimizer": optimizer}
    )
    step = None if rank == 0 else 0
    with ckpt.CheckpointManager(root) as mgr:
        with pytest.raises(ValueError, match="same items") as items_info:
            mgr.restore(step=step, **items)
        with pytest.raises(ValueError, match="same step") as step_info:
            mgr.restore(step=step, model=model, optimizer=optimizer)
        for refused in (items_info.value, step_info.value):
            assert isinstance(refused, ckpt.RankMismatchError)
            assert isinstance(refused, ckpt.CheckpointError)
        assert items_info.value.key == "optimizer"
        for refused in (items_info.value, step_info.value):
            assert refused.path is not None and refused.path.endswith(Path(root).name)
        _exact(before, full_model_state(model))
        assert mgr.restore(model=model, optimizer=optimizer) is not None
    return [str(items_info.value), str(step_info.value)]


def test_items_are_checked_before_steps_and_both_refused_together(rank_pool, tmp_path):
    rank_pool.run(on_ranks_save, str(tmp_path), "fsdp")
    messages = rank_pool.run(on_ranks_restore_different_items_and_steps, str(tmp_path))
    assert messages[0] == messages[1]
    assert "rank 1 restores" in messages[0][0] and "rank 0: None, rank 1: 0" in messages[0][1]
