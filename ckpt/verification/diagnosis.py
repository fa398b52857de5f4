"""Likely causes of an inexact resume, found in the loop's code and items."""

from __future__ import annotations

import random
import sys
import types
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch.utils.data import DataLoader

from ckpt.data import ResumableDataLoader, ResumableSampler
from ckpt.verification.report import Difference
from ckpt.verification.trace import Leaf, Trace

__all__ = ["diagnose", "outside_state"]


def _names(code: types.CodeType) -> Iterator[str]:
    yield from code.co_names
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            yield from _names(const)


def _referenced(functions: list[Callable[..., Any]], depth: int = 2) -> dict[str, Any]:
    """Objects the functions reach by global name or closure, by ``module.name``.

    Functions of the same modules they call are followed ``depth`` levels deep.
    """
    found: dict[str, Any] = {}
    seen: set[int] = set()
    todo = [(fn, 0) for fn in functions]
    while todo:
        fn, level = todo.pop()
        fn = getattr(fn, "__func__", fn)
        code = getattr(fn, "__code__", None)
        if code is None or id(fn) in seen:
            continue
        seen.add(id(fn))
        module = getattr(fn, "__module__", "?")
        namespace = getattr(fn, "__globals__", {})
        pairs = [(n, namespace[n]) for n in set(_names(code)) if n in namespace]
        cells = fn.__closure__ or ()
        pairs += [(n, c.cell_contents) for n, c in zip(code.co_freevars, cells, strict=False)]
        for name, value in pairs:
            if isinstance(value, types.FunctionType):
                if level < depth and value.__module__ == module:
                    todo.append((value, level + 1))
            elif not isinstance(value, types.ModuleType):
                found[f"{module}.{name}"] = value
    return found


def _generator_kind(value: Any) -> str | None:
    if isinstance(value, torch.Generator):
        return "torch.Generator"
    if isinstance(value, random.Random):
        return "random.Random"
    numpy = sys.modules.get("numpy")
    if numpy is not None and isinstance(value, (numpy.random.Generator, numpy.random.RandomState)):
        return f"numpy.random.{type(value).__name__}"
    return None


def outside_state(functions: list[Callable[..., Any]], items: Mapping[str, Any]) -> list[str]:
    """Generators and data loaders the loop's functions use that the items do not save.

    Call it while ``items`` are those the module globals were set up with.
    """
    reached = _referenced(functions)
    item_ids = {id(v) for v in items.values()}
    notes = []
    for name, value in sorted(reached.items()):
        kind = _generator_kind(value)
        if kind is not None:
            notes.append(
                f"state outside the items: `{name}` ({kind}) is used by the loop but not saved; "
                "save its state with the items (e.g. a dict item holding `get_state()`, set back "
                "after the restore) or draw from the global streams, which ckpt saves"
            )
        elif isinstance(value, DataLoader):
            notes += _loader_notes(name, value, item_ids)
    return notes


def _loader_notes(name: str, loader: DataLoader[Any], item_ids: set[int]) -> list[str]:
    notes = []
    workers = loader.num_workers
    if workers > 0 and not isinstance(loader, ResumableDataLoader):
        notes.append(
            f"DataLoader workers without resumable_loader: `{name}` runs {workers} workers "
            "whose random streams (augmentations) are seeded from the global torch stream at "
            "every iter() and whose prefetched batches are not counted; build it with "
            "ckpt.resumable_loader(...) and save `loader.sampler` with the items"
        )
    elif workers > 0:
        notes.append(
            f"random draws inside DataLoader workers: `{name}` runs {workers} workers; a run "
            "resumed mid-epoch starts fresh workers, whose random streams start over, so "
            "random augmentations in the dataset differ after the resume. Derive per-sample "
            "randomness from the index and epoch (a torch.Generator seeded from them), or "
            "use num_workers=0"
        )
    sampler = loader.sampler
    if isinstance(sampler, ResumableSampler) and id(sampler) not in item_ids:
        notes.append(
            f"data position outside the items: the ResumableSampler of `{name}` is not among "
            "the items; save it (e.g. sampler=loader.sampler)"
        )
    elif not isinstance(sampler, ResumableSampler) and not isinstance(loader, ResumableDataLoader):
        notes.append(
            f"data position outside the items: `{name}` is not built by ckpt.resumable_loader, "
            "so where it was in its epoch is not saved"
        )
    return notes


def _omitted_fields(saving: Trace, resumed: Trace, items: Mapping[str, Any]) -> list[str]:
    notes = []
    for item, attr in sorted(saving.attributes.keys() & resumed.attributes.keys()):
        if saving.attributes[(item, attr)] == resumed.attributes[(item, attr)]:
            continue
        try:
            keys = set(items[item].state_dict())
        except Exception:
            keys = set()
        if attr not in keys and attr.lstrip("_") not in keys:
            notes.append(
                f"an item's state_dict omits fields: `{item}.{attr}` differs right after the "
                f"restore from its value when saved; `{item}.state_dict()` does not include it"
            )
    return notes


def _restore_mismatch(saving: Trace, resumed: Trace, save_at: int) -> list[Leaf]:
    saved = saving.digests_at(save_at) or {}
    return sorted(
        k for k in saved.keys() | resumed.restored.keys() if saved.get(k) != resumed.restored.get(k)
    )


def diagnose(
    reference_differences: list[Difference],
    differences: list[Difference],
    outside: list[str],
    items: Mapping[str, Any],
    saving: Trace,
    resumed: Trace,
    save_at: int,
    repeated: bool = False,
) -> list[str]:
    """Likely causes, in words, for the report.

    ``repeated``: the uninterrupted runs agreed, but a second resume from the same
    checkpoint did not repeat the first one's departure (``reference_differences``
    then compares the two resumes, or the first with the uninterrupted run).
    """
    notes: list[str] = []
    if reference_differences:
        first = reference_differences[0]
        runs = (
            "two resumes from the same checkpoint (whose uninterrupted runs happened to agree)"
            if repeated
            else "two uninterrupted runs, without any checkpoint,"
        )
        note = (
            f"non-deterministic loop: {runs} differ "
            f"first after step {first.step} at {first.item}"
            f"{': ' + first.key if first.key else ''}; ckpt cannot make such a loop resume "
            "exactly. Make the loop deterministic first (no time- or OS-random input, seeded "
            "DataLoader workers"
        )
        if not torch.are_deterministic_algorithms_enabled():
            note += ", torch.use_deterministic_algorithms(True)"
        notes.append(note + ")")
        if first.step > save_at and not repeated:
            notes.append(
                f"both runs agree up to the save after step {save_at}: if the loop is otherwise "
                "deterministic, the save disturbed the run (please report this to ckpt)"
            )
        return notes
    if not differences:
        return notes
    mismatched = _restore_mismatch(saving, resumed, save_at)
    notes += outside
    notes += _omitted_fields(saving, resumed, items)
    if mismatched:
        shown = ", ".join(f"{i}: {k}" for i, k in mismatched[:3])
        notes.append(
            f"the restore did not bring back the saved state ({shown}): an item's "
            "load_state_dict() does not accept all of its state_dict()"
        )
    if not notes:
        first = differences[0]
        notes.append(
            f"the runs depart after step {first.step} at {first.item}"
            f"{': ' + first.key if first.key else ''}: something the loop uses is not among "
            "the items (a generator, a counter, a data iterator), or an item's state_dict() "
            "omits fields"
        )
    return notes
