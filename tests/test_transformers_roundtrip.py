"""Round trips through a real client: Hugging Face transformers.

Exports of a bare, a ``torch.compile``d and a ``DataParallel``-wrapped GPT-2 load
with ``from_pretrained`` bit for bit (single file, sharded, bf16); the HF Trainer
migration of docs/migrating.md restores model, optimizer and scheduler bit for bit.
Everything runs offline: no hub, no network.
"""

from __future__ import annotations

import copy
import json
import random
import types
import warnings
from collections.abc import Callable

import pytest
import torch
from conftest import assert_same_state
from torch import nn

import ckpt

transformers = pytest.importorskip("transformers")

# Importing torch.compile's machinery the first time warns about torch.jit.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated")


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


def _config() -> transformers.GPT2Config:
    return transformers.GPT2Config(
        n_layer=2,
        n_embd=32,
        n_head=2,
        vocab_size=100,
        n_positions=64,
        bos_token_id=0,
        eos_token_id=0,
    )


def _gpt2(seed: int) -> transformers.GPT2LMHeadModel:
    torch.manual_seed(seed)
    model = transformers.GPT2LMHeadModel(_config())
    assert model.lm_head.weight is model.transformer.wte.weight  # tied embeddings
    return model


def _compiled(model: nn.Module) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit, imported by dynamo
        return torch.compile(model)  # keys "_orig_mod."; nothing compiled until called


WRAPPERS: dict[str, Callable[[nn.Module], nn.Module]] = {
    "bare": lambda m: m,
    "compiled": _compiled,
    "data-parallel": nn.DataParallel,  # no GPUs: a plain wrapper, keys "module."
}
PREFIXES = {"bare": "transformer.", "compiled": "_orig_mod.", "data-parallel": "module."}


def _save(root, wrapped: nn.Module) -> None:
    with ckpt.CheckpointManager(root) as mgr:
        mgr.save(1, model=wrapped)


def _load(out, model: nn.Module, **kwargs) -> transformers.GPT2LMHeadModel:
    """``from_pretrained`` of ``out`` (with the model's config), checking nothing was left out."""
    model.config.save_pretrained(out)
    loaded, info = transformers.GPT2LMHeadModel.from_pretrained(
        out, output_loading_info=True, local_files_only=True, **kwargs
    )
    assert not info["missing_keys"], info
    assert not info["unexpected_keys"], info
    assert not info.get("mismatched_keys"), info
    assert not info.get("error_msgs"), info
    assert loaded.lm_head.weight is loaded.transformer.wte.weight  # re-tied on load
    return loaded


@pytest.mark.parametrize("wrap", list(WRAPPERS))
def test_export_loads_in_from_pretrained_bit_for_bit(tmp_path, wrap):
    model = _gpt2(seed=0)
    wrapped = WRAPPERS[wrap](model)
    assert all(k.startswith(PREFIXES[wrap]) for k in wrapped.state_dict() if "lm_head" not in k)
    _save(tmp_path / "run", wrapped)
    files = ckpt.export(tmp_path / "run", tmp_path / "hf")
    assert [p.rsplit("/", 1)[1] for p in files] == ["model.safetensors"]
    loaded = _load(tmp_path / "hf", model)
    assert_same_state(loaded.state_dict(), model.state_dict())


def test_sharded_export_of_a_compiled_model_loads_bit_for_bit(tmp_path):
    model = _gpt2(seed=1)
    _save(tmp_path / "run", _compiled(model))
    files = ckpt.export(tmp_path / "run", tmp_path / "hf", max_shard_size="20KB")
    assert files[-1].endswith("model.safetensors.index.json") and len(files) > 3
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    assert list(index["weight_map"]) == [k for k in model.state_dict() if k != "lm_head.weight"]
    loaded = _load(tmp_path / "hf", model)
    assert_same_state(loaded.state_dict(), model.state_dict())


