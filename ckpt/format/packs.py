"""Packs of small tensors (format version 2): the pack's name and the check that it is tiled."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ckpt.format.records import TensorRecord

PACK_SUFFIX = "/#pack"
"""An item's pack of small tensors is the tensor ``<item>/#pack``: no state key maps
to that name (``#`` in a string key is escaped; integer keys give ``#<digits>``)."""


def check_packs(tensors: Mapping[str, TensorRecord], bad: Any) -> None:
    """Every pack is a 1-d uint8 tensor of its members' file, tiled exactly by them."""
    members: dict[str, list[tuple[int, int, str]]] = {}
    for name, r in tensors.items():
        if r.pack is None:
            continue
        pack = tensors.get(r.pack)
        where = f"tensors.{name}"
        if pack is None or pack.pack is not None:
            raise bad(where, f"pack {r.pack!r} is not a stored tensor")
        if pack.dtype != torch.uint8 or len(pack.shape) != 1 or pack.file != r.file:
            raise bad(where, f"pack {r.pack!r} must be a 1-d uint8 tensor of file {r.file!r}")
        if r.offset % r.dtype.itemsize:
            raise bad(where, f"offset {r.offset} is not aligned to {r.dtype}")
        members.setdefault(r.pack, []).append((r.offset, r.offset + r.nbytes, name))
    for pack_name, spans in members.items():
        expected = 0
        for begin, end, name in sorted(spans):
            if begin != expected:
                raise bad(f"tensors.{name}", f"packed bytes overlap or leave a gap at {begin}")
            expected = end
        if expected != tensors[pack_name].shape[0]:
            raise bad(f"tensors.{pack_name}", f"members cover {expected} bytes of the pack")
