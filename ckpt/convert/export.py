"""Export a module item's weights as Hugging Face safetensors (or a plain ``torch.save`` file).

The safetensors layout is the Hub's: ``model.safetensors``, or shards
``model-00001-of-0000N.safetensors`` with ``model.safetensors.index.json``
(``{"metadata": {"total_size": ...}, "weight_map": {name: shard}}``). Tensors
keep the module's state-dict order, headers carry ``{"format": "pt"}``. Every
header is written before any data, then the data of each tensor as it is read,
so memory stays at one tensor plus read buffers.

Tied weights (one tensor under several names, stored once by ckpt) are written
once, under the first name, as ``save_pretrained`` does; transformers re-ties the
alias when it loads the model. ``format="pt"`` keeps every name, in state-dict
order, the aliases sharing their tensor's storage (as ``torch.save`` of the
module's state dict does).

Keys lose the ``_orig_mod.`` and ``module.`` wrapper prefixes of compiled and
data-parallel models (:mod:`ckpt.convert.naming`), and the destination may not
lie inside the checkpoint read or any checkpoint root.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, BinaryIO

import torch

from ckpt.convert.loading import save_torch
from ckpt.convert.naming import RenamedSource, bare_names, check_destination
from ckpt.convert.source import ItemLayout, LayoutEntry, open_item
from ckpt.errors import CheckpointWriteError, IncompatibleCheckpointError
from ckpt.format.tensorfile import TensorEntry, encode_header, tensor_bytes

__all__ = ["DTYPES", "FORMATS", "export", "parse_size", "plan_shards"]

logger = logging.getLogger(__name__)

DTYPES = {
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
    "fp32": torch.float32,
    "float32": torch.float32,
}
"""Names accepted by ``dtype=`` (``--dtype``)."""

FORMATS = ("safetensors", "pt")

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
_UNITS.update({"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40})

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
PT_NAME = "pytorch_model.bin"
_WRITE_SLICE = 16 * 1024 * 1024


def parse_size(size: int | str) -> int:
    """``5GB`` (10**9), ``500MiB`` (2**20), ``1000`` -> bytes, as transformers reads them.

    Raises:
        ValueError: Not a positive size.
    """
    if isinstance(size, int) and not isinstance(size, bool):
        n = size
    elif isinstance(size, str):
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", size)
        if m is None or m.group(2).upper() not in _UNITS:
            raise ValueError(f"max_shard_size {size!r} is not a size like 5GB or 500MiB")
        n = int(float(m.group(1)) * _UNITS[m.group(2).upper()])
    else:
        raise ValueError(f"max_shard_size must be an int or a str like '5GB', got {size!r}")
    if n <= 0:
        raise ValueError(f"max_shard_size must be positive, got {size!r}")
    return n


def _target_dtype(entry: LayoutEntry, dtype: torch.dtype | None) -> torch.dtype:
    if dtype is not None and entry.dtype.is_floating_point:
        return dtype
    return entry.dtype


@dataclass(frozen=True)
class _Placed:
    entry: LayoutEntry
    shard: int
    dtype: torch.dtype
    begin: int
    end: int


def plan_shards(
    entries: Iterable[LayoutEntry], dtype: torch.dtype | None, max_bytes: int
) -> list[list[_Placed]]:
    """Split entries in order into shards of at most ``max_bytes`` of data each.

    A tensor larger than ``max_bytes`` gets a shard of its own (as transformers does).
    """
    shards: list[list[_Placed]] = [[]]
    size = 0
    for e in entries:
        target = _target_dtype(e, dtype)
        nbytes = e.nbytes // e.dtype.itemsize * target.itemsize
        if shards[-1] and size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(_Placed(e, len(shards) - 1, target, size, size + nbytes))
        size += nbytes
    return shards


def export(
    directory: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    step: int | None = None,
    item: str = "model",
    dtype: str | torch.dtype | None = None,
    max_shard_size: int | str = "5GB",
    format: str = "safetensors",
    progress: bool = False,
    storage_options: dict[str, Any] | None = None,
    strip_prefixes: bool = True,
) -> list[str]:
    """Export one module item's weights: :func:`ckpt.export` (documented there)."""
    target = _check_dtype(dtype)
    if format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
    max_bytes = parse_size(max_shard_size)
    start = time.perf_counter()
    out_dir = os.fspath(out)
    check_destination(os.fspath(directory), out_dir)
    source: Any = open_item(os.fspath(directory), step, item, storage_options)
    if strip_prefixes:
        names = bare_names(source.layout.order)
        if any(k != v for k, v in names.items()):
            logger.info("exported without wrapper prefixes (_orig_mod., module.)")
            source = RenamedSource(source, names)
    layout = source.layout
    for key, first in layout.aliases.items():
        logger.info("%r is tied to %r: written once, as %r", key, first, first)
    for key in layout.skipped:
        logger.warning("%r of item %r is not a tensor: not exported", key, item)
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as e:
        raise CheckpointWriteError(f"cannot create the output directory: {e}", path=out_dir) from e
    bar = _bar(progress, sum(e.nbytes for e in layout.entries), f"export {item}")
    try:
        if format == "pt":
            written = _export_pt(source, out_dir, target, bar)
        else:
            written = _export_safetensors(source, out_dir, target, max_bytes, bar)
    finally:
        if bar is not None:
            bar.close()
    logger.info(
        "exported item %r of step %d to %s (%d files in %.3f s)",
        item,
        layout.step,
        out_dir,
        len(written),
        time.perf_counter() - start,
    )
    return written


