"""``ckpt copy SRC[:STEP] DST``: verified copies between roots, through the tiers' copy code."""

from __future__ import annotations

import json
import os

import pytest
import torch
from conftest import assert_same_state

import ckpt
from ckpt.cli import main


def state(step: int) -> dict[str, object]:
    return {"w": torch.full((16, 8), float(step)), "step": step}


def run(capsys: pytest.CaptureFixture[str], *argv: object) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture
def source(tmp_path):
    root = tmp_path / "src"
    with ckpt.CheckpointManager(root) as mgr:
        for step in range(3):
            mgr.save(step, data=state(step))
    return root


def test_copy_every_step_then_one_skipped(capsys, source, tmp_path):
    dst = tmp_path / "dst"
    code, out, _ = run(capsys, "copy", source, dst)
    assert code == 0 and out.split("\n")[:3] == ["copied step 0", "copied step 1", "copied step 2"]
    reader = ckpt.CheckpointReader(dst)
    assert reader.all_steps() == [0, 1, 2]
    for step in range(3):
        assert_same_state(reader.read(step)["data"], state(step))
    code, out, _ = run(capsys, "copy", f"{source}:1", dst, "--json")
    assert code == 0
    assert json.loads(out) == {
        "source": str(source),
        "destination": str(dst),
        "copied": [],
        "skipped": [1],
    }


def test_copy_one_step_to_s3(capsys, source, s3_bucket):
    bucket, options = s3_bucket
    url = f"s3://{bucket}/run"
    endpoint = options["client_kwargs"]["endpoint_url"]
    flags = [
        "--storage-option=key=testing",
        "--storage-option=secret=testing",
        f'--storage-option=client_kwargs={{"endpoint_url": "{endpoint}"}}',
    ]
    code, _, err = run(capsys, "copy", f"{source}:2", url, *flags)
    assert code == 0, err
    reader = ckpt.CheckpointReader(url, storage_options=options)
    assert reader.all_steps() == [2]
    assert_same_state(reader.read(2)["data"], state(2))


def test_copy_of_a_corrupt_step_fails_and_lists_nothing(capsys, source, tmp_path):
    directory = source / "step_000000000001"
    name = next(n for n in os.listdir(directory) if n.endswith(".safetensors"))
    with open(directory / name, "r+b") as f:
        f.seek(-2, os.SEEK_END)
        f.write(b"!!")
    dst = tmp_path / "dst"
    code, _, err = run(capsys, "copy", f"{source}:1", dst)
    assert code == 1 and "checksum" in err
    assert ckpt.CheckpointReader(dst).all_steps() == []
    assert [n for n in os.listdir(dst) if n.startswith(".ckpt-tmp")] == []


def test_copy_errors(capsys, source, tmp_path):
    assert run(capsys, "copy", f"{source}:7", tmp_path / "d")[0] == 1
    assert run(capsys, "copy", tmp_path / "missing", tmp_path / "d")[0] == 1
    assert run(capsys, "copy", source, f"{tmp_path / 'd'}:3")[0] == 2


def test_copy_of_a_multi_rank_checkpoint(capsys, tmp_path):
    from helpers import write_sharded_checkpoint

    from ckpt.storage import open_storage

    src, dst = tmp_path / "src", tmp_path / "dst"
    full = {"w": torch.arange(24, dtype=torch.float32).reshape(6, 4)}
    write_sharded_checkpoint(open_storage(str(src)), "step_000000000004", full, step=4)
    assert run(capsys, "copy", src, dst)[0] == 0
    reader = ckpt.CheckpointReader(dst)
    reader.verify(4)
    assert_same_state(reader.read(4)["model"], ckpt.CheckpointReader(src).read(4)["model"])


def _step_bytes(root, step: int) -> int:
    _, manifest = ckpt.CheckpointReader(root).manifest(step)
    return sum(r.size for r in manifest.files.values())


def test_copy_shows_a_byte_progress_bar_on_a_terminal_and_keeps_json_clean(
    capsys, monkeypatch, source, tmp_path
):
    import sys
    import types

    made: list[dict] = []

    class FakeBar:
        def __init__(self, **kwargs: object) -> None:
            self.kwargs, self.n, self.texts = kwargs, 0, []
            made.append(self.__dict__)

        def update(self, n: int) -> None:
            self.n += n

        def set_postfix_str(self, text: str, refresh: bool) -> None:
            self.texts.append(text)

        def close(self) -> None:
            pass

    monkeypatch.setitem(sys.modules, "tqdm", types.SimpleNamespace(tqdm=FakeBar))
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    code, out, _ = run(capsys, "copy", source, tmp_path / "dst", "--json")
    assert code == 0 and json.loads(out)["copied"] == [0, 1, 2]
    total = sum(_step_bytes(source, s) for s in range(3))
    assert made[-1]["kwargs"]["total"] == total and made[-1]["n"] == total
    assert made[-1]["kwargs"]["unit"] == "B" and made[-1]["texts"] == ["step 0", "step 1", "step 2"]
    count = len(made)
    assert run(capsys, "copy", source, tmp_path / "dst2", "--no-progress")[0] == 0
    assert len(made) == count


def test_copy_without_tqdm_reports_one_line_on_stderr(capsys, monkeypatch, source, tmp_path):
    import sys

    from ckpt.cli.copying import copy

    monkeypatch.setitem(sys.modules, "tqdm", None)  # import fails
    doc = copy(str(source), str(tmp_path / "dst"), 2, progress=True)
    captured = capsys.readouterr()
    assert doc["copied"] == [2] and captured.out == ""
    total = _step_bytes(source, 2)
    assert f"copy: 100% {total / 1000:.1f}k/{total / 1000:.1f}k B step 2" in captured.err
    assert captured.err.endswith("\r")  # the line erased at the end
