"""Benchmark: ckpt against torch.distributed.checkpoint (DCP) on the same 2-rank FSDP2 state.

Usage: python bench/dcp_bench.py [--mib 300] [--width 2048] [--ranks 2] [--repeat 1]
                                  [--dir DIR] [--json] [--profile DIR]

Each rank builds the same model of ``Linear(width, width)`` layers, shards it
with ``fully_shard`` (FSDP2) and takes one AdamW step, so that parameters and
both moments are DTensors split over the ranks: about ``--mib`` MiB of tensor
bytes over all ranks. Then, every measurement in a fresh group of ``--ranks``
processes (gloo on CPU, loopback), methods taking turns:

- save: ``dcp.save`` with a ``FileSystemWriter`` of the state from
  ``get_state_dict``, against ``ckpt.CheckpointManager(...).save(0, model=...,
  optimizer=...)``. Both fsync every file they write.
- load into a model and optimizer holding other values: ``dcp.load`` with a
  ``FileSystemReader`` and ``set_state_dict``, against ``restore`` (with and
  without checksum verification). Every load is checked bit for bit against
  a digest of each rank's shards taken before the save.

Seconds run from a barrier before the call to a barrier after it (the slowest
rank's time); "cpu s" is the CPU time of the rank's process over the same span
(the largest over the ranks), steadier than seconds on a shared machine.
Memory is each rank's peak RSS above its RSS before the call (VmHWM reset
through /proc/self/clear_refs), the largest over the ranks.
"Metadata" is DCP's pickled ``.metadata`` against ckpt's ``manifest.json``,
divided by the number of shards each records. Prints medians of ``--repeat``
runs and the ratios ckpt / DCP; ``--json`` prints them as one JSON object.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SAVE_METHODS = ["dcp", "ckpt"]
LOAD_METHODS = ["dcp", "ckpt", "ckpt(no verify)"]
RANK_TIMEOUT = 600  # seconds a measurement may take before its ranks are killed


# ---------------------------------------------------------------- one rank


def build(width: int, layers: int, seed: int):
    """The FSDP2 model and AdamW of every rank, after one step: its shards differ per seed."""
    import torch
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(seed)
    model = torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(layers)])
    for layer in model:
        fully_shard(layer)
    fully_shard(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return model, optimizer


def local_digest(model, optimizer) -> tuple[str, int]:
    """SHA-256 of this rank's shards of parameters and optimizer state, and their bytes."""
    import torch

    digest, nbytes = hashlib.sha256(), 0
    states = [("model", model.state_dict()), ("optim", optimizer.state_dict()["state"])]
    for prefix, state in states:
        for key, value in _leaves(state, prefix):
            digest.update(key.encode())
            if isinstance(value, torch.Tensor):
                local = value.to_local() if hasattr(value, "to_local") else value
                data = local.detach().contiguous().reshape(-1).view(torch.uint8)
                digest.update(data.numpy().tobytes())
                nbytes += data.numel()
            else:
                digest.update(repr(value).encode())
    return digest.hexdigest(), nbytes


def _leaves(obj, prefix):
    if isinstance(obj, dict):
        return [leaf for k, v in sorted(obj.items(), key=lambda kv: str(kv[0]))
                for leaf in _leaves(v, f"{prefix}.{k}")]  # fmt: skip
    return [(prefix, obj)]


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


def ckpt_load(args, target: Path, model, optimizer) -> None:
    """Restore with ckpt; with ``--profile DIR``, under cProfile (stats written to DIR)."""
    import cProfile

    import ckpt

    profile = cProfile.Profile() if args.profile else None
    if profile is not None:
        profile.enable()
    mgr = ckpt.CheckpointManager(str(target))
    mgr.restore(model=model, optimizer=optimizer, rng=False, verify=args.method == "ckpt")
    mgr.close()
    if profile is not None:
        profile.disable()
        profile.dump_stats(Path(args.profile) / f"{args.method}-rank{args.rank}.prof")


