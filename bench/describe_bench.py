"""Benchmark: ``CheckpointReader.describe()`` and ``iter_tensors`` on a checkpoint of many tensors.

Usage: python bench/describe_bench.py [--tensors 10000] [--repeat 5] [--dir DIR]

Saves one checkpoint holding a model of ``--tensors`` small parameters (packed,
format version 2; with ``--optimizer`` also its AdamW state, 3 more tensors per
parameter), then, with a fresh reader each time,
times ``describe()`` (median of ``--repeat`` runs) and counts the bytes it read
and the files it opened; then the same for streaming every tensor of the model
with ``iter_tensors`` against ``read()``.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from typing import Any

import torch
from torch import nn

import ckpt
from ckpt.storage import Storage


class _Counting:
    """Wraps a file object, counting the bytes read through it."""

    def __init__(self, f: Any, counts: dict[str, int]) -> None:
        self._f, self._counts = f, counts

    def read(self, n: int = -1) -> bytes:
        data = self._f.read(n)
        self._counts["bytes"] += len(data)
        return data

    def readinto(self, buffer: Any) -> int:
        n = self._f.readinto(buffer)
        self._counts["bytes"] += n or 0
        return n

    def __getattr__(self, name: str) -> Any:
        return getattr(self._f, name)


def count_reads(counts: dict[str, int]) -> None:
    """Count every file opened and byte read through any Storage (``read_bytes`` opens too)."""
    for cls in {
        type(Storage.__new__(Storage, "/tmp")),
        type(Storage.__new__(Storage, "memory://x")),
    }:
        open_read = cls.open_read

        class _Opened:
            def __init__(self, cm: Any) -> None:
                self.cm = cm

            def __enter__(self) -> Any:
                counts["files"] += 1
                return _Counting(self.cm.__enter__(), counts)

            def __exit__(self, *exc: object) -> Any:
                return self.cm.__exit__(*exc)

        def counted_open(self: Any, *parts: str, _orig: Any = open_read) -> Any:
            return _Opened(_orig(self, *parts))

        cls.open_read = counted_open  # type: ignore[method-assign]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tensors", type=int, default=10000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--dir", default=None)
    parser.add_argument("--optimizer", action="store_true", help="also save AdamW state")
    args = parser.parse_args()
    root = tempfile.mkdtemp(dir=args.dir)
    torch.manual_seed(0)
    model = nn.ParameterDict({f"p{i}": nn.Parameter(torch.randn(16)) for i in range(args.tensors)})
    items: dict[str, Any] = {"model": model}
    if args.optimizer:
        optimizer = torch.optim.AdamW(model.parameters())
        sum(p.sum() for p in model.values()).backward()  # type: ignore[misc]
        optimizer.step()
        items["optimizer"] = optimizer
    with ckpt.CheckpointManager(root) as mgr:
        mgr.save(1, rng=False, **items)
    counts = {"bytes": 0, "files": 0}
    count_reads(counts)
    times = []
    for _ in range(args.repeat):
        counts.update(bytes=0, files=0)
        start = time.perf_counter()
        d = ckpt.CheckpointReader(root).describe()
        times.append(time.perf_counter() - start)
    n = sum(len(i.tensors) for i in d.items)
    print(
        f"describe(): {n} tensors in {len(d.items)} items, format v{d.format_version}; "
        f"read {counts['bytes']} bytes from {counts['files']} file opens; "
        f"median {statistics.median(times) * 1000:.1f} ms (min {min(times) * 1000:.1f} ms)"
    )
    reader = ckpt.CheckpointReader(root)
    for name in items:
        counts.update(bytes=0, files=0)
        start = time.perf_counter()
        streamed = sum(t.nbytes for _, t in reader.iter_tensors(item=name))
        stream_s = time.perf_counter() - start
        stream_bytes = counts["bytes"]
        start = time.perf_counter()
        reader.read(items=[name])
        read_s = time.perf_counter() - start
        print(
            f"iter_tensors(item={name!r}): {streamed} tensor bytes, {stream_bytes} bytes read, "
            f"{stream_s * 1000:.1f} ms; read(items=[{name!r}]) {read_s * 1000:.1f} ms"
        )


if __name__ == "__main__":
    main()
