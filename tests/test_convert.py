"""Export to Hugging Face safetensors and import from torch.save, Lightning, HF Trainer and DCP.

Every round trip is checked against torch's own path: the exported file loaded
with ``safetensors.torch.load_file`` into ``load_state_dict``, the imported
checkpoint restored with ``CheckpointManager.restore`` into fresh live objects,
bit for bit (``assert_same_state``: dtype, device, ``torch.equal``).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import pickle
import struct
import warnings
from typing import Any

import pytest
import torch
from conftest import assert_same_state
from helpers import ManySmall, small_model, train_steps, write_sharded_checkpoint
from safetensors.torch import load_file, save_file
from torch import nn

import ckpt
from ckpt.convert.cli import add_export_parser, add_import_parser, split_step
from ckpt.format import step_dir_name
from ckpt.storage import open_storage


def _header_keys(path: os.PathLike[str] | str) -> list[str]:
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
    assert header.pop("__metadata__") == {"format": "pt"}
    return list(header)


def _trained(seed: int = 0) -> tuple[nn.Module, torch.optim.Optimizer, Any]:
    model = small_model(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1, weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)
    train_steps(model, optimizer, 3)
    for _ in range(3):
        scheduler.step()
    return model, optimizer, scheduler


def _fresh() -> tuple[nn.Module, torch.optim.Optimizer, Any]:
    model = small_model(seed=9)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1, weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)
    return model, optimizer, scheduler


def _restore_matches(root: Any, source: tuple[nn.Module, Any, Any], **restore: Any) -> Any:
    model, optimizer, scheduler = source
    live = _fresh()
    assert not torch.equal(live[0][0].weight, model[0].weight)  # differs before
    with ckpt.CheckpointManager(root) as mgr:
        info = mgr.restore(model=live[0], optimizer=live[1], scheduler=live[2], **restore)
    assert_same_state(live[0].state_dict(), model.state_dict(), "model")
    assert_same_state(live[1].state_dict(), optimizer.state_dict(), "optimizer")
    assert_same_state(live[2].state_dict(), scheduler.state_dict(), "scheduler")
    return info


# ---------------------------------------------------------------------- export


@pytest.mark.parametrize("make", [small_model, ManySmall], ids=["mlp", "packed"])
def test_export_single_file_loads_into_the_model_bit_for_bit(tmp_path, make):
    model = make()
    with ckpt.CheckpointManager(tmp_path / "run") as mgr:
        mgr.save(5, model=model)
    written = ckpt.export(tmp_path / "run", tmp_path / "hf")
    assert written == [str(tmp_path / "hf" / "model.safetensors")]
    assert _header_keys(written[0]) == list(model.state_dict())
    fresh = make(seed=3)
    fresh.load_state_dict(load_file(written[0]))
    assert_same_state(fresh.state_dict(), model.state_dict())


def test_export_shards_follow_the_hub_layout(tmp_path):
    model = ManySmall()
    with ckpt.CheckpointManager(tmp_path / "run") as mgr:
        mgr.save(1, model=model)
    written = ckpt.export(tmp_path / "run", tmp_path / "hf", max_shard_size=1000)
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    shards = sorted({*index["weight_map"].values()})
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert written == [str(tmp_path / "hf" / s) for s in shards] + [
        str(tmp_path / "hf" / "model.safetensors.index.json")
    ]
    assert list(index["weight_map"]) == list(model.state_dict())
    assert index["metadata"]["total_size"] == sum(t.nbytes for t in model.state_dict().values())
    loaded: dict[str, torch.Tensor] = {}
    for s in shards:
        part = load_file(tmp_path / "hf" / s)
        assert sum(t.nbytes for t in part.values()) <= 1000
        assert all(index["weight_map"][k] == s for k in part)
        loaded.update(part)
    fresh = ManySmall(seed=4)
    fresh.load_state_dict(loaded)
    assert_same_state(fresh.state_dict(), model.state_dict())


@pytest.mark.parametrize(
    ("dtype", "torch_dtype"), [("bf16", torch.bfloat16), ("fp16", torch.float16)]
)
def test_export_casts_floating_tensors_only(tmp_path, dtype, torch_dtype):
    model = small_model()
    train_steps(model, torch.optim.SGD(model.parameters(), lr=0.1), 2)
    with ckpt.CheckpointManager(tmp_path / "run") as mgr:
        mgr.save(1, model=model)
    (path,) = ckpt.export(tmp_path / "run", tmp_path / "hf", dtype=dtype)
    loaded = load_file(path)
    for key, t in model.state_dict().items():
        expected = t.to(torch_dtype) if t.is_floating_point() else t
        assert_same_state(loaded[key], expected, key)
    assert loaded["1.num_batches_tracked"].dtype == torch.int64


class Tied(nn.Module):
    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Embedding(7, 4)
        self.body = nn.Linear(4, 4)
        self.head = nn.Linear(4, 7, bias=False)
        self.head.weight = self.embed.weight


def test_export_writes_tied_weights_once_under_the_first_name(tmp_path):
    model = Tied()
    with ckpt.CheckpointManager(tmp_path / "run") as mgr:
        mgr.save(1, model=model)
    (path,) = ckpt.export(tmp_path / "run", tmp_path / "hf")
    assert _header_keys(path) == ["embed.weight", "body.weight", "body.bias"]
    fresh = Tied(seed=5)  # ties itself, as transformers re-ties after loading
    result = fresh.load_state_dict(load_file(path), strict=False)
    assert result.missing_keys == ["head.weight"] and not result.unexpected_keys
    assert fresh.head.weight is fresh.embed.weight
    assert_same_state(fresh.state_dict(), model.state_dict())


def test_export_of_a_sharded_v3_checkpoint_consolidates_full_tensors(tmp_path):
    state = {"w": torch.randn(7, 3), "b": torch.arange(5.0), "n": torch.tensor(4)}
    write_sharded_checkpoint(open_storage(str(tmp_path / "run")), step_dir_name(2), state, step=2)
    (path,) = ckpt.export(tmp_path / "run", tmp_path / "hf")
    assert _header_keys(path) == ["w", "b", "n"]
    assert_same_state(dict(load_file(path)), state)


def on_ranks_save_fsdp(rank: int, world: int, root: str) -> dict[str, torch.Tensor]:
    """Train an FSDP2 model two steps on the ranks, save it (format v3), return its full state."""
    from dist_training import full_model_state, make, train_step

    model, optimizer, scheduler = make("fsdp")
    for step in range(2):
        train_step(model, optimizer, scheduler, step)
    with ckpt.CheckpointManager(root) as mgr:
        mgr.save(1, model=model, optimizer=optimizer)
    return full_model_state(model)


@pytest.mark.distributed
def test_export_of_an_fsdp_checkpoint_saved_by_two_ranks(rank_pool, tmp_path):
    full = rank_pool.run(on_ranks_save_fsdp, str(tmp_path / "run"))[0]
    (path,) = ckpt.export(tmp_path / "run", tmp_path / "hf")
    assert _header_keys(path) == list(full)
    assert_same_state(dict(load_file(path)), full)


def test_export_pt_format_is_a_plain_state_dict(tmp_path):
    model = small_model()
    with ckpt.CheckpointManager(tmp_path / "run") as mgr:
        mgr.save(1, model=model)
        mgr.save(2, model=small_model(seed=1))
    (path,) = ckpt.export(f"{tmp_path / 'run'}", tmp_path / "pt", step=1, format="pt")
    assert os.path.basename(path) == "pytorch_model.bin"
    assert_same_state(torch.load(path, weights_only=True), dict(model.state_dict()))


@pytest.mark.parametrize("wrap", ["compile", "dataparallel", "both"])
def test_export_of_a_wrapped_model_loads_into_the_bare_model_bit_for_bit(tmp_path, wrap):
    model = small_model()
    wrapped: nn.Module = model
    if wrap in ("dataparallel", "both"):
        wrapped = nn.DataParallel(wrapped)  # no GPUs: a plain wrapper, keys "module."
    if wrap in ("compile", "both"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit, imported by dynamo
            wrapped = torch.compile(wrapped)  # keys "_orig_mod."; nothing compiled until called
    assert all(k != k.split(".", 1)[1] for k in wrapped.state_dict())
    with ckpt.CheckpointManager(tmp_path / "run") as mgr:
        mgr.save(1, model=wrapped)
    for fmt in ("safetensors", "pt"):
        (path,) = ckpt.export(tmp_path / "run", tmp_path / fmt, format=fmt)
        loaded = load_file(path) if fmt == "safetensors" else torch.load(path, weights_only=True)
        assert list(loaded) == list(model.state_dict())
        bare = small_model(seed=4)
        bare.load_state_dict(loaded, strict=True)
        assert_same_state(bare.state_dict(), model.state_dict())
    (kept,) = ckpt.export(tmp_path / "run", tmp_path / "kept", strip_prefixes=False)
    assert _header_keys(kept) == list(wrapped.state_dict())


def test_export_pt_keeps_tied_names_in_state_dict_order(tmp_path):
    model = Tied()
    with ckpt.CheckpointManager(tmp_path / "run") as mgr:
        mgr.save(1, model=model)
    (path,) = ckpt.export(tmp_path / "run", tmp_path / "pt", format="pt")
    loaded = torch.load(path, weights_only=True)
    assert list(loaded) == list(model.state_dict())
    assert loaded["head.weight"].data_ptr() == loaded["embed.weight"].data_ptr()
    fresh = Tied(seed=5)
    fresh.load_state_dict(loaded)
    assert_same_state(fresh.state_dict(), model.state_dict())


@pytest.mark.parametrize("where", ["the step", "the root", "another root", "a step of another"])
def test_export_refuses_a_destination_inside_a_checkpoint(tmp_path, where):
    from helpers import bounded, fingerprint

    with ckpt.CheckpointManager(tmp_path / "run") as mgr:
        info = mgr.save(1, model=small_model())
    with ckpt.CheckpointManager(tmp_path / "other") as mgr:
        other = mgr.save(3, model=small_model())
    out = {
        "the step": pathlib.Path(info.path),
        "the root": tmp_path / "run" / "hf",
        "another root": tmp_path / "other",
        "a step of another": pathlib.Path(other.path) / "x",
    }[where]
    before = fingerprint(tmp_path)
    with bounded(20), pytest.raises(ckpt.CheckpointWriteError, match="inside"):
        ckpt.export(tmp_path / "run", out)
    assert fingerprint(tmp_path) == before
    assert _main(["export", str(tmp_path / "run"), str(out)]) == 1
    assert fingerprint(tmp_path) == before


def test_export_refuses_keys_that_collide_without_prefixes(tmp_path):
    state = {"module.w": torch.ones(2), "module._orig_mod.w": torch.zeros(2)}
    with ckpt.CheckpointManager(tmp_path / "run") as mgr:
        mgr.save(1, model=state)
    with pytest.raises(ckpt.IncompatibleCheckpointError, match="keep-prefixes"):
        ckpt.export(tmp_path / "run", tmp_path / "hf")


def test_export_of_a_corrupt_checkpoint_leaves_nothing(tmp_path):
    with ckpt.CheckpointManager(tmp_path / "run") as mgr:
        info = mgr.save(1, model=small_model(), rng=False)
    (name,) = [n for n in os.listdir(info.path) if n.endswith(".safetensors")]
    data = bytearray((pathlib.Path(info.path) / name).read_bytes())
    data[-3] ^= 0xFF
    (pathlib.Path(info.path) / name).write_bytes(bytes(data))
    with pytest.raises(ckpt.CorruptCheckpointError, match="checksum"):
        ckpt.export(tmp_path / "run", tmp_path / "hf")
    assert os.listdir(tmp_path / "hf") == []


def test_export_refuses_what_is_not_a_module_and_what_is_missing(tmp_path):
    model, optimizer, _ = _trained()
    with ckpt.CheckpointManager(tmp_path / "run") as mgr:
        mgr.save(1, model=model, optimizer=optimizer)
    with pytest.raises(ckpt.IncompatibleCheckpointError, match="optimizer"):
        ckpt.export(tmp_path / "run", tmp_path / "hf", item="optimizer")
    with pytest.raises(ckpt.CheckpointNotFoundError, match="no item 'net'"):
        ckpt.export(tmp_path / "run", tmp_path / "hf", item="net")
    with pytest.raises(ckpt.CheckpointNotFoundError):
        ckpt.export(tmp_path / "typo", tmp_path / "out")
    assert not (tmp_path / "typo").exists() and not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match="dtype"):
        ckpt.export(tmp_path / "run", tmp_path / "hf", dtype="int8")
    with pytest.raises(ValueError, match="max_shard_size"):
        ckpt.export(tmp_path / "run", tmp_path / "hf", max_shard_size="5 parsecs")


# ---------------------------------------------------------------------- import


@pytest.mark.parametrize(
    ("model_key", "optimizer_key", "scheduler_key"),
    [
        ("net", "optimizer", "scheduler"),
        ("model", "optimizer_state_dict", "lr_scheduler"),
        ("state_dict", "optimizer", "scheduler"),
        ("model_state_dict", "optimizer_state_dict", "scheduler"),
    ],
)
def test_import_classic_torch_save_restores_exactly(
    tmp_path, model_key, optimizer_key, scheduler_key
):
    source = _trained()
    model, optimizer, scheduler = source
    src = tmp_path / "epoch_7.pt"
    torch.save(
        {
            model_key: model.state_dict(),
            optimizer_key: optimizer.state_dict(),
            scheduler_key: scheduler.state_dict(),
            "epoch": 7,
            "best_acc": 0.91,
            "args": {"lr": 0.1, "name": "run"},
        },
        src,
    )
    report = ckpt.import_checkpoint(src, tmp_path / "run")
    assert report.step == 7 and report.epoch == 7 and report.layout == "torch.save"
    assert report.items == {
        "model": "module",
        "optimizer": "optimizer",
        "scheduler": "stateful",
        "extra": "dict",
    }
    assert report.extra == ("best_acc", "args") and not report.dropped
    info = _restore_matches(tmp_path / "run", source)
    assert info.step == 7 and info.epoch == 7
    extra: dict[str, Any] = {}
    with ckpt.CheckpointManager(tmp_path / "run") as mgr:
        mgr.restore(extra=extra)
    assert extra == {"best_acc": 0.91, "args": {"lr": 0.1, "name": "run"}}


def test_import_bare_state_dict_and_explicit_step(tmp_path):
    model = small_model()
    torch.save(model.state_dict(), tmp_path / "weights.pt")
    report = ckpt.import_checkpoint(tmp_path / "weights.pt", tmp_path / "run", step=12)
    assert (
        report.layout == "state dict" and report.step == 12 and report.items == {"model": "module"}
    )
    fresh = small_model(seed=4)
    with ckpt.CheckpointManager(tmp_path / "run") as mgr:
        mgr.restore(model=fresh)
    assert_same_state(fresh.state_dict(), model.state_dict())
    with pytest.raises(ckpt.CheckpointExistsError):
        ckpt.import_checkpoint(tmp_path / "weights.pt", tmp_path / "run", step=12)


def test_import_lightning_layout_restores_and_keeps_the_rest(tmp_path):
    source = _trained()
    model, optimizer, scheduler = source
    torch.save(
        {
            "epoch": 3,
            "global_step": 120,
            "pytorch-lightning_version": "2.4.0",
            "state_dict": model.state_dict(),
            "loops": {"fit_loop": {"epoch_progress": {"total": {"ready": 4}}}},
            "callbacks": {"ModelCheckpoint{'monitor': None}": {"best_model_score": None}},
            "optimizer_states": [optimizer.state_dict()],
            "lr_schedulers": [scheduler.state_dict()],
            "hyper_parameters": {"lr": 0.1},
            "odd": torch.Size([2, 3]),
        },
        tmp_path / "last.ckpt",
    )
    report = ckpt.import_checkpoint(tmp_path / "last.ckpt", tmp_path / "run")
    assert report.layout == "lightning" and report.step == 120 and report.epoch == 3
    assert set(report.extra) == {
        "pytorch-lightning_version",
        "loops",
        "callbacks",
        "hyper_parameters",
    }
    assert set(report.dropped) == {"odd"}  # a torch.Size is not plain data: reported
    info = _restore_matches(tmp_path / "run", source)
    assert info.step == 120 and info.epoch == 3


def test_import_hf_trainer_directory(tmp_path):
    import random

    source = _trained()
    model, optimizer, _ = source
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 / (1 + s))
    scheduler.step()
    src = tmp_path / "checkpoint-500"
    src.mkdir()
    save_file(dict(model.state_dict()), src / "model.safetensors", metadata={"format": "pt"})
    torch.save(optimizer.state_dict(), src / "optimizer.pt")
    torch.save(scheduler.state_dict(), src / "scheduler.pt")
    torch.save({"python": random.getstate(), "cpu": torch.get_rng_state()}, src / "rng_state.pth")
    marker = tmp_path / "args-unpickled"
    with open(src / "training_args.bin", "wb") as f:
        pickle.dump(_Payload(str(marker)), f)
    (src / "trainer_state.json").write_text(json.dumps({"global_step": 500, "epoch": 2.0}))
    (src / "config.json").write_text(json.dumps({"hidden_size": 5}))
    report = ckpt.import_checkpoint(src, tmp_path / "run")
    assert report.layout == "hf-trainer" and report.step == 500 and report.epoch == 2
    assert report.mapped["model.safetensors"] == "model"
    assert "training_args.bin" in report.dropped and not marker.exists()
    assert {"trainer_state.json", "config.json", "rng_state.pth"} <= set(report.extra)
    live = _fresh()
    live_scheduler = torch.optim.lr_scheduler.LambdaLR(live[1], lambda s: 1.0 / (1 + s))
    with ckpt.CheckpointManager(tmp_path / "run") as mgr:
        mgr.restore(model=live[0], optimizer=live[1], scheduler=live_scheduler)
    assert_same_state(live[0].state_dict(), model.state_dict())
    assert_same_state(live[1].state_dict(), optimizer.state_dict())
    assert_same_state(live_scheduler.state_dict(), scheduler.state_dict())


def test_hf_trainer_migration_with_tied_weights_restores_bit_for_bit(tmp_path):
    """docs/migrating.md's Trainer path, on a model whose head is tied to its embedding."""
    model = Tied()
    decay = [p for n, p in model.named_parameters() if n.endswith("weight")]
    no_decay = [p for n, p in model.named_parameters() if not n.endswith("weight")]
    groups = [{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 / (1 + s))
    for _ in range(2):
        loss = model.head(model.body(model.embed(torch.tensor([1, 2])))).square().sum()
        loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
    src = tmp_path / "checkpoint-2"
    src.mkdir()
    state = {k: v for k, v in model.state_dict().items() if k != "head.weight"}
    save_file(state, src / "model.safetensors", metadata={"format": "pt"})  # as save_pretrained
    torch.save(optimizer.state_dict(), src / "optimizer.pt")
    torch.save(scheduler.state_dict(), src / "scheduler.pt")
    (src / "trainer_state.json").write_text(json.dumps({"global_step": 2, "epoch": 1.0}))
    assert ckpt.import_checkpoint(src, tmp_path / "run").step == 2
    # the documented restore: build the model (it ties itself), the same groups, strict=False
    live = Tied(seed=5)
    decay = [p for n, p in live.named_parameters() if n.endswith("weight")]
    no_decay = [p for n, p in live.named_parameters() if not n.endswith("weight")]
    live_opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}],
        lr=0.1,
    )
    live_sched = torch.optim.lr_scheduler.LambdaLR(live_opt, lambda s: 1.0 / (1 + s))
    with ckpt.CheckpointManager(tmp_path / "run") as mgr:
        mgr.restore(model=live, optimizer=live_opt, scheduler=live_sched, strict=False)
    assert live.head.weight is live.embed.weight
    assert_same_state(live.state_dict(), model.state_dict())
    assert_same_state(live_opt.state_dict(), optimizer.state_dict())
    assert_same_state(live_sched.state_dict(), scheduler.state_dict())


