"""Fuzzing ``ckpt import``: mutated real sources succeed or raise ``CheckpointError``, nothing else.

Sources made by the real producers (``torch.save``, safetensors, a Hugging
Face Trainer directory, ``torch.distributed.checkpoint``) are mutated: flipped
bytes, truncation, rewritten DCP fields (offsets, sizes, lengths inflated or
negative), deep nesting and inflated numbers in JSON. Each import runs under an
alarm; it either commits a checkpoint that then verifies, or raises a
``CheckpointError`` and leaves nothing where the checkpoint would have gone.
The source is never changed. The default run is bounded (:data:`EXAMPLES`
examples per test, 48 in all); ``-m slow`` runs :data:`SLOW_EXAMPLES` each.
"""

from __future__ import annotations

import copy
import json
import os
import pickle
import shutil
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import bounded, fingerprint, small_model, train_steps
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

import ckpt

EXAMPLES = 8
SLOW_EXAMPLES = 300
SECONDS = 30


def _settings(n: int) -> settings:
    return settings(
        max_examples=n,
        deadline=None,  # the alarm bounds each example instead (a hang fails it)
        database=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )


def _trained() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    model = small_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    train_steps(model, optimizer, 2)
    return model, optimizer


def _make_sources(base: Path) -> dict[str, Path]:
    model, optimizer = _trained()
    out = {}
    torch.save(
        {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": 3},
        base / "classic.pt",
    )
    out["torch"] = base / "classic.pt"
    save_file(dict(model.state_dict()), base / "weights.safetensors")
    out["safetensors"] = base / "weights.safetensors"
    hf = base / "checkpoint-9"
    hf.mkdir()
    save_file(dict(model.state_dict()), hf / "model.safetensors")
    torch.save(optimizer.state_dict(), hf / "optimizer.pt")
    (hf / "trainer_state.json").write_text(json.dumps({"global_step": 9, "epoch": 1.0}))
    out["hf"] = hf
    import torch.distributed.checkpoint as dcp

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "assuming the intent is to save in a single process"
        dcp.save(
            {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": 2},
            checkpoint_id=str(base / "dcp"),
        )
    out["dcp"] = base / "dcp"
    return out


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return _make_sources(tmp_path_factory.mktemp("sources"))


def _files(src: Path) -> list[str]:
    return sorted(p.name for p in src.iterdir()) if src.is_dir() else [""]


def _outcome(src: Path, work: Path) -> None:
    """Import ``src`` into ``work/run``: success that verifies, or CheckpointError and nothing."""
    before = fingerprint(src.parent)
    root = work / "run"
    with bounded(SECONDS):
        try:
            ckpt.import_checkpoint(src, root)
        except ckpt.CheckpointError as e:
            assert e.path is not None, e
            assert not root.exists(), "a refused import left something behind"
        else:
            ckpt.CheckpointReader(root).verify()
    after = fingerprint(src.parent)
    assert {k: v for k, v in after.items() if not k.startswith("run")} == before


def _mutated(sources: dict[str, Path], kind: str, name_index: int, mutate: Callable) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        src = sources[kind]
        copy_ = work / src.name
        (shutil.copytree if src.is_dir() else shutil.copy)(src, copy_)
        names = _files(copy_)
        target = copy_ / names[name_index % len(names)] if copy_.is_dir() else copy_
        target.write_bytes(mutate(target.read_bytes()))
        _outcome(copy_, work)


def _flip(positions: list[int], value: int) -> Callable[[bytes], bytes]:
    def mutate(data: bytes) -> bytes:
        raw = bytearray(data)
        for p in positions:
            if raw:
                raw[p % len(raw)] ^= value
        return bytes(raw)

    return mutate


KINDS = st.sampled_from(["torch", "safetensors", "hf", "dcp"])


@given(
    kind=KINDS,
    name=st.integers(0, 10),
    positions=st.lists(st.integers(0, 2**32), min_size=1, max_size=8),
    value=st.integers(1, 255),
)
@_settings(EXAMPLES * 2)
def test_flipped_bytes(sources, kind, name, positions, value):
    _mutated(sources, kind, name, _flip(positions, value))


@given(kind=KINDS, name=st.integers(0, 10), keep=st.floats(0.0, 1.0))
@_settings(EXAMPLES)
def test_truncation(sources, kind, name, keep):
    _mutated(sources, kind, name, lambda data: data[: int(len(data) * keep)])


def _rewrite_dcp(metadata: Any, draw: Any) -> None:
    """Set one field of one record to a drawn value."""
    tensors = [m for m in metadata.state_dict_metadata.values() if hasattr(m, "chunks")]
    meta = tensors[draw.draw(st.integers(0, len(tensors) - 1))]
    infos = list(metadata.storage_data.values())
    info = infos[draw.draw(st.integers(0, len(infos) - 1))]
    number = st.one_of(st.integers(-3, 3), st.integers(0, 2**63), st.integers(-(2**70), 2**70))
    field = draw.draw(st.sampled_from(["size", "offsets", "sizes", "offset", "length", "dtype"]))
    if field == "size":
        meta.size = torch.Size([draw.draw(st.integers(0, 2**62)) for _ in meta.size])
    elif field in ("offsets", "sizes"):
        chunk = meta.chunks[0]
        dims = draw.draw(st.lists(number, min_size=0, max_size=3))
        setattr(chunk, field, dims)
    elif field == "dtype":
        meta.properties.dtype = draw.draw(st.sampled_from([torch.float64, torch.int8, "x", None]))
    else:
        setattr(info, field, draw.draw(number))


def _rewritten_dcp(sources: dict[str, Path], data: Any) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        src = work / "dcp"
        shutil.copytree(sources["dcp"], src)
        metadata = pickle.loads((src / ".metadata").read_bytes())
        metadata = copy.deepcopy(metadata)
        _rewrite_dcp(metadata, data)
        (src / ".metadata").write_bytes(pickle.dumps(metadata))
        _outcome(src, work)


@given(data=st.data())
@_settings(EXAMPLES * 2)
def test_rewritten_dcp_fields(sources, data):
    _rewritten_dcp(sources, data)


JSON_VALUES = st.recursive(
    st.one_of(st.none(), st.integers(-(2**80), 2**80), st.floats(), st.text(max_size=5)),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner),
    max_leaves=20,
)


@given(
    value=JSON_VALUES,
    depth=st.sampled_from([0, 50, 99, 101, 3000]),
    name=st.sampled_from(["trainer_state.json", "config.json"]),
)
@_settings(EXAMPLES)
def test_rewritten_trainer_json(sources, value, depth, name):
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        src = work / "checkpoint-9"
        shutil.copytree(sources["hf"], src)
        text = json.dumps({"global_step": value, "epoch": value, "x": value})
        (src / name).write_text("[" * depth + text + "]" * depth)
        _outcome(src, work)


@pytest.mark.slow
@given(
    kind=KINDS,
    name=st.integers(0, 10),
    positions=st.lists(st.integers(0, 2**32), min_size=1, max_size=32),
    value=st.integers(1, 255),
)
@_settings(SLOW_EXAMPLES)
def test_flipped_bytes_many(sources, kind, name, positions, value):
    _mutated(sources, kind, name, _flip(positions, value))


@pytest.mark.slow
@given(data=st.data())
@_settings(SLOW_EXAMPLES)
def test_rewritten_dcp_fields_many(sources, data):
    _rewritten_dcp(sources, data)


def test_sources_are_importable(sources, tmp_path):
    """The unmutated sources import (so the mutations above start from a working source)."""
    for kind, src in sources.items():
        with bounded(SECONDS):
            report = ckpt.import_checkpoint(src, tmp_path / kind)
        assert report.items and not report.dropped, (kind, report.dropped)
        assert os.path.isdir(tmp_path / kind)
