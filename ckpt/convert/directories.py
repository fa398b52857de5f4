"""Map checkpoint directories of the Hugging Face Trainer and of Accelerate's ``save_state``.

A Trainer ``checkpoint-N/`` holds the model (``model.safetensors``,
``pytorch_model.bin``, or shards with their index), ``optimizer.pt``,
``scheduler.pt``, ``scaler.pt``, ``rng_state*.pth``, ``trainer_state.json``
and JSON configs. An Accelerate ``save_state`` directory holds
``model.safetensors`` (``model_1.safetensors``, ... for more models; or
``pytorch_model.bin``, ``pytorch_model_1.bin``), ``optimizer.bin``
(``optimizer_1.bin``, ...), ``scheduler.bin`` (...), ``scaler.pt``,
``random_states_*.pkl`` and ``custom_checkpoint_*.pkl``. Files are read
through :mod:`ckpt.convert.loading` only (``weights_only``; no link followed
out of the directory, no special file opened).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

import torch

from ckpt.convert.guard import hub_blobs
from ckpt.convert.layouts import Mapped, map_classic, optimizer_param_records
from ckpt.convert.loading import load_json, load_safetensors, load_torch
from ckpt.errors import CheckpointError, CorruptCheckpointError

__all__ = ["HF_MODEL_FILES", "is_accelerate", "is_hf_trainer", "map_accelerate", "map_hf_trainer"]

HF_MODEL_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
"""The model files of a Trainer directory (one of them)."""

_ACCELERATE = re.compile(
    r"(?P<base>model|pytorch_model|optimizer|scheduler)(?:_(?P<n>[0-9]+))?\.(?P<ext>safetensors|bin)"
)


def is_hf_trainer(names: Mapping[str, str]) -> bool:
    """Whether a directory's entries look like a Trainer checkpoint."""
    return any(n in names for n in HF_MODEL_FILES) or "trainer_state.json" in names


def is_accelerate(names: Mapping[str, str]) -> bool:
    """Whether a directory's entries look like an Accelerate ``save_state`` directory."""
    return "optimizer.bin" in names or any(n.startswith("random_states_") for n in names)


_HF_STATE_FILES = (
    ("optimizer.pt", "optimizer"),
    ("scheduler.pt", "scheduler"),
    ("scaler.pt", "scaler"),
)


def map_hf_trainer(source: str, names: dict[str, str]) -> Mapped:
    """Map a Trainer checkpoint directory (``names``: its entries, from ``source_entries``)."""
    out = Mapped("hf-trainer")
    blobs = hub_blobs(source)
    model = _hf_model(source, names, blobs, out)
    if model is not None:
        out.items["model"] = ("module", model, {})
    for file_name, base in _HF_STATE_FILES:
        if file_name not in names:
            continue
        sub = map_classic({base: load_torch(os.path.join(source, file_name), blobs=blobs)})
        for name, value in sub.items.items():
            out.items[name] = value
            out.mapped[file_name] = name
        out.notes.extend(sub.notes)
        for key, value in sub.extra.items():
            out.dropped[f"{file_name}[{key}]"] = f"not a {base} state: {type(value).__name__}"
        if base == "optimizer" and "optimizer" in out.items and model is not None:
            kind, state, _ = out.items["optimizer"]
            records, notes = optimizer_param_records(state, model)
            out.items["optimizer"] = (kind, state, {"params": records})
            out.notes.extend(n for n in notes if n not in out.notes)
    for name, kind in names.items():
        _hf_other_file(source, name, kind, blobs, out)
    return out


def _hf_other_file(source: str, name: str, kind: str, blobs: str | None, out: Mapped) -> None:
    """Map one more file of a Trainer directory: state JSON, random state, or reported."""
    path = os.path.join(source, name)
    if name in HF_MODEL_FILES or name in {n for n, _ in _HF_STATE_FILES}:
        return
    if name.startswith(("model-", "pytorch_model-")):
        return  # shards, read through their index
    if name == "trainer_state.json":
        _hf_trainer_state(load_json(path, blobs=blobs), out)
    elif name.startswith("rng_state") and name.endswith(".pth"):
        try:
            out.keep(name, load_torch(path, blobs=blobs))
        except CheckpointError as e:
            out.dropped[name] = f"not loadable with weights_only: {e}"
        if name in out.extra:
            out.notes.append(
                f"{name} is kept under 'extra' as data: ckpt restores random streams only "
                "from its own saves"
            )
    elif name.endswith(".json"):
        out.keep(name, load_json(path, blobs=blobs))
    elif name == "training_args.bin":
        out.dropped[name] = "a pickled TrainingArguments object: never unpickled"
    elif kind != "file":
        out.dropped[name] = f"{kind}: not read"
    else:
        out.dropped[name] = "not a training state ckpt knows (copy it yourself if needed)"


