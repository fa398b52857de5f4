"""Limits that hold at both ends: what saves can be listed and read back; what is read costs
little. Step range, metric values, shapes and offsets that overflow, manifest bombs."""

from __future__ import annotations

import json
import logging
import math
import os
import tracemalloc
import zlib

import numpy as np
import pytest
import torch
from conftest import assert_same_state
from helpers import minimal_manifest_bytes, write_manifest

import ckpt
import ckpt.format.bounds
import ckpt.saving.retaining
from ckpt.errors import CorruptCheckpointError
from ckpt.format import (
    MANIFEST_NAME,
    MAX_COMPRESSION_RATIO,
    MAX_MANIFEST_BYTES,
    MAX_MANIFEST_VALUES,
    MAX_STEP,
    decode_manifest,
    parse_step_dir_name,
    step_dir_name,
)
from ckpt.format.checksums import hash_bytes
from ckpt.format.limits import MAX_BYTES, byte_count, check_metrics, float64_value
from ckpt.format.tensorfile import parse_header
from ckpt.policies.retention import RetentionPolicy, steps_to_delete


def entries(root) -> list[str]:
    return sorted(os.listdir(root))


# ---------------------------------------------------------------------- steps


def test_the_step_range_is_what_a_step_directory_name_holds():
    assert MAX_STEP == ckpt.MAX_STEP == 10**20 - 1
    assert parse_step_dir_name(step_dir_name(MAX_STEP)) == MAX_STEP
    assert parse_step_dir_name("step_" + "1" * 21) is None
    for bad in (MAX_STEP + 1, 10**20, 2**70, 10**5000, -1, -(10**5000)):
        with pytest.raises(ValueError, match="from 0 to 10\\*\\*20 - 1"):
            step_dir_name(bad)


@pytest.mark.parametrize("step", [0, 10**12 - 1, 10**12, 2**63 - 1, 2**63, 2**64, MAX_STEP])
def test_every_step_in_range_saves_lists_and_restores(tmp_path, step):
    mgr = ckpt.CheckpointManager(tmp_path)
    mgr.save(step, data={"x": torch.tensor([step % 1000])}, rng=False)
    mgr.save(5, data={"x": torch.tensor([5])}, rng=False)  # sorts numerically
    assert mgr.all_steps() == sorted({5, step})
    assert mgr.latest_step() == max(5, step)
    live = {"x": torch.tensor([-1])}
    info = mgr.restore(step, data=live, rng=False)
    assert info is not None and info.step == step and live["x"].item() == step % 1000
    assert mgr.verify(step).step == step and mgr.checkpoint(step).step == step
    assert mgr.should_save(step) is False or step == 5


@pytest.mark.parametrize("step", [MAX_STEP + 1, 10**20, 2**80, -1])
def test_a_step_out_of_range_is_refused_before_anything_is_written(tmp_path, step):
    mgr = ckpt.CheckpointManager(tmp_path, every_steps=1)
    with pytest.raises(ValueError, match="step must be an int from 0"):
        mgr.save(step, data={"x": 1})
    with pytest.raises(ValueError, match="step must be an int from 0"):
        mgr.should_save(step)
    with pytest.raises(ValueError, match="step must be an int from 0"):
        mgr.restore(step, data={})
    assert entries(tmp_path) == [] and mgr.all_steps() == []


def test_a_manifest_step_out_of_range_is_corrupt():
    doc = json.loads(minimal(step=10**20))
    with pytest.raises(CorruptCheckpointError, match="from 0 to") as e:
        decode_manifest(json.dumps(doc).encode(), "m")
    assert e.value.key == "step" and e.value.path == "m"


# -------------------------------------------------------------------- metrics


@pytest.mark.parametrize(
    ("given", "stored"),
    [
        (np.float32(0.5), 0.5),
        (np.float64(0.25), 0.25),
        (np.int64(7), 7),
        (np.uint8(200), 200),
        (np.array(1.5), 1.5),
        (np.array([2.5]), 2.5),
        (torch.tensor(0.75), 0.75),
        (torch.tensor([3]), 3),
        (torch.tensor([[4.0]], dtype=torch.bfloat16), 4.0),
        (2**63, 2**63),
        (10**308, 10**308),
        (-1.7976931348623157e308, -1.7976931348623157e308),
        (float("inf"), float("inf")),
        (-float("inf"), -float("inf")),
        (np.float32("inf"), float("inf")),
        (torch.tensor(float("-inf")), -float("inf")),
        (float("nan"), float("nan")),
        (np.float64("nan"), float("nan")),
    ],
)
def test_numbers_of_every_kind_are_accepted_as_metrics(tmp_path, given, stored):
    """NaN and the infinities too: a loss overflows now and then (GradScaler), and the save
    must not fail for it (tests/kill_worker.py saves such a loss); they never rank."""
    mgr = ckpt.CheckpointManager(tmp_path)
    info = mgr.save(1, metrics={"m": given}, data={"v": 1}, rng=False)
    for got in (info.metrics["m"], mgr.checkpoint(1).metrics["m"]):
        assert type(got) is type(stored)
        assert got == stored or (math.isnan(got) and math.isnan(stored))


