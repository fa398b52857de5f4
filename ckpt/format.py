"""On-disk format (versions 1 and 2): step directory names and the JSON manifest.

Pure functions over names and bytes; no I/O. See ``docs/format.md`` for the
specification. A checkpoint is one directory named :func:`step_dir_name`,
holding one safetensors file per item that has tensors and ``manifest.json``,
which is written last and is the commit marker.
"""

from __future__ import annotations

import json
import math
import re
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from ckpt.errors import CorruptCheckpointError, IncompatibleCheckpointError
from ckpt.integrity import ALGORITHM, Hasher, hash_bytes
from ckpt.limits import MAX_BYTES, MAX_STEP, byte_count
from ckpt.tree import Json, loads_strict

__all__ = [
    "FORMAT_NAME",
    "FileRecord",
    "FORMAT_VERSION",
    "ITEM_KINDS",
    "MANIFEST_NAME",
    "MAX_COMPRESSION_RATIO",
    "MAX_MANIFEST_BYTES",
    "MAX_MANIFEST_VALUES",
    "MAX_STEP",
    "PACK_SUFFIX",
    "ItemRecord",
    "Manifest",
    "TempDirName",
    "TensorRecord",
    "decode_manifest",
    "encode_manifest",
    "is_tensor_file_name",
    "item_file_name",
    "parse_step_dir_name",
    "parse_temp_dir_name",
    "safe_host_name",
    "step_dir_name",
    "temp_dir_name",
]

FORMAT_NAME = "ckpt"
FORMAT_VERSION = 2
"""The newest version this ckpt reads and writes. A checkpoint is written in the
oldest version that can express it: 1 unless it packs small tensors or
compresses its manifest (version 2)."""
MANIFEST_NAME = "manifest.json"
MAX_MANIFEST_BYTES = 64 * 1024 * 1024
"""Largest manifest, compressed or not, read or written (400,000 tensors is about 60 MB of JSON)."""
MAX_MANIFEST_VALUES = 2**22
"""Most JSON values (and object members) a manifest may hold, counted as the bytes ``,``,
``[`` and ``{`` in its JSON: it bounds the time and memory parsing takes (about 10
values per tensor)."""
MAX_COMPRESSION_RATIO = 64
"""A compressed manifest may inflate to at most this many times its size (or to
:data:`INFLATE_FREELY`); a manifest that compresses better is stored plain."""
INFLATE_FREELY = 1024 * 1024
"""Any compressed manifest may inflate this far, whatever its ratio."""
COMPRESS_MANIFEST_ABOVE = 64 * 1024
"""Manifests whose JSON is larger than this are stored zlib-compressed (version 2)."""
PACK_SUFFIX = "/#pack"
"""An item's pack of small tensors is the tensor ``<item>/#pack``: no state key maps
to that name (``#`` in a string key is escaped; integer keys give ``#<digits>``)."""
ITEM_KINDS = ("module", "optimizer", "stateful", "dict", "rng")

_STEP_DIR = re.compile(r"step_(\d{12,20})")
_TEMP_PREFIX = ".ckpt-tmp."
_TEMP_DIR = re.compile(
    r"\.ckpt-tmp\.(step_\d{12,20})\.([A-Za-z0-9-]+)-(\d{1,10})\.([0-9a-f]{1,32})"
)
_FILE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(?:\.[0-9a-f]{8})?\.safetensors")
_TOKEN = re.compile(r"[0-9a-f]{8}")
_DIGEST = re.compile(r"xxh3_64:[0-9a-f]{16}")
_DTYPES = {
    str(d).removeprefix("torch."): d for d in vars(torch).values() if isinstance(d, torch.dtype)
}


def step_dir_name(step: int) -> str:
    """Return the directory name of ``step``: ``step_`` and 12 to 20 digits.

    Raises:
        ValueError: ``step`` is not an int from 0 to :data:`MAX_STEP` (``10**20 - 1``).
    """
    if isinstance(step, bool) or not isinstance(step, int) or not 0 <= step <= MAX_STEP:
        shown = repr(step) if not isinstance(step, int) or abs(step) < 10**30 else "a huge int"
        raise ValueError(f"step must be an int from 0 to 10**20 - 1, got {shown}")
    return f"step_{step:012d}"


def parse_step_dir_name(name: str) -> int | None:
    """Return the step a directory name stands for, or ``None`` if it is not a step directory.

    Only the canonical spelling parses, so every step has exactly one name.
    """
    match = _STEP_DIR.fullmatch(name)
    if match is None:
        return None
    step = int(match.group(1))
    return step if step_dir_name(step) == name else None


