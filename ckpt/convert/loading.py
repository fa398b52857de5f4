"""Load foreign checkpoint files without running their code; the one module that touches pickle.

``torch.save`` files (the zip format of torch >= 1.6) go through
``torch.load(weights_only=True)`` only, memory mapped; safetensors files are memory mapped; a DCP
directory's ``.metadata`` goes through an unpickler that admits DCP's own
metadata classes and a short list of torch and standard types, and refuses
anything else before it is constructed. :func:`save_torch` writes the plain
``torch.save`` state dict of ``ckpt export --format pt``. ``tests/test_api.py``
allows pickle here only, and checks every ``torch.load`` passes ``weights_only=True``.
"""

from __future__ import annotations

import io
import mmap
import os
import pickle
import re
from collections.abc import Mapping
from typing import Any

import torch

from ckpt.convert.guard import (
    MAX_JSON_BYTES,
    MAX_METADATA_BYTES,
    check_tree,
    open_source,
    read_bounded,
)
from ckpt.errors import CorruptCheckpointError
from ckpt.format.tensorfile import parse_header
from ckpt.state.tree import loads_strict

__all__ = [
    "load_bytes",
    "load_dcp_metadata",
    "load_json",
    "load_safetensors",
    "load_torch",
    "save_torch",
]


def load_torch(path: str, *, follow: bool = False, blobs: str | None = None) -> Any:
    """``torch.load(weights_only=True)`` of a regular file, on CPU, memory mapped when it allows.

    The file is opened once (:func:`ckpt.convert.guard.open_source`: no FIFO, no
    link out of the source) and loaded through that descriptor, so what is
    loaded is the file that was checked.

    Args:
        path: The file.
        follow: Follow ``path`` if it is a link (the path the user named).
        blobs: A hub-cache ``blobs`` directory links may point into.

    Raises:
        CheckpointNotFoundError: No such file.
        CorruptCheckpointError: ``weights_only`` refuses the file (it would need to
            run code, or build an unknown class; the message names the global), it
            is not a zip-format ``torch.save`` file (torch >= 1.6), or not a regular
            file.
    """
    with open_source(path, follow=follow, blobs=blobs) as f:
        if f.read(4) != _ZIP_MAGIC:
            raise CorruptCheckpointError(
                "not a torch.save file in the zip format torch has written since 1.6: an "
                "older file declares storage sizes torch allocates before they can be "
                "checked, so ckpt does not read it (re-save it with a current torch)",
                path=path,
            )
        f.seek(0)
        by_fd = f"/proc/self/fd/{f.fileno()}"
        mapped = os.path.exists(by_fd)  # the descriptor checked, reopened by path for mmap
        value = _torch_load(by_fd if mapped else f, path, mapped=mapped)
    check_tree(value, path)
    return value


_ZIP_MAGIC = b"PK\x03\x04"


def _torch_load(target: Any, path: str, *, mapped: bool) -> Any:
    try:
        return torch.load(target, map_location="cpu", weights_only=True, mmap=mapped)
    except pickle.UnpicklingError as e:
        raise _refused(path, e) from e
    except RecursionError as e:
        raise CorruptCheckpointError("nested too deeply to load", path=path) from e
    except MemoryError as e:
        raise CorruptCheckpointError("declares more data than memory holds", path=path) from e
    except Exception as e:
        raise CorruptCheckpointError(
            f"not a loadable torch.save file: {_short(e)}", path=path
        ) from e


def _short(e: BaseException) -> str:
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(e)).strip().splitlines()
    return (text[0] if text else type(e).__name__)[:300]


def save_torch(state: dict[str, torch.Tensor], path: str) -> None:
    """``torch.save(state, path)``: a plain state dict of tensors, for tools that need one."""
    torch.save(state, path)


_GLOBAL = re.compile(r"(?:GLOBAL|global)\s+([A-Za-z_][\w.]*)")


