"""Benchmark: ``ckpt.export`` and ``ckpt.import_checkpoint`` against a raw copy of the same bytes.

Usage: python bench/convert_bench.py [--gib 1.0] [--tensor-mib 64] [--repeat 3] [--dir DIR]

A model state of about ``--gib`` GiB (float32 tensors of ``--tensor-mib`` MiB,
plus a few small ones) is saved once with ckpt and once with ``torch.save``.
Then, each in a fresh process, taking turns, ``--repeat`` times:

- raw copy: the ckpt checkpoint's model file copied with 8 MiB reads and
  writes, fsynced (the same bytes export reads and writes);
- export: ``ckpt.export`` to ``model.safetensors`` (checksums verified, fsynced);
- export (sharded, bf16): ``max_shard_size="256MiB"``, ``dtype="bf16"``;
- raw copy of the ``torch.save`` file, and ``ckpt.import_checkpoint`` of it.

Prints the median seconds, throughput, the ratio to the raw copy, and the peak
RSS above the RSS before the operation (``VmHWM``, reset to ``VmRSS`` first;
it counts the pages of memory-mapped files read, which the kernel may drop) and
the peak private memory above it (``RssAnon``, sampled every 5 ms), next
to the target: the largest tensor plus 64 MiB.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

MiB = 2**20


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def _rss() -> int:
    """The RSS now, after resetting the peak (VmHWM) to it (Linux: clear_refs 5)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    return _status("VmRSS")


class _AnonPeak:
    """Samples RssAnon (private memory; mapped file pages excluded) every 5 ms in a thread."""

    def __init__(self) -> None:
        import threading

        self.base = _status("RssAnon")
        self.peak = self.base
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, _status("RssAnon"))

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _status("RssAnon"))
        return self.peak - self.base


def _peak() -> int:
    return _status("VmHWM") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _copy(src: str, dst: str) -> int:
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        shutil.copyfileobj(fin, fout, 8 * MiB)
        fout.flush()
        os.fsync(fout.fileno())
    return os.path.getsize(dst)


def child(mode: str, root: str, out: str) -> None:
    """Run one operation in this (fresh) process; print JSON seconds and peak extra RSS."""
    import torch  # noqa: F401  (imported before the baseline, like ckpt itself)

    import ckpt

    shutil.rmtree(out, ignore_errors=True)
    os.sync()
    base = _rss()
    anon = _AnonPeak()
    start = time.perf_counter()
    if mode == "raw-export":
        steps = [n for n in os.listdir(os.path.join(root, "run")) if n.startswith("step_")]
        step_dir = os.path.join(root, "run", steps[0])
        src = next(n for n in os.listdir(step_dir) if n.startswith("model"))
        os.makedirs(out)
        _copy(os.path.join(step_dir, src), os.path.join(out, "copy"))
    elif mode == "export":
        ckpt.export(os.path.join(root, "run"), out)
    elif mode == "export-bf16-sharded":
        ckpt.export(os.path.join(root, "run"), out, dtype="bf16", max_shard_size="256MiB")
    elif mode == "raw-import":
        os.makedirs(out)
        _copy(os.path.join(root, "state.pt"), os.path.join(out, "copy"))
    elif mode == "import":
        ckpt.import_checkpoint(os.path.join(root, "state.pt"), out)
    seconds = time.perf_counter() - start
    extra_anon = anon.stop()
    print(json.dumps({"seconds": seconds, "extra": max(0, _peak() - base), "anon": extra_anon}))


def prepare(root: str, gib: float, tensor_mib: int) -> tuple[int, int]:
    """Save the state with ckpt and with torch.save; return (tensor bytes, largest tensor)."""
    import torch

    import ckpt

    torch.manual_seed(0)
    n = max(1, int(gib * 1024 / tensor_mib))
    side = int((tensor_mib * MiB // 4) ** 0.5)
    state = {f"layers.{i}.weight": torch.randn(side, side) for i in range(n)}
    state.update({f"layers.{i}.bias": torch.randn(side) for i in range(n)})
    state["norm.num_batches_tracked"] = torch.tensor(7)

    class Holder(torch.nn.Module):
        def state_dict(self, *args, **kwargs):  # type: ignore[no-untyped-def, override]
            return dict(state)

    with ckpt.CheckpointManager(os.path.join(root, "run")) as mgr:
        mgr.save(0, model=Holder(), rng=False)
    torch.save({"model": state, "epoch": 1}, os.path.join(root, "state.pt"))
    return sum(t.nbytes for t in state.values()), max(t.nbytes for t in state.values())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gib", type=float, default=1.0)
    p.add_argument("--tensor-mib", type=int, default=64)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--dir", default=None)
    p.add_argument("--child", nargs=3, metavar=("MODE", "ROOT", "OUT"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(*args.child)
        return
    root = tempfile.mkdtemp(prefix="ckpt-convert-bench-", dir=args.dir)
    try:
        nbytes, largest = prepare(root, args.gib, args.tensor_mib)
        modes = ["raw-export", "export", "export-bf16-sharded", "raw-import", "import"]
        results: dict[str, list[dict[str, float]]] = {m: [] for m in modes}
        for _ in range(args.repeat):
            for mode in modes:
                out = os.path.join(root, "out")
                done = subprocess.run(
                    [sys.executable, __file__, "--child", mode, root, out],
                    check=False,
                    capture_output=True,
                    text=True,
                )
                if done.returncode:
                    sys.exit(f"{mode} failed:\n{done.stderr}")
                results[mode].append(json.loads(done.stdout.strip().splitlines()[-1]))
                shutil.rmtree(out, ignore_errors=True)
        print(
            f"state: {nbytes / 2**30:.2f} GiB, largest tensor {largest / MiB:.0f} MiB; "
            f"memory target {(largest + 64 * MiB) / MiB:.0f} MiB; median of {args.repeat}"
        )
        print(
            f"{'operation':<22}{'seconds':>9}{'GiB/s':>8}{'vs raw':>8}"
            f"{'peak extra RSS MiB':>20}{'peak extra anon MiB':>21}"
        )
        for mode in modes:
            seconds = statistics.median(r["seconds"] for r in results[mode])
            extra = statistics.median(r["extra"] for r in results[mode])
            anon = statistics.median(r["anon"] for r in results[mode])
            raw = "raw-import" if "import" in mode else "raw-export"
            raw_s = statistics.median(r["seconds"] for r in results[raw])
            throughput = raw_s / seconds  # same bytes: relative throughput
            print(
                f"{mode:<22}{seconds:>9.3f}{nbytes / 2**30 / seconds:>8.2f}"
                f"{throughput:>7.2f}x{extra / MiB:>20.1f}{anon / MiB:>21.1f}"
            )
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
