"""Benchmark of tiered checkpoints (issue 19), same-run ratios, in one run.

Usage: python bench/tiers_bench.py [--mib 128] [--saves 4] [--train-mib 32] [--rounds 2]
[--upload-mib 128] [--run abc] [--tiers local,s3] [--dir DIR]

(c) S3 upload throughput of one ``--upload-mib`` object through ckpt's parallel
    multipart upload against one part at a time and against fsspec's own
    single-stream writer (``fs.open(..., "wb")``), with the peak extra RSS of each.
(a) How long ``save()`` blocks with two extra tiers (a second local root and an
    S3 root) against without tiers: the same state, saves in A B A B blocks after
    a warm-up save each.
(b) Training-step time while the copier copies a checkpoint to those tiers
    against idle: a small CPU model, ``--rounds`` rounds of (save, train while
    the copies run, train as many steps idle), with torch using every core and
    one core fewer; medians. A control without ckpt (a niced thread reading the
    checkpoint's files) shows what any background reader costs.

S3 is moto on 127.0.0.1 in its own process (its memory is not counted); after
(c) its threads are niced to 19 so that it competes with training as little as
a remote store would. Needs Linux (/proc) and ``ckpt[s3]`` plus ``moto[server]``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from s3_memory import _reset_peak, _rss_kib  # this script's directory is on sys.path

MIB = 2**20


def _serve(queue) -> None:  # runs in its own process
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    queue.put(server.get_host_and_port())
    while True:
        time.sleep(3600)


def _renice(pid: int) -> None:
    """Lower every thread of process ``pid`` to niceness 19 (Linux: nice is per thread)."""
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(OSError):  # the thread ended meanwhile
            os.setpriority(os.PRIO_PROCESS, int(tid), 19)


def _s3(endpoint: str) -> tuple[str, dict]:
    import boto3

    bucket = f"bench-{uuid.uuid4().hex[:12]}"
    boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        region_name="us-east-1",
    ).create_bucket(Bucket=bucket)
    options = {
        "key": "testing",
        "secret": "testing",
        "client_kwargs": {"endpoint_url": endpoint, "region_name": "us-east-1"},
        "skip_instance_cache": True,
    }
    return bucket, options


def _state(mib: int):
    """A model of about ``mib`` MiB with its AdamW state (stepped once)."""
    import torch

    torch.manual_seed(0)
    width = 1024
    layers = max(1, mib * MIB // (12 * width * width))
    model = torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(layers)])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    optimizer.step()
    nbytes = sum(p.numel() * 4 for p in model.parameters()) * 3
    return model, optimizer, nbytes


def _median_ms(values: list[float]) -> str:
    return f"{statistics.median(values) * 1e3:8.1f} ms"


# ------------------------------------------------------------------ (a) save blocking


def bench_blocking(root: Path, bucket: str, options: dict, mib: int, saves: int) -> None:
    import ckpt

    model, optimizer, nbytes = _state(mib)
    plain = ckpt.CheckpointManager(root / "plain", keep_last=2)
    tiers = [
        ckpt.Tier(str(root / "second"), keep_last=2),
        ckpt.Tier(f"s3://{bucket}/blocking", keep_last=2, storage_options=options),
    ]
    tiered = ckpt.CheckpointManager(root / "first", keep_last=2, tiers=tiers)
    times: dict[str, list[float]] = {"without tiers": [], "with 2 tiers": []}
    plain.save(0, model=model, optimizer=optimizer)  # warm-up: not timed
    tiered.save(0, model=model, optimizer=optimizer)
    step = 1
    for _ in range(2):  # A B A B: drift in the machine's load hits both alike
        for label, mgr in (("without tiers", plain), ("with 2 tiers", tiered)):
            for _ in range(saves // 2):
                start = time.perf_counter()
                mgr.save(step, model=model, optimizer=optimizer)
                times[label].append(time.perf_counter() - start)
                step += 1
    start = time.perf_counter()
    tiered.wait()
    drain = time.perf_counter() - start
    plain.close()
    tiered.close()
    base, with_tiers = (statistics.median(times[k]) for k in times)
    print(f"\n(a) save() blocking, {nbytes / MIB:.0f} MiB state, {saves} saves each, median:")
    for label, values in times.items():
        print(f"  {label:14s} {_median_ms(values)}  (all: {' '.join(f'{v:.3f}' for v in values)})")
    print(f"  ratio with/without: {with_tiers / base:.2f}x")
    print(f"  copies still pending after the last save: {drain:.2f} s to drain")


# ------------------------------------------------------------------ (b) training slowdown


def _trainer(seed: int = 0):
    import torch

    torch.manual_seed(seed)
    model = torch.nn.Sequential(
        torch.nn.Linear(512, 1024), torch.nn.ReLU(), torch.nn.Linear(1024, 512)
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    x, y = torch.randn(64, 512), torch.randn(64, 512)

    def step() -> float:
        start = time.perf_counter()
        optimizer.zero_grad()
        loss = ((model(x) - y) ** 2).mean()
        loss.backward()
        optimizer.step()
        return time.perf_counter() - start

    return step


def _train_while(step, busy: Callable[[], bool]) -> tuple[list[float], list[float]]:
    """Step times while ``busy()`` holds, then as many (at least 20) idle ones."""
    during: list[float] = []
    while busy():
        during.append(step())
    idle = [step() for _ in range(max(len(during), 20))]
    return during, idle


def _reading(directory: Path, seconds: float) -> Callable[[], bool]:
    """A control without ckpt: a niced thread reading and hashing ``directory``'s files."""
    from ckpt.format.checksums import Hasher
    from ckpt.saving.pipeline import set_thread_nice

    def read() -> None:
        set_thread_nice(19)
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            for path in sorted(directory.rglob("*.safetensors")):
                hasher = Hasher()
                with open(path, "rb") as f:
                    while chunk := f.read(8 * MIB):
                        hasher.update(chunk)

    thread = threading.Thread(target=read)
    thread.start()
    return thread.is_alive