@dataclass(frozen=True)
class TempDirName:
    """The parts of a temporary directory name: the step and the writer that made it."""

    step: int
    host: str
    pid: int


def safe_host_name(host: str) -> str:
    """Reduce a host name to the characters allowed in a temporary directory name."""
    return re.sub(r"[^A-Za-z0-9-]", "-", host)[:64] or "host"


def temp_dir_name(step: int, host: str, pid: int, token: str) -> str:
    """Return the name of the temporary directory a save of ``step`` writes into.

    It starts with ``.ckpt-tmp.`` and therefore never parses as a step; it names
    the writer (host and pid) so that an abandoned one can be recognized.
    """
    return f"{_TEMP_PREFIX}{step_dir_name(step)}.{safe_host_name(host)}-{pid}.{token}"


def parse_temp_dir_name(name: str) -> TempDirName | None:
    """Return the parts of a name made by :func:`temp_dir_name`, or ``None`` if it is not one."""
    match = _TEMP_DIR.fullmatch(name)
    if match is None or parse_step_dir_name(match.group(1)) is None:
        return None
    return TempDirName(int(match.group(1)[5:]), match.group(2), int(match.group(3)))


def item_file_name(item: str, token: str | None = None) -> str:
    """Return the safetensors file name that holds an item's tensors.

    ``token`` (8 hex digits) makes the name unique to one save attempt; it is
    used where checkpoints are committed without a rename (object stores), so
    that two writers racing for one step never write the same object.
    """
    if token is None:
        return f"{item}.safetensors"
    if not _TOKEN.fullmatch(token):
        raise ValueError(f"token must be 8 hex digits, got {token!r}")
    return f"{item}.{token}.safetensors"


def is_tensor_file_name(name: str) -> bool:
    """Whether ``name`` is a tensor file name ckpt writes (``<item>[.<token>].safetensors``)."""
    return _FILE_NAME.fullmatch(name) is not None


@dataclass(frozen=True)
class TensorRecord:
    """What the manifest says about one stored tensor.

    A packed tensor (format version 2) is not a tensor of its file: its bytes
    sit at ``offset`` in the ``uint8`` tensor named ``pack``, which is.
    """

    file: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    device: str
    pack: str | None = None
    offset: int = 0

    @property
    def nbytes(self) -> int:
        """The number of bytes the tensor's data occupies."""
        return math.prod(self.shape) * self.dtype.itemsize


@dataclass(frozen=True)
class ItemRecord:
    """One saved item: its kind, its typed-JSON state tree and kind-specific extras."""

    kind: str
    state: Json
    extra: dict[str, Json] = field(default_factory=dict)


@dataclass(frozen=True)
class FileRecord:
    """One tensor file of a checkpoint: its size and checksum (``None`` in ckpt 0.1.0 files)."""

    size: int
    checksum: str | None = None


@dataclass(frozen=True)
class Manifest:
    """The parsed, validated contents of ``manifest.json``."""

    step: int
    epoch: int | None
    metrics: dict[str, float | int]
    files: dict[str, FileRecord]
    tensors: dict[str, TensorRecord]
    items: dict[str, ItemRecord]
    created_at: str = ""
    versions: dict[str, str] = field(default_factory=dict)