def test_import_accelerate_save_state_directory(tmp_path):
    """The files Accelerate's save_state writes (accelerate is not installed: written alike)."""
    import random

    source = _trained()
    model, optimizer, scheduler = source
    second = small_model(seed=3)
    second_opt = torch.optim.SGD(second.parameters(), lr=0.1, momentum=0.9)
    train_steps(second, second_opt, 1)
    src = tmp_path / "checkpoint_4"
    src.mkdir()
    save_file(dict(model.state_dict()), src / "model.safetensors", metadata={"format": "pt"})
    save_file(dict(second.state_dict()), src / "model_1.safetensors", metadata={"format": "pt"})
    torch.save(optimizer.state_dict(), src / "optimizer.bin")
    torch.save(second_opt.state_dict(), src / "optimizer_1.bin")
    torch.save(scheduler.state_dict(), src / "scheduler.bin")
    torch.save({"step": 4, "random_state": random.getstate()}, src / "random_states_0.pkl")
    report = ckpt.import_checkpoint(src, tmp_path / "run", step=4)
    assert report.layout == "accelerate" and report.step == 4
    assert report.items == {
        "model": "module",
        "model_1": "module",
        "optimizer": "optimizer",
        "optimizer_1": "optimizer",
        "scheduler": "stateful",
        "extra": "dict",
    }
    assert "random_states_0.pkl" in report.extra
    _restore_matches(tmp_path / "run", source)
    live = small_model(seed=8)
    live_opt = torch.optim.SGD(live.parameters(), lr=0.1, momentum=0.9)
    with ckpt.CheckpointManager(tmp_path / "run") as mgr:
        mgr.restore(model_1=live, optimizer_1=live_opt)
    assert_same_state(live.state_dict(), second.state_dict())
    assert_same_state(live_opt.state_dict(), second_opt.state_dict())


