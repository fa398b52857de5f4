"""The on-disk format: step names, manifest validation, and golden bytes that pin v1 and v2."""

from __future__ import annotations

import json
import math
import os
import shutil
import zlib
from pathlib import Path

import pytest
import torch
from conftest import assert_same_state
from helpers import minimal_manifest_bytes
from torch import nn

import ckpt
import ckpt.format.bounds
from ckpt.format import (
    MANIFEST_NAME,
    Manifest,
    TempDirName,
    decode_manifest,
    encode_manifest,
    parse_step_dir_name,
    parse_temp_dir_name,
    step_dir_name,
    temp_dir_name,
)
from ckpt.state.items import PACK_MAX_BYTES, PACK_MIN_TENSORS

GOLDEN = Path(__file__).parent / "golden" / "v1"
GOLDEN_WITHOUT_CHECKSUMS = Path(__file__).parent / "golden" / "v1-ckpt-0.1.0-no-checksums"
"""Written by ckpt 0.1.0, before files had checksums: must still load."""
GOLDEN_V2 = Path(__file__).parent / "golden" / "v2"
"""A pack of small tensors and a compressed manifest."""


@pytest.mark.parametrize("step", [0, 1, 42, 10**12 - 1, 10**12, 2**63 - 1])
def test_step_names_round_trip_and_sort(step):
    name = step_dir_name(step)
    assert parse_step_dir_name(name) == step


def test_step_names_are_strict():
    for name in ["step_1", "step_0000000000001", "step_-00000000001", "step_00000000001a",
                 "Step_000000000001", "step_000000000001/", "../step_000000000001"]:  # fmt: skip
        assert parse_step_dir_name(name) is None, name
    assert sorted(step_dir_name(s) for s in (10, 9, 100)) == [
        step_dir_name(s) for s in (9, 10, 100)
    ]
    with pytest.raises(ValueError):
        step_dir_name(-1)


def test_temp_names_never_parse_as_steps_and_name_their_writer():
    name = temp_dir_name(5, "my.host_name", 1234, "abcd")
    assert parse_step_dir_name(name) is None
    assert parse_temp_dir_name(name) == TempDirName(5, "my-host-name", 1234)
    others = [
        "step_000000000005",
        ".ckpt-tmp.step_5.h-1.ab",
        ".ckpt-tmp.step_000000000005.h.ab",
        ".ckpt-tmp.step_000000000005.h-1.ab/..",
        "x.ckpt-tmp.step_000000000005.h-1.ab",
    ]
    for other in others:
        assert parse_temp_dir_name(other) is None, other


def minimal_manifest(**changes: object) -> bytes:
    return minimal_manifest_bytes(1, 10, **changes)


def test_minimal_manifest_parses():
    m = decode_manifest(minimal_manifest(), "m.json")
    assert m.step == 1 and m.tensors["data/x"].dtype == torch.float32


@pytest.mark.parametrize(
    ("raw", "key"),
    [
        (b"\xff\xfe", None),
        (b"[]", "format"),
        (b'{"format": "ckpt", "format_version": 1, "step": NaN}', None),
        (minimal_manifest(format="other"), "format"),
        (minimal_manifest(format_version="1"), "format_version"),
        (minimal_manifest(step=-1), "step"),
        (minimal_manifest(step=True), "step"),
        (minimal_manifest(epoch=1.5), "epoch"),
        (minimal_manifest(metrics={"a": "b"}), "metrics.a"),
        (minimal_manifest(files={"../x.safetensors": {"size": 1}}), "files.../x.safetensors"),
        (minimal_manifest(files={"/abs.safetensors": {"size": 1}}), "files./abs.safetensors"),
        (minimal_manifest(files={"a\x00.safetensors": {"size": 1}}), "files.a\x00.safetensors"),
        (minimal_manifest(files={"a.safetensors": {"size": -1}}), "files.a.safetensors"),
        (
            minimal_manifest(
                tensors={"t": {"file": "zz", "dtype": "float32", "shape": [], "device": "cpu"}}
            ),
            "tensors.t",
        ),
        (
            minimal_manifest(
                tensors={
                    "t": {"file": "data.safetensors", "dtype": "f", "shape": [], "device": "cpu"}
                }
            ),
            "tensors.t",
        ),
        (
            minimal_manifest(
                tensors={
                    "t": {
                        "file": "data.safetensors",
                        "dtype": "float32",
                        "shape": [-2],
                        "device": "cpu",
                    }
                }
            ),
            "tensors.t",
        ),
        (
            minimal_manifest(
                tensors={
                    "t": {
                        "file": "data.safetensors",
                        "dtype": "float32",
                        "shape": [],
                        "device": "x:y",
                    }
                }
            ),
            "tensors.t",
        ),
        (minimal_manifest(items={"a": {"kind": "pickle", "state": {}}}), "items.a"),
        (minimal_manifest(items=[]), "items"),
    ],
)
def test_malformed_manifests_are_corrupt_and_name_the_key(raw, key):
    with pytest.raises(ckpt.CorruptCheckpointError) as info:
        decode_manifest(raw, "dir/manifest.json")
    assert info.value.path == "dir/manifest.json"
    assert info.value.key == key


