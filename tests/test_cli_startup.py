"""What ``import ckpt``, ``ckpt info`` and ``ckpt ls`` load (issue 21): only what they need.

Each check runs in a fresh interpreter and reads its ``sys.modules``; nothing is
timed here (``bench/cli_startup.py`` times the commands).
"""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import ManySmall

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
