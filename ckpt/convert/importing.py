"""Import training checkpoints from other tools as ckpt checkpoints.

Sources: a ``torch.save`` file (classic layouts or a bare state dict), a
Lightning ``.ckpt`` file, a Hugging Face Trainer checkpoint directory, a DCP
directory, or a safetensors file. Nothing is unpickled except through
``torch.load(weights_only=True)`` and, for DCP's ``.metadata``, an unpickler
that admits DCP's metadata classes only (:mod:`ckpt.convert.loading`). The
result restores with ``CheckpointManager.restore(model=..., optimizer=...,
scheduler=...)``; what could not be mapped is in the :class:`ImportReport`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from ckpt.convert.layouts import (
    EXTRA_ITEM,
    Mapped,
    is_lightning,
    map_classic,
    map_lightning,
)
from ckpt.convert.loading import load_dcp, load_json, load_safetensors, load_torch
from ckpt.errors import CheckpointError, CheckpointExistsError, CheckpointNotFoundError
from ckpt.kinds import Captured
from ckpt.limits import MAX_STEP
from ckpt.torch_compat import module_metadata
from ckpt.tree import flatten
from ckpt.writer import CheckpointWriter

__all__ = ["FORMATS", "ImportReport", "import_checkpoint"]

logger = logging.getLogger(__name__)

FORMATS = ("auto", "torch", "lightning", "hf-trainer", "dcp", "safetensors")
"""Values of ``format=``: what the source is (``auto``: tell from the source)."""

_HF_MODEL_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


@dataclass(frozen=True)
class ImportReport:
    """What an import did.

    Attributes:
        source: The source path.
        layout: The layout recognised (``torch.save``, ``state dict``, ``lightning``,
            ``hf-trainer``, ``dcp``, ``safetensors``).
        directory: The ckpt root written to.
        step: The step written.
        epoch: The epoch recorded, if any.
        items: ``{item name: kind}`` written (``model``: module, ...).
        mapped: ``{source key: item or field it became}``.
        extra: Source keys kept as plain data under the ``extra`` dict item.
        dropped: ``{source key: why it was not imported}``.
        notes: Guesses made and hints for the restore.
    """

    source: str
    layout: str
    directory: str
    step: int
    epoch: int | None
    items: dict[str, str]
    mapped: dict[str, str]
    extra: tuple[str, ...]
    dropped: dict[str, str]
    notes: tuple[str, ...]

    def summary(self) -> str:
        """A human-readable account, one fact per line."""
        lines = [
            f"imported {self.source} ({self.layout}) as step {self.step} of {self.directory}",
            "items: " + ", ".join(f"{n} ({k})" for n, k in self.items.items()),
        ]
        lines += [f"  {key} -> {to}" for key, to in self.mapped.items()]
        if self.extra:
            lines.append(f"kept under {EXTRA_ITEM!r}: " + ", ".join(self.extra))
        lines += [f"NOT imported: {key}: {why}" for key, why in self.dropped.items()]
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


def import_checkpoint(
    src: str | os.PathLike[str],
    directory: str | os.PathLike[str],
    *,
    step: int | None = None,
    format: str = "auto",
    storage_options: dict[str, Any] | None = None,
) -> ImportReport:
    """Convert another tool's checkpoint into a committed ckpt checkpoint.

    Args:
        src: A ``torch.save``/Lightning file, a safetensors file, or a Hugging Face
            Trainer or DCP checkpoint directory (local).
        directory: The ckpt root to write (path or fsspec URL).
        step: The step to write; else the source's ``global_step``/``step``, else
            its epoch, else 0.
        format: One of :data:`FORMATS`.
        storage_options: Passed to fsspec for ``directory``.

    Returns:
        The report; its unmapped parts are also logged as warnings.

    Raises:
        CheckpointNotFoundError: ``src`` does not exist.
        CorruptCheckpointError: ``src`` cannot be loaded without running code
            (``weights_only`` refused it), or is malformed.
        CheckpointExistsError: ``directory`` already has the step.
        CheckpointError: Nothing in ``src`` could be imported.
        ValueError: A bad ``format`` or ``step``.

    Example:
        >>> report = ckpt.import_checkpoint("old/epoch_10.pt", "runs/exp1")
        >>> print(report.summary())
    """
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
        raise ValueError(f"the source's step {chosen} exceeds ckpt.MAX_STEP; pass step=")
    root = os.fspath(directory)
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
    if os.path.isdir(source):
        if format in ("dcp", "auto") and os.path.exists(os.path.join(source, ".metadata")):
            return _map_dcp(source)
        if format in ("hf-trainer", "auto") and (
            any(os.path.exists(os.path.join(source, n)) for n in _HF_MODEL_FILES)
            or os.path.exists(os.path.join(source, "trainer_state.json"))
        ):
            return _map_hf_trainer(source)
        raise CheckpointNotFoundError(
            "not a checkpoint directory ckpt can import: no DCP .metadata and no Hugging Face "
            f"files ({', '.join(_HF_MODEL_FILES)}, trainer_state.json)",
            path=source,
        )
    if format == "safetensors" or (format == "auto" and source.endswith(".safetensors")):
        return map_classic(load_safetensors(source), "safetensors")
    loaded = load_torch(source)
    if format == "lightning" or (format == "auto" and is_lightning(loaded)):
        if not isinstance(loaded, Mapping):
            raise CheckpointError("not a Lightning checkpoint (not a dict)", path=source)
        return map_lightning(loaded)
    return map_classic(loaded)


def _map_hf_trainer(source: str) -> Mapped:
    out = Mapped("hf-trainer")
    model = _hf_model(source, out)
    if model is not None:
        out.items["model"] = ("module", model, {})
    for file_name, base in (
        ("optimizer.pt", "optimizer"),
        ("scheduler.pt", "scheduler"),
        ("scaler.pt", "scaler"),
    ):
        path = os.path.join(source, file_name)
        if not os.path.exists(path):
            continue
        sub = map_classic({base: load_torch(path)}, "hf-trainer")
        for name, value in sub.items.items():
            out.items[name] = value
            out.mapped[file_name] = name
        out.notes.extend(sub.notes)
        for key, value in sub.extra.items():
            out.dropped[f"{file_name}[{key}]"] = f"not a {base} state: {type(value).__name__}"
        if base == "optimizer" and "optimizer" in out.items and model is not None:
            kind, state, _ = out.items["optimizer"]
            from ckpt.convert.layouts import optimizer_param_records  # noqa: PLC0415

            records, notes = optimizer_param_records(state, model)
            out.items["optimizer"] = (kind, state, {"params": records})
            out.notes.extend(n for n in notes if n not in out.notes)
    for name in sorted(os.listdir(source)):
        path = os.path.join(source, name)
        if name in _HF_MODEL_FILES or name in ("optimizer.pt", "scheduler.pt", "scaler.pt"):
            continue
        if name.startswith(("model-", "pytorch_model-")):
            continue  # shards, read through their index
        if name == "trainer_state.json":
            _hf_trainer_state(load_json(path), out)
        elif name.startswith("rng_state") and name.endswith(".pth"):
            try:
                out.keep(name, load_torch(path))
            except CheckpointError as e:
                out.dropped[name] = f"not loadable with weights_only: {e}"
            if name in out.extra:
                out.notes.append(
                    f"{name} is kept under 'extra' as data: ckpt restores random streams only "
                    "from its own saves"
                )
        elif name.endswith(".json") and os.path.isfile(path):
            out.keep(name, load_json(path))
        elif name == "training_args.bin":
            out.dropped[name] = "a pickled TrainingArguments object: never unpickled"
        else:
            out.dropped[name] = "not a training state ckpt knows (copy it yourself if needed)"
    return out


def _hf_model(source: str, out: Mapped) -> dict[str, torch.Tensor] | None:
    for index_name, load in (
        ("model.safetensors.index.json", load_safetensors),
        ("pytorch_model.bin.index.json", load_torch),
    ):
        index_path = os.path.join(source, index_name)
        if os.path.exists(index_path):
            weight_map = load_json(index_path).get("weight_map", {})
            model: dict[str, torch.Tensor] = {}
            for shard in dict.fromkeys(weight_map.values()):
                if not isinstance(shard, str) or os.path.basename(shard) != shard:
                    out.dropped[index_name] = f"bad shard name {shard!r}"
                    return None
                model.update(load(os.path.join(source, shard)))
            out.mapped[index_name] = "model"
            return {k: model[k] for k in weight_map if k in model}
    for file_name, load in (
        ("model.safetensors", load_safetensors),
        ("pytorch_model.bin", load_torch),
    ):
        path = os.path.join(source, file_name)
        if os.path.exists(path):
            out.mapped[file_name] = "model"
            loaded = load(path)
            return dict(loaded)
    out.notes.append("no model weights found in the directory")
    return None


def _hf_trainer_state(state: Any, out: Mapped) -> None:
    out.keep("trainer_state.json", state)
    if not isinstance(state, Mapping):
        return
    step = state.get("global_step")
    if isinstance(step, int) and not isinstance(step, bool) and step >= 0:
        out.step = step
        out.mapped["trainer_state.json[global_step]"] = "step"
    epoch = state.get("epoch")
    if isinstance(epoch, (int, float)) and not isinstance(epoch, bool):
        if float(epoch).is_integer():
            out.epoch = int(epoch)
            out.mapped["trainer_state.json[epoch]"] = "epoch"
        else:
            out.notes.append(
                f"trainer_state.json has a fractional epoch {epoch}: kept under 'extra' only"
            )


def _map_dcp(source: str) -> Mapped:
    state, failed = load_dcp(source)
    state = {k: _packed_optimizer(v) for k, v in state.items()}
    out = map_classic(state, "dcp")
    out.layout = "dcp"
    for key, why in failed.items():
        out.dropped[key] = why
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