def bench_training(
    root: Path, bucket: str, options: dict, mib: int, rounds: int, kinds: list[str]
) -> None:
    import torch

    import ckpt

    model, optimizer, nbytes = _state(mib)
    cores = os.cpu_count() or 1
    print(
        f"\n(b) training step (MLP 512-1024-512, batch 64, SGD) while each {nbytes / MIB:.0f} MiB "
        f"checkpoint is copied to tiers {'+'.join(kinds)}, {rounds} rounds, medians:"
    )
    for threads in sorted({max(1, cores - 1), cores}):
        torch.set_num_threads(threads)
        step = _trainer()
        for _ in range(20):  # warm-up
            step()
        tiers = []
        if "local" in kinds:
            tiers.append(ckpt.Tier(str(root / f"train{threads}-second"), keep_last=1))
        if "s3" in kinds:
            url = f"s3://{bucket}/train{threads}"
            tiers.append(ckpt.Tier(url, keep_last=1, storage_options=options))
        mgr = ckpt.CheckpointManager(root / f"train{threads}-first", keep_last=1, tiers=tiers)
        busy: list[float] = []
        idle: list[float] = []
        copy_seconds: list[float] = []
        peak = 0
        for r in range(rounds):
            mgr.save(r, model=model, optimizer=optimizer)  # not timed: its copies are
            _reset_peak()
            before = _rss_kib("VmRSS")
            start = time.perf_counter()
            during, after = _train_while(step, lambda m=mgr: any(m.pending_copies()))
            copy_seconds.append(time.perf_counter() - start)
            peak = max(peak, (_rss_kib("VmHWM") - before) * 1024)
            busy += during
            idle += after
        ratio = statistics.median(busy) / statistics.median(idle)
        print(f"  torch threads {threads} of {cores} cores:")
        print(f"    idle            {_median_ms(idle)}  ({len(idle)} steps)")
        print(f"    while copying   {_median_ms(busy)}  ({len(busy)} steps)")
        print(f"    ratio copying/idle: {ratio:.3f}x (target <= 1.05x)")
        print(f"    copies took {' '.join(f'{s:.1f}' for s in copy_seconds)} s;", end=" ")
        print(f"peak extra RSS while copying {peak / MIB:.1f} MiB")
        if threads == cores:
            seconds = statistics.median(copy_seconds)
            during, after = _train_while(step, _reading(root / f"train{threads}-first", seconds))
            ratio = statistics.median(during) / statistics.median(after)
            print(
                f"    control without ckpt, a niced thread reading the checkpoint's files for "
                f"{seconds:.1f} s: "
                f"{ratio:.3f}x ({len(during)} steps)"
            )
        mgr.close()


