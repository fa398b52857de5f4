"""The checked files a restore keeps for its reads into live tensors (``ckpt.io.held_files``)."""

from __future__ import annotations

from contextlib import ExitStack

import pytest

import ckpt
from ckpt.io import held_files
from ckpt.io.held_files import HeldFiles, Reopen, opened, recheck_reopened
from ckpt.storage import Storage


def _write(tmp_path, names: list[str]) -> Storage:
    for name in names:
        (tmp_path / name).write_bytes(name.encode() * 4)
    return Storage(str(tmp_path))


def _keep(kept: HeldFiles, storage: Storage, name: str):
    with ExitStack() as scope:
        f = scope.enter_context(storage.open_read(name))
        identity = storage.file_identity(f)
        assert identity is not None
        return f, kept.keep(scope, f, storage, identity, (name,))


def test_files_up_to_the_limit_are_held_the_rest_reopen_only_if_unchanged(tmp_path):
    storage = _write(tmp_path, ["a", "b", "c"])
    kept = HeldFiles(2)
    try:
        kept_sources = [_keep(kept, storage, name) for name in ["a", "b", "c"]]
        (f_a, a), (f_b, b), (f_c, c) = kept_sources
        assert a is f_a and b is f_b and not f_a.closed and not f_b.closed
        assert isinstance(c, Reopen) and f_c.closed
        (tmp_path / "a").unlink()  # a held file is still read as checked
        with opened(a) as f:
            f.seek(0)
            assert f.read() == b"aaaa"
        with opened(c) as f:
            assert f.read() == b"cccc"
        recheck_reopened([a, b, c])
        (tmp_path / "c").write_bytes(b"other bytes")
        with pytest.raises(ckpt.CorruptCheckpointError, match="changed after it was checked"):
            recheck_reopened([a, b, c])
    finally:
        kept.close()
    assert f_a.closed and f_b.closed
    f_d, d = _keep(kept, storage, "b")  # the registry can be used again after close
    assert d is f_d
    kept.close()


def test_the_spill_is_one_file_and_absent_without_room(monkeypatch):
    kept = HeldFiles(1)
    try:
        spill = kept.spill(10)
        assert spill is not None and kept.spill(10) is spill
        monkeypatch.setattr(held_files, "spill_room", lambda nbytes: False)
        assert kept.spill(10) is None
    finally:
        kept.close()
    assert spill.closed
