"""The commit protocol shared by saves from one process and from many ranks."""

from __future__ import annotations

import json
import uuid

import pytest

import ckpt
from ckpt.format import step_dir_name
from ckpt.format.header import ManifestHeader
from ckpt.saving.commit import open_attempt
from ckpt.saving.commit_protocol import Attempt, ManifestLast, RenameDir, protocol_for
from ckpt.storage import open_storage


def _open(url: str, step: int = 3, **kwargs: object) -> tuple[object, Attempt]:
    storage = open_storage(url, None)
    storage.makedirs()
    header = ManifestHeader.now()
    return storage, open_attempt(storage, step, token="0123abcd", header=header, **kwargs)


@pytest.mark.parametrize("where", ["local", "memory"])
def test_an_attempt_travels_as_json_and_comes_back_equal(tmp_path, where):
    url = str(tmp_path) if where == "local" else f"memory://p-{uuid.uuid4().hex}"
    storage, attempt = _open(url, overwrite=False)
    again = Attempt.from_json(json.loads(json.dumps(attempt.to_json())))
    assert again == attempt
    assert isinstance(again.protocol, RenameDir if where == "local" else ManifestLast)
    assert again.header.versions["torch"]
    attempt.protocol.abandon(storage, attempt)
    assert storage.list_dir() == ([] if where == "local" else [step_dir_name(3)])


@pytest.mark.parametrize("doc", [None, {}, {"step": 1}, "x"])
def test_anything_else_is_not_an_attempt(doc):
    with pytest.raises(ValueError):
        Attempt.from_json(doc)


def test_an_unknown_strategy_is_refused(tmp_path):
    _, attempt = _open(str(tmp_path), overwrite=False)
    with pytest.raises(ValueError, match="strategy"):
        Attempt.from_json({**attempt.to_json(), "strategy": "teleport"})


def test_abandoning_on_an_object_store_removes_only_the_attempts_files():
    storage, attempt = _open(f"memory://p-{uuid.uuid4().hex}", overwrite=False)
    assert attempt.file_token == "0123abcd" and attempt.directory == step_dir_name(3)
    for name in ("data.0123abcd.safetensors", "data.89abcdef.safetensors", "notes.txt"):
        storage.write_file((attempt.directory, name), lambda f: f.write(b"x") or 1)
    attempt.protocol.abandon(storage, attempt)
    assert sorted(storage.list_dir(attempt.directory)) == [
        "data.89abcdef.safetensors",
        "notes.txt",
    ]


def test_a_collective_overwrite_committed_by_its_manifest_is_refused():
    storage = open_storage(f"memory://p-{uuid.uuid4().hex}", None)
    assert isinstance(protocol_for(storage, 1, True), ManifestLast)
    with pytest.raises(ckpt.CheckpointWriteError, match="overwrite"):
        open_attempt(
            storage, 1, overwrite=True, token="0123abcd", header=ManifestHeader.now(),
            collective=True,
        )  # fmt: skip
    assert step_dir_name(1) not in storage.list_dir()