def test_import_dcp_directory(tmp_path):
    import torch.distributed.checkpoint as dcp

    source = _trained()
    model, optimizer, scheduler = source
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "assuming the intent is to save in a single process"
        dcp.save(
            {
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "epoch": 4,
            },
            checkpoint_id=str(tmp_path / "dcp"),
        )
    report = ckpt.import_checkpoint(tmp_path / "dcp", tmp_path / "run")
    assert report.layout == "dcp" and report.step == 4 and not report.dropped
    _restore_matches(tmp_path / "run", source)


def test_import_dcp_with_optimizer_state_keyed_by_parameter_name(tmp_path):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model = small_model()
    optimizer = torch.optim.Adam(model.parameters())
    train_steps(model, optimizer, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no process group: "assuming ... a single process"
        model_state, optimizer_state = get_state_dict(model, optimizer)
        assert next(iter(optimizer_state["state"])) == "0.weight"
        dcp.save(
            {"model": model_state, "optim": optimizer_state}, checkpoint_id=str(tmp_path / "d")
        )
    report = ckpt.import_checkpoint(tmp_path / "d", tmp_path / "run")
    assert report.items == {"model": "module", "optimizer": "optimizer"}
    live_model = small_model(seed=5)
    live_optimizer = torch.optim.Adam(live_model.parameters())
    with ckpt.CheckpointManager(tmp_path / "run") as mgr:
        mgr.restore(model=live_model, optimizer=live_optimizer)
    assert_same_state(live_model.state_dict(), model.state_dict())
    assert_same_state(live_optimizer.state_dict(), optimizer.state_dict())


class _Payload:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self) -> Any:
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


