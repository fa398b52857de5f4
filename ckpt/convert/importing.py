"""Import training checkpoints from other tools as ckpt checkpoints.

Sources: a ``torch.save`` file (classic layouts or a bare state dict), a
Lightning ``.ckpt`` file, a Hugging Face Trainer checkpoint directory, an
Accelerate ``save_state`` directory, a DCP directory, or a safetensors file.
Nothing is unpickled except through ``torch.load(weights_only=True)`` and,
for DCP's ``.metadata``, an unpickler that admits DCP's metadata classes only
(:mod:`ckpt.convert.loading`). Sources are read strictly (:mod:`ckpt.convert.guard`,
:mod:`ckpt.convert.dcp`): any failure raises before anything is written. The
result restores with ``CheckpointManager.restore(model=..., optimizer=...,
scheduler=...)``; what could not be mapped is in the :class:`ImportReport`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

from ckpt.convert.dcp import load_dcp
from ckpt.convert.directories import (
    HF_MODEL_FILES,
    is_accelerate,
    is_hf_trainer,
    map_accelerate,
    map_hf_trainer,
)
from ckpt.convert.guard import source_entries
from ckpt.convert.layouts import EXTRA_ITEM, Mapped, is_lightning, map_classic, map_lightning
from ckpt.convert.loading import load_safetensors, load_torch
from ckpt.converting import ImportReport
from ckpt.errors import (
    CheckpointError,
    CheckpointExistsError,
    CheckpointNotFoundError,
    CorruptCheckpointError,
    IncompatibleCheckpointError,
)
from ckpt.format import ItemRecord
from ckpt.format.limits import MAX_STEP
from ckpt.saving.writer import CheckpointWriter
from ckpt.state.kinds import Captured, kind_of_record
from ckpt.state.tree import flatten
from ckpt.torch_compat import module_metadata

__all__ = [
    "AMPLIFICATION_SLACK",
    "FORMATS",
    "MAX_AMPLIFICATION",
    "ImportReport",
    "import_checkpoint",
]

logger = logging.getLogger(__name__)

FORMATS = ("auto", "torch", "lightning", "hf-trainer", "accelerate", "dcp", "safetensors")
"""Values of ``format=``: what the source is (``auto``: tell from the source)."""

MAX_AMPLIFICATION = 2
"""An import writes at most this many times the source's bytes on disk (plus the slack)."""
AMPLIFICATION_SLACK = 2**20
"""Bytes an import may write beyond :data:`MAX_AMPLIFICATION` times the source's size."""


def import_checkpoint(
    src: str | os.PathLike[str],
    directory: str | os.PathLike[str],
    *,
    step: int | None = None,
    format: str = "auto",
    storage_options: dict[str, Any] | None = None,
) -> ImportReport:
    """Import ``src`` into ``directory``: :func:`ckpt.import_checkpoint` (documented there)."""
    if format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
    if step is not None and (
        isinstance(step, bool) or not isinstance(step, int) or not 0 <= step <= MAX_STEP
    ):
        raise ValueError(f"step must be an int in [0, {MAX_STEP}], got {step!r}")
    source = os.fspath(src)
    if not os.path.exists(source):
        raise CheckpointNotFoundError("no such file or directory", path=source)
    mapped = _load_and_map(source, format)
    if not mapped.items and not mapped.extra:
        raise CheckpointError(
            "nothing in it could be imported: "
            + "; ".join(f"{k}: {v}" for k, v in mapped.dropped.items()),
            path=source,
        )
    if mapped.extra:
        mapped.items[EXTRA_ITEM] = ("dict", mapped.extra, {})
    chosen = step if step is not None else (mapped.step if mapped.step is not None else 0)
    if chosen > MAX_STEP:
        raise ValueError(
            f"the source's step {chosen} exceeds ckpt.MAX_STEP; choose one (step=, --step)"
        )
    root = os.fspath(directory)
    _check_materialised(source, mapped)
    _check_items(source, mapped)
    _commit(root, chosen, mapped, storage_options)
    report = ImportReport(
        source=source,
        layout=mapped.layout,
        directory=root,
        step=chosen,
        epoch=mapped.epoch,
        items={n: kind for n, (kind, _, _) in mapped.items.items()},
        mapped=dict(mapped.mapped),
        extra=tuple(mapped.extra),
        dropped=dict(mapped.dropped),
        notes=tuple(mapped.notes),
    )
    for key, why in report.dropped.items():
        logger.warning("not imported from %s: %s: %s", source, key, why)
    return report


def _load_and_map(source: str, format: str) -> Mapped:
    """Load ``source`` and map it; any failure is a ``CheckpointError`` naming the source."""
    try:
        return _load_and_map_unchecked(source, format)
    except CheckpointError:
        raise
    except RecursionError as e:
        raise CorruptCheckpointError("nested too deeply to import", path=source) from e
    except (ValueError, TypeError, KeyError, IndexError, AttributeError, OverflowError) as e:
        raise CorruptCheckpointError(f"malformed: {type(e).__name__}: {e}", path=source) from e
    except (MemoryError, RuntimeError) as e:
        raise CorruptCheckpointError(f"cannot be imported: {e}", path=source) from e


