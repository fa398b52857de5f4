"""Recognise the layouts of training checkpoints and map them onto ckpt items (pure).

A layout is mapped onto the items ``model`` (a module state dict), ``optimizer``
(torch's index-packed optimizer state), ``scheduler``, ``scaler`` (stateful
objects; several optimizers or schedulers become ``optimizer_1``, ...), and
``extra`` (a dict of every other value that is plain data). The step comes from
``global_step``/``step``, else ``epoch``; the epoch from ``epoch``. Nothing is
dropped silently: each source key is either mapped, kept under ``extra``, or
reported with the reason it could not be kept.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from ckpt.state.optim import PARAM_SHAPED_KEYS
from ckpt.state.tree import flatten

__all__ = [
    "EXTRA_ITEM",
    "MODEL_KEYS",
    "OPTIMIZER_KEYS",
    "SCHEDULER_KEYS",
    "Mapped",
    "is_state_dict",
    "map_classic",
    "map_lightning",
    "optimizer_param_records",
]

MODEL_KEYS = ("model", "net", "state_dict", "model_state_dict", "module", "model_state")
OPTIMIZER_KEYS = ("optimizer", "optimizer_state_dict", "optim", "opt", "optimizer_state")
SCHEDULER_KEYS = ("scheduler", "lr_scheduler", "scheduler_state_dict", "sched")
SCALER_KEYS = ("scaler", "grad_scaler", "scaler_state_dict", "amp")
STEP_KEYS = ("global_step", "step", "iteration", "iter")
EPOCH_KEYS = ("epoch",)
EXTRA_ITEM = "extra"
_BUFFER_SUFFIXES = ("running_mean", "running_var", "num_batches_tracked")


@dataclass
class Mapped:
    """What a source maps to: items (kind, state, extras), step, epoch and the bookkeeping."""

    layout: str
    items: dict[str, tuple[str, Any, dict[str, Any]]] = field(default_factory=dict)
    mapped: dict[str, str] = field(default_factory=dict)
    """``{source key: item it became}``."""
    extra: dict[str, Any] = field(default_factory=dict)
    dropped: dict[str, str] = field(default_factory=dict)
    """``{source key: why it could not be kept}``."""
    notes: list[str] = field(default_factory=list)
    step: int | None = None
    epoch: int | None = None

    def keep(self, key: str, value: Any) -> None:
        """Keep ``value`` under ``extra`` if it is plain data, else report it."""
        try:
            flatten(value, EXTRA_ITEM)
        except (TypeError, ValueError) as e:
            self.dropped[key] = f"not plain data: {e}"
            return
        self.extra[key] = value


def is_state_dict(value: object) -> bool:
    """A non-empty mapping of str keys to tensors (``_extra_state`` entries aside)."""
    if not isinstance(value, Mapping) or not value:
        return False
    tensors = 0
    for k, v in value.items():
        if not isinstance(k, str):
            return False
        if isinstance(v, torch.Tensor):
            tensors += 1
        elif not k.endswith("_extra_state"):
            return False
    return tensors > 0


def is_optimizer_state(value: object) -> bool:
    """Shaped like ``Optimizer.state_dict()``: ``state`` and ``param_groups``."""
    return (
        isinstance(value, Mapping)
        and set(value) == {"state", "param_groups"}
        and isinstance(value["state"], Mapping)
        and isinstance(value["param_groups"], list)
    )


def _as_int(value: object) -> int | None:
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_floating_point():
        value = int(value.item())
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    return None


def optimizer_param_records(
    state: Mapping[str, Any], model: Mapping[str, torch.Tensor] | None
) -> tuple[list[dict[str, Any]], list[str]]:
    """Each packed index's ``{"name": None, "shape": [...]}``, in param-group order.

    A parameter's shape comes from its per-parameter state (``exp_avg``,
    ``momentum_buffer``, ...); else, when the optimizer has as many parameters
    as the model state has floating-point entries other than norm statistics,
    from the model's entry at the same position (``optimizer(model.parameters())``).

    Returns:
        The records and notes on what had to be guessed or is unknown.
    """
    indices = [i for g in state["param_groups"] for i in g.get("params", [])]
    known: dict[Any, list[int]] = {}
    for index, value in state["state"].items():
        if isinstance(value, Mapping):
            for key, t in value.items():
                if key in PARAM_SHAPED_KEYS and isinstance(t, torch.Tensor):
                    known[index] = list(t.shape)
                    break
    notes: list[str] = []
    positional: list[list[int]] | None = None
    if model is not None:
        candidates = [
            list(t.shape)
            for k, t in model.items()
            if isinstance(t, torch.Tensor)
            and t.is_floating_point()
            and not k.endswith(_BUFFER_SUFFIXES)
        ]
        if len(candidates) == len(indices) and all(
            known.get(i, candidates[p]) == candidates[p] for p, i in enumerate(indices)
        ):
            positional = candidates
    records = []
    unknown = []
    for position, index in enumerate(indices):
        if index in known:
            shape = known[index]
        elif positional is not None:
            shape = positional[position]
        else:
            shape = []
            unknown.append(index)
        records.append({"name": None, "shape": shape})
    if positional is not None and len(known) < len(indices):
        notes.append(
            "optimizer parameter shapes without state were taken from the model's entries "
            "in order (as optimizer(model.parameters()) lists them)"
        )
    if unknown:
        notes.append(
            f"optimizer parameters {unknown} have no state and no model entry to take a "
            "shape from: recorded as shape [] (restore will refuse them)"
        )
    return records, notes


def _add_optimizer(out: Mapped, name: str, source_key: str, state: Any, model: Any) -> None:
    records, notes = optimizer_param_records(state, model)
    packed = {"state": dict(state["state"]), "param_groups": list(state["param_groups"])}
    out.items[name] = ("optimizer", packed, {"params": records})
    out.mapped[source_key] = name
    out.notes.extend(notes)


def _add_stateful(out: Mapped, name: str, source_key: str, state: Any) -> None:
    out.items[name] = ("stateful", dict(state), {})
    out.mapped[source_key] = name


def _numbered(base: str, i: int) -> str:
    return base if i == 0 else f"{base}_{i}"


def _step_and_epoch(out: Mapped, source: Mapping[str, Any], used: set[str]) -> None:
    for key in STEP_KEYS:
        if key in source and out.step is None:
            step = _as_int(source[key])
            if step is not None:
                out.step, out.mapped[key] = step, "step"
                used.add(key)
    for key in EPOCH_KEYS:
        if key in source:
            epoch = _as_int(source[key])
            if epoch is not None:
                out.epoch, out.mapped[key] = epoch, "epoch"
                used.add(key)
                if out.step is None:
                    out.step = epoch
                    out.notes.append("no step recorded: the epoch is used as the step")


def map_classic(source: Any, layout: str = "torch.save") -> Mapped:
    """Map a classic ``torch.save`` checkpoint dict, or a bare state dict."""
    out = Mapped(layout)
    if is_state_dict(source):
        out.items["model"] = ("module", source, {})
        out.mapped["<state dict>"] = "model"
        out.layout = "state dict"
        return out
    if not isinstance(source, Mapping):
        out.dropped["<file>"] = f"a {type(source).__name__}, not a dict of states"
        return out
    used: set[str] = set()
    model = None
    for key in MODEL_KEYS:
        if key in source and is_state_dict(source[key]) and "model" not in out.items:
            model = source[key]
            out.items["model"] = ("module", model, {})
            out.mapped[key] = "model"
            used.add(key)
    count = 0
    for key in OPTIMIZER_KEYS:
        value = source.get(key)
        values = value if isinstance(value, list) else [value]
        if key in source and values and all(is_optimizer_state(v) for v in values):
            for v in values:
                _add_optimizer(out, _numbered("optimizer", count), key, v, model)
                count += 1
            used.add(key)
    for base, keys in (("scheduler", SCHEDULER_KEYS), ("scaler", SCALER_KEYS)):
        count = 0
        for key in keys:
            value = source.get(key)
            values = value if isinstance(value, list) else [value]
            if key in source and values and all(isinstance(v, Mapping) for v in values):
                for v in values:
                    _add_stateful(out, _numbered(base, count), key, v)
                    count += 1
                used.add(key)
    _step_and_epoch(out, source, used)
    for key, value in source.items():
        if key not in used:
            out.keep(str(key), value)
    if "model" not in out.items:
        out.notes.append("no model state found (looked for " + ", ".join(MODEL_KEYS) + ")")
    return out


def map_lightning(source: Mapping[str, Any]) -> Mapped:
    """Map a Lightning ``.ckpt`` dict (``state_dict``, ``optimizer_states``, ``lr_schedulers``)."""
    out = Mapped("lightning")
    used: set[str] = set()
    model = source.get("state_dict")
    if model is not None and is_state_dict(model):
        out.items["model"] = ("module", model, {})
        out.mapped["state_dict"] = "model"
        used.add("state_dict")
        if all(k.startswith("model.") for k in model):
            out.notes.append(
                "every model key starts with 'model.' (a LightningModule attribute): restore "
                "into the LightningModule, or strip the prefix with CheckpointManager.read()"
            )
    for key, base, check in (
        ("optimizer_states", "optimizer", is_optimizer_state),
        ("lr_schedulers", "scheduler", lambda v: isinstance(v, Mapping)),
    ):
        values = source.get(key)
        if isinstance(values, list) and all(check(v) for v in values):
            for i, v in enumerate(values):
                name = _numbered(base, i)
                if base == "optimizer":
                    _add_optimizer(out, name, key, v, model if is_state_dict(model) else None)
                else:
                    _add_stateful(out, name, key, v)
                out.mapped[key] = base if len(values) == 1 else f"{base}, {base}_1, ..."
            used.add(key)
    _step_and_epoch(out, source, used)
    for key, value in source.items():
        if key not in used:
            out.keep(str(key), value)
    return out


def is_lightning(source: object) -> bool:
    """Whether a loaded dict is a Lightning checkpoint."""
    return isinstance(source, Mapping) and (
        "pytorch-lightning_version" in source
        or "optimizer_states" in source
        or "lr_schedulers" in source
        or ("state_dict" in source and "loops" in source)
    )