@pytest.mark.parametrize(
    ("given", "error"),
    [
        (10**400, ValueError),
        (-(10**400), ValueError),
        (2**1024, ValueError),
        pytest.param(10**5000, ValueError, id="10**5000"),
        (True, TypeError),
        (np.bool_(True), TypeError),
        (torch.tensor(True), TypeError),
        (torch.ones(2), TypeError),
        (torch.ones(1, device="meta"), TypeError),
        (1 + 2j, TypeError),
        ("0.5", TypeError),
        (None, TypeError),
    ],
)
def test_metrics_that_are_not_float64_numbers_are_refused_at_save(tmp_path, given, error):
    mgr = ckpt.CheckpointManager(tmp_path, keep_best=1, best_metric="m")
    with pytest.raises(error, match=r"metrics\['m'\]"):
        mgr.save(1, metrics={"m": given}, data={"v": 1})
    assert entries(tmp_path) == [] and mgr.all_steps() == []


def test_float64_value_never_raises():
    for value in (10**400, -(10**400), 10**5000, math_nan(), "1", None, [1], {"$float": "inf"}):
        assert float64_value(value) is None
    assert float64_value(2**1000) == 2.0**1000 and float64_value(3) == 3.0
    assert check_metrics({"a": 1, "b": 0.5}) == {"a": 1, "b": 0.5}


def math_nan() -> float:
    return float("nan")


@pytest.mark.parametrize(
    "bad", [10**400, -(10**400), 2**1024, {"$float": "inf"}, {"$float": "nan"}, 1e999]
)
def test_a_bad_metric_in_an_old_manifest_never_breaks_retention(tmp_path, bad, caplog):
    """Written by an older ckpt (or by hand): ranking skips it, and every later save works."""
    mgr = ckpt.CheckpointManager(tmp_path, keep_best=1, best_metric="loss", keep_last=1)
    mgr.save(1, metrics={"loss": 0.5}, data={"v": 1}, rng=False)
    path = tmp_path / step_dir_name(1) / MANIFEST_NAME
    doc = json.loads(path.read_bytes())
    doc["metrics"]["loss"] = bad
    write_manifest(path, doc)
    mgr.close()
    mgr = ckpt.CheckpointManager(tmp_path, keep_best=1, best_metric="loss", keep_last=1)
    with caplog.at_level(logging.WARNING, logger="ckpt"):
        for step, loss in ((2, 3.0), (3, 1.0), (4, 2.0)):
            assert mgr.save(step, metrics={"loss": loss}, data={"v": step}, rng=False)
    assert mgr.all_steps() == [3, 4]  # best finite (3) and newest (4); the bad one ranks last


def test_a_retention_failure_is_a_warning_and_later_saves_work(tmp_path, monkeypatch, caplog):
    mgr = ckpt.CheckpointManager(tmp_path, keep_last=1)
    mgr.save(1, data={"v": 1}, rng=False)

    def broken(*args, **kwargs):
        raise OverflowError("int too large to convert to float")

    monkeypatch.setattr(ckpt.saving.retaining, "steps_to_delete", broken)
    with caplog.at_level(logging.WARNING, logger="ckpt"):
        info = mgr.save(2, data={"v": 2}, rng=False)
        mgr.save(3, data={"v": 3}, rng=False)
    assert info.step == 2 and "retention after step 2 failed" in caplog.text
    assert mgr.all_steps() == [1, 2, 3]
    monkeypatch.undo()
    mgr.save(4, data={"v": 4}, rng=False)
    assert mgr.all_steps() == [4]


def test_ranking_handles_huge_ints_and_junk_without_raising():
    metrics = {1: {"m": 10**400}, 2: {"m": "x"}, 3: {"m": 2.0}, 4: {"m": None}, 5: {"m": 1.0}}
    policy = RetentionPolicy(keep_best=1, best_metric="m")
    assert steps_to_delete(range(1, 7), just_saved=6, policy=policy, metrics=metrics) == [
        1,
        2,
        3,
        4,
    ]


