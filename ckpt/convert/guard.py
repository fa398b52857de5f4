"""Open an import source's files strictly, and bound what parsing them may cost (no pickle here).

An import reads a file or a directory the user named. The path the user typed
is followed (``last.ckpt`` may be a link Lightning made); below a source
directory nothing is followed: an entry that is a symbolic link, a FIFO, a
device or a socket is never opened. Files are opened with ``O_NONBLOCK`` and
checked with ``fstat`` on the open descriptor, so a FIFO can never block the
command and a file swapped after the check is still refused.

One exception, for the Hugging Face hub cache: a snapshot directory
(``models--org--name/snapshots/<revision>/``) holds links into
``../../blobs/``. A link there is followed when it resolves to a regular file
inside that repository's ``blobs`` directory, and refused otherwise.

Bounds (refused with :class:`ckpt.CorruptCheckpointError`, named file and key):
:data:`MAX_JSON_BYTES` per JSON file, :data:`MAX_METADATA_BYTES` for a DCP
``.metadata``, :data:`MAX_DEPTH` levels of nesting and :data:`MAX_NODES` values
(each visit counted, so shared references cannot multiply the work) in any
loaded object, and :data:`MAX_ENTRIES` entries in a source directory.
"""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Iterator, Mapping
from typing import Any, BinaryIO

import torch

from ckpt.errors import CheckpointNotFoundError, CorruptCheckpointError
from ckpt.storage.local import file_kind

__all__ = [
    "MAX_DEPTH",
    "MAX_ENTRIES",
    "MAX_JSON_BYTES",
    "MAX_METADATA_BYTES",
    "MAX_NODES",
    "check_shape",
    "check_tree",
    "hub_blobs",
    "open_source",
    "read_bounded",
    "source_entries",
]

MAX_JSON_BYTES = 64 * 2**20
"""The largest JSON file an import reads (``trainer_state.json``, an index, a config)."""
MAX_METADATA_BYTES = 256 * 2**20
"""The largest DCP ``.metadata`` an import reads."""
MAX_DEPTH = 100
"""The deepest nesting of dicts, lists and tuples an import accepts in a loaded value."""
MAX_NODES = 2_000_000
"""The most values (dict entries, list elements, tensors) an import walks in one loaded object."""
MAX_ENTRIES = 100_000
"""The most entries an import lists in a source directory."""

_FLAGS = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC


def _kind(mode: int) -> str:
    return file_kind(mode, "import never follows links out of the source")


def hub_blobs(directory: str) -> str | None:
    """The ``blobs`` directory of a Hugging Face hub-cache snapshot, or ``None``.

    ``directory`` is a snapshot when its parent is named ``snapshots`` and the
    grandparent holds a ``blobs`` directory.
    """
    real = os.path.realpath(directory)
    parent = os.path.dirname(real)
    if os.path.basename(parent) != "snapshots":
        return None
    blobs = os.path.join(os.path.dirname(parent), "blobs")
    return blobs if os.path.isdir(blobs) and not os.path.islink(blobs) else None


def _resolve(path: str, follow: bool, blobs: str | None) -> str:
    """The path to open: ``path`` itself, or a hub-cache link's target inside ``blobs``."""
    try:
        info = os.lstat(path)
    except FileNotFoundError as e:
        raise CheckpointNotFoundError("no such file", path=path) from e
    except OSError as e:
        raise CorruptCheckpointError(f"cannot read: {e.strerror or e}", path=path) from e
    if not stat.S_ISLNK(info.st_mode) or follow:
        return path
    target = os.path.realpath(path)
    if blobs is not None and os.path.dirname(target) == os.path.realpath(blobs):
        return target
    raise CorruptCheckpointError(f"is {_kind(info.st_mode)}", path=path)