def _hf_model(
    source: str, names: dict[str, str], blobs: str | None, out: Mapped
) -> dict[str, torch.Tensor] | None:
    loaders = {"safetensors": load_safetensors, "bin": load_torch}
    for index_name, load in (
        ("model.safetensors.index.json", loaders["safetensors"]),
        ("pytorch_model.bin.index.json", loaders["bin"]),
    ):
        if index_name in names:
            index_path = os.path.join(source, index_name)
            weight_map = _weight_map(load_json(index_path, blobs=blobs), index_path)
            model: dict[str, torch.Tensor] = {}
            for shard in dict.fromkeys(weight_map.values()):
                model.update(load(os.path.join(source, shard), blobs=blobs))
            missing = [k for k in weight_map if k not in model]
            if missing:
                raise CorruptCheckpointError(
                    f"{len(missing)} tensor(s) of the weight map are in no shard",
                    path=index_path,
                    key=missing[0],
                )
            out.mapped[index_name] = "model"
            return {k: model[k] for k in weight_map}
    for file_name, load in (
        ("model.safetensors", loaders["safetensors"]),
        ("pytorch_model.bin", loaders["bin"]),
    ):
        if file_name in names:
            out.mapped[file_name] = "model"
            return dict(load(os.path.join(source, file_name), blobs=blobs))
    out.notes.append("no model weights found in the directory")
    return None


def _weight_map(index: Any, path: str) -> dict[str, str]:
    """An index's ``weight_map``: tensor names to shard file names in the same directory."""
    weight_map = index.get("weight_map") if isinstance(index, Mapping) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CorruptCheckpointError("no weight_map (a dict of names to files)", path=path)
    for key, shard in weight_map.items():
        if (
            not isinstance(shard, str)
            or os.path.basename(shard) != shard
            or shard in ("", ".", "..")
        ):
            raise CorruptCheckpointError(f"bad shard name {shard!r:.80}", path=path, key=key)
    return weight_map


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


def _accelerate_item(base: str, n: str | None) -> str:
    item = "model" if base in ("model", "pytorch_model") else base
    return item if n is None else f"{item}_{n}"


def map_accelerate(source: str, names: dict[str, str]) -> Mapped:
    """Map an Accelerate ``save_state`` directory: models, optimizers, schedulers, scaler.

    The directory records no step: the import writes step 0 unless told (``--step``).
    """
    out = Mapped("accelerate")
    optimizers: dict[str, Any] = {}
    for name, kind in names.items():
        found = _ACCELERATE.fullmatch(name)
        path = os.path.join(source, name)
        if found is None or kind != "file":
            _accelerate_other(path, name, kind, out)
            continue
        item = _accelerate_item(found["base"], found["n"])
        load = load_safetensors if found["ext"] == "safetensors" else load_torch
        value = load(path)
        if item.startswith("model"):
            sub = map_classic(value)
            if "model" not in sub.items:
                out.dropped[name] = "not a model state dict"
                continue
            out.items[item] = sub.items["model"]
        else:
            base = "optimizer" if item.startswith("optimizer") else "scheduler"
            sub = map_classic({base: value})
            if base not in sub.items:
                out.dropped[name] = f"not a {base} state"
                continue
            out.items[item] = sub.items[base]
            if base == "optimizer":
                optimizers[item] = sub.items[base]
        out.mapped[name] = item
    for item, (kind, state, _) in optimizers.items():
        suffix = item.removeprefix("optimizer")
        model = out.items.get("model" + suffix, (None, None, None))[1]
        records, notes = optimizer_param_records(state, model)
        out.items[item] = (kind, state, {"params": records})
        out.notes.extend(n for n in notes if n not in out.notes)
    out.notes.append("Accelerate records no step: pass --step (step=) to choose it")
    return out


def _accelerate_other(path: str, name: str, kind: str, out: Mapped) -> None:
    if kind != "file":
        out.dropped[name] = f"{kind}: not read"
    elif name == "scaler.pt":
        sub = map_classic({"scaler": load_torch(path)})
        if "scaler" in sub.items:
            out.items["scaler"] = sub.items["scaler"]
            out.mapped[name] = "scaler"
    elif name.endswith((".pkl", ".bin", ".pt")):
        try:
            out.keep(name, load_torch(path))
        except CheckpointError as e:
            out.dropped[name] = f"not loadable with weights_only: {e.reason}"
        if name.startswith("random_states_") and name in out.extra:
            out.notes.append(
                f"{name} is kept under 'extra' as data: ckpt restores random streams only "
                "from its own saves"
            )
    else:
        out.dropped[name] = "not a training state ckpt knows (copy it yourself if needed)"
