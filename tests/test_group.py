"""RankGroup: ckpt's pickle-free collectives, on two gloo ranks (the shared pool, or fresh ranks).

The functions named ``on_*`` run on every rank (``fn(rank, world_size, ...)``); they
report what they saw and the test asserts on it here, in the test process.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import pickle
import random
import signal
import time
from unittest import mock

import pytest
import torch.distributed as dist
from helpers import call_outcome
from rank_pool import RankError

import ckpt
from ckpt.distributed.group import INLINE_BYTES, MAX_FAILURE_CHARS, RankGroup

pytestmark = pytest.mark.distributed

HOSTILE = {"a/b": [1, 2.5, None, True], "../x": {"": "é\u0000\ud800😀"}, "0": [], "n": -(2**62)}


# -- functions the ranks run -----------------------------------------------------------


def on_many_closed_groups(rank, world_size):
    from ckpt.distributed import kept_groups as group_module

    kept = group_module._KEPT
    before = len(kept)
    for _ in range(group_module.KEPT_GROUPS + 3):
        with RankGroup(timeout=30) as group:
            assert group.all_gather_json(rank) == [0, 1]
        assert len(kept) <= group_module.KEPT_GROUPS
    earlier = list(kept)
    with RankGroup(timeout=30) as fresh:  # a new group, never a kept one
        made = fresh._held
        fresh.mark_broken("a collective failed")
    return {
        "grew": len(kept) >= min(before + 1, group_module.KEPT_GROUPS),
        "bounded": len(kept) <= group_module.KEPT_GROUPS,
        "fresh": all(made is not g for g in earlier),
        "broken_not_kept": all(made is not g for g in kept),
    }


def on_exit_with_kept_groups(rank, world_size):
    """Groups closed, then the exit handler run in a forked child and in the rank itself."""
    from ckpt.distributed import kept_groups as group_module

    for _ in range(2):
        with RankGroup(timeout=30) as group:
            group.barrier()
    kept = list(group_module._KEPT) + [g for v in group_module._IDLE.values() for g in v]
    before = [_registered(g) for g in kept]
    pid = os.fork()
    if pid == 0:  # a forked child (a DataLoader worker) exiting normally: nothing destroyed
        group_module._let_go_at_exit()
        os._exit(0 if [_registered(g) for g in kept] == before else 3)
    child = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    group_module._let_go_at_exit()
    left = len(group_module._KEPT) + sum(map(len, group_module._IDLE.values()))
    after = [_registered(g) for g in kept]
    return {"kept": len(kept), "before": before, "child": child, "after": after, "left": left}


def _registered(group):
    try:
        dist.get_process_group_ranks(group)
    except (KeyError, ValueError, RuntimeError):
        return False
    return True


def on_every_operation(rank, world_size):
    with RankGroup(timeout=30) as group:
        seen = {
            "rank": group.rank,
            "world_size": group.world_size,
            "coordinator": group.is_coordinator,
            "gathered": group.all_gather_json(
                {"rank": rank, "hostile": HOSTILE, "pad": "x" * rank}
            ),
            "scalars": group.all_gather_json(None if rank else 1.5),
            "from_0": group.broadcast_json(HOSTILE if rank == 0 else None),
            "from_1": group.broadcast_json([rank, "one"] if rank == 1 else "ignored", src=1),
            "bytes": group.broadcast_bytes(bytes(range(256)) if rank == 0 else None),
            "empty": group.broadcast_bytes(b"" if rank == 1 else None, src=1),
            "view": group.broadcast_bytes(memoryview(b"abc") if rank == 0 else None),
            "barrier": group.barrier(),
            "no_failures": group.failures(None),
            "repr": repr(group),
        }
    seen["after_close"] = call_outcome(group.barrier)
    group.close()  # idempotent
    return seen


def on_large_payloads(rank, world_size, seed):
    rng = random.Random(seed + rank)
    text = "".join(chr(rng.choice([0x41, 0xE9, 0x4E2D, 0x1F600, 0xD800])) for _ in range(100_000))
    value = {"text": text * (rank + 1), "numbers": [rng.random() for _ in range(50_000)]}
    blob = random.Random(seed).randbytes(4_000_000 + 17)
    with RankGroup(timeout=60) as group:
        gathered = group.all_gather_json(value)
        received = group.broadcast_bytes(blob if rank == 1 else None, src=1)
        echoed = group.broadcast_json(value if rank == 0 else None)
    return {
        "gathered_equal": gathered[rank] == value,
        "gathered_digests": [_digest(v) for v in gathered],
        "own_digest": _digest(value),
        "bytes_equal": received == blob,
        "echoed_digest": _digest(echoed),
    }


def _digest(value):
    return hashlib.sha256(repr(value).encode("utf-8", "surrogatepass")).hexdigest()


class _Unprintable(Exception):
    def __str__(self):
        raise RuntimeError("no")


def on_failures(rank, world_size):
    errors = {
        0: [None, None, _Unprintable(), KeyError("k")],
        1: [ValueError("über \ud800 bad"), None, ValueError("x" * 10 * MAX_FAILURE_CHARS), None],
    }
    with RankGroup(timeout=30) as group:
        return [group.failures(error) for error in errors[rank]]


def on_bad_values(rank, world_size):
    with RankGroup(timeout=30) as group:
        seen = {
            "not_json": call_outcome(group.all_gather_json, object() if rank == 1 else 1),
            "nan": call_outcome(group.all_gather_json, math.nan),
            "broadcast_not_json": call_outcome(group.broadcast_json, {1j} if rank == 0 else None),
            "bytes_missing": call_outcome(group.broadcast_bytes, None, src=1),
            "bad_src": call_outcome(group.broadcast_json, 1, src=2),
            "bool_src": call_outcome(group.broadcast_bytes, b"", src=True),
            "still_works": group.all_gather_json(rank),
        }
    return seen


def on_subgroup(rank, world_size):
    both = dist.new_group(ranks=[1, 0], backend="gloo")
    with RankGroup(both, timeout=30) as group:
        seen = [group.rank, group.world_size, group.all_gather_json(rank)]
    dist.destroy_process_group(both)
    return seen


def on_outsider(rank, world_size):
    only_1 = dist.new_group(ranks=[1], backend="gloo")
    try:
        group = RankGroup(only_1, timeout=5)
    except ValueError as e:
        return str(e)
    with group:
        return [group.rank, group.world_size, group.all_gather_json("one")]


def _refuse(*args, **kwargs):
    raise AssertionError("pickle used")


def on_pickle_refused(rank, world_size):
    patches = [
        mock.patch.object(pickle, "loads", _refuse),
        mock.patch.object(pickle, "load", _refuse),
        mock.patch.object(pickle, "dumps", _refuse),
        mock.patch.object(pickle, "dump", _refuse),
        mock.patch.object(pickle, "Unpickler", _refuse),
        mock.patch.object(pickle, "Pickler", _refuse),
        # torch's object collectives bound pickle's classes at import: refuse them as well.
        mock.patch.object(dist.distributed_c10d, "_pickler", _refuse),
        mock.patch.object(dist.distributed_c10d, "_unpickler", _refuse),
    ]
    for patch in patches:
        patch.start()
    try:
        sanity = call_outcome(dist.all_gather_object, [None] * world_size, rank)
        with RankGroup(timeout=30) as group:
            seen = {
                "gathered": group.all_gather_json({"r": rank, "h": HOSTILE}),
                "broadcast": group.broadcast_json(HOSTILE if rank == 1 else None, src=1),
                "bytes": group.broadcast_bytes(b"\x80\x04" if rank == 0 else None),
                "failures": group.failures(ValueError("x") if rank else None),
                "barrier": group.barrier(),
            }
    finally:
        for patch in reversed(patches):
            patch.stop()
    return {"sanity": sanity[0], **seen}


def on_kill(rank, world_size, when):
    group = RankGroup(timeout=10)
    group.barrier()
    # Longer than INLINE_BYTES: rank 0's value takes a second collective after the lengths.
    value = {"rank": rank, "pad": "x" * INLINE_BYTES}
    if rank == 1:
        if when == "mid_gather":  # rank 0 has the lengths and waits for the payloads
            group._gather_lengths(b"{}")
        os.kill(os.getpid(), signal.SIGKILL)
    first = call_outcome(group.all_gather_json, value)
    second = call_outcome(group.barrier)
    return {"first": first, "second": second}


def on_stall(rank, world_size, done_path):
    group = RankGroup(timeout=2)
    group.barrier()
    if rank == 1:  # stall until rank 0 has given up, then leave
        while not os.path.exists(done_path):
            time.sleep(0.05)
        return None
    outcome = call_outcome(group.all_gather_json, "late")
    open(done_path, "w").close()
    return outcome


def on_raise(rank, world_size):
    if rank == 1:
        raise KeyError("only on rank 1")
    return rank


def on_die(rank, world_size):
    if rank == 0:
        os._exit(3)
    return rank


def on_echo(rank, world_size, *args, **kwargs):
    return [rank, world_size, args, kwargs]


# -- tests -----------------------------------------------------------------------------


def test_every_operation_gives_every_rank_the_same_answer(rank_pool):
    seen = rank_pool.run(on_every_operation)
    for rank, s in enumerate(seen):
        assert (s["rank"], s["world_size"], s["coordinator"]) == (rank, 2, rank == 0)
        assert s["gathered"] == [
            {"rank": 0, "hostile": HOSTILE, "pad": ""},
            {"rank": 1, "hostile": HOSTILE, "pad": "x"},
        ]
        assert s["scalars"] == [1.5, None]
        assert s["from_0"] == HOSTILE
        assert s["from_1"] == [1, "one"]
        assert s["bytes"] == bytes(range(256))
        assert s["empty"] == b""
        assert s["view"] == b"abc"
        assert s["barrier"] is None
        assert s["no_failures"] == []
        assert s["repr"] == f"RankGroup(rank={rank}, world_size=2, timeout=30)"
        kind, message, extra = s["after_close"]
        assert kind == "CollectiveError" and "closed" in message
        assert extra == {"operation": "barrier", "rank": rank, "timeout": 30.0}


def test_json_is_json_tuples_become_lists_and_keys_strings(rank_pool):
    seen = rank_pool.run(on_echo_json, {1: (1, 2)})
    assert seen == [[{"1": [1, 2]}] * 2] * 2


def on_echo_json(rank, world_size, value):
    with RankGroup(timeout=30) as group:
        return group.all_gather_json(value)


def test_megabytes_of_unicode_json_and_bytes_arrive_whole(rank_pool):
    seen = rank_pool.run(on_large_payloads, 7)
    for s in seen:
        assert s["gathered_equal"] and s["bytes_equal"]
        assert s["gathered_digests"] == [seen[0]["own_digest"], seen[1]["own_digest"]]
        assert s["echoed_digest"] == seen[0]["own_digest"]
    assert seen[0]["own_digest"] != seen[1]["own_digest"]


SIZES_ABOUT_INLINE = [(0, 0), (0, 1), (1, 0), (1, 1), (-1, 0), (0, -1), (3, -3)]


def _about_inline(extra):
    """A JSON string whose encoding is INLINE_BYTES + extra bytes (ending in a 3-byte euro sign)."""
    return "x" * (INLINE_BYTES - 5 + extra) + "\u20ac"


def on_sizes_about_inline(rank, world_size):
    """Values of INLINE_BYTES (sent with their lengths) and one byte more (a second collective)."""
    with RankGroup(timeout=30) as group:
        gathered = [group.all_gather_json(_about_inline(e[rank])) for e in SIZES_ABOUT_INLINE]
        sent = [
            [
                group.broadcast_json(_about_inline(extra) if rank == 1 else None, src=1),
                group.broadcast_bytes(b"\x80" * (INLINE_BYTES + extra) if rank == 0 else None),
            ]
            for extra in (-INLINE_BYTES, -1, 0, 1)
        ]
    return {"gathered": gathered, "sent": sent}


def test_values_about_the_inline_size_arrive_whole_on_every_rank(rank_pool):
    seen = rank_pool.run(on_sizes_about_inline)
    assert seen[0] == seen[1]
    expected = [[_about_inline(e) for e in extra] for extra in SIZES_ABOUT_INLINE]
    assert seen[0]["gathered"] == expected
    sent = [[_about_inline(e), b"\x80" * (INLINE_BYTES + e)] for e in (-INLINE_BYTES, -1, 0, 1)]
    assert seen[0]["sent"] == sent
    assert len(json.dumps(_about_inline(0), ensure_ascii=False).encode()) == INLINE_BYTES


def test_failures_lists_the_failed_ranks_the_same_on_every_rank(rank_pool):
    seen = rank_pool.run(on_failures)
    assert seen[0] == seen[1]
    one_failed, none_failed, both_failed, zero_failed = seen[0]
    assert one_failed == [(1, "ValueError: über \ud800 bad")]
    assert none_failed == []
    (r0, unprintable), (r1, long) = both_failed
    assert (r0, r1) == (0, 1)
    assert unprintable == "_Unprintable: <unprintable message>"
    assert long.startswith("ValueError: xxx") and len(long) == MAX_FAILURE_CHARS
    assert zero_failed == [(0, "KeyError: 'k'")]


def test_a_value_that_is_not_json_fails_on_every_rank_and_leaves_the_group_usable(rank_pool):
    seen = rank_pool.run(on_bad_values)
    mine, theirs = seen[1]["not_json"], seen[0]["not_json"]
    assert mine[0] == "TypeError" and "object" in mine[1]
    assert theirs[0] == "CollectiveError" and "rank(s) [1]" in theirs[1]
    for rank, s in enumerate(seen):
        assert s["nan"][0] == "ok" and all(math.isnan(v) for v in s["nan"][1])
        assert s["broadcast_not_json"][0] == ("TypeError" if rank == 0 else "CollectiveError")
        assert s["bytes_missing"][0] == ("TypeError" if rank == 1 else "CollectiveError")
        assert s["bad_src"][0] == "ValueError" and "src" in s["bad_src"][1]
        assert s["bool_src"][0] == "ValueError"
        assert s["still_works"] == [0, 1]


def test_a_group_over_the_ranks_of_a_process_group(rank_pool):
    assert rank_pool.run(on_subgroup) == [[0, 2, [0, 1]], [1, 2, [0, 1]]]


def test_a_rank_outside_the_process_group_gets_a_value_error(fresh_ranks):
    outsider, member = fresh_ranks(on_outsider, 2, 60)
    assert outsider.returned and "not a member" in outsider.result
    assert member.returned and member.result == [0, 1, ["one"]]


def test_no_operation_pickles(rank_pool):
    seen = rank_pool.run(on_pickle_refused)
    for s in seen:
        assert s["sanity"] == "AssertionError"  # the patches do stop torch's pickling path
        assert s["gathered"] == [{"r": 0, "h": HOSTILE}, {"r": 1, "h": HOSTILE}]
        assert s["broadcast"] == HOSTILE and s["bytes"] == b"\x80\x04"
        assert s["failures"] == [(1, "ValueError: x")]


@pytest.mark.parametrize("when", ["before_gather", "mid_gather"])
def test_a_rank_killed_mid_collective_makes_the_other_raise_within_the_timeout(fresh_ranks, when):
    outcomes = fresh_ranks(on_kill, 2, 60, args=(when,))
    survivor, killed = outcomes
    assert killed.exitcode == -signal.SIGKILL and not killed.returned
    assert survivor.returned and survivor.exitcode == 0, survivor.error
    kind, message, extra = survivor.result["first"]
    assert kind == "CollectiveError", message
    assert "all_gather_json" in message and "rank 0 of 2" in message and "timeout 10 s" in message
    assert extra == {"operation": "all_gather_json", "rank": 0, "timeout": 10.0}
    kind, message, _ = survivor.result["second"]
    assert kind == "CollectiveError" and "earlier collective failed" in message


def test_a_stalled_rank_makes_the_other_raise_at_the_timeout(fresh_ranks, tmp_path):
    waiting, stalled = fresh_ranks(on_stall, 2, 60, args=(str(tmp_path / "done"),))
    assert stalled.returned and stalled.exitcode == 0
    assert waiting.returned, waiting.error
    kind, message, extra = waiting.result
    assert kind == "CollectiveError" and "all_gather_json" in message and "timeout 2 s" in message
    assert extra["timeout"] == 2.0


def test_construction_needs_a_process_group_and_a_positive_timeout():
    if dist.is_initialized():
        pytest.skip("this process is in a process group")
    with pytest.raises(ValueError, match="init_process_group"):
        RankGroup()
    for bad in (0, -1, 2e9, math.inf, math.nan, True, "10"):
        with pytest.raises(ValueError, match="timeout"):
            RankGroup(timeout=bad)


def test_collective_error_is_a_checkpoint_error_and_keeps_its_fields_when_located():
    error = ckpt.CollectiveError("barrier failed", operation="barrier", rank=1, timeout=5.0)
    assert isinstance(error, ckpt.CheckpointError) and isinstance(error, RuntimeError)
    located = error.located("/r/step-3")
    assert type(located) is ckpt.CollectiveError and located.path == "/r/step-3"
    assert (located.operation, located.rank, located.timeout) == ("barrier", 1, 5.0)


# -- the harness itself ------------------------------------------------------------------


def test_the_pool_passes_arguments_and_reports_a_rank_that_raises(rank_pool):
    assert rank_pool.run(on_echo, 1, "a", key=(2,)) == [
        [0, 2, (1, "a"), {"key": (2,)}],
        [1, 2, (1, "a"), {"key": (2,)}],
    ]
    with pytest.raises(RankError, match=r"rank 1 raised in test_group\.on_raise") as info:
        rank_pool.run(on_raise)
    assert list(info.value.failures) == [1] and "only on rank 1" in info.value.failures[1]
    assert isinstance(info.value.exceptions[1], KeyError)
    assert rank_pool.run(on_echo) == [[0, 2, (), {}], [1, 2, (), {}]]  # restarted


def test_the_pool_restarts_after_a_rank_dies(rank_pool):
    from rank_pool import PoolError

    with pytest.raises(PoolError, match="rank 0 died with exit code 3"):
        rank_pool.run(on_die, timeout=30)
    assert not rank_pool.running
    assert rank_pool.run(on_echo) == [[0, 2, (), {}], [1, 2, (), {}]]


def test_the_pool_refuses_functions_it_cannot_import(rank_pool):
    with pytest.raises(ValueError, match="module-level"):
        rank_pool.run(lambda rank, world_size: None)


def test_closed_groups_of_every_rank_are_kept_unused_and_bounded(rank_pool):
    # close() does not wait for gloo to join a group's threads; a broken one is destroyed,
    # and a group is never taken up again (a rank whose group broke would not).
    for seen in rank_pool.run(on_many_closed_groups):
        assert seen == {"grew": True, "bounded": True, "fresh": True, "broken_not_kept": True}


def test_kept_groups_are_destroyed_at_exit_by_the_process_that_kept_them(rank_pool):
    # Left to the interpreter's finalization, a kept group made about one exit in eight
    # of a 2-rank FSDP2 torchrun job abort ("terminate called without an active
    # exception", SIGABRT) after every save had succeeded. A forked child inheriting the
    # groups must not destroy them (gloo's threads were not forked).
    for seen in rank_pool.run(on_exit_with_kept_groups):
        assert seen["kept"] >= 2 and all(seen["before"]), seen
        assert seen["child"] == 0, seen
        assert seen["after"] == [False] * seen["kept"] and seen["left"] == 0, seen
