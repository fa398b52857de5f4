"""Benchmark: whole-process start-up of ``import ckpt``, ``ckpt info`` and ``ckpt ls``.

Usage: python bench/cli_startup.py [--tensors 10000] [--repeat 7] [--dir DIR] [--against TREE]

Builds two checkpoints of ``--tensors`` tensors each in a temporary directory
(or ``--dir``): ``mixed``, a module whose parameters cycle through sizes from
16 floats to 8,192 floats (those of at most 16 KiB are stored in one pack, the
rest one by one: 1 in 8 are 8,192 floats), one step; and ``unpacked``, a
dict of tensors of 4,200 floats (16.4 KiB, just over the pack limit), so every
one of them is its own safetensors entry. Then times each command as a fresh
subprocess, median of ``--repeat`` rounds (after one warm-up round that fills
the page cache and the bytecode cache; in each round every command runs once,
so that a drifting load hits them alike): ``python -c "import torch"``,
``python -c "import ckpt"``, ``python -m ckpt info DIR``, ``python -m ckpt ls
DIR`` and the ``ckpt`` console script next to the interpreter, when installed.
Prints each command's median wall and CPU (user + system) time and their
differences from ``import torch``; and, for ``import ckpt``, ``info`` and
``ls``, what they take in a fresh interpreter after its ``import torch``
(timed inside the child: the steadier figure on a loaded machine).

With ``--against TREE`` (another checkout's root, whose ``ckpt`` package is
imported instead), times each command's CPU, whole process and after ``import
torch``, the two trees taking turns, and prints them side by side.

Since issue 21's third pass, ``ckpt ls`` and ``ckpt info`` import no torch: their
whole process is compared with ``python -c "import torch"`` and with a bare
``python -c pass``.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SIZES = (16, 64, 256, 1024, 2048, 4096, 16, 8192)
"""Floats per parameter of ``mixed``, cycled: 8,192 floats (32 KiB) are stored unpacked."""


def build_mixed(directory: Path, tensors: int) -> None:
    """One step of a module of ``tensors`` parameters of cycling sizes (7 in 8 packed)."""
    import torch

    import ckpt

    class Mixed(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.p = torch.nn.ParameterList(
                torch.nn.Parameter(torch.randn(SIZES[i % len(SIZES)])) for i in range(tensors)
            )

    torch.manual_seed(0)
    model = Mixed()
    with ckpt.CheckpointManager(directory) as mgr:
        mgr.save(0, model=model, metrics={"loss": 0.5})


def build_unpacked(directory: Path, tensors: int) -> None:
    """One step of a dict of ``tensors`` tensors of 4,200 floats: none small enough to pack."""
    import torch

    import ckpt

    state = {f"layer{i // 10}.w{i % 10}": torch.randn(4200) for i in range(tensors)}
    with ckpt.CheckpointManager(directory) as mgr:
        mgr.save(0, weights=state, metrics={"loss": 0.5})


def child_env(tree: Path = ROOT) -> dict[str, str]:
    """This environment with ``tree`` first on the path and bytecode caching on."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env["PYTHONPATH"] = str(tree)
    return env