def _refused(path: str, e: BaseException) -> CorruptCheckpointError:
    """Name the global ``weights_only`` refused; torch's advice to turn it off is not repeated."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(e))
    found = _GLOBAL.search(text)
    what = f"the global {found.group(1)}" if found else "an object that is not plain data"
    return CorruptCheckpointError(
        f"refused by torch.load(weights_only=True): the file needs {what}, which is not "
        "a tensor or plain data; ckpt never unpickles anything else (nothing was run). If "
        "you trust the file, load it yourself and save its state dicts with ckpt",
        path=path,
    )


def load_json(path: str, *, blobs: str | None = None) -> Any:
    """A JSON file (at most :data:`~ckpt.convert.guard.MAX_JSON_BYTES`, nesting bounded).

    Raises:
        CorruptCheckpointError: Unreadable, too large, too deep, or not strict JSON.
    """
    with open_source(path, blobs=blobs) as f:
        raw = read_bounded(f, MAX_JSON_BYTES, path)
    try:
        value = loads_strict(raw)
    except RecursionError as e:
        raise CorruptCheckpointError("JSON nested too deeply", path=path) from e
    except ValueError as e:
        raise CorruptCheckpointError(f"not valid JSON: {_short(e)}", path=path) from e
    check_tree(value, path)
    return value


def load_safetensors(
    path: str, *, follow: bool = False, blobs: str | None = None
) -> dict[str, torch.Tensor]:
    """A safetensors file's tensors, memory mapped copy-on-write (read lazily, never copied).

    The header is checked as ckpt checks its own files: offsets in order, no
    gaps or overlaps, sizes that agree with shapes and with the file's size.

    Raises:
        CorruptCheckpointError: A malformed file, or not a regular file.
    """
    with open_source(path, follow=follow, blobs=blobs) as f:
        try:
            size = os.fstat(f.fileno()).st_size
            mapped: Any = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY) if size else b""
        except (OSError, ValueError) as e:
            raise CorruptCheckpointError(f"cannot read: {e}", path=path) from e
    n = int.from_bytes(mapped[:8], "little") if size >= 8 else 0
    entries, _, data_start = parse_header(bytes(mapped[: 8 + min(n, size)]), size, path)
    out = {}
    for name, entry in entries.items():
        if entry.nbytes == 0:
            out[name] = torch.empty(entry.shape, dtype=entry.dtype)
            continue
        flat = torch.frombuffer(
            mapped, dtype=torch.uint8, count=entry.nbytes, offset=data_start + entry.begin
        )
        out[name] = flat.view(entry.dtype).reshape(entry.shape)
    return out


_DCP_MODULES = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.filesystem")
_DCP_CLASSES = frozenset(
    {
        "Metadata",
        "TensorStorageMetadata",
        "BytesStorageMetadata",
        "ChunkStorageMetadata",
        "TensorProperties",
        "MetadataIndex",
        "StorageMeta",
        "_MEM_FORMAT_ENCODING",
        "_StorageInfo",
        "_ExtensionDescriptor",
    }
)
_OTHER = {
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("collections", "OrderedDict"),
    ("builtins", "set"),
    ("builtins", "frozenset"),
    ("pathlib", "PosixPath"),
    ("pathlib", "PurePosixPath"),
    ("pathlib", "WindowsPath"),
    ("pathlib", "PureWindowsPath"),
}


class _DcpUnpickler(pickle.Unpickler):
    """Admits DCP's metadata classes, torch dtypes and a few standard types; nothing else."""

    def __init__(self, f: io.BytesIO, path: str) -> None:
        super().__init__(f)
        self.path = path

    def find_class(self, module: str, name: str) -> Any:
        if module in _DCP_MODULES and name in _DCP_CLASSES:
            return super().find_class(module, name)
        if (module, name) in _OTHER:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise CorruptCheckpointError(
            f"DCP metadata refers to {module}.{name}, which is not one of DCP's metadata "
            "classes or the torch types they use: refused (nothing was run)",
            path=self.path,
        )


def load_dcp_metadata(directory: str) -> Any:
    """Unpickle a DCP directory's ``.metadata`` with the restricted unpickler.

    Raises:
        CheckpointNotFoundError: No ``.metadata``.
        CorruptCheckpointError: Not a regular file, larger than
            :data:`~ckpt.convert.guard.MAX_METADATA_BYTES`, malformed, or naming
            a class other than DCP's metadata classes (nothing is constructed).
    """
    path = os.path.join(directory, ".metadata")
    with open_source(path) as f:
        raw = read_bounded(f, MAX_METADATA_BYTES, path)
    try:
        return _DcpUnpickler(io.BytesIO(raw), path).load()
    except CorruptCheckpointError:
        raise
    except RecursionError as e:
        raise CorruptCheckpointError("DCP metadata nested too deeply", path=path) from e
    except Exception as e:
        raise CorruptCheckpointError(f"malformed DCP metadata: {_short(e)}", path=path) from e


def load_bytes(data: bytes, path: str, key: str) -> Any:
    """``torch.load(weights_only=True)`` of one stored value's bytes (a DCP chunk).

    Raises:
        CorruptCheckpointError: Refused or malformed; names ``path`` and ``key``.
    """
    if data[:4] != _ZIP_MAGIC:
        raise CorruptCheckpointError(
            "a stored value is not in torch.save's zip format", path=path, key=key
        )
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise _refused(path, e) from e
    except Exception as e:
        raise CorruptCheckpointError(
            f"cannot load a stored value: {_short(e)}", path=path, key=key
        ) from e


def is_mapping_of_tensors(value: object) -> bool:
    """A mapping whose values are all tensors."""
    return isinstance(value, Mapping) and all(isinstance(v, torch.Tensor) for v in value.values())