def ckpt_save(args, target: Path, model, optimizer) -> None:
    """Save with ckpt; with ``--profile DIR``, under cProfile (``save-ckpt-rankN.prof``)."""
    import cProfile

    import ckpt

    profile = cProfile.Profile() if args.profile else None
    if profile is not None:
        profile.enable()
    mgr = ckpt.CheckpointManager(str(target))
    mgr.save(0, model=model, optimizer=optimizer, rng=False)
    mgr.close()
    if profile is not None:
        profile.disable()
        profile.dump_stats(Path(args.profile) / f"save-{args.method}-rank{args.rank}.prof")


def _import_ckpt_modules() -> None:
    """Import what ckpt imports on first use, as DCP's modules are imported before the timer.

    ckpt imports its process-group modules only when a group is in use, and (``import
    ckpt`` being lazy) the manager itself when first named.
    """
    import importlib

    for name in (
        "ckpt.manager",
        "ckpt.distributed.handshake",
        "ckpt.distributed.own_items",
        "ckpt.distributed.restoring",
        "ckpt.distributed.saving",
        "ckpt.state.kinds.sharded_live",
        "ckpt.state.kinds.sharded_module",
        "ckpt.state.kinds.sharded_optimizer",
    ):
        importlib.import_module(name)


def rank_main(args) -> None:
    """One rank of one measurement; prints a JSON line."""
    from datetime import timedelta

    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    _import_ckpt_modules()  # before the timer, as DCP's just above
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{args.port}", rank=args.rank,
        world_size=args.ranks, timeout=timedelta(seconds=RANK_TIMEOUT),
    )  # fmt: skip
    target = Path(args.dir) / args.method.split("(")[0]
    digests = Path(args.dir) / f"digest-{args.method.split('(')[0]}-{args.rank}.json"
    seed = 0 if args.phase == "save" else 1
    model, optimizer = build(args.width, args.layers, seed)
    if args.phase == "save":
        if args.rank == 0:
            shutil.rmtree(target, ignore_errors=True)
        os.sync()  # no dirty pages left by earlier runs
        digest, nbytes = local_digest(model, optimizer)
        digests.write_text(json.dumps({"digest": digest, "bytes": nbytes}))
    dist.barrier()
    exact_peak = _reset_peak()
    before = _rss_kib("VmRSS")
    start, cpu = time.perf_counter(), time.process_time()
    if args.phase == "save" and args.method == "dcp":
        model_state, optim_state = get_state_dict(model, optimizer)
        dcp.save({"model": model_state, "optim": optim_state},
                 storage_writer=dcp.FileSystemWriter(str(target)))  # fmt: skip
    elif args.phase == "save":
        ckpt_save(args, target, model, optimizer)
    elif args.method == "dcp":
        model_state, optim_state = get_state_dict(model, optimizer)
        state = {"model": model_state, "optim": optim_state}
        dcp.load(state, storage_reader=dcp.FileSystemReader(str(target)))
        set_state_dict(model, optimizer, model_state_dict=state["model"],
                       optim_state_dict=state["optim"])  # fmt: skip
    else:
        ckpt_load(args, target, model, optimizer)
    dist.barrier()
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    peak = _rss_kib("VmHWM")
    result = {"seconds": seconds, "cpu": cpu, "peak": peak * 1024,
              "extra": (peak - before) * 1024 if exact_peak else None}  # fmt: skip
    if args.phase == "load":
        expected = json.loads(digests.read_text())["digest"]
        result["exact"] = local_digest(model, optimizer)[0] == expected
    else:
        result["bytes"] = json.loads(digests.read_text())["bytes"]
    dist.destroy_process_group()
    print(json.dumps(result))


