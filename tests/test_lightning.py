"""ckpt.integrations.lightning.CheckpointIO inside a real Lightning Trainer (CPU, a few steps)."""

from __future__ import annotations

import os
import pickle
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

L = pytest.importorskip("lightning")
from lightning.fabric.plugins import TorchCheckpointIO  # noqa: E402
from lightning.pytorch.callbacks import Callback, ModelCheckpoint  # noqa: E402
from lightning.pytorch.plugins.io import AsyncCheckpointIO  # noqa: E402

import ckpt  # noqa: E402
from ckpt.cli import main as cli_main  # noqa: E402
from ckpt.integrations.lightning import CheckpointIO  # noqa: E402

pytestmark = [  # Lightning's own warnings about this deliberately tiny setup
    pytest.mark.filterwarnings(r"ignore:.*isinstance\(treespec, LeafSpec\).* is deprecated"),
    pytest.mark.filterwarnings("ignore:The dirpath has changed from"),
    pytest.mark.filterwarnings("ignore:You're resuming from a checkpoint that ended before"),
]


class Tiny(L.LightningModule):
    def __init__(self, lr: float = 0.1, width: int = 4):
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(4, width), nn.Dropout(0.1), nn.Linear(width, 2))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = ((self.net(x) - y) ** 2).mean()
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> Any:
        opt = torch.optim.AdamW(self.parameters(), lr=self.hparams.lr)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
        return [opt], [{"scheduler": sched, "interval": "step"}]

    def train_dataloader(self) -> DataLoader[Any]:
        gen = torch.Generator().manual_seed(3)
        data = TensorDataset(torch.randn(32, 4, generator=gen), torch.randn(32, 2, generator=gen))
        return DataLoader(data, batch_size=4, shuffle=True, generator=gen)


class Restored(Callback):
    """Captures the state Lightning restored, at the start of training."""

    def __init__(self) -> None:
        self.state: dict[str, Any] = {}

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        opt = trainer.optimizers[0]
        self.state = {
            "model": {k: v.clone() for k, v in pl_module.state_dict().items()},
            "optimizer": _clone(opt.state_dict()),
            "scheduler": _clone(trainer.lr_scheduler_configs[0].scheduler.state_dict()),
            "global_step": trainer.global_step,
            "epoch": trainer.current_epoch,
            "rng": torch.get_rng_state(),
        }


