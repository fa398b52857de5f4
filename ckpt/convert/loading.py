"""Load foreign checkpoint files without running their code; the one module that touches pickle.

``torch.save`` files go through ``torch.load(weights_only=True)`` only (memory
mapped when the file allows it); safetensors files are memory mapped; a DCP
directory's ``.metadata`` goes through an unpickler that admits DCP's own
metadata classes and a short list of torch and standard types, and refuses
anything else before it is constructed. :func:`save_torch` writes the plain
``torch.save`` state dict of ``ckpt export --format pt``. ``tests/test_api.py``
allows pickle here only, and checks every ``torch.load`` passes ``weights_only=True``.
"""

from __future__ import annotations

import io
import json
import mmap
import os
import pickle
import re
from collections.abc import Mapping
from typing import Any

import torch

from ckpt.errors import CheckpointNotFoundError, CorruptCheckpointError
from ckpt.tensorfile import parse_header

__all__ = ["load_dcp", "load_json", "load_safetensors", "load_torch", "save_torch"]


def load_torch(path: str) -> Any:
    """``torch.load(path, weights_only=True)`` on CPU, memory mapped when the file allows it.

    Raises:
        CheckpointNotFoundError: No such file.
        CorruptCheckpointError: ``weights_only`` refuses the file (it would need to
            run code, or build an unknown class) or it is not a ``torch.save`` file.
    """
    if not os.path.isfile(path):
        raise CheckpointNotFoundError("no such file", path=path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as e:
        raise _refused(path, e) from e
    except RuntimeError as e:
        if "mmap" not in str(e) and "zip" not in str(e):
            raise CorruptCheckpointError(f"not a loadable torch.save file: {e}", path=path) from e
    try:  # an old (non-zip) torch.save file cannot be mapped
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise _refused(path, e) from e
    except Exception as e:
        raise CorruptCheckpointError(f"not a loadable torch.save file: {e}", path=path) from e


def save_torch(state: dict[str, torch.Tensor], path: str) -> None:
    """``torch.save(state, path)``: a plain state dict of tensors, for tools that need one."""
    torch.save(state, path)


def _refused(path: str, e: BaseException) -> CorruptCheckpointError:
    lines = [re.sub(r"\x1b\[[0-9;]*m", "", line).strip() for line in str(e).splitlines()]
    lines = [line for line in lines if line]
    why = [line for line in lines if "Unsupported" in line or "WeightsUnpickler" in line]
    first = (why or lines or [type(e).__name__])[0]
    return CorruptCheckpointError(
        "torch.load(weights_only=True) refused this file: it holds objects other than "
        f"tensors and plain data ({first}). ckpt never unpickles anything else; if you "
        "trust the file, load it yourself and save its state dicts with ckpt",
        path=path,
    )


def load_json(path: str) -> Any:
    """A JSON file, or ``CorruptCheckpointError`` naming it."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise CorruptCheckpointError(f"cannot read JSON: {e}", path=path) from e


def load_safetensors(path: str) -> dict[str, torch.Tensor]:
    """A safetensors file's tensors, memory mapped copy-on-write (read lazily, never copied).

    Raises:
        CorruptCheckpointError: A malformed file.
    """
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY) if size else b""
    except OSError as e:
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
    """Unpickle a DCP directory's ``.metadata`` with the restricted unpickler."""
    path = os.path.join(directory, ".metadata")
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError as e:
        raise CheckpointNotFoundError("not a DCP checkpoint: no .metadata", path=path) from e
    except OSError as e:
        raise CorruptCheckpointError(f"cannot read: {e}", path=path) from e
    try:
        return _DcpUnpickler(io.BytesIO(raw), path).load()
    except CorruptCheckpointError:
        raise
    except Exception as e:
        raise CorruptCheckpointError(f"malformed DCP metadata: {e}", path=path) from e


def _read_slice(directory: str, info: Any, fqn: str) -> bytes:
    rel = getattr(info, "relative_path", None)
    offset, length = getattr(info, "offset", None), getattr(info, "length", None)
    if getattr(info, "transform_descriptors", None):
        raise CorruptCheckpointError(
            f"{fqn!r} is stored with transforms {info.transform_descriptors}, not supported",
            path=directory,
        )
    if (
        not isinstance(rel, str)
        or os.path.basename(rel) != rel
        or rel in ("", ".", "..")
        or not isinstance(offset, int)
        or not isinstance(length, int)
        or offset < 0
        or length < 0
    ):
        raise CorruptCheckpointError(f"bad storage record for {fqn!r}: {info!r}", path=directory)
    path = os.path.join(directory, rel)
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            data = f.read(length)
    except OSError as e:
        raise CorruptCheckpointError(f"cannot read {fqn!r}: {e}", path=path) from e
    if len(data) != length:
        raise CorruptCheckpointError(f"file ends inside {fqn!r}", path=path)
    return data


def _load_bytes(data: bytes, path: str, fqn: str) -> Any:
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise _refused(f"{path} [{fqn}]", e) from e
    except Exception as e:
        raise CorruptCheckpointError(f"cannot load {fqn!r}: {e}", path=path) from e


def load_dcp(directory: str) -> tuple[dict[str, Any], dict[str, str]]:
    """Every value of a DCP checkpoint, as the nested state that was saved.

    Each tensor is assembled whole from its chunks (read by the metadata's
    storage offsets); other values are loaded with ``weights_only=True``.

    Returns:
        The nested state (keys as DCP's planner recorded them; DCP writes the int
        keys of optimizer states as strings) and ``{key: why}`` for values that
        could not be loaded.
    """
    metadata = load_dcp_metadata(directory)
    by_fqn: dict[str, list[tuple[Any, Any]]] = {}
    for index, info in getattr(metadata, "storage_data", {}).items():
        by_fqn.setdefault(getattr(index, "fqn", ""), []).append((index, info))
    planner = getattr(metadata, "planner_data", None) or {}
    state: dict[str, Any] = {}
    failed: dict[str, str] = {}
    for fqn, meta in getattr(metadata, "state_dict_metadata", {}).items():
        stored = by_fqn.get(fqn, [])
        try:
            if hasattr(meta, "chunks"):
                value: Any = _assemble(directory, fqn, meta, stored)
            else:
                if len(stored) != 1:
                    raise CorruptCheckpointError(f"{fqn!r} has no stored bytes", path=directory)
                value = _load_bytes(_read_slice(directory, stored[0][1], fqn), directory, fqn)
        except CorruptCheckpointError as e:
            failed[fqn] = str(e)
            continue
        path = planner.get(fqn, (fqn,))
        _put(state, tuple(path), value)
    return state, failed


def _assemble(directory: str, fqn: str, meta: Any, stored: list[tuple[Any, Any]]) -> torch.Tensor:
    dtype = meta.properties.dtype
    full = torch.empty(tuple(meta.size), dtype=dtype)
    by_offset = {tuple(getattr(i, "offset", None) or ()): info for i, info in stored}
    for chunk in meta.chunks:
        offsets, sizes = tuple(chunk.offsets), tuple(chunk.sizes)
        info = by_offset.get(offsets)
        if info is None and len(stored) == 1 and len(meta.chunks) == 1:
            info = stored[0][1]
        if info is None:
            raise CorruptCheckpointError(f"a chunk of {fqn!r} has no stored bytes", path=directory)
        part = _load_bytes(_read_slice(directory, info, fqn), directory, fqn)
        if not isinstance(part, torch.Tensor) or tuple(part.shape) != sizes:
            raise CorruptCheckpointError(
                f"a chunk of {fqn!r} is not its recorded tensor", path=directory
            )
        target = full
        for dim, (o, s) in enumerate(zip(offsets, sizes, strict=True)):
            target = target.narrow(dim, o, s)
        target.copy_(part)
    return full


def _put(state: dict[str, Any], path: tuple[Any, ...], value: Any) -> None:
    node: Any = state
    for i, key in enumerate(path[:-1]):
        nxt = path[i + 1]
        if isinstance(node, list):
            while len(node) <= key:
                node.append(None)
            if node[key] is None:
                node[key] = [] if isinstance(nxt, int) else {}
            node = node[key]
        else:
            node = node.setdefault(key, [] if isinstance(nxt, int) else {})
    last = path[-1]
    if isinstance(node, list):
        while len(node) <= last:
            node.append(None)
        node[last] = value
    else:
        node[last] = value


def is_mapping_of_tensors(value: object) -> bool:
    """A mapping whose values are all tensors."""
    return isinstance(value, Mapping) and all(isinstance(v, torch.Tensor) for v in value.values())