# ---------------------------------------------------------------- the driver


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure(args, phase: str, method: str) -> list[dict]:
    """One measurement in a fresh group of ``args.ranks`` processes; each rank's result."""
    port = _free_port()
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                __file__,
                "--rank",
                str(rank),
                "--port",
                str(port),
                "--phase",
                phase,
                "--method",
                method,
                "--ranks",
                str(args.ranks),
                "--width",
                str(args.width),
                "--layers",
                str(args.layers),
                "--dir",
                args.dir,
                *(["--profile", args.profile] if args.profile else []),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for rank in range(args.ranks)
    ]
    results, errors = [], []
    deadline = time.monotonic() + RANK_TIMEOUT
    for proc in procs:
        try:
            out, err = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            out, err = proc.communicate()
        if proc.returncode != 0:
            errors.append(
                err.strip().splitlines()[-1] if err.strip() else f"exit {proc.returncode}"
            )
        else:
            results.append(json.loads(out.strip().splitlines()[-1]))
    if errors:
        raise RuntimeError(f"{phase} {method}: {errors[0]}")
    return results


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def metadata(root: Path) -> dict:
    """Metadata bytes and shard counts of the DCP and ckpt checkpoints under ``root``."""
    dcp_meta = root / "dcp" / ".metadata"
    import torch.distributed.checkpoint as dcp

    # Reading DCP's metadata unpickles it: fine for the file this benchmark just wrote.
    meta = dcp.FileSystemReader(str(root / "dcp")).read_metadata()
    dcp_shards = sum(
        len(entry.chunks) if hasattr(entry, "chunks") else 1
        for entry in meta.state_dict_metadata.values()
    )
    manifests = sorted((root / "ckpt").glob("*/manifest.json"))
    manifest = manifests[-1]
    ckpt_shards = _ckpt_shards(manifest)
    return {
        "dcp_bytes": dcp_meta.stat().st_size,
        "dcp_shards": dcp_shards,
        "ckpt_bytes": manifest.stat().st_size,
        "ckpt_json_bytes": len(_inflated(manifest.read_bytes())),
        "ckpt_shards": ckpt_shards,
    }


def _inflated(raw: bytes) -> bytes:
    """A manifest's JSON: stored compressed (zlib, first byte ``x``) when over 64 KiB."""
    import zlib

    return zlib.decompress(raw) if raw[:1] == b"x" else raw


def _ckpt_shards(manifest: Path) -> int:
    """Chunks of global tensors plus per-rank tensors in a v3 manifest (tensors in v1/v2)."""
    from ckpt.format.manifest import decode_manifest

    decoded = decode_manifest(manifest.read_bytes(), str(manifest))
    sharded = getattr(decoded, "sharded", None)
    if sharded is None:
        return len(decoded.tensors)
    return sum(len(t.chunks) for t in sharded.tensors.values()) + sum(
        len(r.tensors) for r in sharded.ranks
    )


def run(args) -> dict:
    per_layer = 3 * (args.width * args.width + args.width) * 4  # params and two AdamW moments
    args.layers = max(1, round(args.mib * 2**20 / per_layer))
    saves: dict[str, list[list[dict]]] = {m: [] for m in SAVE_METHODS}
    loads: dict[str, list[list[dict]]] = {m: [] for m in LOAD_METHODS}
    sizes: dict[str, int] = {}
    for _ in range(args.repeat):  # methods take turns, so drift in the disk hits them alike
        for method in SAVE_METHODS:
            saves[method].append(measure(args, "save", method))
            sizes[method] = _dir_bytes(Path(args.dir) / method)
        for method in LOAD_METHODS:
            loads[method].append(measure(args, "load", method))
    nbytes = sum(r["bytes"] for r in saves["dcp"][0])
    result = {
        "ranks": args.ranks, "layers": args.layers, "width": args.width,
        "tensor_bytes": nbytes, "repeat": args.repeat, "save": {}, "load": {},
        "metadata": metadata(Path(args.dir)),
    }  # fmt: skip
    for phase, runs in (("save", saves), ("load", loads)):
        for method, rounds in runs.items():
            figures = {
                "seconds": statistics.median(max(r["seconds"] for r in rs) for rs in rounds),
                "cpu_seconds": statistics.median(max(r["cpu"] for r in rs) for rs in rounds),
                "peak_rss_per_rank": max(r["peak"] for rs in rounds for r in rs),
            }
            extras = [r["extra"] for rs in rounds for r in rs]
            if None not in extras:
                figures["extra_rss_per_rank"] = statistics.median(
                    max(r["extra"] for r in rs) for rs in rounds
                )
            if phase == "save":
                figures["bytes_on_disk"] = sizes[method]
            else:
                figures["exact"] = all(r["exact"] for rs in rounds for r in rs)
            result[phase][method] = figures
    meta = result["metadata"]
    meta["dcp_bytes_per_shard"] = meta["dcp_bytes"] / max(1, meta["dcp_shards"])
    meta["ckpt_bytes_per_shard"] = meta["ckpt_bytes"] / max(1, meta["ckpt_shards"])
    result["ratios"] = {
        "save_seconds": result["save"]["ckpt"]["seconds"] / result["save"]["dcp"]["seconds"],
        "load_seconds": result["load"]["ckpt"]["seconds"] / result["load"]["dcp"]["seconds"],
        "load_seconds_no_verify": result["load"]["ckpt(no verify)"]["seconds"]
        / result["load"]["dcp"]["seconds"],
        "save_cpu": result["save"]["ckpt"]["cpu_seconds"] / result["save"]["dcp"]["cpu_seconds"],
        "load_cpu": result["load"]["ckpt"]["cpu_seconds"] / result["load"]["dcp"]["cpu_seconds"],
        "bytes_on_disk": sizes["ckpt"] / sizes["dcp"],
        "metadata_bytes": meta["ckpt_bytes"] / meta["dcp_bytes"],
        "metadata_bytes_per_shard": meta["ckpt_bytes_per_shard"] / meta["dcp_bytes_per_shard"],
    }
    return result