def test_import_refuses_a_pickle_payload_without_running_it(tmp_path):
    marker = tmp_path / "pwned"
    torch.save(
        {"model": small_model().state_dict(), "x": _Payload(str(marker))}, tmp_path / "evil.pt"
    )
    with pytest.raises(ckpt.CorruptCheckpointError, match="weights_only") as e:
        ckpt.import_checkpoint(tmp_path / "evil.pt", tmp_path / "run")
    assert "evil.pt" in str(e.value)
    assert not marker.exists() and not (tmp_path / "run").exists()


@pytest.mark.parametrize("damage", ["index twice", "state without a group"])
def test_import_refuses_a_malformed_optimizer_state_and_commits_nothing(tmp_path, damage):
    """Found by test_import_fuzz: a flipped byte in a torch.save file gave an optimizer
    state that imported, committed, and then failed verify()."""
    model, optimizer, _ = _trained()
    state = optimizer.state_dict()
    if damage == "index twice":
        state["param_groups"][0]["params"][1] = state["param_groups"][0]["params"][0]
    else:
        state["state"][99] = state["state"][0]
    torch.save({"model": model.state_dict(), "optimizer": state}, tmp_path / "bad.pt")
    with pytest.raises(ckpt.CorruptCheckpointError, match="optimizer") as e:
        ckpt.import_checkpoint(tmp_path / "bad.pt", tmp_path / "run")
    assert e.value.path == str(tmp_path / "bad.pt") and e.value.key is not None
    assert not (tmp_path / "run").exists()


