"""Benchmark: incremental saves against full saves of the same state, in one run.

Usage: python bench/incremental_bench.py [--mib 512] [--frozen 0.9] [--saves 5] [--restores N]
[--dir DIR]

A model of about ``--mib`` MiB of float32 parameters, a fraction ``--frozen`` of
whose bytes never change (a frozen base), the rest changed before every save (an
adapter). Two roots side by side: one saved with ``incremental=False`` (a full
save), one with ``incremental=True``. Every save is synchronous (every file and
blob fsynced before the clock stops). Reports, per save after the first, the
medians of: bytes written (growth of the root, no retention), save time, time
spent hashing the bytes (establishing identity) as a share of the full save, and
restore time (with verification) of the newest step from each root (``--restores``
times each, taking turns; by default as many as ``--saves``).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

import ckpt
from ckpt.format.blobs import blob_key
from ckpt.format.tensorfile import tensor_bytes


def build(mib: float, frozen: float) -> torch.nn.Module:
    """Layers of 1024 x 1024 float32 (4 MiB each); the last ones trainable."""
    layers = max(10, round(mib / 4))
    model = torch.nn.Sequential(*(torch.nn.Linear(1024, 1024, bias=False) for _ in range(layers)))
    for i, layer in enumerate(model):
        layer.requires_grad_(i >= round(layers * frozen))
    return model


def usage(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file() and p.suffix != ".lock")


def hash_seconds(model: torch.nn.Module) -> float:
    """What an incremental save spends establishing identity: hashing every tensor's bytes."""
    began = time.perf_counter()
    for p in model.parameters():
        t = p.detach()
        blob_key(t, tensor_bytes(t))
    return time.perf_counter() - began


def step_in_place(model: torch.nn.Module) -> None:
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.01)


def run(args: argparse.Namespace) -> None:
    model = build(args.mib, args.frozen)
    if args.dir is None:  # a directory of its own, removed after
        with tempfile.TemporaryDirectory(prefix="incr-bench-") as base:
            measure(args, model, Path(base))
    else:
        measure(args, model, Path(args.dir))


def measure(args: argparse.Namespace, model: torch.nn.Module, base: Path) -> None:
    """Save ``model`` into two roots below ``base``, restore from both, print the medians."""
    total = sum(p.nbytes for p in model.parameters())
    frozen = sum(p.nbytes for p in model.parameters() if not p.requires_grad) / total
    roots = {"full": base / "full", "incremental": base / "incremental"}
    managers = {
        kind: ckpt.CheckpointManager(root, incremental=kind == "incremental")
        for kind, root in roots.items()
    }
    rows: dict[str, dict[str, list[float]]] = {k: {"bytes": [], "save": []} for k in roots}
    hashing: list[float] = []
    for step in range(args.saves + 1):
        step_in_place(model)
        for kind, mgr in managers.items():
            before = usage(roots[kind])
            began = time.perf_counter()
            mgr.save(step, model=model, rng=False)
            elapsed = time.perf_counter() - began
            if step > 0:  # the first save writes everything either way
                rows[kind]["bytes"].append(usage(roots[kind]) - before)
                rows[kind]["save"].append(elapsed)
        if step > 0:
            hashing.append(hash_seconds(model))
    restore: dict[str, list[float]] = {k: [] for k in roots}
    for _ in range(args.restores or args.saves):
        for kind, mgr in managers.items():
            target = build(args.mib, args.frozen)
            began = time.perf_counter()
            mgr.restore(model=target, rng=False)
            restore[kind].append(time.perf_counter() - began)
    for mgr in managers.values():
        mgr.close()
    med = statistics.median
    full_bytes, full_save = med(rows["full"]["bytes"]), med(rows["full"]["save"])
    inc_bytes, inc_save = med(rows["incremental"]["bytes"]), med(rows["incremental"]["save"])
    spread = {k: f"{min(v):.3f}-{max(v):.3f}" for k, v in restore.items()}
    print(f"state: {total / 2**20:.0f} MiB of parameters, frozen fraction f = {frozen:.3f}")
    print(
        f"bytes written per save: full {full_bytes:,.0f}, incremental {inc_bytes:,.0f} "
        f"({inc_bytes / full_bytes:.3f}x; target <= {1 - frozen + 0.01:.3f}x + manifest)"
    )
    print(
        f"save time: full {full_save:.3f} s, incremental {inc_save:.3f} s "
        f"({inc_save / full_save:.3f}x; target <= {1 - frozen + med(hashing) / full_save:.3f}x)"
    )
    print(f"hashing: {med(hashing):.3f} s per save = {med(hashing) / full_save:.1%} of a full save")
    print(
        f"restore: full {med(restore['full']):.3f} s, incremental "
        f"{med(restore['incremental']):.3f} s "
        f"({med(restore['incremental']) / med(restore['full']):.3f}x; spread {spread['full']} "
        f"and {spread['incremental']} s)"
    )
    print(
        f"root usage after {args.saves + 1} saves: full {usage(roots['full']):,}, "
        f"incremental {usage(roots['incremental']):,}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=float, default=512)
    parser.add_argument("--frozen", type=float, default=0.9)
    parser.add_argument("--saves", type=int, default=5)
    parser.add_argument("--restores", type=int, default=0, help="default: --saves")
    parser.add_argument("--dir", default=None)
    run(parser.parse_args())


if __name__ == "__main__":
    main()
