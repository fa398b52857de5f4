"""The manifest (format versions 1 to 3): a :class:`Manifest` encoded to bytes and decoded back.

Pure functions over bytes; no I/O. See ``docs/format.md`` for the specification.
Encoding picks the oldest version that can express the manifest, seals it with its
own checksum and compresses a large one; decoding undoes that within
:mod:`ckpt.format.bounds` and validates every field.
"""

from __future__ import annotations

import json
import math
import zlib
from typing import Any

from ckpt.errors import CorruptCheckpointError, IncompatibleCheckpointError
from ckpt.format import bounds
from ckpt.format.blobs import is_ref, ref_key
from ckpt.format.limits import MAX_STEP
from ckpt.format.records import FileRecord, Manifest, TensorRecord
from ckpt.format.sealing import check_manifest_checksum, sealed
from ckpt.format.sections import (
    decode_blobs,
    decode_files,
    decode_items,
    decode_tensors,
    encode_item,
    encode_tensor,
)
from ckpt.format.sharded import decode_sharded, encode_sharded
from ckpt.state.tree import Json, loads_strict

FORMAT_NAME = "ckpt"
FORMAT_VERSION = 5
"""The newest version this ckpt reads and writes. A checkpoint is written in the
oldest version that can express it: 1 unless it packs small tensors or
compresses its manifest (version 2); 3 when several ranks saved it; 4 when it
references tensors in the root's content store (an incremental save); 5 when
several ranks saved it incrementally."""


def encode_manifest(manifest: Manifest) -> bytes:
    """Serialize a manifest to UTF-8 JSON bytes (deterministic; no NaN literals).

    A manifest with ``sharded`` set is written as version 3 from that section
    alone (its ``items`` are derived from it, and its ``tensors`` must be empty).

    The JSON ends with ``"checksum"``: the digest of the bytes before it with the
    object closed right there, so any change to the manifest is detected.
    """
    sharded = manifest.sharded
    if sharded is not None and manifest.tensors:
        raise ValueError("a sharded manifest holds its tensors in 'sharded', not in 'tensors'")
    packed = any(r.pack is not None for r in manifest.tensors.values())
    blobs = _blobs_of(manifest)
    version = (5 if blobs else 3) if sharded is not None else 4 if blobs else 2 if packed else 1
    doc: dict[str, Any] = {
        "format": FORMAT_NAME,
        "format_version": version,
        "step": manifest.step,
        "epoch": manifest.epoch,
        "metrics": {k: _encode_number(v) for k, v in manifest.metrics.items()},
        "created_at": manifest.created_at,
        "versions": manifest.versions,
        "files": {
            name: {"size": r.size, **({"checksum": r.checksum} if r.checksum else {})}
            for name, r in manifest.files.items()
            if not is_ref(name)
        },
    }
    if blobs:
        doc["blobs"] = {k: {"size": r.size, "checksum": r.checksum} for k, r in blobs.items()}
    if sharded is None:
        doc["tensors"] = {name: encode_tensor(r) for name, r in manifest.tensors.items()}
        doc["items"] = {name: encode_item(r) for name, r in manifest.items.items()}
    else:
        doc.update(encode_sharded(sharded))
    body = json.dumps(doc, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    values = sum(body.count(c) for c in ",[{")
    if values > bounds.MAX_MANIFEST_VALUES:
        raise ValueError(
            f"the manifest of step {manifest.step} would hold {values} JSON values, more than "
            f"the {bounds.MAX_MANIFEST_VALUES} a reader accepts; store long lists as tensors"
        )
    if len(body) <= bounds.COMPRESS_MANIFEST_ABOVE:
        return bounds.checked_size(sealed(body), manifest.step)
    # Compressed needs version 2; "format_version" is the second key, so this edits only it.
    compressed_body = body.replace('"format_version":1,', '"format_version":2,', 1)
    inflated = sealed(compressed_body)
    raw = zlib.compress(inflated, 6)
    if len(inflated) > bounds.inflate_limit(len(raw)):  # a reader would refuse it: store it plain
        return bounds.checked_size(sealed(body), manifest.step)
    return bounds.checked_size(raw, manifest.step, inflated=len(inflated))


def _blobs_of(manifest: Manifest) -> dict[str, FileRecord]:
    """The blobs a manifest references, by key, sorted (version 4's ``blobs``)."""
    blobs: dict[str, FileRecord] = {}
    for name, r in manifest.files.items():
        key = ref_key(name)
        if key is not None:
            if r.checksum is None:
                raise ValueError(f"blob {key} has no checksum")
            blobs[key] = r
    return dict(sorted(blobs.items()))


def _blobs_doc(doc: dict[str, Any], version: int, bad: Any) -> dict[str, FileRecord] | None:
    """The validated ``blobs`` section of a version 4 or 5 manifest; ``None`` before."""
    return decode_blobs(doc.get("blobs"), bad) if version >= 4 else None


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
    raw = bounds.decompressed(raw, source)
    sealed_manifest = check_manifest_checksum(raw, source)
    values = sum(raw.count(c) for c in (b",", b"[", b"{"))
    if values > bounds.MAX_MANIFEST_VALUES:  # counted before parsing: parsing costs per value
        raise CorruptCheckpointError(
            f"manifest holds {values} JSON values, "
            f"more than the {bounds.MAX_MANIFEST_VALUES} allowed",
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
    if version >= 3 and not sealed_manifest:  # only ckpt 0.1.0 (version 1) wrote none
        raise bad("checksum", f"missing: every manifest of version {version} carries its checksum")
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
    files = decode_files(doc.get("files"), bad)
    sharded = None
    if version in (3, 5):
        sharded = decode_sharded(doc, files, bad, _blobs_doc(doc, version, bad))
        tensors: dict[str, TensorRecord] = {}
        items = {**sharded.items, **sharded.ranks[0].items}
    else:
        tensors = decode_tensors(doc.get("tensors"), files, bad, _blobs_doc(doc, version, bad))
        items = decode_items(doc.get("items"), bad)
    created_at = doc.get("created_at", "")
    versions = doc.get("versions", {})
    if not isinstance(created_at, str):
        raise bad("created_at", "must be a string")
    if not isinstance(versions, dict) or not all(isinstance(v, str) for v in versions.values()):
        raise bad("versions", "must map names to strings")
    return Manifest(step, epoch, metrics, files, tensors, items, created_at, versions, sharded)