def test_import_refuses_dcp_metadata_naming_other_classes(tmp_path):
    marker = tmp_path / "pwned"
    (tmp_path / "dcp").mkdir()
    with open(tmp_path / "dcp" / ".metadata", "wb") as f:
        pickle.dump(_Payload(str(marker)), f)
    with pytest.raises(ckpt.CorruptCheckpointError, match=r"pathlib\.Path\.touch|refused"):
        ckpt.import_checkpoint(tmp_path / "dcp", tmp_path / "run")
    assert not marker.exists()


def test_import_of_nothing_importable_is_an_error(tmp_path):
    torch.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(ckpt.CheckpointError, match="nothing"):
        ckpt.import_checkpoint(tmp_path / "list.pt", tmp_path / "run")
    with pytest.raises(ckpt.CheckpointNotFoundError):
        ckpt.import_checkpoint(tmp_path / "missing.pt", tmp_path / "run")
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    with pytest.raises(ckpt.CorruptCheckpointError, match=r"junk\.pt"):
        ckpt.import_checkpoint(tmp_path / "junk.pt", tmp_path / "run")


# ------------------------------------------------------------------------- CLI


def _main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="ckpt")
    sub = parser.add_subparsers(required=True)
    add_export_parser(sub)
    add_import_parser(sub)
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:
        return int(e.code or 0)
    return int(args.func(args))


