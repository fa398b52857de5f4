"""The ``nn.Module`` kind: keys, shapes and metadata checked as torch's load checks them, first.

Restores as ``nn.Module.load_state_dict`` does, including what torch does in
a module's own code: lazy modules materialize their parameters, observers and
fake-quantize modules resize their buffers, parametrizations load their
originals. Keys that differ only by wrapper prefixes (``_orig_mod.`` from
``torch.compile``, ``module.`` from DDP/DataParallel) are matched up.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from torch.nn.parameter import UninitializedTensorMixin  # type: ignore[attr-defined]

from ckpt.errors import CorruptCheckpointError, IncompatibleCheckpointError
from ckpt.format import ItemRecord
from ckpt.restoring.inplace import loads_own_way, module_loads_plainly
from ckpt.state.kinds.base import Captured, ItemKind, ItemPlan, RestoreOptions
from ckpt.state.tree import Json, flatten, tensors_by_path, unflatten
from ckpt.torch_compat import module_metadata, with_module_metadata

__all__ = ["ModuleKind", "bare_key"]

WRAPPER_PREFIXES = ("_orig_mod", "module")
"""Module names that wrappers add in front of every key (torch.compile; DDP and DataParallel)."""

DRY_RUN_MAX_BYTES = 16 * 1024 * 1024
"""Submodules that load their own way are first loaded on a copy when at most this big."""

_CPU = torch.device("cpu")


def bare_key(key: str, *, keep_last: bool = True) -> str:
    """``key`` without the wrapper prefixes in front (``_orig_mod.module.fc.w`` -> ``fc.w``)."""
    parts = key.split(".")
    i = 0
    while i < len(parts) - (1 if keep_last else 0) and parts[i] in WRAPPER_PREFIXES:
        i += 1
    return ".".join(parts[i:])


def _is_uninitialized(t: object) -> bool:
    return isinstance(t, UninitializedTensorMixin)


class ModuleKind(ItemKind):
    """An ``nn.Module``: restored with its ``load_state_dict``."""

    stored = "module"
    order = 0

    def accepts(self, obj: object) -> bool:
        """Whether ``obj`` is an ``nn.Module``."""
        return isinstance(obj, nn.Module)

    def capture(self, name: str, obj: Any, param_names: Mapping[int, str]) -> Captured:
        """Capture the state dict and torch's ``_metadata`` (module versions)."""
        state = self.state_of(name, obj)
        extra: dict[str, Json] = {}
        metadata = module_metadata(state)
        if metadata is not None:
            extra["module_metadata"], _ = flatten(dict(metadata), name)
        tree, tensors = flatten(state, name)
        return Captured(self.stored, tree, tensors, extra)

    def check_saved(self, name: str, state: Any, record: ItemRecord) -> None:
        """Keys are strings, values tensors (``_extra_state``: anything), metadata well formed."""
        if not isinstance(state, dict):
            raise CorruptCheckpointError("a module state must be a dict", key=name)
        for key, value in state.items():
            if not isinstance(key, str):
                raise CorruptCheckpointError(f"module key {key!r} is not a string", key=name)
            if not isinstance(value, torch.Tensor) and not key.endswith("_extra_state"):
                raise CorruptCheckpointError(
                    f"module entry is a {type(value).__name__}, not a tensor", key=f"{name}.{key}"
                )
        _decode_metadata(name, record)

    def validate(
        self, plan: ItemPlan, options: RestoreOptions, live_names: Mapping[int, str]
    ) -> None:
        """Match keys (through wrapper prefixes), check every value, decide where tensors go."""
        name, module = plan.name, plan.obj
        self.check_saved(name, plan.saved, plan.record)
        live = module.state_dict()
        key_map = _key_map(list(plan.saved), list(live), strict=options.strict)
        saved = plan.saved if key_map is None else _renamed(plan.saved, key_map)
        own_way = {
            p for p, sub in module.named_modules(remove_duplicate=False) if loads_own_way(sub)
        }
        _check_keys(name, saved, live, strict=options.strict)
        _check_values(name, saved, live, own_way)
        plan.extra.update(
            key_map=key_map,
            live_metadata=module_metadata(live),
            strict=options.strict,
            assign=options.assign,
        )
        plan.extra["own_way"] = sorted(own_way)
        plainly = module_loads_plainly(module)
        plan.runs_user_code = not plainly
        live_by_path = tensors_by_path(live)
        plan.written = [t for t in live_by_path.values() if not _is_uninitialized(t)]
        placeholders = plan.placeholders
        if plainly and not options.assign:
            for path, t in tensors_by_path(saved).items():
                if id(t) in placeholders and path in live_by_path:
                    plan.counterparts.setdefault(placeholders[id(t)], []).append(
                        (live_by_path[path], None)  # load_state_dict copies into it
                    )
        if not options.override:
            for path, t in tensors_by_path(saved).items():
                if id(t) in placeholders:
                    device = _staging_device(live_by_path.get(path), assign=options.assign)
                    plan.targets[placeholders[id(t)]] = (device, None)

    def build(self, plan: ItemPlan, tensors: Mapping[str, torch.Tensor]) -> Any:
        """The state as an ``OrderedDict`` with ``_metadata``; dry-run own-way loaders."""
        state = unflatten(plan.record.state, tensors)
        key_map = plan.extra.get("key_map")
        metadata = _decode_metadata(plan.name, plan.record)
        if key_map is not None:
            state = _renamed(state, key_map)
            if metadata is not None:
                metadata = _renamed_metadata(metadata, plan.extra.get("live_metadata"))
        state = OrderedDict(state)
        if metadata is not None:
            with_module_metadata(state, OrderedDict(metadata))
        for prefix in plan.extra.get("own_way", []):
            _dry_run(plan, prefix, state, strict=plan.extra.get("strict", True))
        return state

    def apply(self, plan: ItemPlan, state: Any) -> tuple[list[str], list[str]]:
        """``load_state_dict(state, strict=, assign=)``; return the missing/unexpected keys."""
        result = plan.obj.load_state_dict(
            state, strict=plan.extra.get("strict", True), assign=plan.extra.get("assign", False)
        )
        return list(result.missing_keys), list(result.unexpected_keys)