def encode_manifest(manifest: Manifest) -> bytes:
    """Serialize a manifest to UTF-8 JSON bytes (deterministic; no NaN literals).

    The JSON ends with ``"checksum"``: the digest of the bytes before it with the
    object closed right there, so any change to the manifest is detected.
    """
    packed = any(r.pack is not None for r in manifest.tensors.values())
    doc = {
        "format": FORMAT_NAME,
        "format_version": 2 if packed else 1,
        "step": manifest.step,
        "epoch": manifest.epoch,
        "metrics": {k: _encode_number(v) for k, v in manifest.metrics.items()},
        "created_at": manifest.created_at,
        "versions": manifest.versions,
        "files": {
            name: {"size": r.size, **({"checksum": r.checksum} if r.checksum else {})}
            for name, r in manifest.files.items()
        },
        "tensors": {name: _encode_tensor(r) for name, r in manifest.tensors.items()},
        "items": {
            name: {"kind": r.kind, **r.extra, "state": r.state}
            for name, r in manifest.items.items()
        },
    }
    body = json.dumps(doc, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    values = sum(body.count(c) for c in ",[{")
    if values > MAX_MANIFEST_VALUES:
        raise ValueError(
            f"the manifest of step {manifest.step} would hold {values} JSON values, more than "
            f"the {MAX_MANIFEST_VALUES} a reader accepts; store long lists as tensors"
        )
    if len(body) <= COMPRESS_MANIFEST_ABOVE:
        return _checked_size(_sealed(body), manifest.step)
    # Compressed needs version 2; "format_version" is the second key, so this edits only it.
    compressed_body = body.replace('"format_version":1,', '"format_version":2,', 1)
    inflated = _sealed(compressed_body)
    raw = zlib.compress(inflated, 6)
    if len(inflated) > _inflate_limit(len(raw)):  # a reader would refuse it: store it plain
        return _checked_size(_sealed(body), manifest.step)
    return _checked_size(raw, manifest.step, inflated=len(inflated))


def _checked_size(raw: bytes, step: int, *, inflated: int = 0) -> bytes:
    """``raw``, when a reader accepts a manifest of its size."""
    if max(len(raw), inflated) > MAX_MANIFEST_BYTES:
        raise ValueError(
            f"the manifest of step {step} would be {max(len(raw), inflated)} bytes, more than "
            f"the {MAX_MANIFEST_BYTES} a reader accepts; store long lists as tensors"
        )
    return raw


def _inflate_limit(compressed: int) -> int:
    """How far a compressed manifest of ``compressed`` bytes may inflate."""
    return min(MAX_MANIFEST_BYTES, max(INFLATE_FREELY, MAX_COMPRESSION_RATIO * compressed))


def _sealed(body: str) -> bytes:
    """The JSON object ``body`` with its own checksum added as the last field."""
    checksum = hash_bytes(body.encode("utf-8"))
    return (body[:-1] + f',"checksum":"{checksum}"}}\n').encode("utf-8")


def _encode_tensor(r: TensorRecord) -> dict[str, Any]:
    out: dict[str, Any] = {
        "file": r.file,
        "dtype": str(r.dtype).removeprefix("torch."),
        "shape": list(r.shape),
        "device": r.device,
    }
    if r.pack is not None:
        out["pack"] = r.pack
        out["offset"] = r.offset
    return out


def _decompressed(raw: bytes, source: str) -> bytes:
    """The JSON of a manifest, inflating a compressed one within the size limit."""
    if not raw.startswith(b"x"):  # zlib's first byte; JSON text cannot start with it
        return raw
    limit = _inflate_limit(len(raw))
    inflate = zlib.decompressobj()
    try:
        out = inflate.decompress(raw, limit + 1)
    except zlib.error as e:
        raise CorruptCheckpointError(f"compressed manifest is damaged: {e}", path=source) from e
    if len(out) > limit:
        raise CorruptCheckpointError(
            f"compressed manifest of {len(raw)} bytes inflates past the {limit} bytes allowed "
            f"({MAX_COMPRESSION_RATIO} times its size, at most {MAX_MANIFEST_BYTES})",
            path=source,
        )
    if not inflate.eof or inflate.unused_data:
        raise CorruptCheckpointError(
            "compressed manifest is truncated or followed by other bytes", path=source
        )
    return out


_CHECKSUM_TAIL = re.compile(rb',"checksum":"(xxh3_64:[0-9a-f]{16})"\}\n?\Z')


def _check_manifest_checksum(raw: bytes, source: str) -> None:
    """Verify the manifest's own checksum, when it has one (manifests of ckpt 0.1.0 do not)."""
    tail = _CHECKSUM_TAIL.search(raw, max(0, len(raw) - 64))  # it can only be at the end
    if tail is None:
        if b'"checksum"' in raw[-64:]:
            raise CorruptCheckpointError("manifest checksum is malformed", path=source)
        return
    hasher = Hasher()  # the bytes before the checksum, closed: hashed in place, not copied
    hasher.update(memoryview(raw)[: tail.start()])
    hasher.update(b"}")
    actual = hasher.digest()
    expected = tail.group(1).decode()
    if actual != expected:
        raise CorruptCheckpointError(
            f"manifest checksum mismatch: expected {expected}, actual {actual}",
            path=source,
            key="checksum",
        )


def _encode_number(v: float | int) -> Json:
    if isinstance(v, float) and not math.isfinite(v):
        return {"$float": "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf")}
    return v