# ------------------------------------------------------------ shapes, offsets


def minimal(**changes: object) -> bytes:
    return minimal_manifest_bytes(2, 1000, **changes)


def with_tensor(**record: object) -> bytes:
    base = {"file": "data.safetensors", "dtype": "float32", "shape": [1], "device": "cpu"}
    return minimal(tensors={"data/x": {**base, **record}})


@pytest.mark.parametrize(
    "shape",
    [
        [2**64],
        [2**63],
        [2**62],  # float32: 2**64 bytes
        [2**32, 2**32],
        [0, 2**62, 2**62],  # no bytes, but strides torch cannot hold
        [2**31] * 5,
        [2] * 100_000,  # a product that grows without end
        [10**4000],
        [1001],  # fits an int64, but not the 1000-byte file
    ],
)
def test_shapes_whose_byte_count_overflows_are_corrupt_and_named(shape):
    with pytest.raises(CorruptCheckpointError, match="shape") as e:
        decode_manifest(with_tensor(shape=shape), "dir/manifest.json")
    assert e.value.key == "tensors.data/x" and e.value.path == "dir/manifest.json"
    assert len(str(e.value)) < 500


@pytest.mark.parametrize("shape", [[-1], [1.5], [True], "12", [[1]]])
def test_shapes_that_are_not_lists_of_sizes_are_corrupt(shape):
    with pytest.raises(CorruptCheckpointError, match="shape") as e:
        decode_manifest(with_tensor(shape=shape), "m")
    assert e.value.key == "tensors.data/x"


@pytest.mark.parametrize("offset", [2**64, 2**63, 1001, -1])
def test_offsets_beyond_the_file_are_corrupt(offset):
    raw = minimal(
        tensors={
            "data/#pack": {
                "file": "data.safetensors",
                "dtype": "uint8",
                "shape": [4],
                "device": "cpu",
            },
            "data/x": {
                "file": "data.safetensors",
                "dtype": "float32",
                "shape": [1],
                "device": "cpu",
                "pack": "data/#pack",
                "offset": offset,
            },
        }
    )
    with pytest.raises(CorruptCheckpointError, match="offset") as e:
        decode_manifest(raw, "m")
    assert e.value.key == "tensors.data/x"


def test_byte_count_stops_at_the_bound():
    assert byte_count([], 4) == 4 and byte_count([0, 5], 8) == 0 and byte_count([3, 4], 2) == 24
    assert byte_count([2**61], 4) is None and byte_count([2**61], 2) == 2**62
    assert byte_count([MAX_BYTES], 1) == MAX_BYTES and byte_count([MAX_BYTES + 1], 1) is None


def safetensors_header(shape: object, offsets: object, data: bytes = b"") -> bytes:
    doc = {"a": {"dtype": "F32", "shape": shape, "data_offsets": offsets}}
    raw = json.dumps(doc).encode()
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw + data


@pytest.mark.parametrize(
    ("shape", "offsets"),
    [
        ([2**64], [0, 2**66]),
        ([2**62], [0, 2**64]),
        ([2**32, 2**32], [0, 2**66]),
        ([0, 2**62, 2**62], [0, 0]),
        ([2] * 100_000, [0, 4]),
        ([1], [0, 2**64]),
    ],
)
def test_safetensors_shapes_and_offsets_that_overflow_are_corrupt_and_named(shape, offsets):
    raw = safetensors_header(shape, offsets, b"\0" * 4)
    with pytest.raises(CorruptCheckpointError) as e:
        parse_header(raw, len(raw), "dir/data.safetensors")
    assert e.value.key == "a" and e.value.path == "dir/data.safetensors"
    assert len(str(e.value)) < 500


