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
    "assembly",
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


def _tells_modules_from_optimizers(path: pathlib.Path) -> bool:
    """Whether ``path`` calls ``isinstance(x, ...Module)`` or ``isinstance(x, ...Optimizer)``."""
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "isinstance":
            classes = node.args[1] if len(node.args) == 2 else None
            names = {getattr(n, "attr", getattr(n, "id", None)) for n in ast.walk(classes)}
            if names & {"Module", "Optimizer"}:
                return True
    return False


def test_item_kinds_live_in_state_kinds():
    """Sharded modules and optimizers are item kinds (issue 18): ``distributed/`` keeps the group.

    Only the sharded kinds in ``state/kinds/`` reach ``ckpt.distributed`` (its
    narrow functions: DCP's state-dict bridge, planners, chunk reads), and in
    ``distributed/`` only DCP's state-dict bridge (``states.py``) tells a module
    from an optimizer.
    """
    reaching = sorted(
        str(path.relative_to(PACKAGE.parent))
        for path in (PACKAGE / "state").rglob("*.py")
        if "distributed" in ckpt_imports(path) and not path.name.startswith("sharded")
    )
    assert not reaching
    telling = sorted(
        path.name
        for path in (PACKAGE / "distributed").glob("*.py")
        if path.name != "states.py" and _tells_modules_from_optimizers(path)
    )
    assert not telling


def _imported_names(path: pathlib.Path) -> set[str]:
    """The names ``path`` imports from ckpt modules (``from ckpt.x import name``)."""
    return {
        alias.name
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("ckpt")
        for alias in node.names
    }


def test_items_are_validated_by_their_kinds():
    """``distributed/`` checks no saved item against a live one: its kind does (issue 18).

    Matching module keys, an optimizer's class, groups and numbers, and where each
    saved tensor goes live in ``state/kinds/sharded_module.py`` and
    ``sharded_optimizer.py``; ``distributed/`` imports none of those checks.
    """
    checks = {"check_group_types", "check_optimizer_numbers", "class_name"}
    checks |= {"module_destinations", "optimizer_destinations", "live_optimizer_tensors"}
    offenders = sorted(
        f"{path.name} imports {name}"
        for path in (PACKAGE / "distributed").glob("*.py")
        for name in _imported_names(path) & checks
    )
    assert not offenders


def test_the_checker_sees_an_item_kind_check(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("import torch\nok = isinstance(o, (dict, torch.nn.Module))\n")
    assert _tells_modules_from_optimizers(probe)
    probe.write_text("ok = isinstance(o, dict)\n")
    assert not _tells_modules_from_optimizers(probe)


def test_the_checker_sees_an_imported_check(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("from ckpt.state.optim import check_group_types, class_name\nimport os\n")
    assert _imported_names(probe) == {"check_group_types", "class_name"}