# ------------------------------------------------------------------ (c) upload throughput


def bench_upload(bucket: str, options: dict, mib: int) -> None:
    from ckpt.storage.remote import RemoteStorage

    data = os.urandom(mib * MIB)
    chunk = 8 * MIB

    def writer(f) -> int:
        for at in range(0, len(data), chunk):
            f.write(memoryview(data)[at : at + chunk])
        return len(data)

    def ckpt_upload(threads: int, name: str):
        def run() -> None:
            storage = RemoteStorage(f"s3://{bucket}/upload", options)
            storage.upload_threads = threads
            if threads == 1:
                storage.max_in_flight_bytes = storage.min_part_bytes
            storage.write_file((name,), writer, size_hint=len(data))
            storage.remove_file(name)

        return run

    def fsspec_stream(name: str):
        def run() -> None:
            storage = RemoteStorage(f"s3://{bucket}/upload", options)
            with storage.fs.open(storage.path(name), "wb") as f:
                writer(f)
            storage.remove_file(name)

        return run

    methods = {
        "ckpt multipart, 4 parts in flight": ckpt_upload(4, "a"),
        "ckpt multipart, 1 part at a time": ckpt_upload(1, "b"),
        "fsspec single stream (fs.open wb)": fsspec_stream("c"),
    }
    results: dict[str, list[float]] = {k: [] for k in methods}
    peaks: dict[str, int] = {k: 0 for k in methods}
    for _ in range(2):
        for label, run in methods.items():
            _reset_peak()
            before = _rss_kib("VmRSS")
            start = time.perf_counter()
            run()
            results[label].append(time.perf_counter() - start)
            peaks[label] = max(peaks[label], (_rss_kib("VmHWM") - before) * 1024)
    print(f"\n(c) S3 upload of one {mib} MiB object to moto on loopback, best of 2:")
    best = {k: min(v) for k, v in results.items()}
    for label, seconds in best.items():
        extra = peaks[label] / MIB
        print(f"  {label:34s} {mib / seconds:7.1f} MiB/s  peak extra RSS {extra:6.1f} MiB")
    first, sequential, stream = best.values()
    print(f"  ratio parallel multipart / one part at a time: {sequential / first:.2f}x")
    print(f"  ratio parallel multipart / fsspec single stream: {stream / first:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=128, help="checkpoint state size in MiB")
    parser.add_argument("--saves", type=int, default=4, help="saves per configuration in (a)")
    parser.add_argument("--train-mib", type=int, default=32, help="checkpoint size in (b)")
    parser.add_argument("--rounds", type=int, default=2, help="copy rounds in (b)")
    parser.add_argument("--upload-mib", type=int, default=128, help="object size in (c)")
    parser.add_argument("--run", default="abc", help="which parts to run (default: abc)")
    parser.add_argument("--tiers", default="local,s3", help="the tiers copied to in (b)")
    parser.add_argument("--dir", help="where the local tiers go (default: a temporary dir)")
    args = parser.parse_args()

    import multiprocessing

    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    server = context.Process(target=_serve, args=(queue,), daemon=True)
    server.start()
    host, port = queue.get(timeout=60)
    endpoint = f"http://{host}:{port}"
    load = os.getloadavg()[0]
    print(f"{os.cpu_count()} CPUs, load average {load:.1f}; moto on {endpoint}")
    try:
        with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
            root = Path(tmp)
            bucket, options = _s3(endpoint)
            if "c" in args.run:
                bench_upload(bucket, options, args.upload_mib)
            assert server.pid is not None
            _renice(server.pid)  # from here on moto competes with training like a remote store
            if "a" in args.run:
                bench_blocking(root, bucket, options, args.mib, args.saves)
            if "b" in args.run:
                kinds = args.tiers.split(",")
                bench_training(root, bucket, options, args.train_mib, args.rounds, kinds)
    finally:
        server.kill()
    print(f"load average at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