def test_an_overflowing_shape_in_a_saved_checkpoint_is_corrupt_for_every_operation(tmp_path):
    mgr = ckpt.CheckpointManager(tmp_path)
    mgr.save(1, data={"x": torch.ones(3)}, rng=False)
    mgr.save(2, data={"x": torch.ones(3) * 2}, rng=False)
    path = tmp_path / step_dir_name(2) / MANIFEST_NAME
    doc = json.loads(path.read_bytes())
    doc["tensors"]["data/x"]["shape"] = [2**64]
    write_manifest(path, doc)
    for operation in (
        lambda: mgr.restore(data={"x": torch.zeros(3)}, rng=False),
        mgr.read,
        mgr.verify,
        mgr.checkpoint,
        lambda: mgr.restore(map_location="meta", data={"x": torch.zeros(3)}, rng=False),
    ):
        with pytest.raises(CorruptCheckpointError, match="overflows") as e:
            operation()
        assert e.value.key == "tensors.data/x" and e.value.path == str(path)
    live = {"x": torch.zeros(3)}
    fallback = ckpt.CheckpointManager(tmp_path, fallback_to_intact=True)
    assert fallback.restore(data=live, rng=False).step == 1
    assert_same_state(live, {"x": torch.ones(3)})


# ------------------------------------------------------------ manifest bombs


def sealed(body: str) -> bytes:
    return (body[:-1] + f',"checksum":"{hash_bytes(body.encode())}"}}\n').encode()


BOMB_HEAD = (
    '{"format":"ckpt","format_version":2,"step":1,"epoch":null,"metrics":{},'
    '"files":{},"tensors":{},"items":{"d":{"kind":"dict","state":['
)


def bomb(fill: str, count: int) -> bytes:
    """A valid, sealed manifest whose state is a list of ``fill`` repeated ``count`` times."""
    return sealed(BOMB_HEAD + fill * count + "0]}}}")


