"""Benchmark: ckpt against a raw write, torch.save/load, safetensors and DCP, in one run.

Usage: python bench/bench.py [--gib 1.0] [--small 10000] [--repeat 5] [--dir DIR] [--cold]

Two states: a model with AdamW state of about ``--gib`` GiB, and ``--small``
small tensors. Every method runs in a fresh process (so peak memory is its own),
writes with the same fsync policy (every file fsynced before the clock stops),
and is timed with a warm page cache (``--cold`` drops caches before each load;
needs root). Prints seconds, ratios and peak extra RSS (peak RSS above the RSS
once the state is built) per method, each the median of ``--repeat`` runs.
Loads into the model also time the first optimizer step after the load, which
pays for any state a lazy (mmap) load left unread. The async part times how
long ``save()`` blocks and the training steps run while the save persists.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SAVE_METHODS = ["raw", "torch.save", "safetensors", "dcp", "ckpt"]
LOAD_METHODS = ["torch.load(mmap)", "safetensors", "dcp", "ckpt", "ckpt(no verify)"]


def build(kind: str, gib: float, small: int, seed: int = 0):
    """The state to save: (model, optimizer) for "model", a dict for "small"."""
    import torch

    torch.manual_seed(seed)
    if kind == "small":
        return None, None, {f"t{i}": torch.randn(64) for i in range(small)}
    width = 4096
    layers = max(1, int(gib * 2**30 / 12 / (width * width)))  # params + 2 AdamW moments
    model = torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(layers)])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    optimizer.step()
    return model, optimizer, None


def _flat(model, optimizer):
    """Everything as one flat {name: tensor} (for the formats that need one)."""
    out = {f"model.{k}": v for k, v in model.state_dict().items()}
    for index, state in optimizer.state_dict()["state"].items():
        for key, value in state.items():
            out[f"optim.{index}.{key}"] = value
    return out


def _fsync_tree(path: Path) -> None:
    for p in [path] if path.is_file() else sorted(path.rglob("*")):
        if p.is_file():
            fd = os.open(p, os.O_RDONLY)
            os.fsync(fd)
            os.close(fd)


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def child(args) -> None:
    """One measurement in a fresh process; prints a JSON line."""
    import torch

    model, optimizer, small = build(args.kind, args.gib, args.small)
    tensors = small if small is not None else _flat(model, optimizer)
    nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
    target = Path(args.dir) / f"{args.kind}-{args.method.replace('(', '').replace(')', '')}"
    if args.phase == "save":  # a fresh target, and no dirty pages left by earlier runs
        shutil.rmtree(target, ignore_errors=True)
        target.unlink(missing_ok=True)
        os.sync()
    if args.phase == "load":
        model, optimizer, small = build(args.kind, args.gib, args.small, seed=1)  # fresh values
        if args.cold:
            subprocess.run(["sync"], check=True)
            Path("/proc/sys/vm/drop_caches").write_text("3")
    _import_library(args.method)  # imports are not part of any method's time
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = _rss_kib("VmRSS")
    start = time.perf_counter()
    if args.phase == "save":
        _save(args.method, target, model, optimizer, small, tensors)
    else:
        _load(args.method, target, model, optimizer, small)
    seconds = time.perf_counter() - start
    extra = (_rss_kib("VmHWM") - before) * 1024
    steps = {}
    if args.phase == "load" and optimizer is not None:
        # The first optimizer step pays for whatever the load deferred (mmap'd state).
        for label in ("first_step", "next_step"):
            begin = time.perf_counter()
            optimizer.step()
            steps[label] = time.perf_counter() - begin
    size = (
        sum(p.stat().st_size for p in target.rglob("*") if p.is_file())
        if target.is_dir()
        else (target.stat().st_size if target.exists() else 0)
    )
    print(json.dumps({"seconds": seconds, "extra": extra, "bytes": nbytes, "size": size, **steps}))
    del torch


def async_child(args) -> None:
    """Async save: how long save() blocks, and how much slower training steps run meanwhile."""
    import statistics

    import torch

    import ckpt

    model, optimizer, _ = build("model", args.gib, 0)
    tensors = _flat(model, optimizer)
    nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
    buffers = {k: torch.empty_like(v) for k, v in tensors.items()}
    copies = []
    for _ in range(3):  # one copy of the state into memory that is already mapped
        begin = time.perf_counter()
        for k, v in tensors.items():
            buffers[k].copy_(v)
        copies.append(time.perf_counter() - begin)
    del buffers
    batch = torch.randn(args.batch, model[0].in_features)

    def train_step() -> float:
        begin = time.perf_counter()
        optimizer.zero_grad()
        model(batch).square().mean().backward()
        optimizer.step()
        return time.perf_counter() - begin

    for _ in range(2):
        train_step()  # warm up
    alone = [train_step() for _ in range(args.steps)]
    shutil.rmtree(Path(args.dir) / "async", ignore_errors=True)
    mgr = ckpt.CheckpointManager(str(Path(args.dir) / "async"), async_save=True, keep_last=2)
    blocked, during, per_save = [], [], []
    for step in range(args.saves):
        begin = time.perf_counter()
        mgr.save(step, model=model, optimizer=optimizer, rng=False)
        blocked.append(time.perf_counter() - begin)
        steps = []
        while mgr._saver.pending is not None and mgr._saver.pending.is_alive():
            steps.append(train_step())
        per_save.append(time.perf_counter() - begin)
        during.extend(steps[:-1])  # the last step may end long after the save did
        mgr.wait()
        train_step()  # the writer's last bytes may still be settling
    mgr.close()
    print(json.dumps({
        "bytes": nbytes,
        "copy": min(copies),
        "blocked": blocked,
        "persist": per_save,
        "step_alone": statistics.median(alone),
        "step_during": statistics.median(during) if during else float("nan"),
        "steps_during": len(during),
    }))  # fmt: skip


def _import_library(method: str) -> None:
    import importlib

    module = {"safetensors": "safetensors.torch", "dcp": "torch.distributed.checkpoint"}.get(
        method, "ckpt" if method.startswith("ckpt") else "torch"
    )
    importlib.import_module(module)
    if method == "dcp":
        importlib.import_module("torch.distributed.checkpoint.state_dict")


def _save(method, target, model, optimizer, small, tensors) -> None:
    import torch

    if method == "raw":
        with open(target, "wb") as f:
            for t in tensors.values():
                f.write(memoryview(t.reshape(-1).contiguous().view(torch.uint8).numpy()))
            f.flush()
            os.fsync(f.fileno())
    elif method == "torch.save":
        state = small if small is not None else {"model": model.state_dict(),
                                                  "optimizer": optimizer.state_dict()}  # fmt: skip
        torch.save(state, target)
        _fsync_tree(target)
    elif method == "safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in tensors.items()}, str(target))
        _fsync_tree(target)
    elif method == "dcp":
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        if small is not None:
            state = small
        else:
            model_state, optim_state = get_state_dict(model, optimizer)
            state = {"model": model_state, "optimizer": optim_state}
        dcp.save(state, checkpoint_id=str(target))
        _fsync_tree(target)
    elif method == "ckpt":
        import ckpt

        mgr = ckpt.CheckpointManager(str(target))
        if small is not None:
            mgr.save(0, data=small, rng=False)
        else:
            mgr.save(0, model=model, optimizer=optimizer, rng=False)
        mgr.close()


def _load(method, target, model, optimizer, small) -> None:
    import torch

    if method == "torch.load(mmap)":
        state = torch.load(target.with_name(target.name.replace("torch.loadmmap", "torch.save")),
                           mmap=True, weights_only=True)  # fmt: skip
        if small is not None:
            small.update(state)
        else:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
    elif method == "safetensors":
        from safetensors.torch import load_file

        flat = load_file(str(target))
        if small is not None:
            small.update(flat)
        else:
            model.load_state_dict({k[6:]: v for k, v in flat.items() if k.startswith("model.")})
            packed = optimizer.state_dict()
            state: dict = {}
            for key, value in flat.items():
                if key.startswith("optim."):
                    _, index, name = key.split(".", 2)
                    state.setdefault(int(index), {})[name] = value
            optimizer.load_state_dict({"state": state, "param_groups": packed["param_groups"]})
    elif method == "dcp":
        import torch.distributed.checkpoint as dcp

        if small is not None:
            dcp.load(small, checkpoint_id=str(target))
        else:
            from torch.distributed.checkpoint.state_dict import (
                get_state_dict,
                set_state_dict,
            )

            model_state, optim_state = get_state_dict(model, optimizer)
            state = {"model": model_state, "optimizer": optim_state}
            dcp.load(state, checkpoint_id=str(target))
            set_state_dict(model, optimizer, model_state_dict=state["model"],
                           optim_state_dict=state["optimizer"])  # fmt: skip
    elif method.startswith("ckpt"):
        import ckpt

        mgr = ckpt.CheckpointManager(str(target.with_name(target.name.split("-")[0] + "-ckpt")))
        verify = method == "ckpt"
        if small is not None:
            mgr.restore(data=small, rng=False, verify=verify)
        else:
            mgr.restore(model=model, optimizer=optimizer, rng=False, verify=verify)


def run_interleaved(args, kind: str, phase: str, methods: list[str]) -> dict[str, dict]:
    """Run every method ``--repeat`` times, each run in a fresh process, taking turns
    (so drift in the disk's speed hits every method alike); the median of each figure."""
    runs: dict[str, list[dict]] = {m: [] for m in methods}
    for _ in range(args.repeat):
        for method in methods:
            runs[method].append(run_child(args, kind, phase, method))
    out = {}
    for method, results in runs.items():
        failed = [r for r in results if "error" in r]
        out[method] = failed[0] if failed else {
            key: statistics.median(r[key] for r in results) for key in results[0]
        }  # fmt: skip
    return out


def run_child(args, kind: str, phase: str, method: str) -> dict:
    cmd = [sys.executable, __file__, "--child", "--kind", kind, "--phase", phase,
           "--method", method, "--gib", str(args.gib), "--small", str(args.small),
           "--dir", args.dir, "--saves", str(args.saves), "--steps", str(args.steps),
           "--batch", str(args.batch)] + (["--cold"] if args.cold else [])  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        return {"error": done.stderr.strip().splitlines()[-1] if done.stderr else "failed"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def _print_async(r: dict) -> None:
    if "error" in r:
        print(f"async error: {r['error']}")
        return
    copy, blocked = r["copy"], r["blocked"]
    later = sorted(blocked[1:])[len(blocked[1:]) // 2] if len(blocked) > 1 else float("nan")
    budget = 1.5 * copy + 0.050
    print(f"async save: one copy of the state {copy:.3f} s; save() blocked "
          f"{blocked[0]:.3f} s the first time, median {later:.3f} s after "
          f"({later / budget:.2f}x the 1.5 x copy + 50 ms budget of {budget:.3f} s); "
          f"all: {', '.join(f'{b:.3f}' for b in blocked)}")  # fmt: skip
    print(f"training step {r['step_alone']:.3f} s alone, {r['step_during']:.3f} s while a "
          f"save persists ({r['step_during'] / r['step_alone']:.2f}x, "
          f"{r['steps_during']} steps); save to commit: "
          f"{', '.join(f'{p:.2f}' for p in r['persist'])} s")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gib", type=float, default=1.0)
    parser.add_argument("--small", type=int, default=10_000)
    parser.add_argument("--dir", default=None)
    parser.add_argument("--cold", action="store_true")
    parser.add_argument("--repeat", type=int, default=5, help="runs per figure (median)")
    parser.add_argument("--saves", type=int, default=4, help="async saves to time")
    parser.add_argument("--steps", type=int, default=8, help="training steps timed alone")
    parser.add_argument("--batch", type=int, default=32, help="training batch (async)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--kind", help=argparse.SUPPRESS)
    parser.add_argument("--phase", help=argparse.SUPPRESS)
    parser.add_argument("--method", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        async_child(args) if args.phase == "async" else child(args)
        return
    own = args.dir is None
    args.dir = args.dir or tempfile.mkdtemp(prefix="ckpt-bench-")
    try:
        for kind in ("model", "small"):
            print(
                f"\n== {kind}: "
                + ("model + AdamW" if kind == "model" else f"{args.small} small tensors")
            )
            results = run_interleaved(args, kind, "save", SAVE_METHODS)
            nbytes = results["raw"].get("bytes", 1)
            header = ("save", "s", "/raw", "/torch", "extra mem", "size/bytes")
            print("{:18s} {:>7s} {:>6s} {:>7s} {:>10s} {:>10s}".format(*header))
            raw_s, torch_s = results["raw"]["seconds"], results["torch.save"]["seconds"]
            for method, r in results.items():
                if "error" in r:
                    print(f"{method:18s} error: {r['error']}")
                    continue
                s = r["seconds"]
                print(f"{method:18s} {s:7.3f} {s / raw_s:6.2f} {s / torch_s:7.2f} "
                      f"{r['extra'] / nbytes:9.3f}x {r['size'] / nbytes:10.4f}")  # fmt: skip
            loads = run_interleaved(args, kind, "load", LOAD_METHODS)
            print(f"{'load':18s} {'s':>7s} {'/torch':>7s} {'extra mem':>10s} "
                  f"{'+1st step':>10s} {'/torch':>7s} {'2nd step':>9s}")  # fmt: skip
            base = loads["torch.load(mmap)"].get("seconds", float("nan"))
            first = loads["torch.load(mmap)"].get("first_step", 0.0)
            for method, r in loads.items():
                if "error" in r:
                    print(f"{method:18s} error: {r['error']}")
                    continue
                line = (f"{method:18s} {r['seconds']:7.3f} {r['seconds'] / base:7.2f} "
                        f"{r['extra'] / nbytes:9.3f}x")  # fmt: skip
                if "first_step" in r:
                    total = r["seconds"] + r["first_step"]
                    line += (f" {total:10.3f} {total / (base + first):7.2f} "
                             f"{r['next_step']:9.3f}")  # fmt: skip
                print(line)
            print(f"(state: {nbytes / 2**20:.1f} MiB of tensor bytes)")
            if kind == "model":
                _print_async(run_child(args, kind, "async", "ckpt"))
    finally:
        if own:
            shutil.rmtree(args.dir, ignore_errors=True)


if __name__ == "__main__":
    main()