def test_duplicate_keys_and_deep_nesting_are_corrupt():
    with pytest.raises(ckpt.CorruptCheckpointError, match="duplicate"):
        decode_manifest(b'{"format": "ckpt", "format": "ckpt"}', "m")
    with pytest.raises(ckpt.CorruptCheckpointError):
        decode_manifest(b"[" * 100_000 + b"]" * 100_000, "m")


def test_newer_format_version_is_incompatible_with_a_remedy():
    with pytest.raises(ckpt.IncompatibleCheckpointError, match="upgrade ckpt"):
        decode_manifest(minimal_manifest(format_version=99), "m")


def test_manifest_encoding_round_trips_and_has_no_nan_literals():
    m = decode_manifest(minimal_manifest(metrics={"loss": {"$float": "nan"}, "n": 3}), "m")
    raw = encode_manifest(m)
    assert b"NaN" not in raw
    again = decode_manifest(raw, "m")
    assert math.isnan(again.metrics["loss"]) and again.metrics["n"] == 3
    assert isinstance(again, Manifest) and again.items == m.items


# ------------------------------------------------------------------ golden bytes


def golden_items() -> dict[str, object]:
    linear = nn.Linear(2, 3)
    with torch.no_grad():
        linear.weight.copy_(torch.arange(6.0).reshape(3, 2) / 4)
        linear.bias.copy_(torch.tensor([-1.0, 0.0, 1.0]))
    shared = torch.tensor([1.5, -2.5])
    return {
        "model": linear,
        "state": {
            "state": {
                0: {"step": torch.tensor(3.0), "exp_avg": torch.arange(4, dtype=torch.bfloat16)}
            },
            "param_groups": [{"lr": 0.1, "betas": (0.9, 0.999), "fused": None, "params": [0]}],
            "counts": torch.tensor([1, 2, 3], dtype=torch.int64),
            "mask": torch.tensor([True, False]),
            "specials": [math.inf, -math.inf, 0.5, 7, "text", b"\x00\x01"],
            "a": shared,
            "b": shared,
            "0": "str key",
        },
    }


def golden_items_v2() -> dict[str, object]:
    dtypes = [torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.bool, torch.int8]
    packed = {
        f"p{i}": (torch.arange(i % 5 + 1) - 2).to(dtypes[i % len(dtypes)])
        for i in range(PACK_MIN_TENSORS + 2)
    }
    packed["large"] = torch.arange(PACK_MAX_BYTES // 4 + 1, dtype=torch.float32)
    return {"packed": packed}


def normalized_manifest(path: Path) -> dict[str, object]:
    raw = path.read_bytes()
    doc = json.loads(zlib.decompress(raw) if raw.startswith(b"x") else raw)
    assert isinstance(doc.pop("created_at"), str)
    assert set(doc.pop("versions")) == {"ckpt", "torch", "python"}
    doc.pop("checksum")  # covers created_at and versions, so it changes on every save
    return doc


@pytest.mark.parametrize("version", [1, 2])
def test_golden_bytes_pin_the_format(tmp_path, monkeypatch, version):
    """Fails when the bytes ckpt writes change: that is a format change (bump the version).

    Regenerate deliberately with ``CKPT_REGENERATE_GOLDEN=1 pytest tests/test_format.py``.
    """
    golden, items = (GOLDEN, golden_items()) if version == 1 else (GOLDEN_V2, golden_items_v2())
    if version == 2:
        monkeypatch.setattr(ckpt.format.bounds, "COMPRESS_MANIFEST_ABOVE", 0)
    mgr = ckpt.CheckpointManager(tmp_path)
    mgr.save(7, epoch=1, metrics={"loss": 0.125}, rng=False, **items)
    written = tmp_path / step_dir_name(7)
    if os.environ.get("CKPT_REGENERATE_GOLDEN"):
        shutil.rmtree(golden, ignore_errors=True)
        shutil.copytree(written, golden)
    assert (written / MANIFEST_NAME).read_bytes()[:1] == (b"{" if version == 1 else b"x")
    assert normalized_manifest(written / MANIFEST_NAME)["format_version"] == version
    assert sorted(os.listdir(written)) == sorted(os.listdir(golden))
    for name in os.listdir(golden):
        if name == MANIFEST_NAME:
            assert normalized_manifest(written / name) == normalized_manifest(golden / name)
        else:
            assert (written / name).read_bytes() == (golden / name).read_bytes(), name


def test_golden_v2_still_loads(tmp_path):
    shutil.copytree(GOLDEN_V2, tmp_path / step_dir_name(7))
    mgr = ckpt.CheckpointManager(tmp_path)
    assert_same_state(mgr.read(7)["packed"], golden_items_v2()["packed"])
    mgr.verify(7)


@pytest.mark.parametrize("golden", [GOLDEN, GOLDEN_WITHOUT_CHECKSUMS], ids=["v1", "v1-0.1.0"])
def test_golden_checkpoint_still_loads(tmp_path, golden):
    shutil.copytree(golden, tmp_path / step_dir_name(7))
    states = ckpt.CheckpointManager(tmp_path).read(7)
    expected = golden_items()
    assert_same_state(states["model"], expected["model"].state_dict())
    assert_same_state(states["state"], expected["state"])
    assert states["state"]["a"] is states["state"]["b"]
