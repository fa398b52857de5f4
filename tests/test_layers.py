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


def _module_name(path: pathlib.Path, root: pathlib.Path) -> str:
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _load_time_imports(path: pathlib.Path, name: str, modules: set[str]) -> set[str]:
    """The modules of ``modules`` that ``path`` imports when it is loaded.

    Imports inside functions and under ``if TYPE_CHECKING:`` are left out; ``from
    package import submodule`` counts as the submodule alone.
    """
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            continue
        for inner in node.body if isinstance(node, ast.Try) else [node]:
            if isinstance(inner, ast.Import):
                found.update(a.name for a in inner.names)
            elif isinstance(inner, ast.ImportFrom):
                base = inner.module or ""
                if inner.level:
                    up = package.split(".")[: len(package.split(".")) - inner.level + 1]
                    base = ".".join([*up, base] if base else up)
                subs = {f"{base}.{a.name}" for a in inner.names} & modules
                found.update(subs or {base})
    return (found & modules) - {name}


def import_cycles(root: pathlib.Path) -> list[list[str]]:
    """Each group of modules under ``root`` that import one another when loaded."""
    paths = {_module_name(p, root): p for p in root.rglob("*.py")}
    graph = {n: _load_time_imports(p, n, set(paths)) for n, p in paths.items()}

    def reaches(start: str) -> set[str]:
        seen, todo = set(), [start]
        while todo:
            for nxt in graph[todo.pop()] - seen:
                seen.add(nxt)
                todo.append(nxt)
        return seen

    reach = {n: reaches(n) for n in graph}
    cycles = {
        frozenset({n, *(m for m in reach[n] if n in reach[m])}) for n in graph if n in reach[n]
    }
    return sorted(sorted(c) for c in cycles)


def test_no_modules_import_each_other_when_loaded():
    """No import cycle, e.g. storage's base/local/lock (issue 18): each layer loads alone."""
    assert import_cycles(PACKAGE) == []


def test_the_checker_sees_an_import_cycle(tmp_path):
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("from pkg import a\n")
    (package / "a.py").write_text("from pkg.sub import b\n")
    (package / "sub" / "__init__.py").write_text("")
    (package / "sub" / "b.py").write_text("from ..a import thing\n")
    (package / "c.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import pkg.a\n"
        "def f():\n    import pkg.a\n"
    )
    assert import_cycles(package) == [["pkg.a", "pkg.sub.b"]]
