"""What export writes, and where it may write it (pure, apart from looking at the destination).

Names: a model saved from ``torch.compile(model)`` has ``_orig_mod.`` in its
keys, one wrapped in ``DataParallel`` or ``DistributedDataParallel`` starts
every key with ``module.``; inference tools load the bare model and would
silently leave those weights at their initial values. :func:`bare_names`
removes every ``_orig_mod`` component and a ``module.`` prefix that every key
carries.

Destinations: export never writes inside a checkpoint root (a directory with
ckpt's writer lock or committed step directories, or a step directory itself)
nor inside the checkpoint it reads: its files would replace a step's files.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import replace
from typing import Any

import torch

from ckpt.convert.source import ItemLayout
from ckpt.errors import CheckpointWriteError, IncompatibleCheckpointError
from ckpt.format import MANIFEST_NAME
from ckpt.format.names import parse_step_dir_name
from ckpt.saving.writer_lock import LOCK_NAME

__all__ = ["RenamedSource", "bare_names", "check_destination"]

_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*://")


def bare_names(keys: Iterable[str]) -> dict[str, str]:
    """``{key: bare key}`` without ``_orig_mod.`` components and a ``module.`` on every key.

    Raises:
        IncompatibleCheckpointError: Two keys would get the same bare name.
    """
    keys = list(keys)
    out = {k: ".".join(p for p in k.split(".") if p != "_orig_mod") for k in keys}
    while out and all(v.startswith("module.") for v in out.values()):
        out = {k: v.removeprefix("module.") for k, v in out.items()}
    seen: dict[str, str] = {}
    for key, bare in out.items():
        if bare in seen:
            raise IncompatibleCheckpointError(
                f"{seen[bare]!r} and {key!r} both become {bare!r} without their wrapper "
                "prefixes; export with strip_prefixes=False (--keep-prefixes)",
                key=key,
            )
        seen[bare] = key
    return out


class RenamedSource:
    """An item source whose keys are renamed (the layout and the tensors it yields)."""

    def __init__(self, source: Any, names: dict[str, str]) -> None:
        self._source, self._names = source, names
        old: ItemLayout = source.layout
        self.layout = replace(
            old,
            entries=tuple(replace(e, key=names[e.key]) for e in old.entries),
            aliases={names[k]: names[v] for k, v in old.aliases.items()},
            order=tuple(names[k] for k in old.order),
        )

    def tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """The source's tensors under their new names."""
        for key, t in self._source.tensors():
            yield self._names[key], t


def _local(directory: str) -> str | None:
    if directory.startswith("file://"):
        return directory.removeprefix("file://")
    return None if _URL.match(directory) else directory


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def _is_root(path: str) -> bool:
    """A ckpt root (its writer lock, or a committed step) or one of its step directories."""
    if parse_step_dir_name(os.path.basename(path)) is not None and os.path.isfile(
        os.path.join(path, MANIFEST_NAME)
    ):
        return True
    if os.path.lexists(os.path.join(path, LOCK_NAME)):
        return True
    try:
        names = os.listdir(path)
    except OSError:
        return False
    return any(
        parse_step_dir_name(n) is not None and os.path.isfile(os.path.join(path, n, MANIFEST_NAME))
        for n in names
    )


def check_destination(directory: str, out_dir: str) -> None:
    """Refuse an export destination inside the source checkpoint or any checkpoint root.

    Raises:
        CheckpointWriteError: ``out_dir`` is, or lies inside, such a directory.
    """
    out_real = os.path.realpath(out_dir)
    local = _local(directory)
    if local is not None and _inside(out_real, os.path.realpath(local)):
        raise CheckpointWriteError(
            f"the export destination is inside the checkpoint it reads ({directory}); "
            "choose a directory outside it",
            path=out_dir,
        )
    path = out_real
    while True:
        if _is_root(path):
            raise CheckpointWriteError(
                f"the export destination is inside the checkpoint root {path}: its files "
                "would replace a checkpoint's; choose a directory outside it",
                path=out_dir,
            )
        parent = os.path.dirname(path)
        if parent == path:
            return
        path = parent
