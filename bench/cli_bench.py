"""Benchmark: ``ckpt info`` and ``ckpt ls`` on a checkpoint of 10,000 tensors.

Usage: python bench/cli_bench.py [--tensors 10000] [--steps 1] [--adamw] [--repeat 7] [--dir DIR]

Saves ``--steps`` checkpoints of a module with ``--tensors`` parameters of 16
floats (with ``--adamw``, also an AdamW that has stepped: 3 more tensors per
parameter), then runs each command through
``ckpt.cli.main`` in this process (after one warm-up run, so imports are not
counted) and reports, per command, the median wall time and the bytes read:
the process's ``rchar`` from ``/proc/self/io`` (every byte any ``read``
system call returned, whatever opened the file), and the bytes the storage
layer opened files for (``Storage.open_read`` wrapped). Also times ``python -m
ckpt ls`` end to end, which adds the interpreter and ``import torch``.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def rchar() -> int:
    """Bytes this process's read system calls have returned so far (Linux)."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise RuntimeError("no rchar in /proc/self/io")


def build(directory: Path, tensors: int, steps: int, adamw: bool) -> None:
    import torch

    import ckpt

    class Many(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.p = torch.nn.ParameterList(
                torch.nn.Parameter(torch.randn(16)) for _ in range(tensors)
            )

    model = Many()
    opt = torch.optim.AdamW(model.parameters())
    items: dict[str, Any] = {"model": model, "optimizer": opt} if adamw else {"model": model}
    with ckpt.CheckpointManager(directory) as mgr:
        for step in range(steps):
            if adamw:
                sum(p.sum() for p in model.parameters()).backward()
                opt.step()
            mgr.save(step, **items, rng=False, metrics={"loss": 1.0 / (step + 1)})


class StorageReads:
    """Counts the files and file bytes the storage layer opens for reading."""

    def __init__(self) -> None:
        self.files = 0
        self.nbytes = 0

    @contextlib.contextmanager
    def counting(self) -> Any:
        from ckpt.storage import local, remote

        originals = {}
        for module in (local, remote):
            for cls in vars(module).values():
                if isinstance(cls, type) and "open_read" in vars(cls):
                    originals[cls] = cls.open_read
        counter = self

        def wrap(original: Any) -> Any:
            def open_read(self: Any, *parts: str) -> Any:
                counter.files += 1
                counter.nbytes += self.size(*parts)
                return original(self, *parts)

            return open_read

        for cls, original in originals.items():
            cls.open_read = wrap(original)
        try:
            yield self
        finally:
            for cls, original in originals.items():
                cls.open_read = original


def measure(argv: list[str], repeat: int) -> dict[str, float]:
    from ckpt.cli import main

    sink = io.StringIO()
    with contextlib.redirect_stdout(sink):
        assert main(argv) == 0  # warm-up: imports, page cache
    times, reads = [], []
    opened = StorageReads()
    for i in range(repeat):
        sink = io.StringIO()
        with (
            contextlib.redirect_stdout(sink),
            opened.counting() if i == 0 else contextlib.nullcontext(),
        ):
            before = rchar()
            start = time.perf_counter()
            code = main(argv)
            times.append(time.perf_counter() - start)
            reads.append(rchar() - before)
        assert code == 0
    return {
        "seconds": statistics.median(times),
        "rchar": statistics.median(reads),
        "files_opened": opened.files,
        "file_bytes_opened": opened.nbytes,
        "output_chars": len(sink.getvalue()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tensors", type=int, default=10_000)
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--adamw", action="store_true", help="also save an AdamW's state")
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--dir", default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        run = Path(tmp) / "run"
        build(run, args.tensors, args.steps, args.adamw)
        from ckpt.format import MANIFEST_NAME, step_dir_name

        manifest = (run / step_dir_name(0) / MANIFEST_NAME).stat().st_size
        print(
            f"{args.tensors} parameters{' + AdamW' if args.adamw else ''}, {args.steps} step(s); "
            f"manifest.json {manifest} bytes"
        )
        commands = {
            "ckpt info DIR": ["info", str(run)],
            "ckpt info DIR --json": ["info", str(run), "--json"],
            "ckpt ls DIR": ["ls", str(run)],
            "ckpt ls DIR --json": ["ls", str(run), "--json"],
        }
        print(
            f"{'command':24} {'median s':>9} {'rchar':>10} {'opened':>7} "
            f"{'opened B':>10} {'out chars':>10}"
        )
        for name, argv in commands.items():
            r = measure(argv, args.repeat)
            print(
                f"{name:24} {r['seconds']:9.4f} {r['rchar']:10.0f} {r['files_opened']:7d} "
                f"{r['file_bytes_opened']:10d} {r['output_chars']:10d}"
            )
        start = time.perf_counter()
        subprocess.run(
            [sys.executable, "-m", "ckpt", "ls", str(run)],
            check=True,
            capture_output=True,
            env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
        )
        print(f"python -m ckpt ls DIR (whole process): {time.perf_counter() - start:.2f} s")


if __name__ == "__main__":
    main()