def whole(argv: list[str], tree: Path = ROOT) -> tuple[float, float]:
    """Wall and CPU (user + system) seconds of one run of the whole process ``argv``."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run(argv, check=True, env=child_env(tree), stdout=subprocess.DEVNULL, cwd=tree)
    elapsed = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return elapsed, after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime


AFTER_TORCH = """
import os, sys, time
import torch
sys.stdout = open(os.devnull, "w")
wall, cpu = time.perf_counter(), time.process_time()
{body}
sys.stderr.write(f"\\nTIMING {{time.perf_counter() - wall}} {{time.process_time() - cpu}}\\n")
"""
"""A child that imports torch, then times ``body`` (what the command adds to torch's import)."""


def after_torch(body: str, tree: Path = ROOT) -> tuple[float, float]:
    """Wall and CPU seconds ``body`` takes in a fresh interpreter that has imported torch."""
    done = subprocess.run(
        [sys.executable, "-c", AFTER_TORCH.format(body=body)],
        check=True,
        env=child_env(tree),
        capture_output=True,
        text=True,
        cwd=tree,  # with -c the working directory comes first on the path
    )
    wall, cpu = done.stderr.rsplit("TIMING ", 1)[1].split()
    return float(wall), float(cpu)


def medians(samples: list[tuple[float, float]]) -> tuple[float, float]:
    """The median wall and the median CPU time of ``samples``."""
    return statistics.median(s[0] for s in samples), statistics.median(s[1] for s in samples)


def commands(roots: dict[str, Path]) -> list[tuple[str, list[str], str | None]]:
    """``(label, whole-process argv, the same after import torch)`` for each command timed."""
    py = sys.executable
    runs: list[tuple[str, list[str], str | None]] = [
        ("python (nothing imported)", [py, "-c", "pass"], None),
        ("import torch", [py, "-c", "import torch"], None),
        ("import ckpt", [py, "-c", "import ckpt"], "import ckpt"),
    ]
    script = Path(py).with_name("ckpt")
    for name, root in roots.items():
        for command in ("info", "ls"):
            body = f"from ckpt.cli import main; assert main([{command!r}, {str(root)!r}]) == 0"
            argv = [py, "-m", "ckpt", command, str(root)]
            runs.append((f"python -m ckpt {command} ({name})", argv, body))
            if script.exists():
                label = f"ckpt {command} ({name}), console script"
                runs.append((label, [str(script), command, str(root)], None))
    return runs


def compare(runs: list[tuple[str, list[str], str | None]], against: Path, repeat: int) -> None:
    """Print each command's CPU, ``against`` and this tree taking turns.

    Both the whole process (``python -m ckpt ...``; the console script is left
    out: it is installed for one tree) and, where the command has one, the
    figure after ``import torch`` in the child.
    """
    trees = {"against": against.resolve(), "this tree": ROOT}
    cpu: dict[tuple[str, str, str], list[float]] = {}
    for round_ in range(repeat + 1):  # round 0 warms the caches
        for label, argv, body in runs:
            if "console script" in label:
                continue
            for tree_name, tree in trees.items():
                measured = {"whole": whole(argv, tree)[1]}
                if body is not None:
                    measured["after torch"] = after_torch(body, tree)[1]
                if round_:
                    for kind, value in measured.items():
                        cpu.setdefault((label, kind, tree_name), []).append(value)
    print(f"CPU ms, median of {repeat}; against = {trees['against']}\n")
    print("| command | whole: against | this tree | after torch: against | this tree |")
    print("|---|---:|---:|---:|---:|")
    for label, _, _ in runs:
        cells = [
            f"{1000 * statistics.median(cpu[label, kind, t]):.0f}"
            if (label, kind, t) in cpu
            else "-"
            for kind in ("whole", "after torch")
            for t in trees
        ]
        if cells[0] != "-":
            print(f"| `{label}` | {' | '.join(cells)} |")


def main() -> None:
    """Build, time and print."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tensors", type=int, default=10_000)
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument(
        "--dir",
        type=Path,
        help="build here and keep them (reused when already built); default: a temporary directory",
    )
    parser.add_argument(
        "--against", type=Path, help="another checkout's root: compare after-torch CPU with it"
    )
    args = parser.parse_args()
    base = args.dir or Path(tempfile.mkdtemp(prefix="ckpt-startup-"))
    try:
        roots = {"mixed": base / "mixed", "unpacked": base / "unpacked"}
        for name, build in (("mixed", build_mixed), ("unpacked", build_unpacked)):
            if not roots[name].exists():
                build(roots[name], args.tensors)
        runs = commands(roots)
        if args.against is not None:
            compare(runs, args.against, args.repeat)
            return
        samples: dict[str, tuple[list[tuple[float, float]], list[tuple[float, float]]]] = {
            label: ([], []) for label, _, _ in runs
        }
        # Round after round, every command once: a load that drifts hits them all alike.
        # Round 0 only warms the page cache and writes the bytecode cache.
        for round_ in range(args.repeat + 1):
            for label, argv, body in runs:
                timing = whole(argv), (after_torch(body) if body else None)
                if round_:
                    samples[label][0].append(timing[0])
                    if timing[1] is not None:
                        samples[label][1].append(timing[1])
    finally:
        if args.dir is None:
            shutil.rmtree(base, ignore_errors=True)
    print(f"median of {args.repeat} runs; python {sys.version.split()[0]}; {os.cpu_count()} CPUs\n")
    print("| command | wall s | beyond torch | CPU s | beyond torch | after torch: wall | CPU |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    torch_wall, torch_cpu = medians(samples["import torch"][0])
    for label, (whole_runs, inside_runs) in samples.items():
        wall, cpu = medians(whole_runs)
        cells = f"{wall:.3f} | {1000 * (wall - torch_wall):.0f} ms | {cpu:.3f} | "
        cells += f"{1000 * (cpu - torch_cpu):.0f} ms | "
        if inside_runs:
            inside_wall, inside_cpu = medians(inside_runs)
            cells += f"{1000 * inside_wall:.0f} ms | {1000 * inside_cpu:.0f} ms"
        else:
            cells += "- | -"
        print(f"| `{label}` | {cells} |")


if __name__ == "__main__":
    main()
