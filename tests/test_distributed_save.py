"""Multi-rank save decisions and hangs: every rank saves the same step, and nothing hangs long.

Signals arrive at random moments (one rank, or every rank at its own moment), clocks
differ per rank; every trial checks that the ranks saved the same steps and stopped
together. A rank that does not come (``if rank == 0: save()``, a stopped rank) is
named within ``handshake_timeout``.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from datetime import timedelta
from typing import Any

import pytest
import torch
import torch.distributed as dist
from conftest import assert_same_state
from dist_training import build_model, full_model_state, full_optimizer_state, train_step

import ckpt


def _train(mgr: ckpt.CheckpointManager, steps: int, pause: float, rng: random.Random) -> dict:
    """A loop as users write it: save when told, stop when told; what happened, per step."""
    saved, stopped = [], None
    state = {"w": torch.zeros(3)}
    for step in range(steps):
        state["w"] += 1
        time.sleep(pause * rng.random())  # ranks drift apart, as they do
        if mgr.should_save(step):
            mgr.save(step, state=state, rng=False)
            saved.append(step)
        if mgr.should_stop:
            stopped = step
            break
    mgr.wait()
    return {"saved": saved, "stopped": stopped, "committed": mgr.all_steps()}


def on_ranks_signal_trial(rank: int, world: int, root: str, seed: int, who: str) -> dict:
    """One trial: SIGTERM to ``who`` ("one": a random rank; "all": each at its own moment)."""
    rng = random.Random(seed * 10 + rank)
    pick = random.Random(seed).randrange(world)  # the same on every rank
    delay = random.Random(seed * 10 + rank).uniform(0.0, 0.25)
    async_save = bool(seed % 2)
    mgr = ckpt.CheckpointManager(
        root, every_steps=7, preemption_signals=True, async_save=async_save, handshake_timeout=60
    )
    timer = None
    if who == "all" or rank == pick:
        timer = threading.Timer(delay, os.kill, (os.getpid(), signal.SIGTERM))
        timer.start()
    try:
        return _train(mgr, 40, 0.01, rng)
    finally:
        if timer is not None:
            timer.cancel()
            timer.join()  # no signal may land once the handler is gone
        mgr.close()


def on_ranks_clock_trial(rank: int, world: int, root: str, seed: int) -> dict:
    """One trial: ``every_seconds`` with per-rank drift; the clocks disagree, the ranks do not."""
    rng = random.Random(seed * 10 + rank)
    with ckpt.CheckpointManager(root, every_seconds=0.05, agree_every=1 + seed % 3) as mgr:
        return _train(mgr, 25, 0.01, rng)


def _check_agreed(results: list[dict], signalled: bool) -> None:
    first = results[0]
    assert all(r == first for r in results), results
    assert first["committed"] == sorted(set(first["saved"]))
    if signalled and first["stopped"] is not None:
        assert first["saved"][-1] == first["stopped"]  # the stop comes right after its save


@pytest.mark.parametrize("who", ["one", "all"])
def test_a_signal_at_a_random_moment_saves_the_same_step_on_every_rank(rank_pool, tmp_path, who):
    for seed in range(3):
        root = str(tmp_path / f"{who}{seed}")
        results = rank_pool.run(on_ranks_signal_trial, root, seed, who, timeout=120)
        _check_agreed(results, True)
        assert results[0]["stopped"] is not None  # the signal came within the loop


def test_every_seconds_saves_the_same_steps_on_every_rank(rank_pool, tmp_path):
    for seed in range(3):
        results = rank_pool.run(on_ranks_clock_trial, str(tmp_path / str(seed)), seed, timeout=120)
        _check_agreed(results, False)


@pytest.mark.slow
@pytest.mark.parametrize("who", ["one", "all"])
def test_many_signal_trials_agree(rank_pool, tmp_path, who):
    for seed in range(3, 40):
        root = str(tmp_path / f"{who}{seed}")
        _check_agreed(rank_pool.run(on_ranks_signal_trial, root, seed, who, timeout=120), True)


@pytest.mark.slow
def test_many_clock_trials_agree(rank_pool, tmp_path):
    for seed in range(3, 40):
        results = rank_pool.run(on_ranks_clock_trial, str(tmp_path / str(seed)), seed, timeout=120)
        _check_agreed(results, False)


def on_ranks_every_steps_alone(rank: int, world: int, root: str) -> list[bool]:
    with ckpt.CheckpointManager(root, every_steps=3) as mgr:
        assert mgr._decisions is None  # every_steps alone runs no collective
        return [mgr.should_save(s) for s in range(7)]


def test_every_steps_alone_needs_no_agreement(rank_pool, tmp_path):
    answers = rank_pool.run(on_ranks_every_steps_alone, str(tmp_path))
    assert answers[0] == answers[1] == [False, False, True, False, False, True, False]


def on_ranks_configured_differently(rank: int, world: int, root: str) -> str:
    with pytest.raises(ValueError, match="same every_steps") as info:
        ckpt.CheckpointManager(root, every_seconds=10.0 if rank == 0 else None)
    assert isinstance(info.value, ckpt.RankMismatchError)
    assert isinstance(info.value, ckpt.CheckpointError)
    assert info.value.path == root
    return str(info.value)


def test_ranks_configuring_their_managers_differently_are_refused_together(rank_pool, tmp_path):
    messages = rank_pool.run(on_ranks_configured_differently, str(tmp_path))
    assert all("rank 1 has" in m for m in messages)


def on_ranks_incremental_on_one_rank(rank: int, world: int, root: str) -> str:
    with pytest.raises(ValueError, match="incremental") as info:
        ckpt.CheckpointManager(root, incremental=rank == 0)
    assert isinstance(info.value, ckpt.RankMismatchError)
    assert isinstance(info.value, ckpt.CheckpointError)
    return str(info.value)


def test_incremental_on_one_rank_only_is_refused_on_every_rank(rank_pool, tmp_path):
    messages = rank_pool.run(on_ranks_incremental_on_one_rank, str(tmp_path))
    assert all("'incremental': False" in m and "rank 1 has" in m for m in messages)


def on_ranks_save_on_rank_0_only(rank: int, world: int, root: str, subgroup: bool) -> str | None:
    group = dist.new_group([0, 1]) if subgroup else None
    mgr = ckpt.CheckpointManager(root, process_group=group, handshake_timeout=2)
    try:
        if rank != 0:
            return None
        with pytest.raises(ckpt.CollectiveError) as info:
            mgr.save(0, state={"w": torch.ones(2)})
        with pytest.raises(ckpt.CollectiveError):  # the manager stays refused, at once
            mgr.save(1, state={"w": torch.ones(2)})
        assert mgr.all_steps() == []  # nothing was written
        return str(info.value)
    finally:
        mgr._release()  # no collective: the ranks are out of step


@pytest.mark.parametrize("subgroup", [False, True])
def test_saving_on_one_rank_only_fails_fast_and_says_what_to_do(rank_pool, tmp_path, subgroup):
    message = rank_pool.run(on_ranks_save_on_rank_0_only, str(tmp_path), subgroup, timeout=60)[0]
    assert "rank(s) [1]" in message and "within 2 s" in message
    assert "every rank of the group must call save() with the same step" in message


def on_ranks_one_stopped(rank: int, world: int, root: str) -> str:
    mgr = ckpt.CheckpointManager(root, handshake_timeout=2)
    try:
        if rank == 1:  # stopped for 6 s (a debugger, a frozen node), then back
            subprocess.Popen(["sh", "-c", f"sleep 6; kill -CONT {os.getpid()}"])
            os.kill(os.getpid(), signal.SIGSTOP)
        with pytest.raises(ckpt.CollectiveError) as info:
            mgr.save(0, state={"w": torch.ones(2)})
        return str(info.value)
    finally:
        mgr._release()


def test_a_stopped_rank_is_named_and_the_late_rank_is_told(fresh_ranks, tmp_path):
    outcomes = fresh_ranks(on_ranks_one_stopped, 2, 60, args=(str(tmp_path),))
    assert all(o.returned for o in outcomes), [o.error for o in outcomes]
    assert "rank(s) [1]" in outcomes[0].result
    assert "rank 0 gave up waiting" in outcomes[1].result


def on_ranks_different_calls(rank: int, world: int, root: str) -> str:
    with ckpt.CheckpointManager(root, handshake_timeout=30) as mgr:
        mgr.save(0, state={"w": torch.ones(2)})
        with pytest.raises(ValueError, match="same call") as info:
            if rank == 0:
                mgr.save(1, state={"w": torch.ones(2)})
            else:
                mgr.restore(state={"w": torch.ones(2)})
        assert isinstance(info.value, ckpt.RankMismatchError)
        assert isinstance(info.value, ckpt.CheckpointError)
        assert info.value.path == root
        mgr.save(1, state={"w": torch.ones(2)})  # the ranks are still in step
    return str(info.value)


def test_ranks_making_different_calls_are_refused_together(rank_pool, tmp_path):
    messages = rank_pool.run(on_ranks_different_calls, str(tmp_path))
    assert all("rank 1 called restore()" in m for m in messages)


def on_ranks_agreement_cost(rank: int, world: int, root: str, every: int, n: int) -> float:
    with ckpt.CheckpointManager(
        root, every_seconds=1e6, preemption_signals=True, agree_every=every
    ) as mgr:
        mgr.should_save(0)
        start = time.perf_counter()
        for step in range(1, n + 1):
            mgr.should_save(step)
        return (time.perf_counter() - start) / n * 1e6


@pytest.mark.slow
def test_report_the_agreement_cost(rank_pool, tmp_path, capsys):
    """Not an assertion on time: prints µs per step of should_save (see docs/distributed.md)."""
    for every in (1, 10):
        costs = rank_pool.run(on_ranks_agreement_cost, str(tmp_path / str(every)), every, 2000)
        with capsys.disabled():
            print(f"\nshould_save, agree_every={every}: {max(costs):.1f} us/step on 2 gloo ranks")


def _start_ranks(role: str, root: str, store: Any) -> list[subprocess.Popen[str]]:
    """Two ranks joining ``store`` (held by the test, as torchrun's agent holds its own)."""
    env = os.environ | {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(store.port)}
    env |= {"WORLD_SIZE": "2", "TORCHELASTIC_USE_AGENT_STORE": "True"}
    if os.path.isdir("/sys/class/net/lo"):
        env["GLOO_SOCKET_IFNAME"] = "lo"
    worker = os.path.join(os.path.dirname(__file__), "save_exit_worker.py")
    return [
        subprocess.Popen(
            [sys.executable, worker, role, root],
            env=env | {"RANK": str(rank)},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in range(2)
    ]


def _finish(process: subprocess.Popen[str], timeout: float) -> tuple[int, str, str]:
    try:
        out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        out, err = process.communicate()
        pytest.fail(f"a rank was still running after {timeout:g} s:\n{err[-3000:]}")
    return process.returncode, out, err


def test_a_crashed_rank_does_not_wait_on_its_save_and_the_next_run_restores(tmp_path):
    """Main thread raises with an async save stuck on a stopped peer: the rank exits (not after
    collective_timeout, 300 s); the next run restores the previous step and cleans up."""
    root = str(tmp_path)
    store = dist.TCPStore("127.0.0.1", 0, None, True, timedelta(seconds=60), wait_for_workers=False)
    ranks = _start_ranks("crash", root, store)
    try:
        code, out, err = _finish(ranks[0], 120)
    finally:
        ranks[1].kill()
        ranks[1].communicate()
    assert code == 1 and "step 1 in flight" in out, err[-3000:]
    assert "collective save in flight is abandoned" in err, err[-3000:]
    assert any(n.startswith(".ckpt-tmp") for n in os.listdir(root))  # what the crash left
    store = dist.TCPStore("127.0.0.1", 0, None, True, timedelta(seconds=60), wait_for_workers=False)
    ranks = _start_ranks("resume", root, store)
    results = [_finish(p, 120) for p in ranks]
    assert [r[0] for r in results] == [0, 0], [r[2][-3000:] for r in results]
    assert all("restored 0" in r[1] for r in results)
    assert ckpt.CheckpointManager(root, process_group=False).all_steps() == [0, 1]
    assert not [n for n in os.listdir(root) if n.startswith(".ckpt-tmp")]


def _fsdp_kept_unsharded(seed: int) -> tuple[torch.nn.Module, torch.optim.Optimizer, Any]:
    """FSDP2 per layer and at the root with reshard_after_forward=False."""
    from torch.distributed.fsdp import fully_shard

    model = build_model(seed)
    for layer in model:
        if any(True for _ in layer.parameters()):
            fully_shard(layer, reshard_after_forward=False)
    fully_shard(model, reshard_after_forward=False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.05)
    return model, optimizer, torch.optim.lr_scheduler.StepLR(optimizer, step_size=2)


def _evaluate(model: torch.nn.Module) -> None:
    """An eval pass: FSDP2 leaves the unsharded parameters registered afterwards."""
    model.eval()
    with torch.no_grad():
        model(torch.ones(4, 5))
    model.train()


def on_ranks_unsharded_after_eval(rank: int, world: int, root: str) -> list[float]:
    from torch.distributed.tensor import DTensor

    model, optimizer, scheduler = _fsdp_kept_unsharded(0)
    train_step(model, optimizer, scheduler, 0)
    expected = full_model_state(model), full_optimizer_state(model, optimizer)  # before the eval
    _evaluate(model)
    assert not any(isinstance(p, DTensor) for p in model.parameters())  # the state to save
    fresh, fresh_optimizer, fresh_scheduler = _fsdp_kept_unsharded(9)
    _evaluate(fresh)
    with ckpt.CheckpointManager(root) as mgr:
        mgr.save(0, model=model, optimizer=optimizer, scheduler=scheduler)
        mgr.restore(model=fresh, optimizer=fresh_optimizer, scheduler=fresh_scheduler)
    assert_same_state(expected[0], full_model_state(fresh))
    assert_same_state(expected[1], full_optimizer_state(fresh, fresh_optimizer))
    streams = torch.get_rng_state()  # dropout draws from it: the same draws for both
    loss = train_step(model, optimizer, scheduler, 1)
    torch.set_rng_state(streams)
    return [loss, train_step(fresh, fresh_optimizer, fresh_scheduler, 1)]


def test_fsdp2_kept_unsharded_after_an_eval_pass_saves_and_restores(rank_pool, tmp_path):
    for losses in rank_pool.run(on_ranks_unsharded_after_eval, str(tmp_path)):
        assert losses[0] == losses[1]  # training goes on identically


@pytest.mark.slow
def test_sigterm_to_the_torchrun_agent_saves_one_step_on_every_rank_and_stops(tmp_path):
    """torchrun forwards its SIGTERM to each worker, at slightly different moments."""
    root, marks = tmp_path / "run", tmp_path / "marks"
    marks.mkdir()
    worker = os.path.join(os.path.dirname(__file__), "save_exit_worker.py")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           worker, "train", str(root), str(marks)]  # fmt: skip
    job = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           start_new_session=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while not all((marks / f"ready{r}").exists() for r in range(2)):
            assert job.poll() is None and time.monotonic() < deadline, "the ranks did not start"
            time.sleep(0.1)
        time.sleep(random.uniform(0, 0.3))
        job.send_signal(signal.SIGTERM)  # the agent only
        _, err = job.communicate(timeout=90)
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
            job.communicate()
    stops = [(marks / f"rank{r}.json").read_text() for r in range(2)]
    assert stops[0] == stops[1], err[-3000:]
    stopped = json.loads(stops[0])["stopped"]
    assert ckpt.CheckpointManager(root, process_group=False).all_steps() == [stopped]


def on_ranks_mesh(rank: int, world: int, root: str) -> dict[str, Any]:
    """HSDP on a 2x2 mesh (replicate x shard): managers on each dimension's groups."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("replicate", "shard"))
    model = build_model(0)
    fully_shard(model, mesh=mesh)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.05)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2)
    train_step(model, optimizer, scheduler, 0)
    expected = full_model_state(model), full_optimizer_state(model, optimizer)
    out: dict[str, Any] = {}
    replica = mesh.get_local_rank("replicate")
    # One replica's ranks hold a whole copy: each replica saves its own.
    with ckpt.CheckpointManager(
        f"{root}/replica{replica}", process_group=mesh.get_group("shard")
    ) as mgr:
        mgr.save(0, model=model, optimizer=optimizer)
        fresh = build_model(9)
        fully_shard(fresh, mesh=mesh)
        fresh_optimizer = torch.optim.AdamW(fresh.parameters(), lr=0.05)
        mgr.restore(model=fresh, optimizer=fresh_optimizer)
    assert_same_state(expected[0], full_model_state(fresh))
    assert_same_state(expected[1], full_optimizer_state(fresh, fresh_optimizer))
    for step in (1, 2):  # managers on the same group, one after the other
        with ckpt.CheckpointManager(
            f"{root}/replica{replica}", process_group=mesh.get_group("shard"), every_seconds=60
        ) as mgr:
            mgr.save(step, model=model, optimizer=optimizer)
            out["steps"] = mgr.all_steps()
    # The ranks of the replicate dimension hold half of each tensor: refused, nothing written.
    shard = mesh.get_local_rank("shard")
    with ckpt.CheckpointManager(
        f"{root}/across{shard}", process_group=mesh.get_group("replicate")
    ) as mgr:
        with pytest.raises(ckpt.CheckpointWriteError) as info:
            mgr.save(0, model=model, optimizer=optimizer)
        out["refused"] = str(info.value)
        out["written"] = mgr.all_steps()
    # And a manager over all four ranks.
    with ckpt.CheckpointManager(f"{root}/all") as mgr:
        mgr.save(0, model=model, optimizer=optimizer)
        fresh = build_model(9)
        fully_shard(fresh, mesh=mesh)
        mgr.restore(model=fresh)
    assert_same_state(expected[0], full_model_state(fresh))
    return out


@pytest.mark.slow
def test_managers_on_the_dimensions_of_a_2d_mesh(fresh_ranks, tmp_path):
    outcomes = fresh_ranks(on_ranks_mesh, 4, 240, args=(str(tmp_path),))
    assert all(o.returned for o in outcomes), [o.error for o in outcomes]
    for outcome in outcomes:
        assert outcome.result["written"] == [] and outcome.result["steps"] == [0, 1, 2]
        assert "hold only" in outcome.result["refused"]


def on_ranks_should_save_on_rank_0_only(rank: int, world: int, root: str) -> str | None:
    mgr = ckpt.CheckpointManager(root, every_seconds=1e6, handshake_timeout=2)
    try:
        if rank != 0:
            return None
        with pytest.raises(ckpt.CollectiveError) as info:
            mgr.should_save(0)
        return str(info.value)
    finally:
        mgr._release()


def test_should_save_on_one_rank_only_fails_fast_and_says_what_to_do(rank_pool, tmp_path):
    message = rank_pool.run(on_ranks_should_save_on_rank_0_only, str(tmp_path), timeout=60)[0]
    assert "every rank of the group must call should_save(step)" in message.lower()


class Opaque:
    """A value ckpt cannot store without pickle."""


def _save_unstorable(root: str, value: Any) -> None:
    with ckpt.CheckpointManager(root) as mgr:
        mgr.save(0, state={"w": torch.zeros(2)}, config={"opts": {"x": value}}, rng=False)


def on_ranks_save_unstorable(rank: int, world: int, root: str, who: str) -> dict[str, Any]:
    """Save a dict item holding an :class:`Opaque` on every rank, or on rank 1 only."""
    value = Opaque() if who == "all" or rank == 1 else 1
    try:
        _save_unstorable(root, value)
    except Exception as e:
        error: Exception = e
    return {"error": type(error).__name__, "message": str(error)}


@pytest.mark.parametrize("who", ["all", "one"])
def test_an_unstorable_value_raises_the_one_process_type_error_on_every_rank(
    rank_pool, tmp_path, who
):
    with pytest.raises(TypeError) as alone:
        _save_unstorable(str(tmp_path / "alone"), Opaque())
    assert "config['opts']['x']" in str(alone.value)
    root = tmp_path / "ranks"
    outcomes = rank_pool.run(on_ranks_save_unstorable, str(root), who)
    assert [o["error"] for o in outcomes] == ["TypeError"] * 2
    assert outcomes[1]["message"] == str(alone.value)  # as in one process
    if who == "all":
        assert outcomes[0]["message"] == str(alone.value)
    else:
        assert "rank 1" in outcomes[0]["message"] and str(alone.value) in outcomes[0]["message"]
    assert ckpt.CheckpointManager(root).all_steps() == []
    assert not [p for p in root.iterdir() if p.is_dir()]  # nothing written, no leftover