def _decode_number(v: Json) -> float | int | None:
    if isinstance(v, bool):
        return None
    if isinstance(v, (int, float)):
        return v
    if isinstance(v, dict) and set(v) == {"$float"}:
        return {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}.get(v["$float"])
    return None


def decode_manifest(raw: bytes, source: str) -> Manifest:
    """Parse and validate ``manifest.json`` bytes.

    Args:
        raw: The file's bytes.
        source: The file's path, for error messages.

    Raises:
        CorruptCheckpointError: Not UTF-8 JSON, or a field is missing or of the wrong type.
        IncompatibleCheckpointError: Written by a newer, unknown format version.
    """
    raw = _decompressed(raw, source)
    _check_manifest_checksum(raw, source)
    values = sum(raw.count(c) for c in (b",", b"[", b"{"))
    if values > MAX_MANIFEST_VALUES:  # counted before parsing: parsing costs per value
        raise CorruptCheckpointError(
            f"manifest holds {values} JSON values, more than the {MAX_MANIFEST_VALUES} allowed",
            path=source,
        )
    try:
        doc = loads_strict(raw)
    except (ValueError, RecursionError) as e:
        raise CorruptCheckpointError(f"manifest is not valid JSON: {e}", path=source) from e

    def bad(key: str, why: str) -> CorruptCheckpointError:
        return CorruptCheckpointError(f"invalid manifest: {why}", path=source, key=key)

    if not isinstance(doc, dict) or doc.get("format") != FORMAT_NAME:
        raise bad("format", f"not a {FORMAT_NAME} manifest")
    version = doc.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise bad("format_version", "missing or not an int")
    if version > FORMAT_VERSION:
        raise IncompatibleCheckpointError(
            f"format version {version} is newer than this ckpt understands ({FORMAT_VERSION}); "
            "upgrade ckpt",
            path=source,
            key="format_version",
        )
    step = doc.get("step")
    if isinstance(step, bool) or not isinstance(step, int) or not 0 <= step <= MAX_STEP:
        raise bad("step", "must be an int from 0 to 10**20 - 1")
    epoch = doc.get("epoch")
    if epoch is not None and (isinstance(epoch, bool) or not isinstance(epoch, int)):
        raise bad("epoch", "must be an int or null")
    metrics_doc = doc.get("metrics", {})
    if not isinstance(metrics_doc, dict):
        raise bad("metrics", "must be an object")
    metrics: dict[str, float | int] = {}
    for k, v in metrics_doc.items():
        number = _decode_number(v)
        if number is None:
            raise bad(f"metrics.{k}", "must be a number")
        metrics[k] = number
    files = _decode_files(doc.get("files"), bad)
    tensors = _decode_tensors(doc.get("tensors"), files, bad)
    items = _decode_items(doc.get("items"), bad)
    created_at = doc.get("created_at", "")
    versions = doc.get("versions", {})
    if not isinstance(created_at, str):
        raise bad("created_at", "must be a string")
    if not isinstance(versions, dict) or not all(isinstance(v, str) for v in versions.values()):
        raise bad("versions", "must map names to strings")
    return Manifest(step, epoch, metrics, files, tensors, items, created_at, versions)


def _decode_files(doc: Json, bad: Any) -> dict[str, FileRecord]:
    if not isinstance(doc, dict):
        raise bad("files", "must be an object")
    files: dict[str, FileRecord] = {}
    for name, info in doc.items():
        if not _FILE_NAME.fullmatch(name):
            raise bad(f"files.{name}", "file name is not a plain .safetensors name")
        if not isinstance(info, dict):
            raise bad(f"files.{name}", "must be an object")
        size = info.get("size")
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise bad(f"files.{name}", "size must be a non-negative int")
        checksum = info.get("checksum")
        if checksum is not None and not (isinstance(checksum, str) and _DIGEST.fullmatch(checksum)):
            raise bad(f"files.{name}.checksum", f"must be '{ALGORITHM}:' and 16 hex digits")
        unknown = sorted(set(info) - {"size", "checksum"})
        if unknown:
            raise bad(f"files.{name}", f"unknown fields {unknown}")
        files[name] = FileRecord(size, checksum)
    return files


