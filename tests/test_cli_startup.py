"""What ``import ckpt``, ``ckpt info`` and ``ckpt ls`` load (issue 21): only what they need.

Each check runs in a fresh interpreter and reads its ``sys.modules``; nothing is
timed here (``bench/cli_startup.py`` times the commands).
"""

from __future__ import annotations

import contextlib
import inspect
import io
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import ManySmall, read_manifest_doc, trained_live_objects, write_manifest

import ckpt
import ckpt.converting
import ckpt.verification
from ckpt.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]

HEAVY = (
    "ckpt.convert",
    "ckpt.verification.verify",
    "ckpt.verification.runs",
    "ckpt.verification.child",
    "ckpt.verification.diagnosis",
    "torch.distributed.checkpoint",
    "lightning",
    "pytorch_lightning",
    "transformers",
)
"""Modules (and their submodules) that neither ``import ckpt`` nor ``info``/``ls`` may load."""

DISTRIBUTED = "ckpt.distributed."
"""``ckpt.distributed`` itself is a facade that imports its parts on use: none may be loaded."""

PROBE = """
import contextlib, io, json, sys
loaded = {{}}
import ckpt
loaded["import ckpt"] = sorted(sys.modules)
from ckpt.cli import main
for argv in {commands!r}:
    with contextlib.redirect_stdout(io.StringIO()) as out:
        status = main(argv)
    assert status == 0 and "step" in out.getvalue().lower(), (argv, status, out.getvalue())
loaded["info and ls"] = sorted(sys.modules)
with contextlib.suppress(SystemExit), contextlib.redirect_stdout(io.StringIO()):
    main(["export", "--help"])
loaded["export --help"] = sorted(sys.modules)
print(json.dumps(loaded))
"""


def heavy_among(modules: list[str]) -> list[str]:
    return [
        m
        for m in modules
        if m.startswith(DISTRIBUTED) or any(m == h or m.startswith(h + ".") for h in HEAVY)
    ]


