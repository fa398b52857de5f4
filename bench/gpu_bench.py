"""GPU benchmark: ckpt against torch.save/torch.load for a model and its AdamW on one GPU.

Usage: python3 bench/gpu_bench.py [--gib 3] [--repeat 3] [--dir DIR] [--device cuda]

The state is a stack of 4096x4096 linear layers and their AdamW moments, about
``--gib`` GiB in all, on the GPU. Each method is timed ``--repeat`` times (median
shown), with the GPU synchronized before the clock stops and every file fsynced
(torch.save's file too), the page cache warm:

- save: ``torch.save`` of both state dicts; ckpt ``save``; ckpt ``async_save``
  (how long ``save()`` blocks, and until it has committed);
- restore into live objects that have state: ``torch.load(map_location=device)``
  plus both ``load_state_dict``; ckpt ``restore``.

Every ckpt restore is checked bit for bit against the saved state. Prints a
table, ckpt's ratios to torch, and one JSON line with every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

import ckpt

WIDTH = 4096


def build(gib: float, device: str, seed: int) -> tuple[nn.Module, torch.optim.Optimizer]:
    """Layers whose parameters are a third of ``gib`` (AdamW's two moments are the rest)."""
    torch.manual_seed(seed)
    layer_bytes = WIDTH * WIDTH * 4
    layers = max(1, round(gib * 2**30 / 3 / layer_bytes))
    model = nn.Sequential(*(nn.Linear(WIDTH, WIDTH, bias=False) for _ in range(layers))).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    optimizer.step()
    return model, optimizer


def timed(fn: Callable[[], object], device: str) -> float:
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    sync()
    began = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - began


def torch_save(model: nn.Module, optimizer: torch.optim.Optimizer, path: Path) -> None:
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, path)
    with open(path, "rb+") as f:  # the same durability as ckpt: fsync the file
        os.fsync(f.fileno())


def torch_load(model: nn.Module, optimizer: torch.optim.Optimizer, path: Path, device: str) -> None:
    state = torch.load(path, map_location=device, weights_only=True)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])


Pair = tuple[nn.Module, torch.optim.Optimizer]


def check_equal(a: Pair, b: Pair) -> None:
    for (name, x), y in zip(a[0].state_dict().items(), b[0].state_dict().values(), strict=True):
        assert x.dtype == y.dtype and x.device == y.device and torch.equal(x, y), name
    for index, state in a[1].state_dict()["state"].items():
        other = b[1].state_dict()["state"][index]
        for key, x in state.items():
            y = other[key]
            assert x.dtype == y.dtype and x.device == y.device and torch.equal(x, y), (index, key)


def run(args: argparse.Namespace) -> dict[str, list[float]]:
    source = build(args.gib, args.device, seed=0)
    live = build(args.gib, args.device, seed=1)
    nbytes = sum(t.nbytes for t in source[0].state_dict().values()) + sum(
        t.nbytes
        for s in source[1].state_dict()["state"].values()
        for t in s.values()
        if isinstance(t, torch.Tensor)
    )
    print(f"state: {nbytes / 2**30:.2f} GiB on {args.device}, {args.repeat} repeats", flush=True)
    times: dict[str, list[float]] = {}
    root = Path(tempfile.mkdtemp(prefix="ckpt-gpu-bench-", dir=args.dir))
    try:
        for i in range(args.repeat):
            run_dir = root / f"r{i}"
            run_dir.mkdir()
            one_repeat(run_dir, source, live, args.device, times)
            shutil.rmtree(run_dir)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return times


def one_repeat(
    run_dir: Path, source: Pair, live: Pair, device: str, times: dict[str, list[float]]
) -> None:
    def record(name: str, seconds: float) -> None:
        times.setdefault(name, []).append(seconds)

    items = {"model": source[0], "optimizer": source[1], "rng": False}
    pt = run_dir / "state.pt"
    record("torch.save", timed(lambda: torch_save(*source, pt), device))
    with ckpt.CheckpointManager(str(run_dir / "ckpt")) as mgr:
        record("ckpt save", timed(lambda: mgr.save(0, **items), device))
        with ckpt.CheckpointManager(str(run_dir / "async"), async_save=True) as amgr:
            began = time.perf_counter()
            record("ckpt async save (blocks)", timed(lambda: amgr.save(0, **items), device))
            amgr.wait()
            record("ckpt async save (committed)", time.perf_counter() - began)
        record("torch.load + load_state_dict", timed(lambda: torch_load(*live, pt, device), device))
        record(
            "ckpt restore",
            timed(lambda: mgr.restore(rng=False, model=live[0], optimizer=live[1]), device),
        )
    check_equal(source, live)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gib", type=float, default=3.0)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--dir", default=None, help="where to write (default: the temp dir)")
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    times = run(args)
    median = {name: statistics.median(values) for name, values in times.items()}
    for name, seconds in median.items():
        print(f"{name:32s} {seconds:8.3f} s   (runs: {', '.join(f'{v:.3f}' for v in times[name])})")
    ratios = {
        "save: ckpt / torch.save": median["ckpt save"] / median["torch.save"],
        "async save blocks: ckpt / torch.save": median["ckpt async save (blocks)"]
        / median["torch.save"],
        "restore: ckpt / torch.load": median["ckpt restore"]
        / median["torch.load + load_state_dict"],
    }
    for name, ratio in ratios.items():
        print(f"{name:40s} {ratio:6.2f}x")
    device = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else args.device
    print(json.dumps({"device": device, "gib": args.gib, "median_s": median, "ratios": ratios}))


if __name__ == "__main__":
    main()