def _check_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        if isinstance(dtype, torch.dtype) and not dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating-point dtype, got {dtype}")
        return dtype
    if isinstance(dtype, str) and dtype.lower() in DTYPES:
        return DTYPES[dtype.lower()]
    raise ValueError(f"dtype must be one of {sorted(DTYPES)} or None, got {dtype!r}")


def _bar(progress: bool, total: int, what: str) -> Any:
    if not progress:
        return None
    try:
        tqdm = importlib.import_module("tqdm").tqdm
    except ImportError:
        logger.debug("tqdm is not installed (pip install 'ckpt[progress]'): no progress bar")
        return None
    return tqdm(total=total, unit="B", unit_scale=True, desc=what, leave=False)


def _shard_names(count: int) -> list[str]:
    if count == 1:
        return [SINGLE_NAME]
    return [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]


def _export_safetensors(
    source: Any, out_dir: str, dtype: torch.dtype | None, max_bytes: int, bar: Any
) -> list[str]:
    layout: ItemLayout = source.layout
    shards = plan_shards(layout.entries, dtype, max_bytes)
    names = _shard_names(len(shards))
    placed = {p.entry.key: p for shard in shards for p in shard}
    paths = [os.path.join(out_dir, n) for n in names]
    temps = [p + ".ckpt-export.tmp" for p in paths]
    files: list[BinaryIO] = []
    data_starts: list[int] = []
    try:
        for shard, temp in zip(shards, temps, strict=True):
            f = open(temp, "wb")  # noqa: SIM115 - closed below, after the streamed writes
            files.append(f)
            header = encode_header(
                [TensorEntry(p.entry.key, p.dtype, p.entry.shape, p.begin, p.end) for p in shard],
                {"format": "pt"},
            )
            f.write(header)
            data_starts.append(len(header))
        _stream_into(source, files, data_starts, placed, bar)
        for done_file in files:
            done_file.flush()
            os.fsync(done_file.fileno())
            done_file.close()
        for temp, path in zip(temps, paths, strict=True):
            os.replace(temp, path)
    except OSError as e:
        _discard(files, temps)
        raise CheckpointWriteError(f"export failed: {e}", path=out_dir) from e
    except BaseException:
        _discard(files, temps)
        raise
    written = list(paths)
    if len(shards) > 1:
        index = {
            "metadata": {"total_size": sum(p.end - p.begin for s in shards for p in s)},
            "weight_map": {p.entry.key: names[p.shard] for s in shards for p in s},
        }
        index_path = os.path.join(out_dir, INDEX_NAME)
        _write_text(index_path, json.dumps(index, indent=2) + "\n")
        written.append(index_path)
        _remove_quietly(os.path.join(out_dir, SINGLE_NAME))  # would shadow the index on load
    else:
        _remove_quietly(os.path.join(out_dir, INDEX_NAME))  # a stale index would win on load
    return written


def _stream_into(
    source: Any,
    files: list[BinaryIO],
    data_starts: list[int],
    placed: dict[str, _Placed],
    bar: Any,
) -> None:
    """Write each tensor, as the source yields it, at its place in its shard."""
    done = set()
    for key, t in source.tensors():
        p = placed[key]
        data = (t if t.dtype == p.dtype else t.to(p.dtype)).contiguous()
        out = files[p.shard]
        if out.tell() != data_starts[p.shard] + p.begin:
            out.seek(data_starts[p.shard] + p.begin)
        view = tensor_bytes(data)
        for at in range(0, len(view), _WRITE_SLICE):
            out.write(view[at : at + _WRITE_SLICE])
        done.add(key)
        if bar is not None:
            bar.update(p.entry.nbytes)
        del t, data, view
    missing = [k for k in placed if k not in done]
    if missing:
        raise IncompatibleCheckpointError(
            f"the checkpoint did not yield {len(missing)} tensor(s) of its item", key=missing[0]
        )


def _export_pt(source: Any, out_dir: str, dtype: torch.dtype | None, bar: Any) -> list[str]:
    layout: ItemLayout = source.layout
    loaded: dict[str, torch.Tensor] = {}
    for key, t in source.tensors():
        loaded[key] = t.to(dtype) if dtype is not None and t.dtype.is_floating_point else t
        if bar is not None:
            bar.update(t.nbytes)
    order = layout.order or tuple(e.key for e in layout.entries)
    state = {k: loaded[layout.aliases.get(k, k)] for k in order}  # ties share storage
    path = os.path.join(out_dir, PT_NAME)
    temp = path + ".ckpt-export.tmp"
    try:
        save_torch(state, temp)
        os.replace(temp, path)
    except OSError as e:
        _remove_quietly(temp)
        raise CheckpointWriteError(f"export failed: {e}", path=path) from e
    return [path]


def _write_text(path: str, text: str) -> None:
    temp = path + ".ckpt-export.tmp"
    try:
        with open(temp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temp, path)
    except OSError as e:
        _remove_quietly(temp)
        raise CheckpointWriteError(f"export failed: {e}", path=path) from e


def _discard(files: list[BinaryIO], temps: list[str]) -> None:
    for f in files:
        f.close()
    for temp in temps:
        _remove_quietly(temp)


def _remove_quietly(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass
    except OSError as e:
        logger.warning("could not remove %s: %s", path, e)
