"""A :class:`ckpt.ResumableSampler` state: its fields, their checks, and the split over ranks.

Pure: no sampler, no I/O. An epoch's order is split as ``DistributedSampler``
splits it: the part not yet consumed (from ``split_start``) is padded by
wrapping around to a multiple of the number of ranks, or its uneven tail is
dropped, and rank ``r`` takes every ``num_replicas``-th entry from ``r``.
``position`` counts the entries of the epoch's order consumed across all ranks
(the dataset size once the split is exhausted, padding or dropped tail included).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

__all__ = ["GENERATOR_BYTES", "LIMIT", "check_fields", "check_for", "share"]

LIMIT = 2**63
GENERATOR_BYTES = torch.Generator().get_state().numel()

BASE_KEYS = frozenset({"size", "shuffle", "seed", "epoch", "position", "generator"})
LAYOUT_KEYS = frozenset({"batch_size", "drop_last"})
SPLIT_KEYS = frozenset({"num_replicas", "rank", "split_start", "sampler_drop_last"})
_INT_KEYS = ("size", "seed", "epoch", "position", "num_replicas", "rank", "split_start")


def share(remaining: int, num_replicas: int, drop_last: bool) -> int:
    """How many of ``remaining`` entries each rank gets (``DistributedSampler.num_samples``)."""
    return remaining // num_replicas if drop_last else -(-remaining // num_replicas)


def _keys_problem(state: object) -> str | None:
    if not isinstance(state, Mapping):
        return type(state).__name__
    keys = set(state)
    optional = keys - BASE_KEYS
    if (
        keys >= BASE_KEYS
        and optional <= LAYOUT_KEYS | SPLIT_KEYS
        and (optional & LAYOUT_KEYS) in (set(), LAYOUT_KEYS)
        and (optional & SPLIT_KEYS) in (set(), SPLIT_KEYS)
    ):
        return None
    return repr(sorted(keys, key=str))


def check_fields(state: object, *, generator: bool = True) -> dict[str, Any]:
    """Check every field of a saved sampler state on its own; return it with defaults filled in.

    ``generator=False`` leaves out the generator (a tensor not read yet).

    States saved before the batch layout or the split over ranks was recorded
    get ``batch_size``/``drop_last`` None and one rank (``num_replicas`` 1,
    ``rank`` 0, ``split_start`` 0, ``sampler_drop_last`` False).

    Raises:
        ValueError: Naming the first field that is wrong.
    """
    problem = _keys_problem(state)
    if problem is not None or not isinstance(state, Mapping):
        raise ValueError(
            f"a ResumableSampler state must have exactly the keys {sorted(BASE_KEYS)}, with "
            f"{sorted(LAYOUT_KEYS)} and {sorted(SPLIT_KEYS)} optional, got {problem}"
        )
    out: dict[str, Any] = {
        "batch_size": None,
        "drop_last": None,
        "num_replicas": 1,
        "rank": 0,
        "split_start": 0,
        "sampler_drop_last": False,
        **state,
    }
    for key in _INT_KEYS:
        value = out[key]
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(
                f"the sampler state's {', '.join(_INT_KEYS)} must be ints; {key!r} is {value!r}"
            )
        if not 0 <= value < LIMIT:
            raise ValueError(f"the sampler state's {key!r} is out of range: {key} {value}")
    for key in ("shuffle", "sampler_drop_last"):
        if not isinstance(out[key], bool):
            raise ValueError(f"the sampler state's {key!r} must be a bool, got {out[key]!r}")
    if out["position"] > out["size"]:
        raise ValueError(
            f"the sampler state's 'position' is out of range: position {out['position']} > "
            f"size {out['size']}"
        )
    _check_split(out)
    _check_layout(out)
    if generator:
        _check_generator(out["generator"])
    return out


def _check_split(state: dict[str, Any]) -> None:
    """The ranks' fields, and a position where every rank of the split has taken as many."""
    replicas, rank, start = state["num_replicas"], state["rank"], state["split_start"]
    size, position = state["size"], state["position"]
    if replicas < 1:
        raise ValueError(f"the sampler state's 'num_replicas' must be at least 1, got {replicas}")
    if rank >= replicas:
        raise ValueError(
            f"the sampler state's 'rank' is out of range: rank {rank} >= num_replicas {replicas}"
        )
    if start > position:
        raise ValueError(
            f"the sampler state's 'split_start' is out of range: split_start {start} > "
            f"position {position}"
        )
    if position < size:
        steps, uneven = divmod(position - start, replicas)
        if uneven or steps >= share(size - start, replicas, state["sampler_drop_last"]):
            raise ValueError(
                f"the sampler state's 'position' {position} is not a point where {replicas} "
                f"ranks in step can be in a split from {start} of {size} entries"
            )


def _check_layout(state: dict[str, Any]) -> None:
    batch_size, drop_last = state["batch_size"], state["drop_last"]
    if batch_size is not None and (
        isinstance(batch_size, bool)
        or not isinstance(batch_size, int)
        or not 1 <= batch_size < LIMIT
    ):
        raise ValueError(
            f"the sampler state's 'batch_size' must be a positive int, got {batch_size!r}"
        )
    if not (drop_last is None or isinstance(drop_last, bool)):
        raise ValueError(f"the sampler state's 'drop_last' must be a bool, got {drop_last!r}")


def _check_generator(generator: object) -> None:
    if not (
        isinstance(generator, torch.Tensor)
        and generator.dtype == torch.uint8
        and generator.device.type == "cpu"
        and generator.shape == (GENERATOR_BYTES,)
    ):
        raise ValueError(
            f"the sampler state's 'generator' must be a CPU uint8 tensor of {GENERATOR_BYTES} "
            "bytes (a torch.Generator state)"
        )


def check_for(state: object, size: int, shuffle: bool) -> dict[str, Any]:
    """:func:`check_fields`, then the dataset size and shuffle setting against a live sampler's.

    Raises:
        ValueError: Naming the first field that is wrong.
    """
    out = check_fields(state)
    if out["size"] != size or out["shuffle"] != shuffle:
        raise ValueError(
            f"the sampler state ('size', 'shuffle') is for {out['size']} indices with shuffle="
            f"{out['shuffle']}, but this sampler has {size} with shuffle={shuffle}"
        )
    return out
