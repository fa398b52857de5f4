"""On-disk format (versions 1 to 4): step directory names and the JSON manifest.

Pure functions over names and bytes; no I/O. See ``docs/format.md`` for the
specification. A checkpoint is one directory named :func:`step_dir_name`,
holding one safetensors file per item that has tensors and ``manifest.json``,
which is written last and is the commit marker.

One concern per module: :mod:`~ckpt.format.names` (step, temporary and file
names), :mod:`~ckpt.format.records` (the typed records a manifest holds),
:mod:`~ckpt.format.manifest` (encoding and decoding), :mod:`~ckpt.format.sections`
(validating files, tensors and items), :mod:`~ckpt.format.sharded` (version 3:
checkpoints saved by several ranks), :mod:`~ckpt.format.blobs` (version 4: the
content store of incremental saves), :mod:`~ckpt.format.packs` (packs of small
tensors), :mod:`~ckpt.format.sealing` (the manifest's own checksum),
:mod:`~ckpt.format.dtypes` (dtypes by name, with or without torch) and
:mod:`~ckpt.format.bounds` (size and compression limits). Decoding a manifest
imports no torch (see :mod:`~ckpt.format.dtypes`). The limits are
re-exported here as values (``COMPRESS_MANIFEST_ABOVE`` and ``INFLATE_FREELY``
only there): to change one, assign it in :mod:`ckpt.format.bounds`.
"""

from ckpt.format.bounds import (
    MAX_COMPRESSION_RATIO,
    MAX_MANIFEST_BYTES,
    MAX_MANIFEST_VALUES,
)
from ckpt.format.limits import MAX_STEP
from ckpt.format.manifest import FORMAT_NAME, FORMAT_VERSION, decode_manifest, encode_manifest
from ckpt.format.names import (
    MANIFEST_NAME,
    TempDirName,
    is_tensor_file_name,
    item_file_name,
    parse_step_dir_name,
    parse_temp_dir_name,
    safe_host_name,
    step_dir_name,
    temp_dir_name,
)
from ckpt.format.packs import PACK_SUFFIX
from ckpt.format.records import (
    ITEM_KINDS,
    ChunkRecord,
    FileRecord,
    GlobalTensorRecord,
    ItemRecord,
    Manifest,
    RankSection,
    ShardedSection,
    TensorRecord,
)
from ckpt.format.sharded import MAX_WORLD_SIZE, SHARDED_KINDS, rank_manifest

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
    "MAX_WORLD_SIZE",
    "PACK_SUFFIX",
    "SHARDED_KINDS",
    "ChunkRecord",
    "GlobalTensorRecord",
    "ItemRecord",
    "Manifest",
    "RankSection",
    "ShardedSection",
    "TempDirName",
    "TensorRecord",
    "decode_manifest",
    "encode_manifest",
    "is_tensor_file_name",
    "item_file_name",
    "parse_step_dir_name",
    "parse_temp_dir_name",
    "rank_manifest",
    "safe_host_name",
    "step_dir_name",
    "temp_dir_name",
]
