"""The ``ckpt`` command line, through ``main(argv)`` (and once as ``python -m ckpt``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types
import uuid
from pathlib import Path

import fsspec
import pytest
import torch
from helpers import small_model, train_steps, write_sharded_checkpoint

import ckpt
from ckpt.cli import main
from ckpt.cli.compare import tensor_difference, value_changes
from ckpt.cli.source import Target, parse_target
from ckpt.format import step_dir_name
from ckpt.progress import progress_bar
from ckpt.storage import open_storage

ROOT = Path(__file__).resolve().parents[1]


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def run_json(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, dict]:
    code, out, _ = run(capsys, *argv, "--json")
    return code, json.loads(out)


def save_run(directory: Path | str, steps: int = 3, seed: int = 0) -> None:
    """Steps 0..steps-1 of a small model with AdamW, a scheduler, epoch and metrics."""
    model = small_model(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, 5)
    with ckpt.CheckpointManager(directory) as mgr:
        for step in range(steps):
            train_steps(model, opt, 1, seed=step)
            sched.step()
            mgr.save(
                step,
                model=model,
                optimizer=opt,
                scheduler=sched,
                epoch=step // 2,
                metrics={"loss": 1.0 / (step + 1)},
            )


def save_model(directory: Path, model: torch.nn.Module, step: int = 0, **extra: object) -> None:
    with ckpt.CheckpointManager(directory) as mgr:
        mgr.save(step, model=model, rng=False, **extra)


def tree(path: Path) -> dict[str, float]:
    return {str(p.relative_to(path)): p.stat().st_mtime for p in sorted(path.rglob("*"))}


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("cli") / "run"
    save_run(directory)
    return directory


# ------------------------------------------------------------------ DIR:STEP


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("runs/a", Target("runs/a", None)),
        ("runs/a:12", Target("runs/a", 12)),
        ("s3://b/run:12", Target("s3://b/run", 12)),
        ("s3://b/run", Target("s3://b/run", None)),
        ("memory://x", Target("memory://x", None)),
        ("memory://x:3", Target("memory://x", 3)),
        ("runs/a:b", Target("runs/a:b", None)),
        ("runs/a:12/", Target("runs/a:12/", None)),
        ("C:7", Target("C", 7)),
    ],
)
def test_parse_target(text: str, expected: Target) -> None:
    assert parse_target(text) == expected


def test_parse_target_keeps_an_existing_directory_named_with_a_colon(tmp_path: Path) -> None:
    (tmp_path / "a:12").mkdir()
    assert parse_target(str(tmp_path / "a:12")) == Target(str(tmp_path / "a:12"), None)


# ------------------------------------------------------------------------ ls


def test_ls(capsys: pytest.CaptureFixture[str], saved: Path) -> None:
    code, out, err = run(capsys, "ls", saved)
    assert code == 0 and err == ""
    lines = out.splitlines()
    assert lines[0].split() == ["STEP", "CREATED", "SIZE", "EPOCH", "METRICS", "ITEMS"]
    assert [line.split()[0] for line in lines[1:]] == ["0", "1", "2"]
    assert "loss=0.5" in lines[2] and "model,optimizer,scheduler,rng" in lines[2]


def test_ls_json_schema(capsys: pytest.CaptureFixture[str], saved: Path) -> None:
    code, doc = run_json(capsys, "ls", saved)
    assert code == 0
    assert set(doc) == {"directory", "checkpoints"}
    assert [c["step"] for c in doc["checkpoints"]] == [0, 1, 2]
    first = doc["checkpoints"][0]
    assert set(first) == {
        "step",
        "created_at",
        "nbytes",
        "epoch",
        "metrics",
        "items",
        "format_version",
        "world_size",
        "damaged",
    }
    assert first["damaged"] is None
    assert first["epoch"] == 0 and first["metrics"] == {"loss": 1.0}
    assert first["items"] == ["model", "optimizer", "scheduler", "rng"]
    assert first["nbytes"] == sum(
        p.stat().st_size for p in (saved / step_dir_name(0)).iterdir() if p.name != "manifest.json"
    )
    assert first["world_size"] == 1


def test_ls_through_a_linked_root(
    capsys: pytest.CaptureFixture[str], saved: Path, tmp_path: Path
) -> None:
    (tmp_path / "link").symlink_to(saved)
    code, doc = run_json(capsys, "ls", tmp_path / "link")
    assert code == 0 and [c["step"] for c in doc["checkpoints"]] == [0, 1, 2]


def test_ls_empty_directory(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, doc = run_json(capsys, "ls", tmp_path)
    assert code == 0 and doc["checkpoints"] == []


@pytest.mark.parametrize("command", ["ls", "info", "verify", "prune"])
def test_missing_directory_is_an_error_and_creates_nothing(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, command: str
) -> None:
    typo = tmp_path / "typo" / "run"
    extra = ["--keep-last", "1"] if command == "prune" else []
    code, out, err = run(capsys, command, typo, *extra)
    assert code == 1 and out == ""
    assert "no such checkpoint directory" in err and str(typo) in err
    assert list(tmp_path.iterdir()) == []


def test_missing_memory_directory_creates_nothing(capsys: pytest.CaptureFixture[str]) -> None:
    url = f"memory://cli-{uuid.uuid4().hex}/typo"
    code, _, err = run(capsys, "ls", url)
    assert code == 1 and "no such checkpoint directory" in err
    assert not fsspec.filesystem("memory").exists(url.removeprefix("memory://").split("/")[0])


def test_memory_url(capsys: pytest.CaptureFixture[str]) -> None:
    url = f"memory://cli-{uuid.uuid4().hex}"
    try:
        save_model_url(url)
        code, doc = run_json(capsys, "ls", url)
        assert code == 0 and [c["step"] for c in doc["checkpoints"]] == [4]
        code, doc = run_json(capsys, "info", f"{url}:4")
        assert code == 0 and doc["step"] == 4
    finally:
        fsspec.filesystem("memory").rm(url.removeprefix("memory://"), recursive=True)


def save_model_url(url: str) -> None:
    with ckpt.CheckpointManager(url) as mgr:
        mgr.save(4, model=small_model(), rng=False)


def test_python_dash_m(saved: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-m", "ckpt", "ls", str(saved), "--json"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert [c["step"] for c in json.loads(done.stdout)["checkpoints"]] == [0, 1, 2]


# ---------------------------------------------------------------------- info


def test_info_latest(capsys: pytest.CaptureFixture[str], saved: Path) -> None:
    code, out, _ = run(capsys, "info", saved)
    assert code == 0
    assert "step:       2" in out and "epoch:      1" in out
    assert "item 'model' (module" in out and "torch.optim.adamw.AdamW" in out
    header = next(line for line in out.splitlines() if "KEY" in line)
    assert header.split() == ["KEY", "DTYPE", "SHAPE", "SIZE", "SHARDS"]
    row = next(line for line in out.splitlines() if line.strip().startswith("0.weight"))
    assert row.split()[:4] == ["0.weight", "float32", "(5,", "6)"]


def test_info_json_schema_and_filter(capsys: pytest.CaptureFixture[str], saved: Path) -> None:
    code, doc = run_json(capsys, "info", f"{saved}:1", "--tensors", "model/*.weight")
    assert code == 0
    assert {
        "directory",
        "step",
        "epoch",
        "metrics",
        "created_at",
        "versions",
        "format_version",
        "world_size",
        "files",
        "nbytes",
        "items",
    } <= set(doc)
    assert doc["step"] == 1 and doc["metrics"] == {"loss": 0.5}
    items = {i["name"]: i for i in doc["items"]}
    assert {
        "name",
        "kind",
        "tensors",
        "nbytes",
        "optimizer_class",
        "param_groups",
        "param_names",
    } <= set(items["model"])
    model = small_model()
    expected = [k for k, v in model.state_dict().items() if k.endswith(".weight")]
    assert [t["key"] for t in items["model"]["tensors"]] == expected
    weight = items["model"]["tensors"][0]
    assert {"key", "dtype", "shape", "nbytes", "file", "shards"} <= set(weight)
    assert weight["dtype"] == "float32" and weight["shape"] == [5, 6] and weight["nbytes"] == 120
    assert items["optimizer"]["tensors"] == []  # filtered out
    assert items["optimizer"]["optimizer_class"].endswith("AdamW")


def test_info_missing_step(capsys: pytest.CaptureFixture[str], saved: Path) -> None:
    code, out, err = run(capsys, "info", f"{saved}:9")
    assert code == 1 and out == "" and "step 9" in err


def test_info_empty_directory(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, _, err = run(capsys, "info", tmp_path)
    assert code == 1 and "no committed checkpoint" in err


@pytest.mark.parametrize("command", ["ls", "info", "verify"])
def test_a_directory_of_roots_names_them(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, command: str
) -> None:
    """A Lightning ModelCheckpoint directory holds one root per .ckpt: the error names them."""
    save_run(tmp_path / "epoch=0-step=2.ckpt", steps=1)
    save_run(tmp_path / "last.ckpt", steps=1)
    (tmp_path / "not_a_root").mkdir()
    (tmp_path / "a_link").symlink_to(tmp_path / "last.ckpt")
    code, _, err = run(capsys, command, tmp_path)
    assert code == (0 if command == "ls" else 1)  # ls lists nothing: not a failure
    assert "holds checkpoint roots" in err
    assert "epoch=0-step=2.ckpt" in err and "last.ckpt" in err
    assert "not_a_root" not in err and "a_link" not in err


# -------------------------------------------------------------------- verify


def test_ls_lists_every_step_and_marks_a_damaged_one(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    save_run(tmp_path / "run")
    (tmp_path / "run" / step_dir_name(1) / "manifest.json").write_text("{garbage")
    code, out, err = run(capsys, "ls", tmp_path / "run")
    assert code == 1
    assert [line.split()[0] for line in out.splitlines()[1:]] == ["0", "1", "2"]
    assert "DAMAGED" in out.splitlines()[2] and "step 1 is damaged" in err
    code, doc = run_json(capsys, "ls", tmp_path / "run")
    assert code == 1 and [c["step"] for c in doc["checkpoints"]] == [0, 1, 2]
    assert [bool(c["damaged"]) for c in doc["checkpoints"]] == [False, True, False]
    assert "manifest.json" in doc["checkpoints"][1]["damaged"]


def test_every_command_reads_dir_step_one_way(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    save_run(tmp_path / "run")
    victim = corrupt_one_tensor_file(tmp_path / "run", 1)
    code, out, _ = run(capsys, "verify", f"{tmp_path / 'run'}:1")
    assert code == 1 and victim.name in out
    assert run(capsys, "verify", f"{tmp_path / 'run'}:2")[0] == 0
    assert run(capsys, "verify", f"{tmp_path / 'run'}:2", "--step", "1")[0] == 2
    code, doc = run_json(capsys, "info", f"{tmp_path / 'run'}:0")
    assert code == 0 and doc["step"] == 0
    for command in (["ls"], ["prune", "--keep-last", "1"]):
        code, _, err = run(capsys, *command, f"{tmp_path / 'run'}:2")
        assert code == 2 and "DIR:STEP" in err
    assert sorted(os.listdir(tmp_path / "run")) == sorted(
        [step_dir_name(s) for s in range(3)] + [".ckpt-writer.lock"]
    )


def test_every_option_has_help() -> None:
    from ckpt.cli import build_parser

    parser = build_parser()
    missing = [a.dest for a in parser._actions if not a.help]
    for name, sub in parser._subparsers._group_actions[0].choices.items():  # type: ignore[union-attr]
        missing += [f"{name} {a.option_strings or a.dest}" for a in sub._actions if not a.help]
    assert not missing


def test_errors_name_the_flags_users_type(capsys: pytest.CaptureFixture[str], saved: Path) -> None:
    code, _, err = run(capsys, "export", saved, str(saved.parent / "hf"), "--max-shard-size", "x")
    assert code == 2 and "--max-shard-size" in err
    code, _, err = run(capsys, "import", str(saved / "x.pt"), str(saved), "--step", "-1")
    assert code == 2 and "--step" in err


def test_storage_options_reach_import_and_export(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import ckpt.convert.cli as convert_cli

    seen: dict[str, object] = {}

    def spy(name: str):
        def call(*args: object, **kwargs: object) -> object:
            seen[name] = kwargs.get("storage_options")
            raise ckpt.CheckpointNotFoundError("spied", path="x")

        return call

    monkeypatch.setattr(convert_cli, "export", spy("export"))
    monkeypatch.setattr(convert_cli, "import_checkpoint", spy("import"))
    option = ["--storage-option", "anon=true"]
    assert run(capsys, "export", "memory://r", str(tmp_path / "hf"), *option)[0] == 1
    assert run(capsys, "import", str(tmp_path / "a.pt"), "memory://r", *option)[0] == 1
    assert seen == {"export": {"anon": True}, "import": {"anon": True}}


def corrupt_one_tensor_file(directory: Path, step: int) -> Path:
    victim = next(
        p for p in (directory / step_dir_name(step)).iterdir() if p.name.startswith("model")
    )
    data = bytearray(victim.read_bytes())
    data[-1] ^= 0xFF
    victim.write_bytes(bytes(data))
    return victim


def test_verify_ok_and_corrupt(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    save_run(tmp_path / "run")
    code, out, _ = run(capsys, "verify", tmp_path / "run")
    assert code == 0 and out.split("\n")[1].split() == ["2", "OK"]
    victim = corrupt_one_tensor_file(tmp_path / "run", 1)
    code, out, _ = run(capsys, "verify", tmp_path / "run")  # the latest only: intact
    assert code == 0
    code, out, _ = run(capsys, "verify", tmp_path / "run", "--step", "1")
    assert code == 1 and "CORRUPT" in out and victim.name in out
    code, doc = run_json(capsys, "verify", tmp_path / "run", "--all")
    assert code == 1 and doc["ok"] is False
    assert set(doc) == {"directory", "ok", "steps"}
    assert [(s["step"], s["status"]) for s in doc["steps"]] == [
        (0, "OK"),
        (1, "CORRUPT"),
        (2, "OK"),
    ]
    assert set(doc["steps"][0]) == {"step", "status", "error", "path"}
    assert doc["steps"][0]["error"] is None
    assert "checksum" in doc["steps"][1]["error"] and victim.name in doc["steps"][1]["error"]


def test_verify_missing_step_and_usage(capsys: pytest.CaptureFixture[str], saved: Path) -> None:
    code, _, err = run(capsys, "verify", saved, "--step", "7")
    assert code == 1 and "step 7" in err
    code, _, err = run(capsys, "verify", saved, "--step", "1", "--all")
    assert code == 2 and "not allowed with" in err


# ---------------------------------------------------------------------- diff


def test_diff_identical(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    save_model(tmp_path / "a", small_model(3), epoch=1)
    save_model(tmp_path / "b", small_model(3), epoch=1)
    code, out, _ = run(capsys, "diff", tmp_path / "a", tmp_path / "b:0")
    assert code == 0 and out.splitlines()[-1].startswith("identical:")
    code, doc = run_json(capsys, "diff", tmp_path / "a", tmp_path / "b")
    assert code == 0 and doc["equal"] is True and doc["values"] == []
    assert set(doc) == {"a", "b", "atol", "equal", "summary", "tensors", "values"}
    assert doc["a"] == {"directory": str(tmp_path / "a"), "step": 0}
    assert doc["summary"]["equal"] == len(small_model().state_dict())
    record = doc["tensors"][0]
    assert set(record) == {
        "item",
        "key",
        "status",
        "dtype_a",
        "dtype_b",
        "shape_a",
        "shape_b",
        "max_abs",
        "max_rel",
    }
    assert record["max_abs"] == 0.0


def test_diff_changed(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    a, b = small_model(3), small_model(3)
    with torch.no_grad():
        b[0].weight[1, 2] += 0.25
    save_model(tmp_path / "a", a, metrics={"loss": 1.0})
    save_model(tmp_path / "b", b, metrics={"loss": 0.5})
    code, doc = run_json(capsys, "diff", tmp_path / "a", tmp_path / "b")
    assert code == 1 and doc["equal"] is False
    by_key = {r["key"]: r for r in doc["tensors"]}
    changed = by_key["0.weight"]
    assert changed["status"] == "changed"
    expected = (b[0].weight - a[0].weight).abs().max().item()
    assert changed["max_abs"] == pytest.approx(expected, rel=1e-6)
    assert changed["max_rel"] == pytest.approx(expected / abs(a[0].weight[1, 2].item()), rel=1e-6)
    assert all(r["status"] == "equal" for k, r in by_key.items() if k != "0.weight")
    assert doc["values"] == [{"path": "metrics/loss", "a": 1.0, "b": 0.5}]
    code, out, _ = run(capsys, "diff", tmp_path / "a", tmp_path / "b")
    assert code == 1 and "model/0.weight" in out and "metrics/loss" in out
    code, doc = run_json(capsys, "diff", tmp_path / "a", tmp_path / "b", "--atol", "0.3")
    assert doc["summary"]["changed"] == 0  # within atol; the metric still differs
    assert code == 1 and doc["atol"] == 0.3


def test_diff_reshaped(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    a = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
    b = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Linear(8, 2, bias=False))
    b[1].double()
    c = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2), torch.nn.Linear(2, 1))
    save_model(tmp_path / "a", a)
    save_model(tmp_path / "b", b)
    save_model(tmp_path / "c", c)
    code, doc = run_json(capsys, "diff", tmp_path / "a", tmp_path / "b")
    assert code == 1
    status = {r["key"]: r["status"] for r in doc["tensors"]}
    assert status == {
        "0.weight": "shape_changed",
        "0.bias": "shape_changed",
        "1.weight": "dtype_changed",
        "1.bias": "removed",
    }
    rec = {r["key"]: r for r in doc["tensors"]}
    assert rec["0.weight"]["shape_a"] == [8, 4] and rec["0.weight"]["shape_b"] == [6, 4]
    assert rec["1.weight"]["dtype_b"] == "float64"
    code, doc = run_json(capsys, "diff", tmp_path / "a", tmp_path / "c")
    assert code == 1
    assert [(r["key"], r["status"]) for r in doc["tensors"] if r["status"] != "changed"] == [
        ("2.weight", "added"),
        ("2.bias", "added"),
    ]
    code, out, _ = run(capsys, "diff", tmp_path / "a", tmp_path / "b")
    assert "shape changed  model/0.weight" in out and "(8, 4) -> (6, 4)" in out


def test_diff_v3_checkpoint(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    weights = {"w": torch.arange(24.0).reshape(6, 4), "b": torch.arange(6.0)}
    changed = {"w": weights["w"].clone(), "b": weights["b"].clone()}
    changed["w"][5, 3] = -1.0
    for name, state in (("a", weights), ("b", weights), ("c", changed)):
        (tmp_path / name).mkdir()
        write_sharded_checkpoint(open_storage(str(tmp_path / name)), step_dir_name(0), state)
    code, doc = run_json(capsys, "info", tmp_path / "a")
    assert code == 0 and doc["world_size"] == 2
    model = next(i for i in doc["items"] if i["name"] == "model")
    assert {t["key"]: t["shards"] for t in model["tensors"]} == {"w": 3, "b": 3}
    code, doc = run_json(capsys, "diff", tmp_path / "a", tmp_path / "b")
    assert code == 0 and doc["equal"] is True
    code, doc = run_json(capsys, "diff", tmp_path / "a", tmp_path / "c")
    assert code == 1
    assert [(r["key"], r["max_abs"]) for r in doc["tensors"] if r["status"] == "changed"] == [
        ("w", 24.0)
    ]
    code, doc = run_json(capsys, "verify", tmp_path / "c")
    assert code == 0


def test_info_of_a_group_checkpoint_says_whose_per_rank_items_it_shows(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    # It showed rank 0's sampler, scheduler and random streams of a 3-rank checkpoint
    # as if they were the job's, with nothing saying each rank saved its own.
    write_sharded_checkpoint(
        open_storage(str(tmp_path)), step_dir_name(0), {"w": torch.arange(6.0)}, world_size=3
    )
    code, out, _ = run(capsys, "info", tmp_path)
    assert code == 0
    own, model = out.split("item 'own'")[1], out.split("item 'model'")[1].split("item ")[0]
    assert own.splitlines()[1] == "  rank 0's: each of the 3 ranks saved its own"
    assert "saved its own" not in model


def test_diff_corrupt_and_missing(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    save_model(tmp_path / "a", small_model())
    save_model(tmp_path / "b", small_model())
    corrupt_one_tensor_file(tmp_path / "b", 0)
    code, out, err = run(capsys, "diff", tmp_path / "a", tmp_path / "b")
    assert code == 1 and out == "" and "checksum" in err
    code, _, err = run(capsys, "diff", tmp_path / "a", tmp_path / "nope")
    assert code == 1 and "no such checkpoint directory" in err
    assert not (tmp_path / "nope").exists()
    code, _, err = run(capsys, "diff", tmp_path / "a", tmp_path / "a", "--atol", "-1")
    assert code == 2 and "--atol" in err


def test_tensor_difference_special_values() -> None:
    a = torch.tensor([1.0, float("nan"), float("inf"), 0.0, 2.0])
    assert tensor_difference(a, a.clone()) == (True, 0.0, 0.0)
    b = torch.tensor([1.0, float("nan"), float("inf"), -0.0, 2.0])
    assert tensor_difference(a, b) == (False, 0.0, 0.0)  # -0.0: other bits, same value
    c = torch.tensor([1.0, 3.0, float("-inf"), 0.0, 2.5])
    identical, max_abs, max_rel = tensor_difference(a, c)
    assert not identical and max_abs == float("inf") and max_rel == float("inf")
    ints = torch.tensor([1, 5]), torch.tensor([1, 2])
    assert tensor_difference(*ints) == (False, 3.0, 0.6)
    assert tensor_difference(torch.tensor([True]), torch.tensor([False]))[:2] == (False, 1.0)


def test_value_changes() -> None:
    a = {"epoch": 1, "m": {"loss": float("nan"), "acc": 0.5}, "g": [{"lr": 0.1}]}
    b = {"epoch": 1, "m": {"loss": float("nan"), "top5": 0.9}, "g": [{"lr": 0.2}]}
    assert value_changes(a, b) == [
        {"path": "m/acc", "a": 0.5, "b": None, "missing": "b"},
        {"path": "m/top5", "a": None, "b": 0.9, "missing": "a"},
        {"path": "g/0/lr", "a": 0.1, "b": 0.2},
    ]


# --------------------------------------------------------------------- prune


def test_prune_dry_run_writes_nothing(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    save_run(tmp_path / "run", steps=5)
    before = tree(tmp_path / "run")
    code, out, _ = run(capsys, "prune", tmp_path / "run", "--keep-last", "2", "--dry-run")
    assert code == 0 and out.splitlines() == [f"would delete step {s}" for s in (0, 1, 2)]
    assert tree(tmp_path / "run") == before
    # A writer holds the lock: a dry run still works, a real prune fails and deletes nothing.
    with ckpt.CheckpointManager(tmp_path / "run") as writer:
        writer.save(5, model=small_model(), rng=False)
        code, doc = run_json(
            capsys, "prune", tmp_path / "run", "--keep-last", "2", "--keep-every", "2", "--dry-run"
        )
        assert code == 0 and doc == {
            "directory": str(tmp_path / "run"),
            "dry_run": True,
            "deleted": [0, 2],
            "kept": [1, 3, 4, 5],
        }
        code, _, err = run(capsys, "prune", tmp_path / "run", "--keep-last", "2")
        assert code == 1 and "lock" in err
        assert writer.all_steps() == [0, 1, 2, 3, 4, 5]
    code, doc = run_json(capsys, "prune", tmp_path / "run", "--keep-last", "2", "--keep-every", "2")
    assert code == 0 and doc["deleted"] == [0, 2] and doc["kept"] == [1, 3, 4, 5]
    assert ckpt.CheckpointManager(tmp_path / "run").all_steps() == [1, 3, 4, 5]


def test_prune_usage(capsys: pytest.CaptureFixture[str], saved: Path) -> None:
    code, _, err = run(capsys, "prune", saved)
    assert code == 2 and "--keep-last" in err
    code, _, err = run(capsys, "prune", saved, "--keep-last", "0")
    assert code == 2 and "--keep-last must be" in err  # the flag as typed, not keep_last


# --------------------------------------------------------- usage, logging, progress


@pytest.mark.parametrize(
    "argv", [[], ["nope"], ["ls"], ["ls", "a", "b"], ["info", "x", "--bogus"], ["diff", "a"]]
)
def test_usage_errors(capsys: pytest.CaptureFixture[str], argv: list[str]) -> None:
    code, out, err = run(capsys, *argv)
    assert code == 2 and out == "" and "usage: ckpt" in err


def test_help_and_version(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "--help")
    assert code == 0 and "verify" in out and "diff" in out
    code, out, _ = run(capsys, "--version")
    assert code == 0 and out.strip() == f"ckpt {ckpt.__version__}"


def test_verbose_and_quiet(capsys: pytest.CaptureFixture[str], saved: Path) -> None:
    code, _, err = run(capsys, "verify", saved, "-v")
    assert code == 0 and "INFO: verified step 2" in err
    code, _, err = run(capsys, "-v", "verify", saved)
    assert code == 0 and "INFO: verified step 2" in err
    code, _, err = run(capsys, "verify", saved, "-q")
    assert code == 0 and err == ""
    assert not any(
        type(h).__name__ == "_StderrHandler"
        for h in __import__("logging").getLogger("ckpt").handlers
    )


def test_storage_option_syntax(capsys: pytest.CaptureFixture[str], saved: Path) -> None:
    code, _, err = run(capsys, "ls", saved, "--storage-option", "novalue")
    assert code == 2 and "KEY=VALUE" in err


def test_progress_bar_is_a_no_op_without_tqdm(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tqdm", None)  # import fails
    with progress_bar(3, "x", enabled=True) as bar:
        bar.update()
        assert not bar.active


def test_progress_bars_with_tqdm(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], saved: Path
) -> None:
    made: list[dict] = []

    class FakeBar:
        def __init__(self, **kwargs: object) -> None:
            self.kwargs, self.n = kwargs, 0
            made.append(self.__dict__)

        def update(self, n: int) -> None:
            self.n += n

        def set_postfix_str(self, text: str, refresh: bool) -> None:
            pass

        def close(self) -> None:
            pass

    monkeypatch.setitem(sys.modules, "tqdm", types.SimpleNamespace(tqdm=FakeBar))
    with progress_bar(2, "x", enabled=False) as bar:
        assert not bar.active
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    code, _, _ = run(capsys, "verify", saved, "--all")
    assert code == 0 and made[-1]["n"] == 3 and made[-1]["kwargs"]["desc"] == "verify"
    code, _, _ = run(capsys, "diff", f"{saved}:0", f"{saved}:1")
    assert code == 1 and made[-1]["kwargs"]["desc"] == "diff" and made[-1]["n"] > 0
    count = len(made)
    run(capsys, "verify", saved, "--no-progress")
    assert len(made) == count