@contextlib.contextmanager
def open_source(path: str, *, follow: bool = False, blobs: str | None = None) -> Iterator[BinaryIO]:
    """Open a regular file of an import source; never blocks, never follows a link out of it.

    Args:
        path: The file.
        follow: Follow ``path`` if it is a link (only for the path the user named).
        blobs: A hub-cache ``blobs`` directory that links may point into.

    Raises:
        CheckpointNotFoundError: No such file.
        CorruptCheckpointError: A link, FIFO, device, socket or directory.
    """
    real = _resolve(path, follow, blobs)
    try:
        fd = os.open(real, _FLAGS | (0 if follow else os.O_NOFOLLOW))
    except FileNotFoundError as e:
        raise CheckpointNotFoundError("no such file", path=path) from e
    except OSError as e:
        raise CorruptCheckpointError(f"cannot open: {e.strerror or e}", path=path) from e
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise CorruptCheckpointError(f"is {_kind(info.st_mode)}", path=path)
        f = os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise
    with f:
        yield f


def read_bounded(f: BinaryIO, limit: int, path: str) -> bytes:
    """All of an open file, refused past ``limit`` bytes (before reading them)."""
    size = os.fstat(f.fileno()).st_size
    if size > limit:
        raise CorruptCheckpointError(
            f"is {size} bytes, more than an import reads from such a file ({limit})", path=path
        )
    data = f.read(limit + 1)
    if len(data) > limit:
        raise CorruptCheckpointError(f"grew past {limit} bytes while read", path=path)
    return data


def source_entries(directory: str) -> list[tuple[str, str]]:
    """``(name, kind)`` of a source directory's entries, sorted; kind ``file`` or why not.

    A link into a hub-cache snapshot's ``blobs`` counts as a ``file``.

    Raises:
        CorruptCheckpointError: More than :data:`MAX_ENTRIES` entries, or unreadable.
    """
    blobs = hub_blobs(directory)
    out: list[tuple[str, str]] = []
    try:
        with os.scandir(directory) as it:
            for entry in it:
                if len(out) >= MAX_ENTRIES:
                    raise CorruptCheckpointError(
                        f"has more than {MAX_ENTRIES} entries", path=directory
                    )
                mode = entry.stat(follow_symlinks=False).st_mode
                kind = "file" if stat.S_ISREG(mode) else _kind(mode)
                if stat.S_ISLNK(mode) and blobs is not None:
                    target = os.path.realpath(entry.path)
                    if os.path.dirname(target) == os.path.realpath(blobs):
                        kind = "file" if os.path.isfile(target) else kind
                out.append((entry.name, kind))
    except OSError as e:
        raise CorruptCheckpointError(f"cannot list: {e.strerror or e}", path=directory) from e
    return sorted(out)


def check_shape(shape: Any, what: str, path: str, key: str) -> tuple[int, ...]:
    """A shape as ints >= 0 (at most 64 dimensions), else ``CorruptCheckpointError``."""
    if not isinstance(shape, (list, tuple)) or len(shape) > 64:
        raise CorruptCheckpointError(f"{what} is not a shape: {shape!r:.80}", path=path, key=key)
    out = []
    for d in shape:
        if isinstance(d, bool) or not isinstance(d, int) or d < 0:
            raise CorruptCheckpointError(
                f"{what} is not a shape: {shape!r:.80}", path=path, key=key
            )
        out.append(int(d))
    return tuple(out)


def check_tree(value: Any, path: str, key: str = "") -> None:
    """Refuse a value nested past :data:`MAX_DEPTH` levels or holding over :data:`MAX_NODES`.

    Walks without recursion, counting every visit (a list referenced a million
    times counts a million times), and stops at the first bound passed.
    """
    stack: list[tuple[Any, int]] = [(value, 0)]
    nodes = 0
    while stack:
        obj, depth = stack.pop()
        nodes += 1
        if nodes > MAX_NODES:
            raise CorruptCheckpointError(
                f"holds more than {MAX_NODES} values (counting shared ones each time)",
                path=path,
                key=key or None,
            )
        if isinstance(obj, (torch.Tensor, str, bytes, int, float)) or obj is None:
            continue
        if isinstance(obj, Mapping):
            children: Any = obj.values()
        elif isinstance(obj, (list, tuple)):
            children = obj
        else:
            continue
        if depth >= MAX_DEPTH:
            raise CorruptCheckpointError(
                f"is nested more than {MAX_DEPTH} levels deep", path=path, key=key or None
            )
        stack.extend((child, depth + 1) for child in children)
