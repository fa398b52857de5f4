"""A stand-in for ``ckpt.CheckpointReader`` until it lands, on the manager's internals.

Temporary: :func:`ckpt.cli.source.open_reader` uses it only when ``ckpt`` has no
``CheckpointReader``. It never creates a directory or takes the lock.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from typing import Any

import torch

from ckpt.errors import CheckpointNotFoundError
from ckpt.format import Manifest, TensorRecord
from ckpt.manager import Checkpoint, CheckpointManager
from ckpt.reader import StepReader
from ckpt.storage import open_storage
from ckpt.tree import Json, tensor_refs, tensors_by_path

__all__ = ["FallbackReader"]


class _Description:
    def __init__(self, doc: dict[str, Json]) -> None:
        self.doc = doc

    def to_json(self) -> dict[str, Json]:
        return self.doc


def _key(path: tuple[Any, ...]) -> str:
    return "/".join(str(p) for p in path)


class FallbackReader:
    """Read-only access to a checkpoint root (see ``ckpt.CheckpointReader``)."""

    def __init__(
        self, directory: str | os.PathLike[str], *, storage_options: dict[str, Any] | None = None
    ) -> None:
        self.directory = os.fspath(directory)
        self._options = storage_options
        self._storage = open_storage(self.directory, storage_options)
        self._steps = StepReader(self._storage)

    def all_steps(self) -> list[int]:
        """Committed steps, ascending."""
        return self._steps.all_steps()

    def latest_step(self) -> int | None:
        """The newest committed step."""
        return self._steps.latest_step()

    def _manifest(self, step: int | None) -> Manifest:
        found = self._steps.manifest(step)
        if found is None:
            raise CheckpointNotFoundError("no checkpoint has been saved", path=self.directory)
        return found[1]

    def _manager(self) -> CheckpointManager:  # the root exists: constructing creates nothing
        return CheckpointManager(self.directory, storage_options=self._options, process_group=False)

    def checkpoint(self, step: int | None = None) -> Checkpoint | None:
        """The checkpoint's summary."""
        return self._manager().checkpoint(step)

    def verify(self, step: int | None = None) -> Checkpoint:
        """Check every byte of a step."""
        return self._manager().verify(step)

    def read(
        self, step: int | None = None, *, verify: bool = True, items: Iterable[str] | None = None
    ) -> dict[str, Any]:
        """Read items as plain state."""
        state = self._manager().read(step, verify=verify)
        return state if items is None else {k: v for k, v in state.items() if k in set(items)}

    def iter_tensors(
        self, step: int | None = None, *, item: str, verify: bool = True
    ) -> Iterator[tuple[str, torch.Tensor]]:
        """One item's tensors by key path."""
        state = self.read(step, verify=verify, items=[item])[item]
        for path, tensor in tensors_by_path(state).items():
            yield _key(path), tensor

    def describe(self, step: int | None = None) -> _Description:
        """The manifest's contents, without tensor data."""
        m = self._manifest(step)
        records: dict[str, Any] = dict(m.tensors)
        shards: dict[str, int] = {}
        if m.sharded is not None:
            for name, g in m.sharded.tensors.items():
                records[name] = TensorRecord("", g.dtype, g.shape, "cpu")
                shards[name] = len(g.chunks)
            for name, record in m.sharded.ranks[0].tensors.items():
                records.setdefault(name, record)
        items: list[Json] = []
        for name, item in m.items.items():
            tensors: list[Json] = []
            for path, tname in tensor_refs(item.state):
                r = records.get(tname)
                if r is None:
                    continue
                tensors.append(
                    {
                        "key": _key(path),
                        "dtype": str(r.dtype).removeprefix("torch."),
                        "shape": list(r.shape),
                        "nbytes": r.nbytes,
                        "file": r.file or None,
                        "shards": shards.get(tname, 1),
                    }
                )
            extra = item.extra
            groups = extra.get("params") if item.kind == "optimizer" else None
            items.append(
                {
                    "name": name,
                    "kind": item.kind,
                    "nbytes": sum(int(t["nbytes"]) for t in tensors),  # type: ignore[call-overload,index,arg-type,unused-ignore]
                    "optimizer_class": extra.get("class") if item.kind == "optimizer" else None,
                    "param_groups": [],
                    "param_names": groups if isinstance(groups, list) else None,
                    "tensors": tensors,
                }
            )
        return _Description(
            {
                "step": m.step,
                "epoch": m.epoch,
                "metrics": dict(m.metrics),
                "created_at": m.created_at,
                "versions": dict(m.versions),
                "format_version": 3 if m.sharded is not None else 2,
                "world_size": 1 if m.sharded is None else m.sharded.world_size,
                "files": {n: f.size for n, f in m.files.items()},
                "nbytes": sum(f.size for f in m.files.values()),
                "items": items,
            }
        )
