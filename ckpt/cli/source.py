"""Where a command reads from: ``DIR[:STEP]`` arguments, and opening a read-only reader."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import fsspec

from ckpt.errors import CheckpointNotFoundError
from ckpt.format.names import MANIFEST_NAME
from ckpt.reading.manifests import ManifestReader

if TYPE_CHECKING:
    from ckpt.reading.reader import CheckpointReader

__all__ = [
    "Target",
    "no_checkpoint",
    "open_manifests",
    "open_reader",
    "parse_root",
    "parse_target",
    "require_root",
]

_STEP_SUFFIX = re.compile(r"(?P<root>.+):(?P<step>[0-9]+)")
_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*://")
_STEP_DIR = re.compile(r"step_(?P<step>[0-9]{12})")


@dataclass(frozen=True)
class Target:
    """A checkpoint root and, optionally, one step in it."""

    root: str
    step: int | None


def parse_target(text: str) -> Target:
    """Split ``DIR[:STEP]``: a trailing ``:`` and digits name a step, anything else is the root.

    URLs keep their scheme (``s3://b/run:12`` is step 12 of ``s3://b/run``;
    ``memory://x`` has no step). A local directory whose own name ends in
    ``:digits`` and exists is taken whole; append ``/`` to force that reading
    (``runs/a:12/``).

    Raises:
        ValueError: ``text`` is empty.
    """
    if not text:
        raise ValueError("the checkpoint directory is empty")
    found = _STEP_SUFFIX.fullmatch(text)
    if found is None:
        return Target(text, None)
    root = found["root"]
    if root.endswith("://") or (_URL.match(text) is None and os.path.isdir(text)):
        return Target(text, None)
    return Target(root, int(found["step"]))


def parse_root(text: str, command: str) -> str:
    """A ``DIR`` argument, read by :func:`parse_target`; a ``:STEP`` there is a usage error.

    Raises:
        ValueError: ``text`` is empty or names a step (``command`` takes a root only).
    """
    target = parse_target(text)
    if target.step is not None:
        raise ValueError(
            f"ckpt {command} takes a checkpoint root, not DIR:STEP ({text!r}); "
            f"append '/' if the directory's own name ends in ':{target.step}'"
        )
    return target.root


def root_exists(root: str, storage_options: dict[str, Any] | None) -> bool:
    """Whether the directory ``root`` exists (local path or fsspec URL); creates nothing."""
    if _URL.match(root) is None or root.startswith("file://"):
        path = root.removeprefix("file://")
        return os.path.isdir(path)  # a linked root is the reader's to accept or refuse
    fs, path = fsspec.core.url_to_fs(root, **(storage_options or {}))
    return bool(fs.isdir(path))


def require_root(root: str, storage_options: dict[str, Any] | None) -> None:
    """Raise unless the checkpoint root exists.

    Raises:
        CheckpointNotFoundError: It does not (nothing is created).
    """
    if not root_exists(root, storage_options):
        raise CheckpointNotFoundError("no such checkpoint directory", path=root)


def open_reader(root: str, storage_options: dict[str, Any] | None) -> CheckpointReader:
    """Open ``root`` read-only with :class:`ckpt.CheckpointReader`; it must exist.

    Raises:
        CheckpointNotFoundError: ``root`` does not exist (nothing is created).
    """
    from ckpt.reading.reader import CheckpointReader  # noqa: PLC0415 - imports torch

    require_root(root, storage_options)
    return CheckpointReader(root, storage_options=storage_options)


def open_manifests(root: str, storage_options: dict[str, Any] | None) -> ManifestReader:
    """Open ``root`` to list and describe it (``ls``, ``info``): manifests only, no torch.

    Raises:
        CheckpointNotFoundError: ``root`` does not exist (nothing is created).
    """
    require_root(root, storage_options)
    return ManifestReader(root, storage_options=storage_options)


_MAX_ENTRIES_LOOKED_AT = 1000


def _roots_inside(directory: str) -> list[str]:
    """Local subdirectories of ``directory`` holding a committed step (sorted, at most 3).

    A Lightning ``ModelCheckpoint`` directory, for one, holds one root per ``.ckpt``.
    Looks at no more than ``_MAX_ENTRIES_LOOKED_AT`` entries; never follows links.
    """
    roots: list[str] = []
    try:
        with os.scandir(directory) as entries:
            for count, entry in enumerate(entries):
                if count >= _MAX_ENTRIES_LOOKED_AT:
                    break
                if entry.is_dir(follow_symlinks=False) and _holds_a_step(entry.path):
                    roots.append(entry.name)
    except OSError:
        return []
    return sorted(roots)[:3]


def _holds_a_step(path: str) -> bool:
    try:
        with os.scandir(path) as entries:
            for count, entry in enumerate(entries):
                if count >= _MAX_ENTRIES_LOOKED_AT:
                    return False
                if _STEP_DIR.fullmatch(entry.name) and os.path.isfile(
                    os.path.join(entry.path, MANIFEST_NAME)
                ):
                    return True
    except OSError:
        return False
    return False


def no_checkpoint(directory: str) -> CheckpointNotFoundError:
    """The error for a root with no committed checkpoint (a step directory: its root).

    A local directory holding checkpoint roots (a Lightning ``ModelCheckpoint``
    directory) is named with up to three of them to pass instead.
    """
    name = os.path.basename(directory.rstrip("/"))
    found = _STEP_DIR.fullmatch(name)
    if found is None:
        inside = [] if _URL.match(directory) else _roots_inside(directory)
        if inside:
            listed = ", ".join(os.path.join(directory, root) for root in inside)
            return CheckpointNotFoundError(
                f"no committed checkpoint: this directory holds checkpoint roots; pass one: "
                f"{listed}",
                path=directory,
            )
        return CheckpointNotFoundError("no committed checkpoint", path=directory)
    parent = os.path.dirname(directory.rstrip("/")) or "."
    return CheckpointNotFoundError(
        f"no committed checkpoint: this is the directory of one step; pass the checkpoint "
        f"root, with the step if you want that one: {parent}:{int(found['step'])}",
        path=directory,
    )
