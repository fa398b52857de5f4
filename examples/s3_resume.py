"""Demo: checkpoints in S3; a run is killed, resumed in a new process, and ends bit-identical.

Run it with no arguments: it starts a local S3 server (moto, on 127.0.0.1) and
talks to it with s3fs, exactly as it would talk to AWS. Needs
``pip install 'ckpt[s3]' 'moto[server]'``. To use a real bucket instead:

    python examples/s3_resume.py --url s3://my-bucket/runs/demo

with credentials from the usual AWS environment variables or config files.
Against your own endpoint (MinIO, Ceph), add ``--endpoint http://host:9000``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
import uuid

STEPS = 30
SAVE_EVERY = 4


def train(url: str, options: dict, kill_after: int | None) -> dict:
    import torch
    from torch import nn

    import ckpt

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.Dropout(0.1), nn.GELU(), nn.Linear(32, 1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, STEPS)
    data = torch.utils.data.TensorDataset(torch.randn(96, 8), torch.randn(96, 1))
    loader = ckpt.resumable_loader(data, batch_size=16, seed=0)
    items = {"model": model, "optimizer": optimizer, "scheduler": scheduler,
             "sampler": loader.sampler}  # fmt: skip

    mgr = ckpt.CheckpointManager(url, storage_options=options, keep_last=2,
                                 every_steps=SAVE_EVERY)  # fmt: skip
    info = mgr.restore(**items)
    step = 0 if info is None else info.next_step
    if info is not None:
        print(f"  resumed from {info.path}", file=sys.stderr)
    while step < STEPS:
        for x, y in loader:
            loss = nn.functional.mse_loss(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
            if mgr.should_save(step) or step == STEPS - 1:
                mgr.save(step, metrics={"loss": loss.item()}, **items)
            if step == kill_after:
                print(f"  SIGKILL after step {step}", file=sys.stderr)
                os.kill(os.getpid(), signal.SIGKILL)
            step += 1
            if step == STEPS:
                break
    mgr.close()
    digest = hashlib.sha256()
    for value in model.state_dict().values():
        digest.update(value.numpy().tobytes())
    return {"hash": digest.hexdigest()[:16], "loss": loss.item()}


def child(url: str, options: dict, kill_after: int | None) -> dict | None:
    cmd = [sys.executable, __file__, "--child", url, "--options", json.dumps(options)]
    if kill_after is not None:
        cmd += ["--kill-after", str(kill_after)]
    done = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=False)
    if done.returncode == -signal.SIGKILL:
        return None
    done.check_returncode()
    return json.loads(done.stdout)


def local_s3() -> tuple[str, object]:
    """Start moto's S3 server on loopback in a child process; return its URL."""
    code = (
        "import sys, time\n"
        "from moto.server import ThreadedMotoServer\n"
        "s = ThreadedMotoServer(ip_address='127.0.0.1', port=0, verbose=False); s.start()\n"
        "print('http://%s:%d' % s.get_host_and_port(), flush=True)\n"
        "time.sleep(3600)\n"
    )
    server = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert server.stdout is not None
    return server.stdout.readline().strip(), server


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", help="s3://bucket/prefix to use (default: a local server)")
    parser.add_argument("--endpoint", help="S3 endpoint URL, for S3-compatible stores")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--options", help=argparse.SUPPRESS)
    parser.add_argument("--kill-after", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(train(args.child, json.loads(args.options), args.kill_after)))
        return 0

    server = None
    options: dict = {}
    endpoint = args.endpoint
    url = args.url
    if url is None:
        endpoint, server = local_s3()
        options = {"key": "testing", "secret": "testing"}
        import boto3

        bucket = f"ckpt-demo-{uuid.uuid4().hex[:8]}"
        boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="testing",
                     aws_secret_access_key="testing",
                     region_name="us-east-1").create_bucket(Bucket=bucket)  # fmt: skip
        url = f"s3://{bucket}/demo"
    if endpoint:
        options["client_kwargs"] = {"endpoint_url": endpoint, "region_name": "us-east-1"}
    run = uuid.uuid4().hex[:8]
    try:
        print(f"checkpoints go to {url} ({endpoint or 'AWS'})")
        began = time.perf_counter()
        straight = child(f"{url}/{run}-straight", options, None)
        print("1) uninterrupted run done")
        assert child(f"{url}/{run}-resumed", options, 13) is None, "the run was not killed"
        print("2) run killed after step 13")
        resumed = child(f"{url}/{run}-resumed", options, None)
        print(f"3) resumed in a new process ({time.perf_counter() - began:.1f} s in all)")
    finally:
        if server is not None:
            server.kill()
    assert straight is not None and resumed is not None
    print(f"uninterrupted: {straight['hash']}  resumed: {resumed['hash']}")
    same = straight == resumed
    print("IDENTICAL" if same else "MISMATCH")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
