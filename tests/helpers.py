"""Small builders shared by tests."""

from __future__ import annotations

import contextlib
import copy
import hashlib
import itertools
import json
import math
import os
import signal
import stat
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

try:
    from hypothesis import strategies as st
except ImportError:  # bench/gpu_check.sh runs the cuda tests where hypothesis may be absent
    from unittest import mock

    st = mock.MagicMock()  # the strategies below are then inert; no cuda test uses them


def small_model(seed: int = 0, dtype: torch.dtype = torch.float32, bias: bool = True) -> nn.Module:
    """A deterministic two-layer MLP with a BatchNorm (buffers, metadata)."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(6, 5, bias=bias), nn.BatchNorm1d(5), nn.Tanh(), nn.Linear(5, 3, bias=bias)
    ).to(dtype)


def train_steps(model: nn.Module, opt: torch.optim.Optimizer, steps: int, seed: int = 1) -> None:
    """Run ``steps`` deterministic optimizer steps (with a closure, for LBFGS)."""
    gen = torch.Generator().manual_seed(seed)
    dtype = next(model.parameters()).dtype
    device = next(model.parameters()).device
    for _ in range(steps):
        x = torch.randn(8, 6, generator=gen).to(device, dtype)
        y = torch.randn(8, 3, generator=gen).to(device, dtype)

        def closure(x: torch.Tensor = x, y: torch.Tensor = y) -> torch.Tensor:
            opt.zero_grad()
            loss = ((model(x) - y) ** 2).mean()
            loss.backward()
            return loss

        opt.step(closure)


# Hypothesis strategies for nested training state with hostile keys.
HOSTILE_KEYS = ["a/b", "../x", "/abs", "%2F", "#0", "$tensor", "$dict", "", "\x00", "é", "0"]

keys = st.one_of(st.sampled_from(HOSTILE_KEYS), st.text(max_size=6), st.integers(-5, 2**70))
tensors = st.builds(
    lambda shape, dtype, seed: torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(
        dtype
    ),
    st.lists(st.integers(0, 3), max_size=3).map(tuple),
    st.sampled_from([torch.float32, torch.bfloat16, torch.int64, torch.bool, torch.float64]),
    st.integers(0, 1000),
)
leaves = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(),
    st.binary(max_size=8),
    st.sampled_from([torch.float16, torch.int8]),
    st.sampled_from([torch.device("cpu"), torch.device("cuda", 1)]),
    tensors,
)
trees = st.recursive(
    leaves,
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.lists(children, max_size=4).map(tuple),
        st.dictionaries(keys, children, max_size=4),
    ),
    max_leaves=20,
)


def write_manifest(path, doc: dict) -> None:
    """Write a hand-edited manifest with a valid checksum, as a buggy writer would."""
    import json

    from ckpt.format.checksums import hash_bytes

    doc = {k: v for k, v in doc.items() if k != "checksum"}
    body = json.dumps(doc, separators=(",", ":"))
    path.write_text(body[:-1] + f',"checksum":"{hash_bytes(body.encode())}"}}\n')


class ManySmall(nn.Module):
    """101 tiny layers: a model whose tensors, and its optimizer's, ckpt packs together."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        sizes = [6] + [4] * 100  # train_steps feeds 6 features and wants 3 out
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in itertools.pairwise(sizes))
        self.norm = nn.BatchNorm1d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return self.norm(x)[:, :3]


def trained_live_objects(
    seed: int = 2, build: Callable[[int], nn.Module] | None = None
) -> tuple[nn.Module, torch.optim.Optimizer]:
    """A model and an AdamW that has stepped, so a restore can load into existing state."""
    model = (build or small_model)(seed)
    optimizer = torch.optim.AdamW(model.parameters())
    train_steps(model, optimizer, 1, seed=seed)
    return model, optimizer


