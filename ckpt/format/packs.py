"""Packs of small tensors (format version 2): the pack's name and the check that it is tiled."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ckpt.format.records import TensorRecord

PACK_SUFFIX = "/#pack"
"""An item's pack of small tensors is the tensor ``<item>/#pack``: no state key maps
to that name (``#`` in a string key is escaped; integer keys give ``#<digits>``)."""


def check_packs(
    tensors: Mapping[str, TensorRecord], bad: Any, nbytes: Mapping[str, int] | None = None
) -> None:
    """Every pack is a 1-d uint8 tensor of its members' file, tiled exactly by them.

    ``nbytes`` may give each tensor's byte count (already computed while decoding).
    """
    members: dict[str, list[tuple[int, int, str]]] = {}
    pack_files: dict[str, str] = {}  # each pack checked once, then only its file per member
    for name, r in tensors.items():
        pack_name = r.pack
        if pack_name is None:
            continue
        pack_file = pack_files.get(pack_name)
        if pack_file is None:
            pack = tensors.get(pack_name)
            if pack is None or pack.pack is not None:
                raise bad(f"tensors.{name}", f"pack {pack_name!r} is not a stored tensor")
            if str(pack.dtype) != "torch.uint8" or len(pack.shape) != 1:  # torch's or a name
                pack_file = ""  # never a file name: refused below
            else:
                pack_file = pack_files[pack_name] = pack.file
        if pack_file != r.file:
            raise bad(
                f"tensors.{name}",
                f"pack {pack_name!r} must be a 1-d uint8 tensor of file {r.file!r}",
            )
        offset = r.offset
        if offset % r.dtype.itemsize:
            raise bad(f"tensors.{name}", f"offset {offset} is not aligned to {r.dtype}")
        size = r.nbytes if nbytes is None else nbytes[name]
        members.setdefault(pack_name, []).append((offset, offset + size, name))
    for pack_name, spans in members.items():
        expected = 0
        for begin, end, name in sorted(spans):
            if begin != expected:
                raise bad(f"tensors.{name}", f"packed bytes overlap or leave a gap at {begin}")
            expected = end
        if expected != tensors[pack_name].shape[0]:
            raise bad(f"tensors.{pack_name}", f"members cover {expected} bytes of the pack")
