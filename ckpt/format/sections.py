"""A manifest's sections: files, tensors and items, encoded from and validated into records."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from ckpt.format.blobs import is_blob_key, ref_key, ref_name
from ckpt.format.checksums import ALGORITHM
from ckpt.format.dtypes import dtype_of, dtypes_by_name
from ckpt.format.limits import MAX_BYTES, byte_count
from ckpt.format.names import is_tensor_file_name
from ckpt.format.packs import check_packs
from ckpt.format.records import ITEM_KINDS, FileRecord, ItemRecord, TensorRecord, tensor_record
from ckpt.state.tree import Json

if TYPE_CHECKING:
    import torch

DIGEST = re.compile(r"xxh3_64:[0-9a-f]{16}")


def encode_tensor(r: TensorRecord) -> dict[str, Any]:
    """The JSON of one tensor record (``"blob"`` in place of ``"file"`` for a blob reference)."""
    key = ref_key(r.file)
    out: dict[str, Any] = {
        **({"file": r.file} if key is None else {"blob": key}),
        "dtype": str(r.dtype).removeprefix("torch."),
        "shape": list(r.shape),
        "device": r.device,
    }
    if r.pack is not None:
        out["pack"] = r.pack
        out["offset"] = r.offset
    return out


def encode_item(r: ItemRecord) -> dict[str, Json]:
    """The JSON of one item record: its kind, its extras, then its state."""
    return {"kind": r.kind, **r.extra, "state": r.state}


def decode_files(doc: Json, bad: Any) -> dict[str, FileRecord]:
    """The ``files`` section: each a tensor file name with its size and checksum."""
    if not isinstance(doc, dict):
        raise bad("files", "must be an object")
    files: dict[str, FileRecord] = {}
    for name, info in doc.items():
        if not is_tensor_file_name(name):
            raise bad(f"files.{name}", "file name is not a plain .safetensors name")
        if not isinstance(info, dict):
            raise bad(f"files.{name}", "must be an object")
        size = info.get("size")
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise bad(f"files.{name}", "size must be a non-negative int")
        checksum = info.get("checksum")
        if checksum is not None and not (isinstance(checksum, str) and DIGEST.fullmatch(checksum)):
            raise bad(f"files.{name}.checksum", f"must be '{ALGORITHM}:' and 16 hex digits")
        unknown = sorted(set(info) - {"size", "checksum"})
        if unknown:
            raise bad(f"files.{name}", f"unknown fields {unknown}")
        files[name] = FileRecord(size, checksum)
    return files


def decode_blobs(doc: Json, bad: Any) -> dict[str, FileRecord]:
    """The ``blobs`` section (version 4): each a blob key with its file's size and checksum."""
    if not isinstance(doc, dict):
        raise bad("blobs", "must be an object")
    blobs: dict[str, FileRecord] = {}
    for key, info in doc.items():
        where = f"blobs.{key}"
        if not is_blob_key(key):
            raise bad(where, "a blob key must be 32 lower-case hex digits")
        if not isinstance(info, dict) or set(info) != {"size", "checksum"}:
            raise bad(where, "must be an object with exactly 'size' and 'checksum'")
        size, checksum = info["size"], info["checksum"]
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise bad(where, "size must be a non-negative int")
        if not (isinstance(checksum, str) and DIGEST.fullmatch(checksum)):
            raise bad(f"{where}.checksum", f"must be '{ALGORITHM}:' and 16 hex digits")
        blobs[key] = FileRecord(size, checksum)
    return blobs


def _blob_reference(
    name: str, info: dict[str, Json], files: Mapping[str, FileRecord], blobs: Any, bad: Any
) -> str:
    """The file name of a tensor record's blob reference (version 4), added to ``files``."""
    key = info["blob"]
    where = f"tensors.{name}"
    if blobs is None:
        raise bad(where, "'blob' is not allowed here (only in the tensors of format version 4)")
    if not is_blob_key(key):
        raise bad(where, f"blob key {key!r} is not 32 lower-case hex digits")
    assert isinstance(key, str)
    if key not in blobs:
        raise bad(where, f"names blob {key!r}, which is not in 'blobs'")
    if "file" in info or "pack" in info or "offset" in info:
        raise bad(where, "a blob reference has no 'file', 'pack' or 'offset'")
    file = ref_name(key, name)
    assert isinstance(files, dict)
    files[file] = blobs[key]
    return file


_TENSOR_FIELDS = frozenset({"file", "blob", "dtype", "shape", "device", "pack", "offset"})


