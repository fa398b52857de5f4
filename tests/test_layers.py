"""The package's layers: lower folders never import higher ones (see docs/architecture.md).

``format/`` is pure over bytes and ``policies/`` pure over numbers: neither
reaches storage, I/O, saving, restoring, the manager or the distributed code, so
they can be read, tested and reused without a filesystem.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "ckpt"

HIGHER = (
    "io",
    "storage",
    "saving",
    "restoring",
    "reading",
    "manager",
    "distributed",
    "convert",
    "cli",
)
FORBIDDEN = {
    "format": HIGHER,
    "policies": (*HIGHER, "state"),
}


def ckpt_imports(path: pathlib.Path) -> set[str]:
    """The ckpt subpackages and modules ``path`` imports (first component after ``ckpt.``)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        for name in names:
            parts = name.split(".")
            if parts[0] == "ckpt" and len(parts) > 1:
                found.add(parts[1])
    return found


@pytest.mark.parametrize("folder", sorted(FORBIDDEN))
def test_lower_layers_never_import_higher_ones(folder):
    offenders = {
        f"{path.relative_to(PACKAGE.parent)} imports ckpt.{name}"
        for path in sorted((PACKAGE / folder).glob("*.py"))
        for name in ckpt_imports(path) & set(FORBIDDEN[folder])
    }
    assert not offenders, sorted(offenders)


def test_the_checker_sees_an_import(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("from ckpt.io.read import x\nimport ckpt.storage.local\n")
    assert ckpt_imports(probe) == {"io", "storage"}
