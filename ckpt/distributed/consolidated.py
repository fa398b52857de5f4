"""A checkpoint saved by several ranks read whole, without a group: what ``read()`` gives.

Sharded tensors come back consolidated in full: each is read chunk by chunk
into one tensor, then placed by ``map_location``.
"""

from __future__ import annotations

from typing import Any

import torch

from ckpt.distributed.reading import SavedChunks, read_into
from ckpt.format import Manifest, rank_manifest
from ckpt.io import load_tensors
from ckpt.restoring.locations import MapLocation, mapped_device, place
from ckpt.state.items import build_state
from ckpt.state.kinds import sharded_kind_of_record
from ckpt.state.tree import tensor_refs, unflatten
from ckpt.storage import Storage

__all__ = ["read_full"]


def read_full(
    storage: Storage, step_name: str, manifest: Manifest, map_location: MapLocation, verify: bool
) -> dict[str, Any]:
    """Every item of a v3 checkpoint as plain state, sharded tensors consolidated in full.

    Modules come back keyed by parameter name; optimizers in torch's
    index-packed form, parameters numbered as their groups list them; the
    items each rank saved for itself as rank 0 saved them. Memory: the result
    plus one chunk.
    """
    section = manifest.sharded
    assert section is not None
    out: dict[str, Any] = {}
    source = SavedChunks(storage, step_name, verify=verify)
    for name, record in section.items.items():
        full = {}
        for tensor_name in dict.fromkeys(n for _, n in tensor_refs(record.state)):
            r = section.tensors[tensor_name]
            t = torch.empty(r.shape, dtype=r.dtype)
            read_into(source, {tensor_name: r}, {tensor_name: t})
            device = mapped_device(map_location, "cpu")
            full[tensor_name] = place(t, device, None, map_location=map_location, key=tensor_name)
        out[name] = sharded_kind_of_record(name, record).full_state(unflatten(record.state, full))
    view = rank_manifest(manifest, 0)
    names = list(dict.fromkeys(n for r in view.items.values() for _, n in tensor_refs(r.state)))
    loaded, _ = load_tensors(storage, step_name, view, names, {}, map_location, verify=verify)
    for name, own in view.items.items():
        out[name] = build_state(own, loaded, name)
    return out
