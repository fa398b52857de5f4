"""ckpt: exact, durable, pickle-free checkpoints for PyTorch training.

Example:
    >>> import ckpt
    >>> mgr = ckpt.CheckpointManager("runs/exp1", keep_last=3)
    >>> info = mgr.restore(model=model, optimizer=optimizer)
    >>> start = 0 if info is None else info.step + 1
    >>> for step in range(start, total_steps):
    ...     train_one_step()
    ...     mgr.save(step, epoch=epoch, model=model, optimizer=optimizer)
"""

from ckpt._version import __version__
from ckpt.errors import (
    CheckpointError,
    CheckpointExistsError,
    CheckpointNotFoundError,
    CorruptCheckpointError,
    IncompatibleCheckpointError,
)
from ckpt.items import Stateful
from ckpt.locations import MapLocation
from ckpt.manager import Checkpoint, CheckpointManager

__all__ = [
    "Checkpoint",
    "CheckpointError",
    "CheckpointExistsError",
    "CheckpointManager",
    "CheckpointNotFoundError",
    "CorruptCheckpointError",
    "IncompatibleCheckpointError",
    "MapLocation",
    "Stateful",
    "__version__",
]
