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

from ckpt._version import __version__
from ckpt.converting import ImportReport, export, import_checkpoint
from ckpt.data import ResumableSampler, resumable_loader
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
)
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