def _clone(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.clone()
    if isinstance(value, dict):
        return {k: _clone(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_clone(v) for v in value)
    return value


def _assert_same(a: Any, b: Any, where: str = "") -> None:
    """Equal bit for bit: tensors by dtype, device and torch.equal; other values by ==."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor), where
        assert (a.dtype, a.device, a.shape) == (b.dtype, b.device, b.shape), where
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), (where, set(a) ^ set(b))
        for key in a:
            _assert_same(a[key], b[key], f"{where}/{key}")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_same(x, y, f"{where}/{i}")
    else:
        assert a == b, (where, a, b)


def _fit(root: Path, plugin: Any, max_steps: int, resume: str | None = None) -> tuple[Any, Any]:
    L.seed_everything(0, verbose=False)
    restored = Restored()
    checkpoints = ModelCheckpoint(
        dirpath=root,
        save_top_k=2,
        monitor="train_loss",
        save_last=True,
        every_n_train_steps=2,
    )
    trainer = L.Trainer(
        max_steps=max_steps,
        accelerator="cpu",
        devices=1,
        plugins=[plugin] if plugin is not None else None,
        callbacks=[checkpoints, restored],
        enable_progress_bar=False,
        enable_model_summary=False,
        logger=False,
        num_sanity_val_steps=0,
    )
    model = Tiny()
    trainer.fit(model, ckpt_path=resume)
    return trainer, restored


def _no_pickle(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("pickle or torch.save/torch.load called")

    for module, name in [(torch, "save"), (torch, "load"), (pickle, "dump"), (pickle, "dumps"),
                         (pickle, "load"), (pickle, "loads")]:  # fmt: skip
        monkeypatch.setattr(module, name, refuse)


class NoPickleIO(CheckpointIO):
    """The plugin, with pickle and torch.save/torch.load raising while it saves and loads."""

    calls = 0

    def save_checkpoint(self, *args: Any, **kwargs: Any) -> None:
        with pytest.MonkeyPatch.context() as patch:
            _no_pickle(patch)
            super().save_checkpoint(*args, **kwargs)
        NoPickleIO.calls += 1

    def load_checkpoint(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        with pytest.MonkeyPatch.context() as patch:
            _no_pickle(patch)
            state = super().load_checkpoint(*args, **kwargs)
        NoPickleIO.calls += 1
        return state


def _normalized(value: Any, root: str) -> Any:
    if isinstance(value, str):
        return value.replace(root, "<ROOT>")
    if isinstance(value, dict):
        return {_normalized(k, root): _normalized(v, root) for k, v in value.items()}
    if isinstance(value, list):
        return [_normalized(v, root) for v in value]
    return value


def test_fit_saves_top_k_and_last_without_pickle_and_resumes_as_torch_io_does(
    tmp_path: Path,
) -> None:
    torch_root, ckpt_root = tmp_path / "torch", tmp_path / "ckpt"
    _fit(torch_root, None, 6)
    _fit(ckpt_root, NoPickleIO(), 6)
    names = sorted(os.listdir(ckpt_root))
    assert names == sorted(os.listdir(torch_root))
    assert "last.ckpt" in names and len(names) == 3  # top 2 and last: the others were removed
    for name in names:
        assert (ckpt_root / name).is_dir()
        assert ckpt.CheckpointReader(ckpt_root / name).all_steps()

    # the dict loads the same as Lightning's own
    theirs = TorchCheckpointIO().load_checkpoint(torch_root / "last.ckpt", weights_only=False)
    ours = NoPickleIO().load_checkpoint(ckpt_root / "last.ckpt")
    _assert_same(
        _normalized(ours, str(ckpt_root)), _normalized(_plain(theirs), str(torch_root)), "ckpt"
    )

    # resuming restores the same state, bit for bit, and trains on identically
    trainer_t, restored_t = _fit(tmp_path / "torch2", None, 10, str(torch_root / "last.ckpt"))
    calls = NoPickleIO.calls
    trainer_c, restored_c = _fit(tmp_path / "ckpt2", NoPickleIO(), 10, str(ckpt_root / "last.ckpt"))
    assert NoPickleIO.calls > calls + 1  # it loaded, and saved again
    assert restored_c.state["global_step"] == restored_t.state["global_step"] == 6
    _assert_same(restored_c.state, restored_t.state, "restored")
    _assert_same(
        trainer_c.lightning_module.state_dict(), trainer_t.lightning_module.state_dict(), "final"
    )


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def test_async_checkpoint_io_wraps_it(tmp_path: Path) -> None:
    _fit(tmp_path / "a", AsyncCheckpointIO(CheckpointIO()), 4)
    state = CheckpointIO().load_checkpoint(tmp_path / "a" / "last.ckpt")
    assert state["global_step"] == 4 and "state_dict" in state


def test_a_value_pickle_would_need_fails_at_save_with_its_key_path(tmp_path: Path) -> None:
    io = CheckpointIO()
    good = {"global_step": 1, "state_dict": {"w": torch.ones(2)}}
    io.save_checkpoint(good, tmp_path / "x.ckpt")
    bad = {"global_step": 2, "hyper_parameters": {"thing": object()}}
    with pytest.raises(TypeError, match=r"hyper_parameters.*ignore=") as info:
        io.save_checkpoint(bad, tmp_path / "x.ckpt")
    assert "thing" in str(info.value)
    _assert_same(io.load_checkpoint(tmp_path / "x.ckpt"), good)  # the earlier one is intact
    io.remove_checkpoint(tmp_path / "x.ckpt")
    assert not (tmp_path / "x.ckpt").exists()
    io.remove_checkpoint(tmp_path / "x.ckpt")  # already gone: fine
    with pytest.raises(ckpt.CheckpointNotFoundError):
        io.load_checkpoint(tmp_path / "x.ckpt")
    TorchCheckpointIO().save_checkpoint(good, tmp_path / "torch.ckpt")
    with pytest.raises(ckpt.CheckpointNotFoundError, match="default CheckpointIO"):
        io.load_checkpoint(tmp_path / "torch.ckpt")


def test_the_ckpt_command_reads_it(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    CheckpointIO().save_checkpoint(
        {"global_step": 3, "state_dict": {"w": torch.ones(2)}, "epoch": 0}, tmp_path / "a.ckpt"
    )
    for command in ("ls", "info", "verify"):
        assert cli_main([command, str(tmp_path / "a.ckpt")]) == 0, command
    assert "lightning" in capsys.readouterr().out
    assert cli_main(["export", str(tmp_path / "a.ckpt"), str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "model.safetensors").is_file()


KILLED_SAVER = """
import sys, torch
from ckpt.integrations.lightning import CheckpointIO
io, path = CheckpointIO(), sys.argv[1]
for step in range(1, 10**6):
    weights = {f"layer{i}.weight": torch.full((256, 256), float(step)) for i in range(8)}
    io.save_checkpoint({"global_step": step, "epoch": 0, "state_dict": weights}, path)
    if step == 1:
        open(path + ".ready", "w").close()
"""


@pytest.mark.parametrize(
    "trials", [1, pytest.param(4, marks=pytest.mark.slow)], ids=["once", "four_times"]
)
def test_sigkill_during_saves_leaves_a_loadable_checkpoint(tmp_path: Path, trials: int) -> None:
    import random
    import signal
    import subprocess
    import time

    path = str(tmp_path / "last.ckpt")
    for trial in range(trials):
        child = subprocess.Popen([sys.executable, "-c", KILLED_SAVER, path])
        try:
            deadline = time.monotonic() + 120
            while not os.path.exists(path + ".ready"):
                assert child.poll() is None and time.monotonic() < deadline
                time.sleep(0.01)
            time.sleep(random.Random(trial).uniform(0.0, 0.5))  # somewhere in a later save
        finally:
            child.send_signal(signal.SIGKILL)
            child.wait()
        os.remove(path + ".ready")
        state = CheckpointIO().load_checkpoint(path)
        step = state["global_step"]
        assert step >= 1
        for tensor in state["state_dict"].values():
            assert torch.equal(tensor, torch.full((256, 256), float(step)))


def test_import_ckpt_does_not_import_lightning() -> None:
    import subprocess

    code = "import ckpt, sys; assert 'lightning' not in sys.modules, 'imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
