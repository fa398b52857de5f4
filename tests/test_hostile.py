"""Hostile checkpoints: every one is refused with a CheckpointError, and nothing changes.

Each case takes a valid checkpoint, damages or replaces one part, and restores
into a live model and optimizer. The restore must raise a ``CheckpointError``
(the subclass named by the case), leave the live objects untouched, and cause
no side effect. The parser-level cases (headers, manifests) are in
test_tensorfile.py and test_format.py; these go end to end through the manager.
"""

from __future__ import annotations

import json
import os
import pickle
import struct

import pytest
import torch
from conftest import assert_same_state
from helpers import small_model, snapshot, trained_live_objects, write_manifest

import ckpt
from ckpt.format import MANIFEST_NAME, step_dir_name

STEP = 3
MARKER = "pwned-marker"


class Payload:
    """Unpickling this creates a marker directory: proof that code ran."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (os.mkdir, (self.path,))


def pickle_payload(directory) -> bytes:
    return pickle.dumps(Payload(str(directory / MARKER)))


def header_file(header: dict, data: bytes = b"") -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


def set_tensor_shape(doc, shape):
    doc["tensors"]["model/0.weight"]["shape"] = shape


# Each case: (id, function(step_dir, doc) -> None that damages the checkpoint, expected error).
# ``doc`` is the parsed manifest; cases that edit it write it back with a valid checksum.
def _truncate(length):
    def damage(step_dir, doc):
        path = step_dir / "model.safetensors"
        data = path.read_bytes()
        path.write_bytes(data[: length if length >= 0 else len(data) + length])

    return damage


def _header(header_len):
    def damage(step_dir, doc):
        path = step_dir / "model.safetensors"
        data = bytearray(path.read_bytes())
        data[:8] = struct.pack("<Q", header_len)
        path.write_bytes(bytes(data))

    return damage


def _manifest_edit(edit):
    def damage(step_dir, doc):
        edit(doc)
        write_manifest(step_dir / MANIFEST_NAME, doc)

    return damage


def _manifest_bytes(raw):
    def damage(step_dir, doc):
        (step_dir / MANIFEST_NAME).write_bytes(raw(step_dir))

    return damage


def _replace_file(name, content):
    def damage(step_dir, doc):
        (step_dir / name).write_bytes(content(step_dir))

    return damage


def _tensor_file(header, data=b""):
    """A well-formed-looking model file with this header, its size fixed in the manifest."""

    def damage(step_dir, doc):
        raw = header_file(header, data)
        (step_dir / "model.safetensors").write_bytes(raw)
        doc["files"]["model.safetensors"] = {"size": len(raw)}
        write_manifest(step_dir / MANIFEST_NAME, doc)

    return damage


def _symlink(target_of):
    def damage(step_dir, doc):
        path = step_dir / "model.safetensors"
        outside = step_dir.parent.parent / "outside.safetensors"
        outside.write_bytes(path.read_bytes())
        path.unlink()
        path.symlink_to(target_of(outside))

    return damage


def _symlink_step_dir(step_dir, doc):
    outside = step_dir.parent.parent / "outside-step"
    os.rename(step_dir, outside)
    step_dir.symlink_to(outside, target_is_directory=True)


def _nested(step_dir, doc):
    (step_dir / MANIFEST_NAME).write_bytes(b"[" * 100_000 + b"]" * 100_000)


def _file_outside(name):
    def edit(doc):
        doc["files"][name] = doc["files"].pop("model.safetensors")
        for record in doc["tensors"].values():
            if record["file"] == "model.safetensors":
                record["file"] = name

    return edit


GOOD_ENTRY = {"dtype": "F32", "shape": [5, 6], "data_offsets": [0, 120]}

CorruptError = ckpt.CorruptCheckpointError
CASES = [
    ("truncated to 0 bytes", _truncate(0), CorruptError),
    ("truncated to 1 byte", _truncate(1), CorruptError),
    ("truncated to 7 bytes", _truncate(7), CorruptError),
    ("truncated to 8 bytes", _truncate(8), CorruptError),
    ("truncated inside the header", _truncate(40), CorruptError),
    ("truncated inside the data", _truncate(-100), CorruptError),
    ("truncated by 1 byte", _truncate(-1), CorruptError),
    ("header length 10**12", _header(10**12), CorruptError),
    ("header length 2**64-1", _header(2**64 - 1), CorruptError),
    ("header length 0", _header(0), CorruptError),
    (
        "overlapping offsets",
        _tensor_file({"a": GOOD_ENTRY, "b": {**GOOD_ENTRY, "data_offsets": [60, 180]}}, bytes(180)),
        CorruptError,
    ),
    (
        "offsets out of bounds",
        _tensor_file({"a": {**GOOD_ENTRY, "data_offsets": [0, 10**9]}}, bytes(120)),
        CorruptError,
    ),
    (
        "byte count and shape disagree",
        _tensor_file({"a": {**GOOD_ENTRY, "shape": [5, 7]}}, bytes(120)),
        CorruptError,
    ),
    (
        "unknown dtype",
        _tensor_file({"a": {**GOOD_ENTRY, "dtype": "PICKLE"}}, bytes(120)),
        CorruptError,
    ),
    (
        "duplicate keys in a header",
        _replace_file(
            "model.safetensors",
            lambda d: header_file({})[:8].replace(b"\x02", b"\x00") + b'{"a":1,"a":2}'.ljust(8),
        ),
        CorruptError,
    ),
    (
        "manifest and header disagree on dtype",
        _manifest_edit(lambda doc: doc["tensors"]["model/0.weight"].update(dtype="float64")),
        ckpt.CheckpointError,
    ),
    (
        "manifest and header disagree on shape",
        _manifest_edit(lambda doc: set_tensor_shape(doc, [6, 5])),
        ckpt.CheckpointError,
    ),
    (
        "file size disagrees",
        _manifest_edit(lambda doc: doc["files"]["model.safetensors"].update(size=1)),
        CorruptError,
    ),
    (
        "duplicate keys in the manifest",
        _manifest_bytes(lambda d: b'{"format":"ckpt","format":"x"}'),
        CorruptError,
    ),
    ("manifest nested 10**5 deep", _nested, CorruptError),
    ("manifest not UTF-8", _manifest_bytes(lambda d: b'{"format":"\xff\xfe"}'), CorruptError),
    ("manifest is a list", _manifest_bytes(lambda d: b"[]"), CorruptError),
    ("manifest empty", _manifest_bytes(lambda d: b""), CorruptError),
    ("step is a string", _manifest_edit(lambda doc: doc.update(step="3")), CorruptError),
    ("step is another step", _manifest_edit(lambda doc: doc.update(step=4)), CorruptError),
    ("files is a list", _manifest_edit(lambda doc: doc.update(files=[])), CorruptError),
    (
        "tensors names an unknown file",
        _manifest_edit(lambda doc: doc["tensors"]["model/0.weight"].update(file="x.safetensors")),
        CorruptError,
    ),
    (
        "item state is a string",
        _manifest_edit(lambda doc: doc["items"]["model"].update(state="x")),
        ckpt.CheckpointError,
    ),
    (
        "item kind unknown",
        _manifest_edit(lambda doc: doc["items"]["model"].update(kind="pickle")),
        CorruptError,
    ),
    (
        "tensor name with ../",
        _manifest_edit(
            lambda doc: doc["tensors"].update({"../x": doc["tensors"].pop("model/0.weight")})
        ),
        CorruptError,
    ),
    ("file name with ../", _manifest_edit(_file_outside("../model.safetensors")), CorruptError),
    ("absolute file name", _manifest_edit(_file_outside("/etc/passwd")), CorruptError),
    ("file name with NUL", _manifest_edit(_file_outside("model\x00.safetensors")), CorruptError),
    (
        "file outside the checkpoint",
        _manifest_edit(_file_outside("../../outside.safetensors")),
        CorruptError,
    ),
    ("symlink to a file outside the root", _symlink(lambda outside: outside), CorruptError),
    (
        "relative symlink out of the root",
        _symlink(
            lambda outside: os.path.relpath(outside, outside.parent / "root" / step_dir_name(STEP))
        ),
        CorruptError,
    ),
    ("step directory is a symlink out of the root", _symlink_step_dir, CorruptError),
    ("pickle in place of the manifest", _manifest_bytes(pickle_payload), CorruptError),
    (
        "pickle in place of a tensor file",
        _replace_file("model.safetensors", pickle_payload),
        CorruptError,
    ),
    (
        "pickle in place of the optimizer file",
        _replace_file("optimizer.safetensors", pickle_payload),
        CorruptError,
    ),
    (
        "pickle in place of a file, size fixed",
        lambda step_dir, doc: (
            _tensor_file({})(step_dir, doc)
            or (step_dir / "model.safetensors").write_bytes(pickle_payload(step_dir))
        ),
        CorruptError,
    ),
]


@pytest.fixture
def checkpoint(tmp_path):
    root = tmp_path / "root"
    model = small_model(1)
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.randn(4, 6)).sum().backward()
    optimizer.step()
    mgr = ckpt.CheckpointManager(root)
    mgr.save(STEP, model=model, optimizer=optimizer)
    mgr.close()
    return root


@pytest.mark.parametrize(("damage", "error"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_hostile_checkpoints_are_refused_and_change_nothing(checkpoint, damage, error):
    step_dir = checkpoint / step_dir_name(STEP)
    doc = json.loads((step_dir / MANIFEST_NAME).read_text())
    damage(step_dir, doc)
    model, optimizer = trained_live_objects(2)  # restores load into its existing state
    before = snapshot(model, optimizer)
    mgr = ckpt.CheckpointManager(checkpoint)
    with pytest.raises(error):
        mgr.restore(STEP, model=model, optimizer=optimizer)
    with pytest.raises(ckpt.CheckpointError):
        mgr.verify(STEP)
    with pytest.raises(ckpt.CheckpointError):
        mgr.read(STEP)
    assert_same_state(model.state_dict(), before[0])
    assert_same_state(optimizer.state_dict(), before[1])
    assert not (step_dir / MARKER).exists() and not (checkpoint.parent / MARKER).exists()


def test_the_pickle_payload_works_when_unpickled(tmp_path):
    """The side-effect check above is real: loading the payload with pickle runs code."""
    pickle.loads(pickle_payload(tmp_path))
    assert (tmp_path / MARKER).exists()


def test_enough_hostile_inputs():
    assert len(CASES) >= 40