def _decode_tensors(
    doc: Json, files: Mapping[str, FileRecord], bad: Any
) -> dict[str, TensorRecord]:
    if not isinstance(doc, dict):
        raise bad("tensors", "must be an object")
    tensors: dict[str, TensorRecord] = {}
    valid_devices: set[str] = set()
    for name, info in doc.items():
        where = f"tensors.{name}"
        if not isinstance(info, dict):
            raise bad(where, "must be an object")
        file, dtype, shape, device = (info.get(k) for k in ("file", "dtype", "shape", "device"))
        if not isinstance(file, str) or file not in files:
            raise bad(where, f"names file {file!r}, which is not in 'files'")
        if not isinstance(dtype, str) or dtype not in _DTYPES:
            raise bad(where, f"unknown dtype {dtype!r}")
        if not isinstance(shape, list) or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
        ):
            raise bad(where, "shape must be a list of non-negative ints")
        nbytes = byte_count(shape, _DTYPES[dtype].itemsize)
        if nbytes is None:
            raise bad(where, f"shape {_shown(shape)} overflows: more than {MAX_BYTES} bytes")
        if not isinstance(device, str):
            raise bad(where, "device must be a string")
        if device not in valid_devices:  # a few distinct strings: parse each once
            try:
                torch.device(device)
            except RuntimeError as e:
                raise bad(where, f"invalid device {device!r}") from e
            valid_devices.add(device)
        pack, offset = info.get("pack"), info.get("offset", 0)
        unknown = sorted(set(info) - {"file", "dtype", "shape", "device", "pack", "offset"})
        if unknown:
            raise bad(where, f"unknown fields {unknown}")
        if pack is not None and not isinstance(pack, str):
            raise bad(where, "pack must be a tensor name")
        if (
            isinstance(offset, bool)
            or not isinstance(offset, int)
            or not 0 <= offset <= files[file].size
        ):
            raise bad(where, "offset must be a non-negative int within its file")
        if pack is None and "offset" in info:
            raise bad(where, "offset without a pack")
        tensors[name] = TensorRecord(file, _DTYPES[dtype], tuple(shape), device, pack, offset)
    _check_packs(tensors, bad)
    for name, r in tensors.items():
        if r.nbytes > files[r.file].size:
            shape = _shown(list(r.shape))
            raise bad(
                f"tensors.{name}", f"shape {shape} needs {r.nbytes} bytes; {r.file!r} is smaller"
            )
    return tensors


def _shown(shape: list[int]) -> str:
    """A shape for a message: long ones and huge numbers cut short."""
    dims = [str(d) if d < 10**20 else f"<{d.bit_length()} bits>" for d in shape[:8]]
    return "[" + ", ".join(dims) + (", ...]" if len(shape) > 8 else "]")


def _check_packs(tensors: Mapping[str, TensorRecord], bad: Any) -> None:
    """Every pack is a 1-d uint8 tensor of its members' file, tiled exactly by them."""
    members: dict[str, list[tuple[int, int, str]]] = {}
    for name, r in tensors.items():
        if r.pack is None:
            continue
        pack = tensors.get(r.pack)
        where = f"tensors.{name}"
        if pack is None or pack.pack is not None:
            raise bad(where, f"pack {r.pack!r} is not a stored tensor")
        if pack.dtype != torch.uint8 or len(pack.shape) != 1 or pack.file != r.file:
            raise bad(where, f"pack {r.pack!r} must be a 1-d uint8 tensor of file {r.file!r}")
        if r.offset % r.dtype.itemsize:
            raise bad(where, f"offset {r.offset} is not aligned to {r.dtype}")
        members.setdefault(r.pack, []).append((r.offset, r.offset + r.nbytes, name))
    for pack_name, spans in members.items():
        expected = 0
        for begin, end, name in sorted(spans):
            if begin != expected:
                raise bad(f"tensors.{name}", f"packed bytes overlap or leave a gap at {begin}")
            expected = end
        if expected != tensors[pack_name].shape[0]:
            raise bad(f"tensors.{pack_name}", f"members cover {expected} bytes of the pack")


def _decode_items(doc: Json, bad: Any) -> dict[str, ItemRecord]:
    if not isinstance(doc, dict):
        raise bad("items", "must be an object")
    items: dict[str, ItemRecord] = {}
    for name, info in doc.items():
        if not isinstance(info, dict) or info.get("kind") not in ITEM_KINDS or "state" not in info:
            raise bad(f"items.{name}", f"must have a kind in {ITEM_KINDS} and a state")
        extra = {k: v for k, v in info.items() if k not in ("kind", "state")}
        items[name] = ItemRecord(info["kind"], info["state"], extra)
    return items