def test_cli_import_then_export(tmp_path, capsys):
    model = small_model()
    torch.save({"net": model.state_dict(), "epoch": 2}, tmp_path / "a.pt")
    assert _main(["import", str(tmp_path / "a.pt"), str(tmp_path / "run"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["step"] == 2 and report["items"] == {"model": "module"}
    out = tmp_path / "hf"
    assert _main(["export", f"{tmp_path / 'run'}:2", str(out), "--dtype", "bf16"]) == 0
    assert capsys.readouterr().out.strip() == str(out / "model.safetensors")
    assert load_file(out / "model.safetensors")["0.weight"].dtype == torch.bfloat16
    assert _main(["export", f"{tmp_path / 'run'}:3", str(out)]) == 1
    assert _main(["export", str(tmp_path / "run"), str(out), "--max-shard-size", "x"]) == 2
    assert _main(["export", str(tmp_path / "run")]) == 2
    assert _main(["import", str(tmp_path / "missing.pt"), str(tmp_path / "run")]) == 1
    assert "missing.pt" in capsys.readouterr().err


def test_split_step():
    assert split_step("runs/a:12") == ("runs/a", 12)
    assert split_step("runs/a") == ("runs/a", None)
    assert split_step("s3://bucket/run:3") == ("s3://bucket/run", 3)
    assert split_step("memory://run") == ("memory://run", None)
