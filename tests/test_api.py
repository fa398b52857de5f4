"""The public surface: exports, error tree, and the no-pickle rule."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import ckpt

PACKAGE = Path(ckpt.__file__).parent


def test_all_is_sorted_and_complete():
    public = {n for n, v in vars(ckpt).items() if not n.startswith("_") and not inspect.ismodule(v)}
    assert ckpt.__all__ == sorted(ckpt.__all__)
    assert set(ckpt.__all__) == public | {"__version__"}


def test_every_error_derives_from_checkpoint_error_and_its_builtin():
    assert issubclass(ckpt.CheckpointNotFoundError, (ckpt.CheckpointError, FileNotFoundError))
    assert issubclass(ckpt.CheckpointNotFoundError, FileNotFoundError)
    assert issubclass(ckpt.CheckpointExistsError, FileExistsError)
    assert issubclass(ckpt.CorruptCheckpointError, ValueError)
    assert issubclass(ckpt.IncompatibleCheckpointError, ValueError)
    for cls in (ckpt.CheckpointNotFoundError, ckpt.CheckpointExistsError,
                ckpt.CorruptCheckpointError, ckpt.IncompatibleCheckpointError):  # fmt: skip
        assert issubclass(cls, ckpt.CheckpointError)
        err = cls("bad thing", path="/x/manifest.json", key="model")
        assert str(err) == "bad thing (file '/x/manifest.json', key 'model')"
        assert (err.path, err.key) == ("/x/manifest.json", "model")


def test_a_rank_mismatch_is_a_checkpoint_error_and_a_value_error():
    assert ckpt.RankMismatchError is ckpt.errors.RankMismatchError
    assert "RankMismatchError" in ckpt.errors.__all__
    assert issubclass(ckpt.RankMismatchError, ckpt.CheckpointError)
    assert issubclass(ckpt.RankMismatchError, ValueError)
    err = ckpt.RankMismatchError(
        "every rank must restore the same items: rank 0 restores ['model']; "
        "rank 1 restores ['model', 'optimizer']",
        path="/run",
        key="optimizer",
    )
    assert str(err) == (
        "every rank must restore the same items: rank 0 restores ['model']; "
        "rank 1 restores ['model', 'optimizer'] (file '/run', key 'optimizer')"
    )
    assert err.reason.endswith("rank 1 restores ['model', 'optimizer']")
    assert (err.path, err.key) == ("/run", "optimizer")
    located = ckpt.RankMismatchError("the ranks differ").located("/run/step_000000000001")
    assert type(located) is ckpt.RankMismatchError
    assert str(located) == "the ranks differ (file '/run/step_000000000001')"
    assert str(ckpt.RankMismatchError("the ranks differ")) == "the ranks differ"


def test_every_public_name_has_a_docstring():
    for name in ckpt.__all__:
        obj = getattr(ckpt, name)
        if inspect.isclass(obj) or inspect.isfunction(obj):
            assert inspect.getdoc(obj), name
    for method in ("save", "restore", "read", "all_steps", "latest_step", "checkpoint"):
        assert inspect.getdoc(getattr(ckpt.CheckpointManager, method)), method


UNPICKLING_MODULE = PACKAGE / "convert" / "loading.py"
"""The one module that reads other tools' pickles (``ckpt import``), checked below."""


def test_package_source_never_uses_pickle_torch_load_or_eval():
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        if path == UNPICKLING_MODULE:
            continue  # checked by test_the_importer_only_unpickles_restricted
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
                if any(n.split(".")[0] in {"pickle", "cPickle", "dill", "cloudpickle", "marshal"}
                       for n in names):  # fmt: skip
                    offenders.append(f"{path.name}:{node.lineno} imports {names}")
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) in {"eval", "exec"}:
                offenders.append(f"{path.name}:{node.lineno} {node.func.id}()")  # type: ignore[attr-defined]
            if isinstance(node, ast.Attribute) and node.attr in {"load", "save"}:
                base = node.value
                if isinstance(base, ast.Name) and base.id == "torch":
                    offenders.append(f"{path.name}:{node.lineno} torch.{node.attr}")
    assert not offenders, offenders


def test_the_importer_only_unpickles_restricted():
    """Every torch.load passes weights_only=True; pickle only as an Unpickler with find_class."""
    tree = ast.parse(UNPICKLING_MODULE.read_text())
    loads, offenders = 0, []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) in {"eval", "exec"}:
            offenders.append(f"{node.lineno} {node.func.id}()")  # type: ignore[attr-defined]
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
            base, attr = node.value.id, node.attr
            if base == "pickle" and attr not in {"Unpickler", "UnpicklingError"}:
                offenders.append(f"{node.lineno} pickle.{attr}")
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and getattr(node.func.value, "id", None) == "torch"
            and node.func.attr == "load"
        ):
            loads += 1
            flags = {k.arg: k.value for k in node.keywords}
            weights_only = flags.get("weights_only")
            if not (isinstance(weights_only, ast.Constant) and weights_only.value is True):
                offenders.append(f"{node.lineno} torch.load without weights_only=True")
        if isinstance(node, ast.ClassDef) and any(
            getattr(b, "attr", None) == "Unpickler" for b in node.bases
        ):
            methods = {f.name for f in node.body if isinstance(f, ast.FunctionDef)}
            if "find_class" not in methods:
                offenders.append(f"{node.lineno} an Unpickler without find_class")
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
            if any(n.split(".")[0] in {"cPickle", "dill", "cloudpickle", "marshal"} for n in names):
                offenders.append(f"{node.lineno} imports {names}")
    assert loads > 0 and not offenders, offenders


def test_no_print_in_the_library():
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "print":
                raise AssertionError(f"print() in {path.name}:{node.lineno}")


def test_stateful_protocol_matches_torch_objects():
    import torch

    model = torch.nn.Linear(1, 1)
    opt = torch.optim.SGD(model.parameters(), lr=1)
    sched = torch.optim.lr_scheduler.StepLR(opt, 1)
    for obj in (model, opt, sched, torch.amp.GradScaler("cpu")):
        assert isinstance(obj, ckpt.Stateful)
    assert not isinstance({}, ckpt.Stateful)


def test_os_errors_keep_their_errno_when_located():
    import errno

    for cls in (ckpt.CheckpointWriteError, ckpt.CheckpointReadError):
        located = cls("no space", key="model", errno=errno.ENOSPC).located("/r/step-1")
        assert type(located) is cls and isinstance(located, OSError)
        assert (located.errno, located.path, located.key) == (errno.ENOSPC, "/r/step-1", "model")
