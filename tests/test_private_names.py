"""No ckpt module reaches into another module's private names (issue 18).

A private name (``_x``, not ``__x__``) is used only in the module that defines
it. torch's private names are used only in ``ckpt/torch_compat.py``, which
wraps each with a note of what it relies on. Checked on the source with ``ast``:
imports of private names or modules, and ``obj._x`` (or ``getattr(obj, "_x")``)
where no ``_x`` is defined in the module itself.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

PACKAGE = Path(__file__).parent.parent / "ckpt"
TORCH_WRAPPER = PACKAGE / "torch_compat.py"
ALLOWED_IMPORTS = {("ckpt._version", "__version__")}
"""``_version.py`` is the version file's conventional name; only its dunder is imported."""
ALLOWED_ATTRIBUTES = {("argparse", "_SubParsersAction"), ("os", "_exit")}
"""The type typeshed gives ``add_subparsers()`` (annotations only); ``os._exit``, documented API."""
REFLECTION = {"getattr", "setattr", "hasattr", "delattr"}


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _defined_here(tree: ast.AST) -> set[str]:
    """Private names the module defines: functions, classes, assignments, attributes, args."""
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
            names.add(node.attr)
        elif isinstance(node, ast.arg):
            names.add(node.arg)
        elif isinstance(node, ast.alias):
            names.add(node.asname or node.name)
    return {n for n in names if _private(n)}


def _imports(node: ast.AST) -> Iterator[tuple[str, str]]:
    """``(module, name)`` pairs an import statement brings in."""
    if isinstance(node, ast.ImportFrom):
        module = "." * node.level + (node.module or "")
        for alias in node.names:
            yield module, alias.name
    elif isinstance(node, ast.Import):
        for alias in node.names:
            yield alias.name, ""


def violations(path: Path) -> list[str]:
    """Every use of another module's private name in ``path``."""
    name = str(path.relative_to(PACKAGE.parent))
    return violations_in(path.read_text(), name, torch_allowed=path == TORCH_WRAPPER)


def violations_in(source: str, file_name: str, *, torch_allowed: bool = False) -> list[str]:
    """Every use of another module's private name in a module's ``source``."""
    tree = ast.parse(source, file_name)
    here = _defined_here(tree)
    found = []
    for node in ast.walk(tree):
        where = f"{file_name}:{getattr(node, 'lineno', 0)}"
        for module, name in _imports(node):
            parts = [p for p in module.lstrip(".").split(".") if p] + ([name] if name else [])
            ours = module.startswith((".", "ckpt"))
            if (module, name) in ALLOWED_IMPORTS or not any(_private(p) for p in parts):
                continue
            if ours or (module.startswith("torch") and not torch_allowed):
                found.append(f"{where}: imports {name or module} from {module}")
        attribute = None
        if isinstance(node, ast.Attribute):
            attribute = (node.value, node.attr)
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id in REFLECTION
            and len(node.args) >= 2
            and isinstance(node.args[1], ast.Constant)
            and isinstance(node.args[1].value, str)
        ):
            attribute = (node.args[0], node.args[1].value)
        if attribute is None or not _private(attribute[1]) or attribute[1] in here:
            continue
        owner, name = attribute
        if isinstance(owner, ast.Name) and (owner.id, name) in ALLOWED_ATTRIBUTES:
            continue
        if not torch_allowed:
            found.append(f"{where}: {ast.unparse(owner)}.{name} is another module's private name")
    return found


def test_no_module_uses_another_modules_private_names():
    found = [v for path in sorted(PACKAGE.rglob("*.py")) for v in violations(path)]
    assert not found, "\n".join(found)


@pytest.mark.parametrize(
    "source",
    [
        "from ckpt.manager import _release_quietly",
        "from .commit import _write_error",
        "import ckpt._secret",
        "from torch.distributed.checkpoint.state_dict import _get_fqns",
        "def f(mgr):\n    return mgr._storage",
        "def f(state):\n    return getattr(state, '_metadata', None)",
        "import torch\nx = torch._C",
    ],
)
def test_the_check_sees_each_kind_of_reach(source):
    assert violations_in(source, "probe.py")


@pytest.mark.parametrize(
    "source",
    [
        "class A:\n    def __init__(self):\n        self._x = 1\n    def f(self, o):\n"
        "        return o._x",
        "from ckpt._version import __version__",
        "import argparse\ndef f(s: argparse._SubParsersAction) -> None: ...",
        "x = object().__class__",
    ],
)
def test_the_check_allows_a_modules_own_names(source):
    assert violations_in(source, "probe.py") == []


def test_only_the_wrapper_may_use_torchs_private_names():
    source = "from torch.distributed.checkpoint.state_dict import _get_fqns"
    assert violations_in(source, "ckpt/torch_compat.py", torch_allowed=True) == []