def report(r: dict) -> None:
    mib = 2**20
    print(f"{r['ranks']} ranks, FSDP2: {r['layers']} x Linear({r['width']}, {r['width']}) + AdamW, "
          f"{r['tensor_bytes'] / mib:.1f} MiB of tensors; medians of {r['repeat']}")  # fmt: skip
    print(
        f"{'save':18s} {'s':>7s} {'cpu s':>7s} {'disk MiB':>12s} {'extra MiB/rank':>15s} "
        f"{'peak MiB/rank':>14s}"
    )
    for method, f in r["save"].items():
        extra = f.get("extra_rss_per_rank")
        print(f"{method:18s} {f['seconds']:7.3f} {f['cpu_seconds']:7.3f} "
              f"{f['bytes_on_disk'] / mib:12.1f} "
              f"{'n/a' if extra is None else f'{extra / mib:.1f}':>15s} "
              f"{f['peak_rss_per_rank'] / mib:14.1f}")  # fmt: skip
    print(
        f"{'load':18s} {'s':>7s} {'cpu s':>7s} {'exact':>12s} {'extra MiB/rank':>15s} "
        f"{'peak MiB/rank':>14s}"
    )
    for method, f in r["load"].items():
        extra = f.get("extra_rss_per_rank")
        print(f"{method:18s} {f['seconds']:7.3f} {f['cpu_seconds']:7.3f} {f['exact']!s:>12s} "
              f"{'n/a' if extra is None else f'{extra / mib:.1f}':>15s} "
              f"{f['peak_rss_per_rank'] / mib:14.1f}")  # fmt: skip
    m = r["metadata"]
    print(f"metadata: DCP .metadata {m['dcp_bytes']} B for {m['dcp_shards']} shards "
          f"({m['dcp_bytes_per_shard']:.1f} B/shard); ckpt manifest.json {m['ckpt_bytes']} B "
          f"({m['ckpt_json_bytes']} B of JSON) "
          f"for {m['ckpt_shards']} shards ({m['ckpt_bytes_per_shard']:.1f} B/shard)")  # fmt: skip
    print("ckpt / DCP: " + ", ".join(f"{k} {v:.2f}x" for k, v in r["ratios"].items()))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=float, default=300.0, help="tensor MiB over all ranks")
    parser.add_argument("--width", type=int, default=2048)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=1, help="runs per figure (median)")
    parser.add_argument("--dir", default=None)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument(
        "--profile", default=None, help="write a cProfile of each rank's ckpt saves and loads here"
    )
    parser.add_argument("--rank", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--phase", help=argparse.SUPPRESS)
    parser.add_argument("--method", help=argparse.SUPPRESS)
    parser.add_argument("--layers", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rank is not None:
        rank_main(args)
        return 0
    own = args.dir is None
    args.dir = args.dir or tempfile.mkdtemp(prefix="ckpt-dcp-bench-")
    try:
        result = run(args)
    finally:
        if own:
            shutil.rmtree(args.dir, ignore_errors=True)
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        report(result)
    exact = all(f["exact"] for f in result["load"].values())
    return 0 if exact else 1


if __name__ == "__main__":
    sys.exit(main())