def decode_tensors(
    doc: Json,
    files: Mapping[str, FileRecord],
    bad: Any,
    blobs: Mapping[str, FileRecord] | None = None,
) -> dict[str, TensorRecord]:
    """The ``tensors`` section: each in a listed file, fitting in it, packs tiled exactly.

    With ``blobs`` (version 4) a record may name a blob in place of a file; its
    reference (:func:`~ckpt.format.blobs.ref_name`) is then added to ``files``,
    which must be a dict.
    """
    if not isinstance(doc, dict):
        raise bad("tensors", "must be an object")
    tensors: dict[str, TensorRecord] = {}
    sizes: dict[str, int] = {}
    too_big: list[tuple[str, int]] = []
    valid_devices: set[str] = set()
    shapes = _ShapeBytes()
    # Hot: one pass per record of a manifest of many thousand tensors (locals, no generators).
    dtypes, fields, new_record = dtypes_by_name(), _TENSOR_FIELDS, tensor_record
    for name, record in doc.items():
        if not isinstance(record, dict):
            raise bad(f"tensors.{name}", "must be an object")
        info: dict[str, Any] = record
        file: Any = info.get("file")
        if "blob" in info:
            file = _blob_reference(name, info, files, blobs, bad)
        file_record = files.get(file) if isinstance(file, str) else None
        if file_record is None:
            raise bad(f"tensors.{name}", f"names file {file!r}, which is not in 'files'")
        dtype_name = info.get("dtype")
        dtype = dtypes.get(dtype_name) if isinstance(dtype_name, str) else None
        if dtype is None and isinstance(dtype_name, str):
            dtype = dtype_of(dtype_name)  # one this table lacks: torch decides
        if dtype is None:
            raise bad(f"tensors.{name}", f"unknown dtype {dtype_name!r}")
        shape: Any = info.get("shape")
        nbytes = shapes.nbytes(shape, dtype, name, bad)
        device: Any = info.get("device")
        if not isinstance(device, str) or device not in valid_devices:  # each string once
            _check_device(device, f"tensors.{name}", bad)
            valid_devices.add(device)
        if not fields.issuperset(info):
            raise bad(f"tensors.{name}", f"unknown fields {sorted(set(info) - fields)}")
        size = file_record.size
        if "pack" in info or "offset" in info:
            pack, offset = _pack_fields(info, size, f"tensors.{name}", bad)
        else:
            pack, offset = None, 0
        tensors[name] = new_record(file, dtype, tuple(shape), device, pack, offset)
        sizes[name] = nbytes
        if nbytes > size:
            too_big.append((name, nbytes))
    check_packs(tensors, bad, sizes)
    for name, nbytes in too_big:  # after the packs' own checks, as before
        r = tensors[name]
        shape = shown_shape(list(r.shape))
        raise bad(f"tensors.{name}", f"shape {shape} needs {nbytes} bytes; {r.file!r} is smaller")
    return tensors


class _ShapeBytes:
    """Checks tensor records' shapes and counts their bytes, each distinct shape once."""

    def __init__(self) -> None:
        self._known: dict[tuple[torch.dtype, tuple[int, ...]], int] = {}

    def nbytes(self, shape: Json, dtype: torch.dtype, name: str, bad: Any) -> int:
        """The bytes of tensor ``name``'s ``shape`` (a JSON list of ints >= 0); else raise."""
        if not isinstance(shape, list) or not _INT_TYPE.issuperset(map(type, shape)):
            raise bad(f"tensors.{name}", "shape must be a list of non-negative ints")
        key = (dtype, tuple(shape))  # every dim an int (not a bool): equal keys, equal shapes
        nbytes = self._known.get(key)
        if nbytes is not None:
            return nbytes
        if min(shape, default=0) < 0:
            raise bad(f"tensors.{name}", "shape must be a list of non-negative ints")
        counted = byte_count(shape, dtype.itemsize)
        if counted is None:
            raise bad(
                f"tensors.{name}",
                f"shape {shown_shape(shape)} overflows: more than {MAX_BYTES} bytes",
            )
        self._known[key] = counted
        return counted


_INT_TYPE = frozenset({int})


_PLAIN_DEVICE = re.compile(r"(?:cpu|cuda|meta|mps|xpu)(?::(?:0|[1-9][0-9]?))?")
"""Device strings torch certainly parses (checked against torch in the tests): no import needed."""


def _check_device(device: Json, where: str, bad: Any) -> None:
    """Raise unless ``device`` is a string torch parses as a device.

    Common ones (``cpu``, ``cuda:1``) are known without torch; any other is
    handed to ``torch.device`` (importing torch).
    """
    if not isinstance(device, str):
        raise bad(where, "device must be a string")
    if _PLAIN_DEVICE.fullmatch(device):
        return
    import torch  # noqa: PLC0415 - only for device strings out of the ordinary

    try:
        torch.device(device)
    except RuntimeError as e:
        raise bad(where, f"invalid device {device!r}") from e


def _pack_fields(info: dict[str, Json], size: int, where: str, bad: Any) -> tuple[str | None, int]:
    """A tensor record's ``pack`` and ``offset`` (version 2), checked against its file's size."""
    pack, offset = info.get("pack"), info.get("offset", 0)
    if pack is not None and not isinstance(pack, str):
        raise bad(where, "pack must be a tensor name")
    if isinstance(offset, bool) or not isinstance(offset, int) or not 0 <= offset <= size:
        raise bad(where, "offset must be a non-negative int within its file")
    if pack is None and "offset" in info:
        raise bad(where, "offset without a pack")
    return pack, offset


def decode_items(doc: Json, bad: Any) -> dict[str, ItemRecord]:
    """The ``items`` section: each with a known kind and a state."""
    if not isinstance(doc, dict):
        raise bad("items", "must be an object")
    items: dict[str, ItemRecord] = {}
    for name, info in doc.items():
        if not isinstance(info, dict) or info.get("kind") not in ITEM_KINDS or "state" not in info:
            raise bad(f"items.{name}", f"must have a kind in {ITEM_KINDS} and a state")
        extra = {k: v for k, v in info.items() if k not in ("kind", "state")}
        items[name] = ItemRecord(info["kind"], info["state"], extra)
    return items


def shown_shape(shape: list[int]) -> str:
    """A shape for a message: long ones and huge numbers cut short."""
    dims = [str(d) if d < 10**20 else f"<{d.bit_length()} bits>" for d in shape[:8]]
    return "[" + ", ".join(dims) + (", ...]" if len(shape) > 8 else "]")
