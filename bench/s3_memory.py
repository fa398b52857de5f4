"""Peak memory of saving and restoring a 1 GiB state through S3 (moto on loopback).

Usage: python bench/s3_memory.py [--gib 1.0] [--endpoint URL] [--block-mib N]

Without --endpoint it starts a moto S3 server on 127.0.0.1 in a separate process
(so its copy of the data does not count). It prints the extra resident memory
(peak RSS above the RSS before the call) of ``save`` and of ``restore`` into a
trained model and AdamW, and the time each took. The restore reads each object
once, checks it, keeps the checked bytes in an unnamed local temporary file and
then reads them into the live tensors. Needs Linux (/proc) and ``ckpt[s3]``
plus ``moto[server]``.

``--block-mib`` sets s3fs's ``default_block_size``. Saves upload in parallel
multipart parts of max(8 MiB, size / 10,000) (``ckpt/storage/multipart.py``);
a block size under 8 MiB only lowers that minimum part (never below S3's
5 MiB), so it can make parts smaller but never larger.
"""

from __future__ import annotations

import argparse
import multiprocessing
import time
import uuid


def _serve(queue) -> None:  # runs in its own process
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    queue.put(server.get_host_and_port())
    while True:
        time.sleep(3600)


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS


def measure(label: str, fn, nbytes: int) -> None:
    import gc

    gc.collect()
    _reset_peak()
    before = _rss_kib("VmRSS")
    start = time.perf_counter()
    fn()
    seconds = time.perf_counter() - start
    extra = (_rss_kib("VmHWM") - before) * 1024
    print(
        f"{label:8s} {seconds:6.2f} s  {nbytes / seconds / 2**20:7.1f} MiB/s  "
        f"peak extra memory {extra / 2**20:7.1f} MiB = {extra / nbytes:.3f} x state"
    )


def _trained(gib: float, seed: int):
    """bench.py's model and AdamW (stepped once), about ``gib`` GiB in all."""
    from bench import build  # this script's directory is on sys.path

    model, optimizer, _ = build("model", gib, 0, seed=seed)
    return model, optimizer


def _nbytes(model, optimizer) -> int:
    from bench import _flat

    return sum(t.numel() * t.element_size() for t in _flat(model, optimizer).values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gib", type=float, default=1.0, help="state size in GiB")
    parser.add_argument("--endpoint", help="an S3 endpoint URL (default: start moto)")
    parser.add_argument(
        "--block-mib",
        type=int,
        default=None,
        help="s3fs default_block_size (lowers the 8 MiB minimum part)",
    )
    args = parser.parse_args()

    server = None
    endpoint = args.endpoint
    if endpoint is None:
        queue = multiprocessing.get_context("spawn").Queue()
        server = multiprocessing.get_context("spawn").Process(target=_serve, args=(queue,))
        server.start()
        host, port = queue.get(timeout=60)
        endpoint = f"http://{host}:{port}"

    import boto3
    import torch

    import ckpt

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
    }
    if args.block_mib:
        options["default_block_size"] = args.block_mib * 2**20
    model, optimizer = _trained(args.gib, seed=0)
    nbytes = _nbytes(model, optimizer)
    print(f"state: a model and its AdamW state, {nbytes / 2**30:.2f} GiB; endpoint {endpoint}")
    mgr = ckpt.CheckpointManager(f"s3://{bucket}/run", storage_options=options)
    measure("save", lambda: mgr.save(0, model=model, optimizer=optimizer, rng=False), nbytes)
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    model = optimizer = None  # free the saved objects before measuring the restore
    live_model, live_opt = _trained(args.gib, seed=1)
    measure(
        "restore into a trained model and AdamW",
        lambda: mgr.restore(model=live_model, optimizer=live_opt, rng=False),
        nbytes,
    )
    assert all(torch.equal(v, expected[k]) for k, v in live_model.state_dict().items())
    mgr.close()
    if server is not None:
        server.kill()


if __name__ == "__main__":
    main()