def zlib_bomb(fill: bytes, nbytes: int) -> bytes:
    """A compressed manifest inflating to ``nbytes``, built without holding them."""
    out = zlib.compressobj(9)
    chunk = fill * (1024 * 1024 // len(fill))
    parts = [out.compress(BOMB_HEAD.encode())]
    parts += [out.compress(chunk) for _ in range(nbytes // len(chunk))]
    return b"".join([*parts, out.compress(b"0]}}}"), out.flush()])


def peak_bytes(run) -> int:
    """Peak memory Python allocates while ``run()`` runs (deterministic: no timing)."""
    tracemalloc.start()
    try:
        run()
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return peak


def refused(raw: bytes, match: str) -> None:
    with pytest.raises(CorruptCheckpointError, match=match):
        decode_manifest(raw, "m")


def test_a_zlib_bomb_is_refused_after_inflating_a_bounded_multiple_of_its_size():
    """The issue's bomb: 254 KB inflating to the old 256 MiB cap (51 s, 2.2 GiB to verify)."""
    raw = zlib_bomb(b"[],", 256 * 1024 * 1024)
    assert len(raw) < 300_000
    peak = peak_bytes(lambda: refused(raw, "inflates past"))
    assert peak < 3 * MAX_COMPRESSION_RATIO * len(raw) < 64 * 1024 * 1024  # was over 256 MiB


def test_a_manifest_with_too_many_values_is_refused_before_parsing():
    raw = bomb("[],", MAX_MANIFEST_VALUES // 2 + 10)
    assert len(raw) < MAX_MANIFEST_BYTES
    peak = peak_bytes(lambda: refused(raw, "JSON values"))
    assert peak < 1024 * 1024  # counted in place: nothing parsed, nothing copied
    compressed = zlib.compress(raw, 9)
    assert len(raw) > MAX_COMPRESSION_RATIO * len(compressed)  # refused earlier still
    refused(compressed, "inflates past")


def test_the_value_limit_is_exact(monkeypatch):
    monkeypatch.setattr(ckpt.format.bounds, "MAX_MANIFEST_VALUES", 1000)
    fixed = sum(bomb("", 0).count(c) for c in b",[{")
    assert len(decode_manifest(bomb("0,", 1000 - fixed), "m").items["d"].state) == 1001 - fixed
    refused(bomb("0,", 1001 - fixed), "1001 JSON values")


def test_a_bomb_in_a_checkpoint_is_corrupt_and_fallback_skips_it(tmp_path):
    mgr = ckpt.CheckpointManager(tmp_path)
    mgr.save(1, data={"x": torch.ones(2)}, rng=False)
    mgr.save(2, data={"x": torch.ones(2)}, rng=False)
    (tmp_path / step_dir_name(2) / MANIFEST_NAME).write_bytes(zlib_bomb(b" ", 64 * 1024**2))
    for operation in (mgr.verify, mgr.read, mgr.checkpoint):
        with pytest.raises(CorruptCheckpointError, match="inflates past"):
            operation()
    fallback = ckpt.CheckpointManager(tmp_path, fallback_to_intact=True)
    assert fallback.restore(data={"x": torch.zeros(2)}, rng=False).step == 1


def test_a_manifest_that_compresses_too_well_is_stored_plain_and_reads_back(tmp_path, monkeypatch):
    monkeypatch.setattr(ckpt.format.bounds, "INFLATE_FREELY", 0)
    mgr = ckpt.CheckpointManager(tmp_path)
    mgr.save(1, data={"zeros": [0] * 100_000}, rng=False)  # 200 KB of JSON, ~1000:1
    raw = (tmp_path / step_dir_name(1) / MANIFEST_NAME).read_bytes()
    assert raw.startswith(b"{")
    assert mgr.read(1)["data"] == {"zeros": [0] * 100_000}
    mgr.save(2, data={"t": torch.arange(1.0, 20_000.0).tolist()}, rng=False)  # compresses ~3:1
    assert (tmp_path / step_dir_name(2) / MANIFEST_NAME).read_bytes().startswith(b"x")


def test_a_state_too_large_for_a_manifest_is_refused_at_save(tmp_path, monkeypatch):
    monkeypatch.setattr(ckpt.format.bounds, "MAX_MANIFEST_VALUES", 1000)
    mgr = ckpt.CheckpointManager(tmp_path)
    mgr.save(1, data={"x": list(range(10))}, rng=False)
    with pytest.raises(ValueError, match="JSON values"):
        mgr.save(2, data={"x": list(range(2000))}, rng=False)
    monkeypatch.setattr(ckpt.format.bounds, "MAX_MANIFEST_VALUES", 10**9)
    monkeypatch.setattr(ckpt.format.bounds, "MAX_MANIFEST_BYTES", 5000)
    with pytest.raises(ValueError, match="bytes"):
        mgr.save(2, data={"x": "y" * 10_000}, rng=False)
    assert mgr.all_steps() == [1] and entries(tmp_path) == [".ckpt-writer.lock", step_dir_name(1)]


_LONGDOUBLE_WIDER = np.finfo(np.longdouble).max > np.finfo(np.float64).max
_HUGE_LONGDOUBLE = np.longdouble(1e300) * np.longdouble(1e300) if _LONGDOUBLE_WIDER else None


@pytest.mark.skipif(not _LONGDOUBLE_WIDER, reason="longdouble is float64 on this platform")
@pytest.mark.parametrize(
    "given",
    [
        pytest.param(_HUGE_LONGDOUBLE, id="longdouble"),
        pytest.param(-_HUGE_LONGDOUBLE if _LONGDOUBLE_WIDER else None, id="-longdouble"),
        pytest.param(np.array([_HUGE_LONGDOUBLE]), id="longdouble-array"),
    ],
)
def test_a_finite_metric_that_float64_cannot_hold_is_refused_not_stored_as_inf(tmp_path, given):
    mgr = ckpt.CheckpointManager(tmp_path)
    with pytest.raises(ValueError, match=r"metrics\['m'\].*finite.*beyond float64's range"):
        mgr.save(1, metrics={"m": given}, data={"v": 1})
    assert entries(tmp_path) == [] and mgr.all_steps() == []


def test_a_metric_past_float64_in_any_real_type_is_refused():
    from fractions import Fraction

    with pytest.raises(ValueError, match=r"metrics\['m'\].*Fraction beyond float64's range"):
        check_metrics({"m": Fraction(10**400, 3)})


@pytest.mark.parametrize(
    "given",
    [np.longdouble("inf"), -np.longdouble("inf"), np.longdouble("nan"), np.float16("inf")],
)
def test_a_metric_already_inf_or_nan_in_its_own_type_is_kept(given):
    """A GradScaler overflow step logs an inf loss: that must still save."""
    stored = check_metrics({"m": given})["m"]
    assert type(stored) is float and not math.isfinite(stored)
    assert math.isnan(stored) == bool(np.isnan(given))


@pytest.mark.parametrize("async_save", [False, True])
def test_a_metric_name_that_is_not_valid_unicode_is_refused_at_save(tmp_path, async_save):
    mgr = ckpt.CheckpointManager(tmp_path, async_save=async_save)
    with pytest.raises(TypeError, match=r"metric name 'loss\\ud800'.*not valid Unicode"):
        mgr.save(1, metrics={"loss\ud800": 1.0}, data={"v": 1})
    mgr.close()
    assert entries(tmp_path) == [] and mgr.all_steps() == []
    assert check_metrics({"lössé": 1.0}) == {"lössé": 1.0}  # non-ASCII text is fine
