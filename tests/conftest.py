"""Shared test helpers: exact state comparison and markers."""

from __future__ import annotations

import functools
import math
import multiprocessing
import time
from typing import Any

import pytest
import torch
from rank_pool import RankPool, run_fresh_ranks


def assert_same_state(a: Any, b: Any, path: str = "") -> None:
    """Assert two nested states are identical: types, keys and order, tensors bit for bit."""
    assert type(a) is type(b) or (isinstance(a, dict) and isinstance(b, dict)), (
        f"{path}: {type(a).__name__} != {type(b).__name__}"
    )
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype, f"{path}: dtype {a.dtype} != {b.dtype}"
        assert a.device == b.device, f"{path}: device {a.device} != {b.device}"
        assert a.shape == b.shape, f"{path}: shape {a.shape} != {b.shape}"
        if a.device.type != "meta":
            assert torch.equal(a.cpu(), b.cpu()) or (
                a.is_floating_point()
                and torch.equal(torch.isnan(a).cpu(), torch.isnan(b).cpu())
                and torch.equal(a.nan_to_num().cpu(), b.nan_to_num().cpu())
            ), f"{path}: values differ"
    elif isinstance(a, dict):
        assert list(a.keys()) == list(b.keys()), f"{path}: keys {list(a)} != {list(b)}"
        for k in a:
            assert_same_state(a[k], b[k], f"{path}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), f"{path}: length {len(a)} != {len(b)}"
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same_state(x, y, f"{path}[{i}]")
    elif isinstance(a, float) and math.isnan(a):
        assert math.isnan(b), f"{path}: nan != {b!r}"
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


def states_differ(a: Any, b: Any) -> bool:
    """Tell whether two states are not identical."""
    try:
        assert_same_state(a, b)
    except AssertionError:
        return True
    return False


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def forkserver():
    """The process's one fork server, with everything the trial workers import preloaded.

    Trials fork from it instead of starting an interpreter: torch is imported once.
    multiprocessing has a single fork server per process, so every test shares this one.
    """
    context = multiprocessing.get_context("forkserver")
    # torch._dynamo is imported lazily by the first optimizer: 1 s per trial if not preloaded.
    context.set_forkserver_preload(
        [
            "torch",
            "torch._dynamo",
            "torchdata.stateful_dataloader",
            "numpy",
            "ckpt",
            "kill_worker",
            "crash_worker",
            "torch.distributed",
            "torch.distributed.fsdp",
            "ckpt.distributed.saving",
            "ckpt.distributed.restoring",
            "rank_pool",
            "dist_training",
        ]
    )
    warm_up = context.Process(target=time.sleep, args=(0,))  # starts the server once
    warm_up.start()
    warm_up.join()
    return context


@pytest.fixture(scope="session")
def rank_pool(forkserver):
    """Two gloo ranks for the whole session (see rank_pool.py): ``rank_pool.run(fn, *args)``."""
    pool = RankPool(2, context=forkserver)
    yield pool
    pool.close()


@pytest.fixture
def fresh_ranks(forkserver):
    """``run_fresh_ranks`` forking from the session's fork server: new ranks for one function."""
    return functools.partial(run_fresh_ranks, context=forkserver)


@pytest.fixture(scope="session")
def s3_endpoint():
    """A moto S3 server on 127.0.0.1, for the whole session; nothing leaves loopback."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def s3_bucket(s3_endpoint, request):
    """A fresh bucket; returns (bucket name, storage_options for ckpt)."""
    import uuid

    import boto3

    name = f"ckpt-{uuid.uuid4().hex[:16]}"
    client = boto3.client(
        "s3",
        endpoint_url=s3_endpoint,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        region_name="us-east-1",
    )
    client.create_bucket(Bucket=name)
    options = {
        "key": "testing",
        "secret": "testing",
        "client_kwargs": {"endpoint_url": s3_endpoint, "region_name": "us-east-1"},
        "skip_instance_cache": True,
    }
    return name, options
