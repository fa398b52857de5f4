"""ckpt as Lightning's checkpoint storage: ``Trainer(plugins=[CheckpointIO()])``.

Lightning hands its checkpoint dict (``state_dict``, optimizer and scheduler
states, loops, callbacks, hyper-parameters, versions) to a ``CheckpointIO``
with a path such as ``checkpoints/epoch=0-step=100.ckpt``. This one stores it
in ckpt's format at that path, which becomes a ckpt root holding one
checkpoint (numbered by ``global_step``; the module's weights in the item
``model``, the rest of the dict in the item ``lightning``):
no pickle, committed atomically, every file checksummed, readable with the
``ckpt`` command (``ls``, ``info``, ``verify``, ``export``). Saving the same
path again (``last.ckpt``) replaces it atomically. Importing this module
imports Lightning; ``import ckpt`` does not. It also lets
``LightningModule.load_from_checkpoint`` (and ``LightningDataModule``'s) read a
checkpoint this plugin wrote: Lightning reads a path with ``torch.load``, which
cannot open a directory, so a local directory is read here instead (one that
is not a ckpt checkpoint raises a ``CheckpointError``; files and URLs still go
to Lightning).

Example:
    >>> from ckpt.integrations.lightning import CheckpointIO
    >>> trainer = lightning.Trainer(plugins=[CheckpointIO()])
    >>> trainer.fit(model, ckpt_path="checkpoints/last.ckpt")  # resumes from ckpt's format
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import threading
from collections.abc import Callable, Mapping
from typing import Any

import torch
from lightning.fabric.plugins.io.checkpoint_io import CheckpointIO as _LightningCheckpointIO
from lightning.pytorch.core import saving as _lightning_saving

from ckpt.errors import CheckpointNotFoundError, CheckpointWriteError
from ckpt.manager import CheckpointManager
from ckpt.restoring.locations import MapLocation
from ckpt.storage import open_storage

__all__ = ["ITEM", "MODEL_ITEM", "CheckpointIO"]

ITEM = "lightning"
"""The item under which Lightning's checkpoint dict is stored (less ``state_dict``)."""

MODEL_ITEM = "model"
"""The item holding the LightningModule's ``state_dict`` when it maps names to tensors
(what ``ckpt export`` reads by default)."""

logger = logging.getLogger(__name__)


def _items(checkpoint: Mapping[str, Any]) -> dict[str, Any]:
    """The ckpt items of a Lightning checkpoint: its model weights apart when they are flat."""
    rest = _plain(checkpoint)
    weights = rest.get("state_dict")
    if isinstance(weights, dict) and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in weights.items()
    ):
        del rest["state_dict"]
        return {ITEM: rest, MODEL_ITEM: weights}
    return {ITEM: rest}


def _epoch(checkpoint: Mapping[str, Any]) -> int | None:
    epoch = checkpoint.get("epoch")
    return epoch if isinstance(epoch, int) and not isinstance(epoch, bool) and epoch >= 0 else None


def _plain(value: Any) -> Any:
    """Lightning's dict with its dict subclasses (``OrderedDict``, ``AttributeDict``) as dicts."""
    if isinstance(value, Mapping):
        return {key: _plain(child) for key, child in value.items()}
    if isinstance(value, list):
        return [_plain(child) for child in value]
    if type(value) is tuple:  # a namedtuple stays as it is (and is refused by name)
        return tuple(_plain(child) for child in value)
    return value


