"""ckpt: exact, durable, pickle-free checkpoints for PyTorch training.

Example:
    >>> import ckpt
    >>> mgr = ckpt.CheckpointManager("runs/exp1", keep_last=3, every_steps=500)
    >>> info = mgr.restore(model=model, optimizer=optimizer, scheduler=scheduler)
    >>> start = 0 if info is None else info.next_step
    >>> for step in range(start, total_steps):
    ...     train_one_step()
    ...     if mgr.should_save(step):
    ...         mgr.save(step, model=model, optimizer=optimizer, scheduler=scheduler)
"""

import importlib as _importlib
import sys as _sys
import types as _types
import typing as _typing

from ckpt._version import __version__
from ckpt.converting import ImportReport, export, import_checkpoint
from ckpt.errors import (
    CheckpointError,
    CheckpointExistsError,
    CheckpointLockedError,
    CheckpointNotFoundError,
    CheckpointReadError,
    CheckpointWriteError,
    CollectiveError,
    CorruptCheckpointError,
    IncompatibleCheckpointError,
    InexactResumeError,
    PartialRestoreError,
    RankMismatchError,
)

if _typing.TYPE_CHECKING:
    from ckpt.data import ResumableSampler, resumable_loader
    from ckpt.format.limits import MAX_STEP
    from ckpt.manager import Checkpoint, CheckpointManager
    from ckpt.policies.retention import RetentionPolicy
    from ckpt.reading.describe import Description, ItemInfo, TensorInfo
    from ckpt.reading.reader import CheckpointReader
    from ckpt.restoring.locations import MapLocation
    from ckpt.saving.writer import CheckpointWriter
    from ckpt.state.items import Stateful
    from ckpt.tiers import Tier
    from ckpt.verification import ResumeReport, verify_resume

_LAZY = {
    "Checkpoint": "ckpt.manager",
    "CheckpointManager": "ckpt.manager",
    "CheckpointReader": "ckpt.reading.reader",
    "CheckpointWriter": "ckpt.saving.writer",
    "Description": "ckpt.reading.describe",
    "ItemInfo": "ckpt.reading.describe",
    "MAX_STEP": "ckpt.format.limits",
    "MapLocation": "ckpt.restoring.locations",
    "ResumableSampler": "ckpt.data",
    "ResumeReport": "ckpt.verification",
    "RetentionPolicy": "ckpt.policies.retention",
    "Stateful": "ckpt.state.items",
    "TensorInfo": "ckpt.reading.describe",
    "Tier": "ckpt.tiers",
    "resumable_loader": "ckpt.data",
    "verify_resume": "ckpt.verification",
}
"""Public names imported on first use (each from its module, once): ``import ckpt`` then
imports neither torch nor the saving and restoring machinery, so that ``ckpt ls`` and
``ckpt info``, which read manifests only, start without them."""


def __getattr__(name: str) -> _typing.Any:
    module = _LAZY.get(name)
    if module is None:
        return _submodule(name)
    value = getattr(_importlib.import_module(module), name)
    globals()[name] = value
    return value


def _submodule(name: str) -> _typing.Any:
    """``ckpt.storage`` after ``import ckpt``, as when this package imported every module."""
    if name.startswith("_"):
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    try:
        return _importlib.import_module(f"{__name__}.{name}")
    except ModuleNotFoundError as e:
        if e.name != f"{__name__}.{name}":
            raise
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


__all__ = [
    "Checkpoint",
    "CheckpointError",
    "CheckpointExistsError",
    "CheckpointLockedError",
    "CheckpointManager",
    "CheckpointNotFoundError",
    "CheckpointReadError",
    "CheckpointReader",
    "CheckpointWriteError",
    "CheckpointWriter",
    "CollectiveError",
    "CorruptCheckpointError",
    "Description",
    "ImportReport",
    "IncompatibleCheckpointError",
    "InexactResumeError",
    "ItemInfo",
    "MAX_STEP",
    "MapLocation",
    "PartialRestoreError",
    "RankMismatchError",
    "ResumableSampler",
    "ResumeReport",
    "RetentionPolicy",
    "Stateful",
    "TensorInfo",
    "Tier",
    "__version__",
    "export",
    "import_checkpoint",
    "resumable_loader",
    "verify_resume",
]


class _Package(_types.ModuleType):
    """This package's module type: its namespace, looked at whole, holds every public name.

    ``vars(ckpt)`` (and anything else reading ``ckpt.__dict__``) first imports the
    names of :data:`_LAZY` not used yet; attribute access (``ckpt.X``, ``from ckpt
    import X``) imports only the name asked for.
    """

    @property
    def __dict__(self) -> dict[str, _typing.Any]:  # type: ignore[override]
        namespace = globals()
        for name in _LAZY:
            if name not in namespace:
                __getattr__(name)
        return namespace


_sys.modules[__name__].__class__ = _Package