def snapshot(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[Any, Any]:
    """Deep copies of both states (tensors cloned), to compare against later."""
    return copy.deepcopy(model.state_dict()), copy.deepcopy(optimizer.state_dict())


Pair = tuple[nn.Module, torch.optim.Optimizer]


def restore_matches_torch(
    mgr: Any, saved: Pair, ours: Pair, ref: Pair, after_restore: Callable[[], None] | None = None
) -> None:
    """Restore ``ours`` through ckpt and ``ref`` through torch's ``load_state_dict`` from
    ``saved``'s states; both must be identical, and stay so for 2 more steps (which catches
    state on a wrong device or dtype)."""
    from conftest import assert_same_state

    mgr.restore(model=ours[0], optimizer=ours[1])
    if after_restore is not None:
        after_restore()
    ref[0].load_state_dict(saved[0].state_dict())
    ref[1].load_state_dict(saved[1].state_dict())
    for extra_steps in (0, 2):
        train_steps(*ours, extra_steps, seed=7)
        train_steps(*ref, extra_steps, seed=7)
        assert_same_state(ours[1].state_dict(), ref[1].state_dict())
        assert_same_state(ours[0].state_dict(), ref[0].state_dict())


def read_manifest_doc(path) -> dict:
    """Parse a manifest (plain or zlib-compressed JSON), to edit and reseal with write_manifest."""
    return _manifest_json(path.read_bytes())


def _manifest_json(raw: bytes) -> dict:
    import zlib

    return json.loads(zlib.decompress(raw) if raw[:1] == b"x" else raw)


# The content store of incremental roots (format versions 4 and 5), at any fsspec URL.


def manifest_doc(url: str, step: int, options: dict[str, Any] | None = None) -> dict:
    """The parsed manifest of step ``step`` of the root at ``url``."""
    import fsspec

    from ckpt.format.names import step_dir_name

    fs, path = fsspec.core.url_to_fs(url, **(options or {}))
    return _manifest_json(fs.cat_file(f"{path}/{step_dir_name(step)}/manifest.json"))


def blobs_on_disk(url: str, options: dict[str, Any] | None = None) -> set[str]:
    """The file names in the content store of the root at ``url``."""
    import fsspec

    from ckpt.format.blobs import BLOB_DIR

    fs, path = fsspec.core.url_to_fs(url, **(options or {}))
    if not fs.exists(f"{path}/{BLOB_DIR}"):
        return set()
    return {n.rsplit("/", 1)[-1] for n in fs.ls(f"{path}/{BLOB_DIR}", detail=False)}


def referenced_blobs(url: str, steps: list[int], options: dict[str, Any] | None = None) -> set[str]:
    """The blob file names the manifests of ``steps`` list."""
    from ckpt.format.blobs import blob_file_name

    docs = [manifest_doc(url, s, options) for s in steps]
    return {blob_file_name(k) for doc in docs for k in doc.get("blobs", {})}


# Checkpoints saved by several ranks (format version 3), written by hand.

ChunkSpec = list[tuple[tuple[int, ...], tuple[int, ...]]]
"""``[(offsets, sizes), ...]``: the chunks of one global tensor."""


def split_chunks(shape: tuple[int, ...], dim: int = 0, pieces: int = 3) -> ChunkSpec:
    """Uneven chunks of ``shape`` along ``dim`` (``torch.tensor_split``'s cuts); one if empty."""
    if not shape or math.prod(shape) == 0:
        return [((0,) * len(shape), tuple(shape))]
    chunks: ChunkSpec = []
    at = 0
    for part in torch.arange(shape[dim]).tensor_split(pieces):
        if len(part):
            offsets = tuple(at if d == dim else 0 for d in range(len(shape)))
            chunks.append(
                (offsets, tuple(len(part) if d == dim else n for d, n in enumerate(shape)))
            )
            at += len(part)
    return chunks


def write_sharded_checkpoint(
    storage: Any,
    directory: str,
    state: dict[str, Any],
    *,
    world_size: int = 2,
    chunks: dict[str, ChunkSpec] | None = None,
    rank_items: list[dict[str, Any]] | None = None,
    step: int = 0,
) -> Any:
    """Write a version 3 checkpoint as ``world_size`` ranks would, with no process group.

    Args:
        storage: A :class:`ckpt.storage.Storage`.
        directory: The checkpoint directory below its root (created).
        state: The sharded item ``"model"`` (kind ``module``): its full state, whose
            tensors are cut into chunks.
        world_size: Chunk ``i`` of every tensor goes to rank ``i % world_size``.
        chunks: ``{global tensor name ("model/w"): [(offsets, sizes), ...]}``; by
            default :func:`split_chunks` along dimension 0.
        rank_items: For each rank, ``{item name: plain dict}`` (kind ``dict``) it saves
            for itself; default ``{"own": {"rank": r, "t": torch.full((2,), r)}}``.
        step: The step in the manifest.

    Returns:
        The :class:`ckpt.format.Manifest` as written (``manifest.json`` last).
    """
    from ckpt.format import (
        ChunkRecord,
        GlobalTensorRecord,
        ItemRecord,
        Manifest,
        RankSection,
        ShardedSection,
        TensorRecord,
    )
    from ckpt.format.tensorfile import tensor_bytes
    from ckpt.io import chunk_checksum, data_offsets, write_checkpoint_files
    from ckpt.state.tree import flatten

    if rank_items is None:
        rank_items = [{"own": {"rank": r, "t": torch.full((2,), r)}} for r in range(world_size)]
    files: list[dict[str, torch.Tensor]] = [{} for _ in range(world_size)]
    names = [f"rank{r}.safetensors" for r in range(world_size)]
    tree, full = flatten(state, "model")
    placed: dict[str, list[tuple[tuple[int, ...], tuple[int, ...], int, str]]] = {}
    for name, tensor in full.items():
        spec = (chunks or {}).get(name) or split_chunks(tuple(tensor.shape))
        for i, (offsets, sizes) in enumerate(spec):
            rank = i % world_size
            key = f"{name}#{i}"
            region = tuple(slice(o, o + s) for o, s in zip(offsets, sizes, strict=True))
            files[rank][key] = tensor[region].contiguous()
            placed.setdefault(name, []).append((offsets, sizes, rank, key))
    ranks = []
    for r, items in enumerate(rank_items):
        records, item_records = {}, {}
        for item, value in items.items():
            item_tree, tensors = flatten(value, item)
            item_records[item] = ItemRecord("dict", item_tree)
            for tname, t in tensors.items():
                files[r][tname] = t
                records[tname] = TensorRecord(names[r], t.dtype, tuple(t.shape), "cpu")
        ranks.append(RankSection(records, item_records))
    begins = [data_offsets(f) for f in files]
    globals_ = {
        name: GlobalTensorRecord(
            full[name].dtype,
            tuple(full[name].shape),
            tuple(
                ChunkRecord(
                    offsets,
                    sizes,
                    names[r],
                    begins[r][key],
                    chunk_checksum(tensor_bytes(files[r][key])),
                )
                for offsets, sizes, r, key in spec
            ),
        )
        for name, spec in placed.items()
    }
    sharded_items = {"model": ItemRecord("module", tree)}
    section = ShardedSection(world_size, globals_, sharded_items, tuple(ranks))
    manifest = Manifest(
        step, None, {}, {}, {}, {**sharded_items, **ranks[0].items}, sharded=section
    )
    storage.makedirs(directory)
    return write_checkpoint_files(
        storage, directory, dict(zip(names, files, strict=True)), manifest
    )


def minimal_manifest_bytes(version: int = 1, file_size: int = 10, **changes: object) -> bytes:
    """The JSON of a one-tensor dict-item manifest (no checksum), with top-level ``changes``."""
    doc = {
        "format": "ckpt",
        "format_version": version,
        "step": 1,
        "epoch": None,
        "metrics": {},
        "files": {"data.safetensors": {"size": file_size}},
        "tensors": {
            "data/x": {
                "file": "data.safetensors",
                "dtype": "float32",
                "shape": [1],
                "device": "cpu",
            }
        },
        "items": {"data": {"kind": "dict", "state": {"x": {"$tensor": "data/x"}}}},
    }
    doc.update(changes)
    return json.dumps(doc).encode()


def call_outcome(call: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[Any, ...]:
    """``("ok", result)`` or ``(TypeName, message, fields)`` of one call; never raises.

    For functions run on ranks (rank_pool.py): report an expected error to the test
    instead of raising it. ``fields`` holds a CollectiveError's operation, rank, timeout.
    """
    try:
        return ("ok", call(*args, **kwargs))
    except Exception as e:
        fields = {k: getattr(e, k, None) for k in ("operation", "rank", "timeout")}
        return (type(e).__name__, str(e), fields)


def flat_tensors(state: Any) -> dict[str, torch.Tensor]:
    """``{key: tensor}`` of a state as ``read()`` returns it, keyed as ``iter_tensors`` keys it."""
    from ckpt.reading.describe import key_of
    from ckpt.state.tree import tensors_by_path

    return {key_of(path): t for path, t in tensors_by_path(state).items()}


SECONDS = 20
"""Any case taking longer is a hang (no case comes near it)."""


@contextlib.contextmanager
def bounded(seconds: int = SECONDS):
    """Fail with TimeoutError instead of hanging (a blocked open() is interrupted)."""

    def hang(signum, frame):
        raise TimeoutError(f"hung for {seconds} s")

    previous = signal.signal(signal.SIGALRM, hang)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def fingerprint(directory) -> dict[str, str]:
    """Type, mode and content hash of every entry below ``directory`` (links not followed)."""
    out = {}
    for base, dirs, files in os.walk(directory):
        for name in dirs + files:
            path = os.path.join(base, name)
            info = os.lstat(path)
            if stat.S_ISREG(info.st_mode):
                with open(path, "rb") as f:
                    digest = hashlib.sha256(f.read()).hexdigest()
            elif stat.S_ISLNK(info.st_mode):
                digest = "link:" + os.readlink(path)
            else:
                digest = stat.filemode(info.st_mode)
            out[os.path.relpath(path, directory)] = digest
    return out