def _staging_device(live: torch.Tensor | None, *, assign: bool) -> torch.device | None:
    """Where to build a tensor whose live counterpart is ``live`` (``None``: none).

    A module's tensors are staged in host memory and copied into its parameters
    by ``load_state_dict``, so a restore never needs twice the model's size in
    accelerator memory; meta modules need no data (unless ``assign``, which
    takes the staged tensors themselves: built where the live ones are, meta on the CPU).
    """
    if live is None:
        return None
    if assign:
        return _CPU if live.device.type == "meta" else live.device
    return live.device if live.device.type == "meta" else _CPU


def _decode_metadata(name: str, record: ItemRecord) -> dict[str, dict[str, Any]] | None:
    raw = record.extra.get("module_metadata")
    if raw is None:
        return None
    metadata = unflatten(raw, {})
    where = f"{name}._metadata"
    if not isinstance(metadata, dict):
        raise CorruptCheckpointError("module metadata must be a dict", key=where)
    for prefix, entry in metadata.items():
        if not isinstance(prefix, str) or not isinstance(entry, dict):
            raise CorruptCheckpointError(
                "module metadata must map module names to dicts", key=f"{where}[{prefix!r}]"
            )
        if not all(isinstance(k, str) for k in entry):
            raise CorruptCheckpointError(
                "module metadata keys must be strings", key=f"{where}[{prefix!r}]"
            )
        version = entry.get("version")
        if version is not None and (isinstance(version, bool) or not isinstance(version, int)):
            raise CorruptCheckpointError(
                f"module version must be an int, got {version!r}", key=f"{where}[{prefix!r}]"
            )
    return metadata


def _key_map(saved: list[str], live: list[str], *, strict: bool) -> dict[str, str] | None:
    """Saved key -> live key when the two differ only by wrapper prefixes, else ``None``."""
    if set(saved) == set(live):
        return None
    bare_saved = {bare_key(k): k for k in saved}
    bare_live = {bare_key(k): k for k in live}
    if len(bare_saved) != len(saved) or len(bare_live) != len(live):
        return None  # stripping prefixes would merge keys: not a wrapper
    if strict:
        if set(bare_saved) != set(bare_live):
            return None
        return {s: bare_live[b] for b, s in bare_saved.items()}
    common = bare_saved.keys() & bare_live.keys()
    if len(common) <= len(set(saved) & set(live)):
        return None
    mapping = {k: k for k in saved}
    mapping.update({bare_saved[b]: bare_live[b] for b in common})
    if len(set(mapping.values())) != len(mapping):
        return None
    return mapping


def _renamed(state: Mapping[str, Any], key_map: Mapping[str, str]) -> dict[str, Any]:
    return {key_map.get(k, k): v for k, v in state.items()}


def _renamed_metadata(
    metadata: Mapping[str, dict[str, Any]], live: Mapping[str, Any] | None
) -> dict[str, dict[str, Any]]:
    """Saved metadata keyed by the live module names (wrapper prefixes matched up)."""
    if live is None:
        return dict(metadata)
    by_bare: dict[str, str] = {}
    for prefix in live:
        by_bare[bare_key(prefix, keep_last=False)] = prefix  # the innermost wins
    out: dict[str, dict[str, Any]] = {}
    for prefix, entry in metadata.items():
        target = by_bare.get(bare_key(prefix, keep_last=False))
        if target is not None:
            out[target] = entry
    return out


