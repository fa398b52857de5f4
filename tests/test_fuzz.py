"""Fuzzing: random mutations of a valid checkpoint only ever give a CheckpointError.

Two modes. Raw mutations exercise the integrity checks. "Resealed" mutations
then rewrite the checksums and sizes so the damaged bytes get past them and
reach the parsers and cross-checks (as a buggy writer's files would). Either
way a restore must succeed or raise ``CheckpointError``; never another
exception, never a hang (hypothesis' deadline), and when it raises, the live
model and optimizer are unchanged.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import uuid
from pathlib import Path

import pytest
from conftest import assert_same_state
from helpers import ManySmall, small_model, snapshot, trained_live_objects
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ckpt
import ckpt.format.bounds
from ckpt.format import MANIFEST_NAME, step_dir_name
from ckpt.format.checksums import hash_bytes

FILES = [MANIFEST_NAME, "model.safetensors", "optimizer.safetensors", "rng.safetensors"]


def _pristine(root, build) -> Path:
    model, optimizer = trained_live_objects(1, build)
    mgr = ckpt.CheckpointManager(root)
    mgr.save(0, model=model, optimizer=optimizer)
    mgr.close()
    return root / step_dir_name(0)


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    return _pristine(tmp_path_factory.mktemp("pristine"), small_model)


@pytest.fixture(scope="module")
def pristine_packed(tmp_path_factory):
    """Files holding packs of small tensors (format version 2), with a plain JSON manifest
    so that resealed mutations reach the pack checks."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ckpt.format.bounds, "COMPRESS_MANIFEST_ABOVE", 2**30)
        step_dir = _pristine(tmp_path_factory.mktemp("pristine-packed"), ManySmall)
    assert b'"pack":' in (step_dir / MANIFEST_NAME).read_bytes()
    return step_dir


@pytest.fixture(scope="module")
def pristine_compressed(tmp_path_factory):
    """The same state saved as usual: its manifest is large enough to be compressed."""
    step_dir = _pristine(tmp_path_factory.mktemp("pristine-compressed"), ManySmall)
    assert (step_dir / MANIFEST_NAME).read_bytes().startswith(b"x")
    return step_dir


@st.composite
def mutations(draw, size: int):
    """A list of byte edits: flip, set, truncate, insert, delete, duplicate."""
    edits = []
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["flip", "set", "truncate", "insert", "delete", "duplicate"]))
        at = draw(st.integers(0, max(size - 1, 0)))
        edits.append((kind, at, draw(st.integers(0, 255)), draw(st.integers(1, 64))))
    return edits


def mutate(data: bytes, edits) -> bytes:
    out = bytearray(data)
    for kind, offset, value, length in edits:
        at = min(offset, len(out))
        if kind == "flip" and at < len(out):
            out[at] ^= 1 << (value % 8)
        elif kind == "set" and at < len(out):
            out[at] = value
        elif kind == "truncate":
            del out[at:]
        elif kind == "insert":
            out[at:at] = bytes([value]) * length
        elif kind == "delete":
            del out[at : at + length]
        elif kind == "duplicate":
            out[at:at] = out[at : at + length]
    return bytes(out)


_TAIL = re.compile(rb',"checksum":"xxh3_64:[0-9a-f]{16}"\}\n?\Z')


def reseal(step_dir, name: str) -> None:
    """Make the manifest agree with the (damaged) files again: sizes, checksums, its own."""
    manifest = step_dir / MANIFEST_NAME
    raw = manifest.read_bytes()
    if name != MANIFEST_NAME:
        try:
            doc = json.loads(raw)
            data = (step_dir / name).read_bytes()
            doc["files"][name] = {"size": len(data), "checksum": hash_bytes(data)}
        except (ValueError, KeyError, TypeError):
            return
        doc.pop("checksum", None)
        raw = json.dumps(doc, separators=(",", ":")).encode() + b"\n"
    tail = _TAIL.search(raw)
    body = raw[: tail.start()] + b"}" if tail else raw.rstrip(b"\n")
    if body.endswith(b"}"):
        sealed = body[:-1] + b',"checksum":"' + hash_bytes(body).encode() + b'"}\n'
        manifest.write_bytes(sealed)


def check_restore_of(step_dir, build=small_model) -> None:
    model, optimizer = trained_live_objects(2, build)  # restores load into its existing state
    before = snapshot(model, optimizer)
    mgr = ckpt.CheckpointManager(step_dir.parent)
    try:
        mgr.restore(0, model=model, optimizer=optimizer)
    except ckpt.CheckpointError:
        assert_same_state(model.state_dict(), before[0])
        assert_same_state(optimizer.state_dict(), before[1])
    with contextlib.suppress(ckpt.CheckpointError):
        mgr.verify(0)


def fuzz_case(pristine, tmp_path, name, edits, resealed, build=small_model) -> None:
    step_dir = tmp_path / uuid.uuid4().hex / step_dir_name(0)
    shutil.copytree(pristine, step_dir)
    path = step_dir / name
    path.write_bytes(mutate(path.read_bytes(), edits))
    if resealed:
        reseal(step_dir, name)
    check_restore_of(step_dir, build)


SETTINGS = settings(
    max_examples=150,
    deadline=2000,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@pytest.mark.parametrize("resealed", [False, True], ids=["raw", "resealed"])
@pytest.mark.parametrize("name", FILES)
@SETTINGS
@given(data=st.data())
def test_mutated_files_only_ever_raise_checkpoint_errors(pristine, tmp_path, name, resealed, data):
    size = (pristine / name).stat().st_size
    fuzz_case(pristine, tmp_path, name, data.draw(mutations(size)), resealed)


PACKED_FILES = [MANIFEST_NAME, "model.safetensors", "optimizer.safetensors"]


@pytest.mark.parametrize("resealed", [False, True], ids=["raw", "resealed"])
@pytest.mark.parametrize("name", PACKED_FILES)
@settings(SETTINGS, max_examples=60)
@given(data=st.data())
def test_mutated_packed_files_only_ever_raise_checkpoint_errors(
    pristine_packed, tmp_path, name, resealed, data
):
    size = (pristine_packed / name).stat().st_size
    edits = data.draw(mutations(size))
    fuzz_case(pristine_packed, tmp_path, name, edits, resealed, ManySmall)


@settings(SETTINGS, max_examples=60)
@given(data=st.data())
def test_mutated_compressed_manifests_only_ever_raise_checkpoint_errors(
    pristine_compressed, tmp_path, data
):
    size = (pristine_compressed / MANIFEST_NAME).stat().st_size
    edits = data.draw(mutations(size))
    fuzz_case(pristine_compressed, tmp_path, MANIFEST_NAME, edits, False, ManySmall)