@pytest.fixture(scope="module")
def loaded(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[str]]:
    """The modules loaded by one fresh interpreter after each stage of the probe.

    The checkpoint: two steps of a model whose small tensors are packed, and a large tensor.
    """
    root = tmp_path_factory.mktemp("startup") / "run"
    with ckpt.CheckpointManager(root) as mgr:
        for step in range(2):
            mgr.save(step, model=ManySmall(step), big={"w": torch.zeros(8192)}, rng=False)
    commands = [
        ["info", str(root)],
        ["info", f"{root}:0", "--json"],
        ["ls", str(root)],
        ["ls", str(root), "--json"],
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-c", PROBE.format(commands=commands)],
        capture_output=True,
        text=True,
        env=env,
        timeout=180,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    stages: dict[str, list[str]] = json.loads(done.stdout.splitlines()[-1])
    return stages


def test_import_ckpt_loads_no_converter_distributed_or_verification_machinery(
    loaded: dict[str, list[str]],
) -> None:
    modules = loaded["import ckpt"]
    assert "ckpt" in modules and "ckpt.converting" in modules
    assert heavy_among(modules) == []


def test_info_and_ls_load_no_converter_distributed_or_verification_machinery(
    loaded: dict[str, list[str]],
) -> None:
    modules = loaded["info and ls"]
    assert "ckpt.cli.listing" in modules
    assert heavy_among(modules) == []


def test_the_converter_commands_still_load_when_named(loaded: dict[str, list[str]]) -> None:
    assert "ckpt.convert.cli" in loaded["export --help"]


def test_the_light_commands_are_every_command_but_the_converters() -> None:
    from ckpt.cli import _CORE_COMMANDS

    names = set(build_parser()._subparsers._group_actions[0].choices)  # type: ignore[union-attr]
    assert names - {"export", "import"} == _CORE_COMMANDS
    assert {"export", "import"} <= names


def test_the_lazy_entry_points_match_what_they_call() -> None:
    from ckpt.convert.export import export
    from ckpt.convert.importing import ImportReport, import_checkpoint
    from ckpt.verification.verify import verify_resume

    pairs = [
        (ckpt.export, export),
        (ckpt.import_checkpoint, import_checkpoint),
        (ckpt.verify_resume, verify_resume),
    ]
    for public, implementation in pairs:
        assert inspect.signature(public) == inspect.signature(implementation), public.__name__
        assert public.__module__ in ("ckpt.converting", "ckpt.verification")
    assert ImportReport is ckpt.ImportReport is ckpt.converting.ImportReport
    assert ckpt.verify_resume is ckpt.verification.verify_resume


@pytest.mark.parametrize(
    ("argv", "name"),
    [
        (["info", "runs/a"], "info"),
        (["-v", "-q", "--no-progress", "ls", "runs/a"], "ls"),
        (["--storage-option", "anon=true", "ls", "s3://b/r"], "ls"),
        (["--storage-option=anon=true", "info", "s3://b/r"], "info"),
        (["--storage-option", "export", "import", "a.pt", "runs/a"], "import"),
        (["--storage", "anon=true", "ls", "runs/a"], None),  # an abbreviation: unsure
        (["--help"], None),
        ([], None),
    ],
)
def test_the_command_is_told_from_the_words_before_it(argv: list[str], name: str | None) -> None:
    from ckpt.cli import _command_name

    assert _command_name(argv) == name


def test_options_before_a_light_command_still_parse(tmp_path: Path) -> None:
    from ckpt.cli import main

    assert main(["-q", "--storage-option", "x=1", "ls", str(tmp_path)]) == 0
    assert main(["--no-progress", "info", str(tmp_path)]) == 1  # no checkpoint: a problem


# ----------------------------------------------------------- ls and info without torch

TORCH_FREE_PROBE = """
import contextlib, io, json, sys
from ckpt.cli import main
outputs = []
for argv in {commands!r}:
    with contextlib.redirect_stdout(io.StringIO()) as out:
        with contextlib.redirect_stderr(io.StringIO()) as err:
            status = main(argv)
    outputs.append([status, out.getvalue(), err.getvalue()])
torch = sorted(m for m in sys.modules if m == "torch" or m.startswith("torch."))
print(json.dumps({{"outputs": outputs, "torch": torch}}))
"""


def fresh_outputs(commands: list[list[str]]) -> tuple[list[list[Any]], list[str]]:
    """Each command's ``[status, stdout, stderr]`` in a fresh interpreter, and its torch modules."""
    done = subprocess.run(
        [sys.executable, "-c", TORCH_FREE_PROBE.format(commands=commands)],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        timeout=180,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    found = json.loads(done.stdout.splitlines()[-1])
    return found["outputs"], found["torch"]


def here_outputs(commands: list[list[str]]) -> list[list[Any]]:
    """The same commands run in this process, where torch is imported."""
    from ckpt.cli import main

    outputs = []
    for argv in commands:
        with (
            contextlib.redirect_stdout(io.StringIO()) as out,
            contextlib.redirect_stderr(io.StringIO()) as err,
        ):
            status = main(argv)
        outputs.append([status, out.getvalue(), err.getvalue()])
    return outputs


def every_view(root: Path) -> list[list[str]]:
    """``ls`` and ``info`` of ``root``, as text and as JSON."""
    return [
        ["ls", str(root)],
        ["ls", str(root), "--json"],
        ["info", str(root)],
        ["info", str(root), "--json"],
    ]


@pytest.fixture(scope="module")
def trained_roots(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A root of two steps (packed model, stepped AdamW, RNG, a dict of several dtypes), and an
    incremental root of two steps (format version 4)."""
    base = tmp_path_factory.mktemp("torch_free")
    model, optimizer = trained_live_objects(build=ManySmall)  # small tensors: packed
    mixed = {
        "ints": torch.arange(5),
        "flags": torch.ones(3, dtype=torch.bool),
        "half": torch.ones(2).half(),
        "big": torch.zeros(8192),
    }
    roots = {"run": base / "run", "incremental": base / "incremental"}
    with ckpt.CheckpointManager(roots["run"]) as mgr:
        for step in range(2):
            mgr.save(step, model=model, optimizer=optimizer, extra=mixed, metrics={"loss": 0.5})
    with ckpt.CheckpointManager(roots["incremental"], incremental=True) as mgr:
        for step in range(2):
            mgr.save(step, model=ManySmall(step), big={"w": torch.zeros(8192)}, rng=False)
    return roots


def test_ls_and_info_import_no_torch_and_print_what_they_print_with_it(
    trained_roots: dict[str, Path],
) -> None:
    commands = [argv for root in trained_roots.values() for argv in every_view(root)]
    commands.append(["info", f"{trained_roots['run']}:0", "--tensors", "*.weight"])
    outputs, torch_modules = fresh_outputs(commands)
    assert torch_modules == []
    assert outputs == here_outputs(commands)
    assert all(status == 0 for status, _, _ in outputs)


def _edited(source: Path, target: Path, edit: Callable[[dict[str, Any]], None]) -> Path:
    """A copy of root ``source`` whose latest manifest ``edit`` changed (resealed)."""
    shutil.copytree(source, target)
    step_dir = sorted(p for p in target.iterdir() if p.name.startswith("step_"))[-1]
    doc = read_manifest_doc(step_dir / "manifest.json")
    edit(doc)
    write_manifest(step_dir / "manifest.json", doc)
    return target


def _first_tensor(doc: dict[str, Any], packed: bool = False) -> dict[str, Any]:
    found: dict[str, Any] = next(
        t
        for name, t in doc["tensors"].items()
        if ("pack" in t) == packed and not name.endswith("#pack")
    )
    return found


def _first_pack(doc: dict[str, Any]) -> dict[str, Any]:
    found: dict[str, Any] = next(t for name, t in doc["tensors"].items() if name.endswith("#pack"))
    return found


def _member(doc: dict[str, Any]) -> str:
    """A stored tensor that is a value (not a pack)."""
    return next(name for name in doc["tensors"] if not name.endswith("#pack"))


def _param_group(doc: dict[str, Any]) -> dict[str, Any]:
    group: dict[str, Any] = doc["items"]["optimizer"]["state"]["param_groups"][0]
    return group


EDITS: dict[str, Callable[[dict[str, Any]], None]] = {
    "never_written_dtype": lambda d: _first_tensor(d).update(dtype="qint32"),
    "unknown_dtype": lambda d: _first_tensor(d).update(dtype="float17"),
    "bad_device": lambda d: _first_tensor(d).update(device="cuda:x"),
    "wrapping_device": lambda d: _first_tensor(d).update(device="cuda:1000"),
    "other_device": lambda d: _first_tensor(d).update(device="cuda:7"),
    "pack_not_uint8": lambda d: _first_pack(d).update(dtype="float32"),
    "misaligned_member": lambda d: _first_tensor(d, packed=True).update(offset=2),
    "huge_shape": lambda d: _first_tensor(d).update(shape=[2**62, 2**62]),
    "dtype_in_group": lambda d: _param_group(d).update(kind={"$dtype": "bfloat16"}),
    "bad_dtype_in_group": lambda d: _param_group(d).update(kind={"$dtype": "float17"}),
    "device_in_group": lambda d: _param_group(d).update(on={"$device": "cuda:1"}),
    "bad_device_in_group": lambda d: _param_group(d).update(on={"$device": "gpu"}),
    "param_in_group": lambda d: _param_group(d).update(
        held={"$param": {"tensor": _member(d), "requires_grad": True}}
    ),
    "tensor_in_group": lambda d: _param_group(d).update(held={"$tensor": _member(d)}),
}
"""Manifests edited by hand: each must read the same (or fail the same) without torch."""


def test_edited_and_hostile_manifests_read_the_same_without_torch(
    trained_roots: dict[str, Path], tmp_path: Path
) -> None:
    commands = []
    for name, edit in EDITS.items():
        root = _edited(trained_roots["run"], tmp_path / name, edit)
        commands += [
            ["ls", str(root), "--json"],
            ["info", str(root)],
            ["info", str(root), "--json"],
        ]
    outputs, _ = fresh_outputs(commands)
    expected = here_outputs(commands)
    for argv, got, want in zip(commands, outputs, expected, strict=True):
        assert got == want, argv
    assert {status for status, _, _ in outputs} == {0, 1}  # some read, some are refused


def test_the_dtype_table_is_torchs() -> None:
    from ckpt.format.dtypes import ITEMSIZES, STORABLE, NamedDtype, dtypes_by_name
    from ckpt.format.tensorfile import dtype_name

    found = {
        str(d).removeprefix("torch."): d for d in vars(torch).values() if isinstance(d, torch.dtype)
    }
    assert {name: d.itemsize for name, d in found.items()} == ITEMSIZES
    storable = set()
    for name, d in found.items():
        with contextlib.suppress(TypeError):
            dtype_name(d)
            storable.add(name)
    assert storable == STORABLE
    assert dtypes_by_name() == found  # torch is imported here: its own dtypes
    for name, size in ITEMSIZES.items():
        stand_in = NamedDtype(name, size)
        assert (str(stand_in), repr(stand_in), stand_in.itemsize) == (
            str(found[name]),
            repr(found[name]),
            found[name].itemsize,
        )


def test_the_device_strings_known_without_torch_are_torchs() -> None:
    from ckpt.format.sections import _PLAIN_DEVICE

    for kind in ("cpu", "cuda", "meta", "mps", "xpu"):
        for text in [kind, *(f"{kind}:{i}" for i in range(100))]:
            assert _PLAIN_DEVICE.fullmatch(text), text
            assert str(torch.device(text)) == text
    for text in (
        "cuda:100",
        "cuda:01",
        "cuda:-1",
        "CUDA",
        "cuda:",
        " cpu",
        "cpu ",
        "gpu",
        "cuda:1000",
    ):
        assert not _PLAIN_DEVICE.fullmatch(text), text


def test_the_lazy_names_are_the_modules_own() -> None:
    import ckpt.io
    import ckpt.io.manifest
    import ckpt.io.read
    import ckpt.manager
    import ckpt.reading.reader

    assert ckpt.CheckpointManager is ckpt.manager.CheckpointManager
    assert ckpt.CheckpointReader is ckpt.reading.reader.CheckpointReader
    assert ckpt.io.read_manifest is ckpt.io.manifest.read_manifest
    assert ckpt.io.load_tensors is ckpt.io.read.load_tensors
    assert set(ckpt.__all__) <= set(dir(ckpt))
    assert set(ckpt.io.__all__) <= set(dir(ckpt.io))
    with pytest.raises(AttributeError):
        _ = ckpt.no_such_name  # type: ignore[attr-defined]
    with pytest.raises(AttributeError):
        _ = ckpt.io.no_such_name  # type: ignore[attr-defined]