def test_bf16_export_of_a_data_parallel_model_loads_bit_for_bit(tmp_path):
    from safetensors import safe_open

    model = _gpt2(seed=2)
    _save(tmp_path / "run", nn.DataParallel(model))
    (path,) = ckpt.export(tmp_path / "run", tmp_path / "hf", dtype="bf16")
    with safe_open(path, framework="pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}  # noqa: SIM118
    loaded = _load(tmp_path / "hf", model, dtype=torch.bfloat16)
    expected = {k: v.to(torch.bfloat16) for k, v in model.state_dict().items()}
    assert_same_state(loaded.state_dict(), expected)


def _trainer_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """The Trainer's two parameter groups, by its own rule (it uses no Trainer state)."""
    decay_names = set(transformers.Trainer.get_decay_parameter_names(None, model))
    named = list(model.named_parameters())  # a tied parameter once, as the Trainer sees it
    return [
        {"params": [p for n, p in named if n in decay_names], "weight_decay": weight_decay},
        {"params": [p for n, p in named if n not in decay_names], "weight_decay": 0.0},
    ]


def _trainer_objects(model: nn.Module):
    optimizer = torch.optim.AdamW(_trainer_groups(model, 0.01), lr=1e-2)
    scheduler = transformers.get_linear_schedule_with_warmup(optimizer, 1, 10)
    return optimizer, scheduler


def _write_trainer_checkpoint(src, model, optimizer, scheduler) -> None:
    """The files ``Trainer._save_checkpoint`` writes (the Trainer itself needs accelerate)."""
    import numpy as np

    model.save_pretrained(src)  # model.safetensors without lm_head.weight, config.json
    torch.save(optimizer.state_dict(), src / "optimizer.pt")
    torch.save(scheduler.state_dict(), src / "scheduler.pt")
    rng = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "cpu": torch.random.get_rng_state(),
    }
    torch.save(rng, src / "rng_state.pth")
    state = transformers.TrainerState(global_step=2, epoch=1.0, max_steps=10)
    state.save_to_json(str(src / "trainer_state.json"))
    # TrainingArguments needs accelerate to be pickled; any pickled object stands for it
    args = types.SimpleNamespace(output_dir=str(src.parent), weight_decay=0.01)
    torch.save(args, src / "training_args.bin")  # a pickle: never unpickled by the import


def _trained_and_imported(tmp_path):
    """A GPT-2 trained 2 steps the Trainer's way, its checkpoint-2 imported into ``run``."""
    model = _gpt2(seed=3)
    optimizer, scheduler = _trainer_objects(model)
    batch = torch.randint(0, 100, (2, 8), generator=torch.Generator().manual_seed(0))
    for _ in range(2):
        model(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
    src = tmp_path / "output" / "checkpoint-2"
    src.mkdir(parents=True)
    _write_trainer_checkpoint(src, model, optimizer, scheduler)
    report = ckpt.import_checkpoint(src, tmp_path / "run")
    return model, optimizer, scheduler, report


def test_hf_trainer_migration_restores_bit_for_bit(tmp_path):
    """docs/migrating.md's Trainer path, on a real transformers model with tied embeddings."""
    model, optimizer, scheduler, report = _trained_and_imported(tmp_path)
    assert (report.layout, report.step, report.epoch) == ("hf-trainer", 2, 1)
    assert report.items["model"] == "module" and report.items["optimizer"] == "optimizer"
    assert {"rng_state.pth", "training_args.bin"} <= set(report.dropped)
    # the documented restore: from_config (ties itself), the Trainer's groups, strict=False
    torch.manual_seed(7)
    live = transformers.AutoModelForCausalLM.from_config(_config())
    live_opt, live_sched = _trainer_objects(live)
    with ckpt.CheckpointManager(tmp_path / "run") as mgr:
        mgr.restore(model=live, optimizer=live_opt, scheduler=live_sched, strict=False)
    assert live.lm_head.weight is live.transformer.wte.weight
    assert_same_state(live.state_dict(), model.state_dict())
    assert_same_state(live_opt.state_dict(), optimizer.state_dict())
    assert_same_state(live_sched.state_dict(), scheduler.state_dict())


def test_hf_trainer_migration_with_other_groups_is_refused_untouched(tmp_path):
    """A split on names alone decays GPT-2's LayerNorm weights: refused, live objects kept."""
    _trained_and_imported(tmp_path)
    live = _gpt2(seed=7)
    rule = [n.endswith("weight") and "norm" not in n for n, _ in live.named_parameters()]
    params = [p for _, p in live.named_parameters()]
    groups = [
        {"params": [p for p, d in zip(params, rule, strict=True) if d], "weight_decay": 0.01},
        {"params": [p for p, d in zip(params, rule, strict=True) if not d], "weight_decay": 0.0},
    ]
    live_opt = torch.optim.AdamW(groups, lr=1e-2)
    before = (copy.deepcopy(live.state_dict()), copy.deepcopy(live_opt.state_dict()))
    with (
        ckpt.CheckpointManager(tmp_path / "run") as mgr,
        pytest.raises(ckpt.CheckpointError, match="group 0: checkpoint 10, optimizer 15") as err,
    ):
        mgr.restore(model=live, optimizer=live_opt, strict=False)
    assert err.value.key == "optimizer" and "manifest.json" in str(err.value)
    assert_same_state(live.state_dict(), before[0])
    assert_same_state(live_opt.state_dict(), before[1])