class CheckpointIO(_LightningCheckpointIO):  # type: ignore[misc,unused-ignore]
    """Lightning's ``CheckpointIO`` plugin, writing ckpt checkpoints (no pickle, atomic, checked).

    Use it as ``Trainer(plugins=[CheckpointIO()])``, or wrapped for background
    saves: ``Trainer(plugins=[AsyncCheckpointIO(CheckpointIO())])``.
    ``ModelCheckpoint`` (``save_top_k``, ``save_last``, ``every_n_train_steps``) and
    ``Trainer.fit(ckpt_path=...)`` work unchanged.

    Args:
        storage_options: fsspec options for paths that are URLs.
        verify: Check every file against its checksum when loading.
    """

    def __init__(self, storage_options: dict[str, Any] | None = None, verify: bool = True):
        super().__init__()
        self.storage_options = storage_options
        self.verify = verify
        # Managers are private to this process (process_group=False): under strategy="ddp"
        # Lightning saves on rank 0 alone, and a collective manager would wait for the others.
        # AsyncCheckpointIO saves in a thread while ModelCheckpoint removes top-k losers in
        # the main one: a removal waits for the save in progress instead of breaking it.
        self._lock = threading.Lock()

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None
    ) -> None:
        """Store Lightning's checkpoint dict at ``path`` (a ckpt root), replacing what is there.

        Raises:
            TypeError: A value cannot be stored without pickle; the message names its key
                path (e.g. an object in ``hyper_parameters``: store plain values, or leave
                it out with ``save_hyperparameters(ignore=[...])``).
            CheckpointWriteError: Writing failed, or a file (one ``torch.save`` wrote?) is at
                ``path``; what ``path`` held before is intact.
        """
        options = storage_options if storage_options is not None else self.storage_options
        if os.path.isfile(os.fspath(path)):
            raise CheckpointWriteError(
                "a file is in the way (a checkpoint Lightning's default CheckpointIO wrote?): "
                "ckpt stores a directory at this path and does not delete the file; move or "
                "remove it, or give ModelCheckpoint another dirpath",
                path=os.fspath(path),
                errno=errno.EEXIST,
            )
        step = checkpoint.get("global_step", 0)
        step = step if isinstance(step, int) and not isinstance(step, bool) and step >= 0 else 0
        with (
            self._lock,
            CheckpointManager(
                os.fspath(path), keep_last=1, storage_options=options, process_group=False
            ) as manager,
        ):
            try:
                manager.save(
                    step, epoch=_epoch(checkpoint), rng=False, overwrite=True, **_items(checkpoint)
                )
            except TypeError as e:
                raise TypeError(
                    f"Lightning checkpoint for {os.fspath(path)!r}: {e}. ckpt stores tensors, "
                    "numbers, strings, None, lists, tuples and dicts; store plain values "
                    "instead, or leave the object out of the checkpoint (for hyper-parameters: "
                    "save_hyperparameters(ignore=[...]))"
                ) from e

    def load_checkpoint(
        self, path: Any, map_location: Any | None = None, weights_only: bool | None = None
    ) -> dict[str, Any]:
        """Return the checkpoint dict stored at ``path`` (tensors on ``map_location``, else CPU).

        ``weights_only`` is accepted for Lightning's sake: nothing here runs code on load.

        Raises:
            CheckpointNotFoundError: Nothing is stored at ``path``.
            CorruptCheckpointError: A file is damaged or fails its checksum.
        """
        location: MapLocation = "cpu" if map_location is None else map_location
        if os.path.isfile(os.fspath(path)):
            raise CheckpointNotFoundError(
                "a file, not a ckpt checkpoint (one torch.save wrote, through Lightning's "
                "default CheckpointIO?): resume from it without this plugin, or, if you trust "
                "the file, convert it once: CheckpointIO().save_checkpoint(TorchCheckpointIO()"
                ".load_checkpoint(old, weights_only=False), new)",
                path=os.fspath(path),
            )
        manager = CheckpointManager(
            os.fspath(path), storage_options=self.storage_options, process_group=False
        )
        state = manager.read(map_location=location, verify=self.verify)
        if not isinstance(state.get(ITEM), dict):
            raise CheckpointNotFoundError(
                "not a Lightning checkpoint written by ckpt", path=os.fspath(path), key=ITEM
            )
        checkpoint: dict[str, Any] = state[ITEM]
        if MODEL_ITEM in state:
            checkpoint["state_dict"] = state[MODEL_ITEM]
        return checkpoint

    def remove_checkpoint(self, path: Any) -> None:
        """Remove the checkpoint at ``path`` (nothing when it is gone already)."""
        parent, name = os.path.split(os.fspath(path).rstrip("/"))
        with self._lock:
            open_storage(parent or ".", self.storage_options).remove_tree(name)


def _is_local_directory(path: Any) -> bool:
    """Whether ``path`` is a local directory: a ckpt root, never a file ``torch.load`` reads."""
    return isinstance(path, (str, os.PathLike)) and os.path.isdir(os.fspath(path))


def _reading_ckpt_roots(load: Callable[..., Any]) -> Callable[..., Any]:
    """Lightning's ``pl_load``, reading a ckpt root with :class:`CheckpointIO` instead."""
    if getattr(load, "_ckpt_reads_roots", False):
        return load

    @functools.wraps(load)
    def pl_load(path_or_url: Any, map_location: Any = None, weights_only: Any = None) -> Any:
        if _is_local_directory(path_or_url):  # a ckpt root, or a clear CheckpointError
            return CheckpointIO().load_checkpoint(path_or_url, map_location=map_location)
        return load(path_or_url, map_location=map_location, weights_only=weights_only)

    pl_load._ckpt_reads_roots = True  # type: ignore[attr-defined]
    return pl_load


# Lightning's internal loader (lightning.pytorch.core.saving.pl_load, as of
# lightning 2.6); a Lightning without it keeps its own loading, the plugin unaffected.
if callable(getattr(_lightning_saving, "pl_load", None)):
    _lightning_saving.pl_load = _reading_ckpt_roots(_lightning_saving.pl_load)  # type: ignore[attr-defined]