def _load_and_map_unchecked(source: str, format: str) -> Mapped:
    if os.path.isdir(source):
        names = dict(source_entries(source))
        if format in ("dcp", "auto") and ".metadata" in names:
            return _map_dcp(source)
        if format == "accelerate" or (format == "auto" and is_accelerate(names)):
            return map_accelerate(source, names)
        if format in ("hf-trainer", "auto") and is_hf_trainer(names):
            return map_hf_trainer(source, names)
        raise CheckpointNotFoundError(
            "not a checkpoint directory ckpt can import: no DCP .metadata, no Hugging Face "
            f"files ({', '.join(HF_MODEL_FILES)}, trainer_state.json) and no Accelerate "
            "files (optimizer.bin, random_states_0.pkl)",
            path=source,
        )
    if format == "safetensors" or (format == "auto" and source.endswith(".safetensors")):
        return map_classic(load_safetensors(source, follow=True), "safetensors")
    loaded = load_torch(source, follow=True)
    if format == "lightning" or (format == "auto" and is_lightning(loaded)):
        if not isinstance(loaded, Mapping):
            raise CheckpointError("not a Lightning checkpoint (not a dict)", path=source)
        return map_lightning(loaded)
    return map_classic(loaded)


def _bytes_on_disk(source: str) -> int:
    """The bytes of the source file, or of the regular files in the source directory."""
    if not os.path.isdir(source):
        return os.stat(source).st_size
    total = 0
    for name, kind in source_entries(source):
        if kind == "file":
            total += os.stat(os.path.join(source, name)).st_size
    return total


def _check_materialised(source: str, mapped: Mapped) -> None:
    """Refuse, before writing, tensors that would take far more bytes than the source holds.

    Views of one storage, expanded and strided tensors are written whole (ckpt
    stores each tensor contiguous; identical views are stored once). The bytes
    written may be at most :data:`MAX_AMPLIFICATION` times the source's bytes on
    disk plus :data:`AMPLIFICATION_SLACK`.
    """
    written = 0
    for name, (_, state, _) in mapped.items.items():
        try:
            _, tensors = flatten(state, name)
        except (TypeError, ValueError):
            continue  # refused with its key path when committed
        written += sum(t.numel() * t.element_size() for t in tensors.values())
    on_disk = _bytes_on_disk(source)
    allowed = MAX_AMPLIFICATION * on_disk + AMPLIFICATION_SLACK
    if written > allowed:
        raise CorruptCheckpointError(
            f"its tensors would take {written} bytes written out, more than "
            f"{MAX_AMPLIFICATION} x its {on_disk} bytes on disk + {AMPLIFICATION_SLACK}: views "
            "of one storage or expanded tensors; save them with .clone() if they are meant",
            path=source,
        )


def _map_dcp(source: str) -> Mapped:
    state = load_dcp(source)
    state = {k: _packed_optimizer(v) for k, v in state.items()}
    out = map_classic(state, "dcp")
    out.layout = "dcp"
    return out


def _packed_optimizer(value: Any) -> Any:
    """DCP writes an optimizer state's int keys as strings: turn them back."""
    if not (isinstance(value, dict) and set(value) == {"state", "param_groups"}):
        return value
    groups = value["param_groups"]
    if not isinstance(groups, list) or not isinstance(value["state"], dict):
        return value
    if all(isinstance(i, int) for g in groups for i in g.get("params", [])):
        state = {
            int(k) if isinstance(k, str) and k.isdigit() else k: v
            for k, v in value["state"].items()
        }
        return {"state": state, "param_groups": groups}
    index: dict[Any, int] = {}  # keyed by parameter name (get_state_dict): pack by order
    packed_groups = []
    for g in groups:
        ids = [index.setdefault(n, len(index)) for n in g.get("params", [])]
        packed_groups.append({**g, "params": ids})
    state = {index[k]: v for k, v in value["state"].items() if k in index}
    return {"state": state, "param_groups": packed_groups}


def _check_items(source: str, mapped: Mapped) -> None:
    """Refuse a source whose items ``verify()`` would reject once committed.

    Each item's state gets the same structural checks its kind runs on a saved
    checkpoint (an optimizer's param groups and indices, a scheduler's fields), so
    a malformed source fails the import instead of committing a broken step.

    Raises:
        CorruptCheckpointError: An item is malformed; names the source and the key.
    """
    for name, (kind, state, recorded) in mapped.items.items():
        record = ItemRecord(kind, None, dict(recorded))
        try:
            kind_of_record(name, record).check_saved(name, state, record)
        except (CorruptCheckpointError, IncompatibleCheckpointError) as e:
            raise CorruptCheckpointError(
                f"cannot import item {name!r}: {e.reason}", path=source, key=e.key or name
            ) from e


def _commit(root: str, step: int, mapped: Mapped, storage_options: dict[str, Any] | None) -> None:
    """Write the mapped items as a committed checkpoint of ``step`` under ``root``."""
    captured = {}
    for name, (kind, state, recorded) in mapped.items.items():
        try:
            tree, tensors = flatten(state, name)
        except TypeError as e:
            raise CheckpointError(f"item {name!r} cannot be stored: {e}", path=root) from e
        extra = dict(recorded)
        metadata = module_metadata(state)
        if kind == "module" and isinstance(metadata, Mapping):
            try:
                extra["module_metadata"], _ = flatten(dict(metadata), name)
            except TypeError:
                mapped.notes.append("the model's _metadata (module versions) was not kept")
        captured[name] = Captured(kind, tree, tensors, extra)
    # The writer owns the lock and the commit protocol; an import is one commit
    # of pre-captured items through it.
    with CheckpointWriter(root, storage_options=storage_options) as writer:
        writer.lock()
        if writer.is_committed(step):
            raise CheckpointExistsError(
                f"step {step} is already saved; choose another step", path=root
            )
        writer.commit_captured(step, captured, epoch=mapped.epoch)