def _prefix_hint(saved: list[str], live: list[str]) -> str:
    """Say how the keys differ when a wrapper prefix explains it."""
    for wrapper in WRAPPER_PREFIXES:
        p = wrapper + "."
        saved_has = bool(saved) and all(k.startswith(p) for k in saved)
        live_has = bool(live) and all(k.startswith(p) for k in live)
        if saved_has != live_has:
            side = "checkpoint's" if saved_has else "live module's"
            return (
                f" The {side} keys start with {p!r} and the others do not (torch.compile adds "
                "'_orig_mod.', DDP and DataParallel add 'module.'); ckpt matches such keys up "
                "when nothing else differs, so the other differences are real: compare the "
                "model definitions."
            )
    return ""


def _check_keys(
    name: str, saved: Mapping[str, Any], live: Mapping[str, Any], *, strict: bool
) -> None:
    """Raise torch's missing/unexpected-keys error, in its wording, before loading anything."""
    if not strict:
        return
    missing = [k for k in live if k not in saved]
    unexpected = [k for k in saved if k not in live]
    errors = []
    if unexpected:
        errors.append(
            "Unexpected key(s) in state_dict: " + ", ".join(f'"{k}"' for k in unexpected) + "."
        )
    if missing:
        errors.append("Missing key(s) in state_dict: " + ", ".join(f'"{k}"' for k in missing) + ".")
    if errors:
        raise IncompatibleCheckpointError(
            f"Error(s) in loading state_dict for item {name!r}:\n\t"
            + "\n\t".join(errors)
            + _prefix_hint(list(saved), list(live)),
            key=name,
        )


def _owner(key: str) -> str:
    return key.rsplit(".", 1)[0] if "." in key else ""


def _check_values(
    name: str, saved: Mapping[str, Any], live: Mapping[str, Any], own_way: set[str]
) -> None:
    """Every saved value must be something the live entry can take: a tensor of its shape."""
    errors = []
    for key, value in saved.items():
        target = live.get(key)
        if not isinstance(target, torch.Tensor):
            continue
        if not isinstance(value, torch.Tensor):
            errors.append(
                f'While copying the parameter named "{key}", expected torch.Tensor from '
                f"checkpoint but received {type(value).__name__}"
            )
            continue
        if value.is_complex() and not _is_uninitialized(target) and not target.is_complex():
            errors.append(f"cannot copy complex {key} into the real {target.dtype} in the model")
        if _is_uninitialized(target) or _owner(key) in own_way:
            continue  # torch's lazy load, or the module's own code, decides the shape
        if target.dim() == 0 and value.dim() == 1:
            continue  # torch accepts a 1-d tensor for a 0-d parameter (old checkpoints)
        if value.shape != target.shape:
            errors.append(
                f"size mismatch for {key}: copying a param with shape {value.shape} from "
                f"checkpoint, the shape in current model is {target.shape}."
            )
    if errors:
        raise IncompatibleCheckpointError(
            f"Error(s) in loading state_dict for item {name!r}:\n\t" + "\n\t".join(errors), key=name
        )


def _dry_run(plan: ItemPlan, prefix: str, state: Mapping[str, Any], *, strict: bool) -> None:
    """Load a small own-way submodule's part of the state into a copy of it, to see it accepted."""
    module = plan.obj if prefix == "" else plan.obj.get_submodule(prefix)
    size = sum(
        t.nbytes
        for t in module.state_dict().values()
        if isinstance(t, torch.Tensor) and not _is_uninitialized(t)
    )
    if size > DRY_RUN_MAX_BYTES:
        return
    head = prefix + "." if prefix else ""
    part: OrderedDict[str, Any] = OrderedDict(
        (k[len(head) :], v) for k, v in state.items() if k.startswith(head)
    )
    metadata = module_metadata(state)
    if metadata is not None:
        with_module_metadata(
            part,
            OrderedDict(
                (k[len(head) :] if k.startswith(head) else "", v)
                for k, v in metadata.items()
                if k == prefix or k.startswith(head)
            ),
        )
    try:
        scratch = copy.deepcopy(module)
    except Exception:
        return
    try:
        scratch.load_state_dict(part, strict=strict)
    except Exception as e:
        where = f"{plan.name}.{prefix}" if prefix else plan.name
        raise IncompatibleCheckpointError(
            f"module {type(module).__qualname__} refused the saved state: {e}", key=where
        ) from e
